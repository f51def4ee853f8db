"""What the web app does with a request, as plain functions: decode, check the settings, plan and refuse before
queueing, run with the calls, metadata and output names of ``scripts/refine.py --mask`` (same inputs: same pixels).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.app.page import FIELD_LABELS, json_kind, page_words, start_range, t_window, window_message
from ldm.imageio import (
    ImageLoadError,
    LoadedImage,
    decode_image,
    header_size,
    image_to_tensor,
    save_image_atomic,
    tensor_to_image,
)
from ldm.imageio.errors import short_repr
from ldm.imageio.prompt import DEFAULT_GUIDANCE_SCALE, PROMPT_KEYS, Prompt, PromptError, check_prompt_text
from ldm.imageio.save import to_pil
from ldm.models.tiling import TilingConfig, downscaled_size, tile_starts
from ldm.refine.batch import build_metadata, output_name
from ldm.refine.conditioning import check_chain, is_text_conditioned, text_experts
from ldm.refine.refiner import Refiner
from ldm.refine.regions import (
    DEFAULT_MASK_BLUR,
    DEFAULT_REGION_PADDING,
    MAX_FEATHER,
    Box,
    RegionOptions,
    decode_mask,
    parse_box,
    region_crops,
    region_metadata,
)
from ldm.refine.request import DEFAULT_START_T, MAX_SEED, RefineRequest
from ldm.sampling import SAMPLERS, RefinePlan, build_plan
from ldm.util import LONGEST_ATOMIC_NAME, one_line
from ldm.windows import window_to_steps

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 64 * 2**20  # the server refuses a larger upload body before reading it all
MAX_UPLOAD_PIXELS = 2**25  # 33.5 MP (e.g. 7000x4700): more, read from the file's header, is refused before decoding
MAX_PARALLEL_DECODES = 2  # images and masks decoded at once (each takes ~16 bytes per pixel while it decodes)
MAX_SAMPLES = 8
MAX_STEPS = 1000
MAX_BOXES = 100  # boxes per request
MAX_REQUEST_STEPS = MAX_SAMPLES * MAX_STEPS  # samples x regions x steps: every whole-image request fits, 7 h do not
MAX_GUIDANCE_SCALE = 30.0  # the page's bound (SD is used at 5-12); the library takes any finite scale >= 0
MAX_STEP_SECONDS = 20.0  # estimated wall time of one sampling step: Cancel and Ctrl+C wait for the step in progress
MODES = ("whole", "mask", "crop")  # whole image / in place (only the mask changes) / crop ("only masked")
STEP_MODES = ("grid", "exact")  # the DDIM grid's entries <= start_t / exactly K steps from start_t
SOFTWARE = "latesteps app"
# the longest output stem: <stem>_t999_s4294967295_7.png must fit a name the file system takes with its temp suffix
MAX_STEM_BYTES = LONGEST_ATOMIC_NAME - len(output_name("", MAX_STEPS - 1, MAX_SEED, MAX_SAMPLES - 1))


class RequestError(ValueError):
    """A request the user can fix; ``str()`` is the one line the page shows."""


_decode_slots = threading.BoundedSemaphore(MAX_PARALLEL_DECODES)


@dataclass(frozen=True)
class Upload:
    """An uploaded image: the file's bytes (decoded again per request: float32 pixels take 16 bytes per pixel), a
    printable ``name``, the ``stem`` of output names, the decoded size (EXIF orientation applied) and ``png``, the image
    as the model sees it."""

    name: str
    stem: str
    data: bytes = field(repr=False)
    sha256: str
    width: int
    height: int
    format: str | None
    has_alpha: bool
    png: bytes = field(repr=False)

    def decode(self) -> LoadedImage:
        with _decode_slots:
            return decode_image(self.data, source=self.name)


def load_upload(data: bytes, name: str) -> Upload:
    """Decode an upload with the CLI's loader, to check it and make the PNG the page shows. RequestError for an
    unreadable image or one over :data:`MAX_UPLOAD_PIXELS` (read from its header, before decoding)."""
    shown = _base_name(name, "?")[:200] or "upload"
    size = header_size(data)
    if size is not None and size[0] * size[1] > MAX_UPLOAD_PIXELS:
        w, h = size
        raise RequestError(
            f"{shown} is {w}x{h} ({w * h / 1e6:.1f} MP); the app accepts images up to {MAX_UPLOAD_PIXELS:,} pixels "
            f"({MAX_UPLOAD_PIXELS / 1e6:.1f} MP, e.g. 7000x4700): downscale or crop it, or refine it with scripts/refine.py"
        )
    try:
        with _decode_slots:
            image = decode_image(data, source=shown)
            png = _display_png(image)
    except ImageLoadError as exc:
        raise RequestError(f"{exc} (upload a PNG, JPEG, WebP, AVIF, BMP, GIF, TIFF or PPM image)") from None
    return Upload(shown, output_stem(name), data, hashlib.sha256(data).hexdigest(), image.width, image.height,
                  image.info.get("format"), image.alpha is not None, png)  # fmt: skip


def _display_png(image: LoadedImage) -> bytes:
    """The image as a PNG, pixels as the model sees them (EXIF orientation applied, 16-bit rounded to 8), alpha kept."""
    buffer = io.BytesIO()
    to_pil(tensor_to_image(image_to_tensor(image.rgb)), image.alpha).save(buffer, format="PNG")
    return buffer.getvalue()


def load_painted_mask(data: bytes, upload: Upload) -> tuple[np.ndarray, str]:
    """The painted mask (a PNG of the image's size, white = refine) as ``([H, W] float32 in [0, 1], sha256)``, read
    like ``--mask`` files; RequestError when it cannot be decoded or has another size."""
    size = header_size(data)  # compared before decoding: a mask costs no more memory than its image
    if size is not None and size != (upload.width, upload.height):
        _wrong_mask_size(size, upload)
    try:
        with _decode_slots:
            mask, digest = decode_mask(data, "the painted mask")
    except ImageLoadError as exc:
        raise RequestError(page_words(str(exc))) from None
    if mask.shape != (upload.height, upload.width):
        _wrong_mask_size((mask.shape[1], mask.shape[0]), upload)
    return mask, digest


def _wrong_mask_size(size: tuple[int, int], upload: Upload) -> None:
    raise RequestError(
        f"the painted mask is {size[0]}x{size[1]} but the image is {upload.width}x{upload.height}; "
        "upload the image again and repaint"
    )


@dataclass(frozen=True)
class RefineSettings:
    """Everything the page lets a user choose (the CLI's flags of the same names; sample ``k`` uses seed ``seed + k``).
    ``step_mode`` ``"grid"``: ``steps`` is the DDIM grid size (``--ddim-steps``), ``"exact"``: exactly ``steps`` steps
    from ``start_t`` (``--tail-steps``).  ``mode``: ``"whole"`` image, ``"mask"`` (in place: only the painted mask and
    the boxes change) or ``"crop"`` (``--crop-regions``).  ``mask_blur``, ``mask_dilate``, ``region_padding``: pixels.
    """

    start_t: int = DEFAULT_START_T
    sampler: str = "ddim"
    step_mode: str = "grid"
    steps: int = 50
    seed: int = 0
    n_samples: int = 1
    mode: str = "mask"
    boxes: tuple[Box, ...] = field(default=())
    mask_blur: int = DEFAULT_MASK_BLUR
    mask_dilate: int = 0
    region_padding: int = DEFAULT_REGION_PADDING
    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE

    @classmethod
    def from_json(cls, data: Any, base: RefineSettings | None = None) -> RefineSettings:
        """Settings from the page's JSON object (missing keys take ``base``'s values); RequestError naming the first bad
        or unknown field by its label on the page."""
        base = cls() if base is None else base
        if not isinstance(data, Mapping):
            raise RequestError(f"settings must be a JSON object, got {json_kind(data)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError(f"unknown setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
        limits = {"start_t": (1, MAX_STEPS - 1), "steps": (1, MAX_STEPS), "seed": (0, MAX_SEED), "n_samples": (1, MAX_SAMPLES),
                  "mask_blur": (0, MAX_FEATHER), "mask_dilate": (0, MAX_FEATHER), "region_padding": (0, 4096)}  # fmt: skip
        values: dict[str, Any] = {}
        for name, (lo, hi) in limits.items():
            if name in data:
                values[name] = _int_field(name, data[name], lo, hi)
        for name, choices in (("sampler", SAMPLERS), ("step_mode", STEP_MODES), ("mode", MODES)):
            if name in data:
                if data[name] not in choices:
                    raise RequestError(f"{FIELD_LABELS[name]} {short_repr(data[name])} is not one of {', '.join(choices)}")
                values[name] = data[name]
        if "boxes" in data:
            values["boxes"] = parse_boxes(data["boxes"])
        for name in ("prompt", "negative_prompt"):
            if name in data:
                if not isinstance(data[name], str):
                    raise RequestError(f"{FIELD_LABELS[name]} must be text, got {json_kind(data[name])}")
                try:
                    values[name] = check_prompt_text(data[name], FIELD_LABELS[name])
                except PromptError as exc:
                    raise RequestError(str(exc)) from None
        if "guidance_scale" in data:
            scale = data["guidance_scale"]
            number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
            if not number or not 0 <= scale <= MAX_GUIDANCE_SCALE:  # NaN compares False
                raise RequestError(f"{FIELD_LABELS['guidance_scale']} must be a number from 0 to {MAX_GUIDANCE_SCALE:g} "
                                   f"(1 = no guidance), not {short_repr(scale)}")  # fmt: skip
            values["guidance_scale"] = float(scale)
        seed, n_samples = values.get("seed", base.seed), values.get("n_samples", base.n_samples)
        if seed + n_samples - 1 > MAX_SEED:  # sample k uses seed + k (as scripts/refine.py refuses it)
            raise RequestError(
                f"Seed {seed} with {n_samples} samples would use seeds up to {seed + n_samples - 1}; "
                f"the last seed (Seed + Samples - 1) must be at most {MAX_SEED}: lower the seed"
            )
        return replace(base, **values)

    def request(self, with_prompt: bool = False) -> RefineRequest:
        """These settings as the refinement request the CLI and the Python API build (eta 0: the page has no eta);
        ``with_prompt``: for text-conditioned experts, with the page's prompt, negative prompt and guidance scale."""
        prompt = Prompt(self.prompt, self.negative_prompt, self.guidance_scale) if with_prompt else None
        grid = self.step_mode == "grid"
        return RefineRequest(start_t=self.start_t, ddim_steps=self.steps if grid else None,
                             tail_steps=None if grid else self.steps, sampler=self.sampler, seed=self.seed,
                             n_samples=self.n_samples, regions=self.regions(), prompt=prompt)  # fmt: skip

    def regions(self) -> RegionOptions:
        boxes = self.boxes if self.mode != "whole" else ()
        return RegionOptions(boxes=boxes, blur=self.mask_blur, dilate=self.mask_dilate, crop=self.mode == "crop",
                             padding=self.region_padding)  # fmt: skip

    def parameters(self) -> dict[str, Any]:
        """The settings as the output metadata's ``parameters`` records them."""
        values = asdict(self)
        values["boxes"] = [b.describe() for b in self.boxes]
        return values


def parse_boxes(text: Any) -> tuple[Box, ...]:
    """Boxes from ``"x0,y0,x1,y1[@start_t]"`` lines (or ``;``-separated), blank ones skipped."""
    if not isinstance(text, str):
        raise RequestError(f"Boxes must be text (one x0,y0,x1,y1[@start_t] per line), got {json_kind(text)}")
    lines = [line for line in re.split(r"[;\n]", text) if line.strip()]
    if len(lines) > MAX_BOXES:
        raise RequestError(
            f"{len(lines):,} boxes given; at most {MAX_BOXES} are accepted: merge neighbouring boxes "
            "into one, or paint the region instead"
        )
    boxes = []
    for line in lines:
        try:
            boxes.append(parse_box(line))
        except ValueError as exc:
            raise RequestError(page_words(str(exc))) from None
    return tuple(boxes)


def _int_field(name: str, value: Any, lo: int, hi: int) -> int:
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # JSON may send 4.0 for 4
    if isinstance(value, bool) or not whole or not lo <= value <= hi:
        raise RequestError(f"{FIELD_LABELS[name]} must be a whole number from {lo} to {hi}, not {short_repr(value)}")
    return int(value)


def describe_plan(refiner: Refiner, settings: RefineSettings) -> dict[str, Any]:
    """What the settings will run, for the page's start_t label: ``{"ok": True, **plan_facts}`` or ``{"ok": False,
    "error": one line}``; planned on the CPU, so moving the slider allocates nothing on the device."""
    request = settings.request()
    try:  # as Refiner.plan_for: a box may start later than start_t
        plan = build_plan(refiner.schedule, request.plan_start(refiner.num_timesteps), refiner.denoisers, "cpu",
                          assign=refiner.router.assign, expert_names=[e.name for e in refiner.experts],
                          **request.plan_arguments())  # fmt: skip
    except ValueError as exc:
        return {"ok": False, "error": plan_error(refiner, settings, exc)}
    return {"ok": True, **plan_facts(refiner, plan)}


def plan_error(refiner: Refiner, settings: RefineSettings, exc: ValueError) -> str:
    """A plan the refiner refused, in the page's words."""
    text = one_line(exc)
    if "expert window" in text:
        boxes = [(b.describe(), b.start_t) for b in settings.regions().boxes if b.start_t is not None]
        return window_message(start_range(refiner), settings.start_t, boxes, text)
    return page_words(text)


def plan_facts(refiner: Refiner, plan: RefinePlan) -> dict[str, Any]:
    """A plan as the page shows it (``t_windows``, ``routing_t``: in timesteps t, its labels; ``windows``,
    ``routing``: in steps from noise, its tooltips)."""
    windows = [refiner.experts[index].window for _, _, index in plan.routing]
    steps = [window_to_steps(*window, plan.num_timesteps) for window in windows]
    routing_t = "; ".join(f"t {hi}-{lo}: {plan.expert_names[i]}" if hi != lo else f"t {hi}: {plan.expert_names[i]}"
                          for hi, lo, i in plan.routing)  # fmt: skip
    return {
        "start_t": plan.start_t,
        "effective_start_t": plan.effective_start,
        "n_steps": len(plan.timesteps),
        "windows": "steps " + " then ".join(f"{a}-{b}" for a, b in steps),
        "t_windows": " then ".join(t_window(*window) for window in windows),
        "routing": plan.describe_routing(),
        "routing_t": routing_t,
        "summary": plan.describe(),
    }


@dataclass(frozen=True)
class StepCost:
    """Seconds of one uncancellable unit of work on this machine, in latent pixels ``p``: ``fixed_seconds +
    seconds_per_pixel * p + seconds_per_pixel2 * p**2`` (the quadratic term: attention over the whole latent).
    ``first_stage``: the image's encode plus decode, likewise (a cancel also waits for those; None: not measured).
    A cancel waits for the unit in progress, so each is bounded by :data:`MAX_STEP_SECONDS`."""

    seconds_per_pixel: float
    fixed_seconds: float = 0.0
    seconds_per_pixel2: float = 0.0
    first_stage: StepCost | None = None

    def step_seconds(self, latent_pixels: int) -> float:
        p = float(latent_pixels)
        return self.fixed_seconds + self.seconds_per_pixel * p + self.seconds_per_pixel2 * p * p

    def first_stage_seconds(self, height: int, width: int, factor: int, tiling: TilingConfig | None) -> float:
        """:attr:`first_stage`'s estimate for a ``height`` x ``width`` image (``factor``: the first stage's). Tiled, the
        fit's fixed and linear terms count once per tile as :func:`ldm.models.tiling.tiled_apply` cuts them (clipped to
        the image) and pass, the quadratic (attention) once on the whole latent, plus the statistics pass on the
        downscaled image: the fit itself is timed untiled."""
        fit = self.first_stage
        if fit is None:
            return 0.0
        p = (height // factor) * (width // factor)
        if tiling is None or not tiling.applies_to(height, width):
            return fit.step_seconds(p)
        tiles = len(tile_starts(height, tiling.tile, tiling.overlap)) * len(tile_starts(width, tiling.tile, tiling.overlap))
        tile_pixels = (min(tiling.tile, height) // factor) * (min(tiling.tile, width) // factor)
        per_tile = fit.fixed_seconds + fit.seconds_per_pixel * tile_pixels
        stats = 0.0
        if tiling.stat_side:  # tiled_encode keeps each side at least 2 latent pixels (2 * factor image pixels)
            small_h, small_w = downscaled_size(height, width, tiling.stat_side, 2 * factor)
            stats = fit.step_seconds((small_h // factor) * (small_w // factor))
        return tiles * per_tile * (1 + tiling.stat_passes) + fit.seconds_per_pixel2 * p * p + stats


def fit_step_cost(small: tuple[int, float], large: tuple[int, float]) -> StepCost:
    """:class:`StepCost` through two ``(latent pixels, seconds)`` timings: a fixed cost plus a cost per pixel, or,
    where the time grew faster than the pixels (attention), a cost per pixel plus one per pixel squared."""
    (p_small, small_s), (p_large, large_s) = small, large
    ratio = p_large / p_small
    if large_s > ratio * small_s:
        quadratic = (large_s - ratio * small_s) / (p_large * (p_large - p_small))
        linear = (small_s - quadratic * p_small**2) / p_small
        if linear < 0:  # faster than quadratic (timing noise): all of it quadratic, the larger share
            return StepCost(0.0, 0.0, max(small_s / p_small**2, large_s / p_large**2))
        return StepCost(linear, 0.0, quadratic)
    slope = (large_s - small_s) / (p_large - p_small)
    if slope <= 0:  # timing noise swamped the difference: charge every second to the pixels
        return StepCost(large_s / p_large)
    return StepCost(slope, max(0.0, small_s - slope * p_small))


def measure_step_cost(refiner: Refiner, repeats: int = 3) -> StepCost:
    """The slowest expert's :class:`StepCost`, fitted (:func:`fit_step_cost`) from the median of ``repeats`` timed
    calls (after a warm-up) at the native latent side and twice it, with the first stage's encode + decode timed at
    the same sizes, untiled, as its ``first_stage`` (once each: a large first stage is slow to time)."""
    model = refiner.model
    native = int(model.image_size)
    sizes = (native, 2 * native)
    t = torch.ones(1, dtype=torch.long, device=refiner.device)
    fits = []
    with torch.inference_mode():
        for expert, denoiser in zip(refiner.experts, refiner.denoisers):
            # a text-conditioned expert is timed with the empty prompt's context (one branch; guidance doubles it)
            cond = expert.model.get_learned_conditioning([""]) if is_text_conditioned(expert.model) else None
            seconds = []
            for side in sizes:
                z = torch.zeros(1, int(model.channels), side, side, device=refiner.device)
                denoiser(z, t, cond)
                seconds.append(statistics.median(_timed(denoiser, refiner.device, z, t, cond) for _ in range(repeats)))
            fits.append(fit_step_cost((sizes[0] ** 2, seconds[0]), (sizes[1] ** 2, seconds[1])))
        first_stage = []
        untiled = replace(refiner.first_stage, tiling=None)  # where an image is tiled, its tiles are counted instead
        for k, side in enumerate(sizes):
            x = torch.zeros(1, 3, side * untiled.factor, side * untiled.factor, device=refiner.device)

            def round_trip(x: torch.Tensor = x) -> None:
                untiled.decode(untiled.encode(x))

            if k == 0:
                round_trip()  # warm-up
            first_stage.append(_timed(round_trip, refiner.device))
    slowest = max(fits, key=lambda fit: fit.step_seconds(4 * sizes[1] ** 2))
    stage = fit_step_cost((sizes[0] ** 2, first_stage[0]), (sizes[1] ** 2, first_stage[1]))
    return replace(slowest, first_stage=stage)


def _timed(call: Callable[..., Any], device: torch.device, *args: Any) -> float:
    started = time.perf_counter()
    call(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _check_step_time(refiner: Refiner, upload: Upload, settings: RefineSettings, cost: StepCost | None, calls: int = 1) -> None:
    """Refuse a request whose one sampling step, or its first stage's encode + decode, would take over
    :data:`MAX_STEP_SECONDS`: the whole padded image, or in crop mode one region at the experts' size."""
    if cost is None:
        return
    f, first = refiner.factor, refiner.first_stage.factor
    if settings.mode == "crop":  # a region at the experts' size
        height = width = refiner.native_size
    else:  # the image padded to a multiple of the model's factor
        height, width = -(-upload.height // f) * f, -(-upload.width // f) * f
    seconds, what = calls * cost.step_seconds((height // first) * (width // first)), "one sampling step"
    if seconds <= MAX_STEP_SECONDS:
        seconds, what = cost.first_stage_seconds(height, width, first, refiner.tiling), "encoding and decoding"
    if seconds <= MAX_STEP_SECONDS:
        return
    raise RequestError(
        f"{what} on this {upload.width}x{upload.height} image would take about {seconds:.0f} s here; the app "
        f"refuses steps over {MAX_STEP_SECONDS:.0f} s (Cancel waits for the step in progress): downscale or crop the "
        "image, refine only a region in crop mode, or use scripts/refine.py"
    )


@dataclass
class Prepared:
    """A checked request, ready to run: its plan, start map (None for the whole image) and region metadata."""

    upload: Upload
    settings: RefineSettings
    plan: RefinePlan
    start_map: torch.Tensor | None  # [1, 1, H, W] int16 timesteps (a quarter of int64's memory while it waits)
    region_meta: dict[str, str]
    total_steps: int  # sampling steps the request runs (samples x regions x plan steps), for the progress bar
    request: RefineRequest  # what runs


@dataclass
class SampleResult:
    path: Path
    seed: int
    sample: int


@dataclass
class RefineResult:
    """A request's outputs, the plan they ran and its wall time in seconds."""

    samples: list[SampleResult]
    plan: RefinePlan
    seconds: float


def prepare(
    refiner: Refiner,
    upload: Upload,
    settings: RefineSettings,
    mask: tuple[np.ndarray, str] | None,
    step_cost: StepCost | None = None,
) -> Prepared:
    """Check a request and build its plan and start map (the CLI's ``Refiner.plan_for`` and ``region_start_map``).
    ``mask``: :func:`load_painted_mask`'s result or None (ignored for the whole image); ``step_cost`` None: one step's
    time is not limited. RequestError for a request that cannot or must not run."""
    regions = settings.regions()
    if (settings.prompt or settings.negative_prompt) and not any(is_text_conditioned(e.model) for e in refiner.experts):
        raise RequestError("these experts are not text-conditioned: a prompt would be ignored; leave the prompt empty")
    try:
        plan = refiner.plan_for(settings.request())
        text = bool(text_experts(refiner.experts, plan))  # text-conditioned experts run with the page's prompt
        check_chain(refiner.experts, plan, text, refiner.allow_unconditional_experts)
    except ValueError as exc:
        raise RequestError(plan_error(refiner, settings, exc)) from None
    guided = text and settings.guidance_scale != 1  # guidance runs each network twice (one batched call)
    _check_step_time(refiner, upload, settings, step_cost, 2 if guided else 1)
    request = settings.request(with_prompt=text)
    start_map, crops, digest, meta, n_regions = None, None, "", {}, 1
    if settings.mode != "whole":
        if mask is None and not regions.boxes:
            raise RequestError("nothing selected: paint over the region to refine or draw a box (or set Mode to 'whole image')")
        array, digest = (None, "") if mask is None else mask
        try:
            _, start_map = refiner.region_start_map(upload.height, upload.width, settings.start_t, None, array,
                                                    regions.boxes, regions.dilate)  # fmt: skip
            crops = region_crops(start_map, regions.padding) if regions.crop else None
        except ValueError as exc:
            raise RequestError(page_words(str(exc))) from None
        n_regions = len(crops) if crops is not None else 1
    total = _check_work(settings, n_regions, len(plan.timesteps))  # before the region metadata: a refusal costs little
    if start_map is not None:
        meta = {**regions.as_metadata(), "mask": "painted in the web app" if mask is not None else "", "mask_sha256": digest}
        meta.update(region_metadata(start_map, crops))
        start_map = start_map.to(torch.int16)  # timesteps < 2**15; the refiner reads any integer map
    return Prepared(upload, settings, plan, start_map, meta, total, request)


def _check_work(settings: RefineSettings, n_regions: int, n_steps: int) -> int:
    """The request's sampling steps in all; RequestError beyond :data:`MAX_REQUEST_STEPS` (it would hold the only
    worker for hours)."""
    total = settings.n_samples * n_regions * n_steps
    if total <= MAX_REQUEST_STEPS:
        return total
    regions = f"{n_regions:,} regions x " if n_regions > 1 else ""
    raise RequestError(
        f"this request would run {total:,} sampling steps ({regions}{n_steps} steps x {settings.n_samples} sample(s)); "
        f"at most {MAX_REQUEST_STEPS:,} are allowed per request: use fewer samples or steps"
        + (", or fewer regions (merge them with mask dilate, or refine in place)" if n_regions > 1 else "")
    )


def refine(refiner: Refiner, prepared: Prepared, outdir: str | Path, on_step: Callable[[], None] | None = None) -> RefineResult:
    """Run a prepared request: each sample refined alone (seed ``seed + k``) and written to ``outdir`` with the CLI's
    names and metadata plus the region entries; ``on_step`` is called after every sampling step."""
    started = time.perf_counter()
    s, plan, upload, request = prepared.settings, prepared.plan, prepared.upload, prepared.request
    image = upload.decode()
    x, alpha = image_to_tensor(image.rgb), image.alpha  # [1, 3, H, W] in [-1, 1]
    del image  # the float32 array is not needed once the tensor exists
    callback = None if on_step is None else (lambda _index: on_step())
    samples = []
    for k in range(s.n_samples):
        seed = s.seed + k
        out = refiner.refine(x, request, [seed], start_map=prepared.start_map, callback=callback)
        parameters = s.parameters()
        if request.prompt is None:  # experts without a text condition: the page's prompt fields were not used
            for key in PROMPT_KEYS:
                parameters.pop(key, None)
        meta = build_metadata(refiner, plan, upload.name, seed, k, s.n_samples, parameters, request.prompt)
        meta.update({"Software": SOFTWARE, "input_sha256": upload.sha256, **prepared.region_meta})
        path = Path(outdir) / output_name(upload.stem, plan.start_t, s.seed, k if s.n_samples > 1 else None)
        save_image_atomic(path, tensor_to_image(out[0]), alpha=alpha, metadata=meta)
        samples.append(SampleResult(path, seed, k))
    seconds = time.perf_counter() - started
    logger.info("%s: %d sample(s) in %.1f s into %s (%s)", upload.name, len(samples), seconds, outdir, plan.describe())
    return RefineResult(samples, plan, seconds)


def _base_name(name: str, unprintable: str) -> str:
    """The file name the browser sent, without a folder (``/`` or ``\\``), each unprintable character as ``unprintable``."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c if c.isprintable() else unprintable for c in base).strip()


def output_stem(name: str) -> str:
    """The stem of an upload's output names: ``scripts/refine.py``'s ("my photo (1).png" -> "my photo (1)") made safe:
    no folder, unprintable characters as ``_``, no leading dot or space (no hidden file, no "." or ".."), at most
    :data:`MAX_STEM_BYTES` bytes (cut at a character); "upload" when nothing is left."""
    stem = Path(_base_name(name, "_")).stem.lstrip(". ").rstrip()
    if len(os.fsencode(stem)) > MAX_STEM_BYTES:
        stem = stem[:MAX_STEM_BYTES]  # a character takes a byte or more
        while len(os.fsencode(stem)) > MAX_STEM_BYTES:
            stem = stem[:-1]
        stem = stem.rstrip()
    return stem or "upload"
