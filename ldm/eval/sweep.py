"""The refinement sweep: every method on every case (image x degradation x seed), each output measured.

Refiners run at every ``start_t``, baselines once per case.  Outputs are measured against the clean image (``*_clean``)
and the input (``*_input``: faithfulness); cases of local degradations also inside the box (``*_in``), outside it
(``*_out``) and along its edge (``seam``), and every refiner also runs inside the mask only, per ``region_modes``.  Case
``(image, degradation, seed)`` degrades with ``file_seed(seed, "<degradation label>/<image name>")`` (independent of
the other cases) and refines with ``seed``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ldm.cli import decimal_float
from ldm.eval.baselines import Baseline
from ldm.eval.degrade import Degradation, VQRoundTrip, build_degradation, degradation_from_spec, split_spec
from ldm.eval.degrade_files import file_seed
from ldm.eval.local_degrade import LocalDegradation, LocalVQ
from ldm.eval.metrics import LPIPSMetric, Skipped, compute_metrics, fid_kid, masked_metrics, psnr, seam_energy
from ldm.eval.sources import SweepImage
from ldm.eval.swd import PreparedReference, prepare_reference, swd, swd_bootstrap
from ldm.imageio import from_uint8, to_uint8
from ldm.sampling import check_int_arg
from ldm.util import is_rank_zero, one_line

logger = logging.getLogger(__name__)

DEFAULT_START_TS: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700)
# One of each family of degradation that ldm.eval.degrade provides; "first_stage=model" is the refiner's own first stage.
DEFAULT_DEGRADATIONS: tuple[str, ...] = (
    "vq_roundtrip:first_stage=model,codebook_fraction=0.125",
    "jpeg:quality=15",
    "blur_noise:sigma=1.0,noise_std=0.1",
    "elastic_warp",
    "patch_shuffle",
    "colour_blotches",
)
MODEL_FIRST_STAGE = "model"
NO_REFERENCE = "none"
REGION_MODES: dict[str, str] = {"region": " (region)", "crop": " (crop)"}  # mode -> method name suffix
METRIC_COLUMNS: tuple[str, ...] = tuple(f"{m}_{to}" for to in ("clean", "input") for m in ("psnr", "ssim", "mse", "lpips"))
# cases with a mask (local degradations): (against, region) -> metrics, columns "<metric>_<against>_<region>"; the seam
MASKED_METRICS: dict[tuple[str, str], tuple[str, ...]] = {
    ("clean", "in"): ("psnr", "ssim", "lpips"),
    ("input", "in"): ("psnr", "ssim"),
    ("input", "out"): ("psnr", "ssim", "lpips"),
}
MASKED_COLUMNS: tuple[str, ...] = tuple(f"{m}_{to}_{r}" for (to, r), ms in MASKED_METRICS.items() for m in ms) + ("seam",)
# with a round trip (run_sweep's round_trip): PSNR to the first stage's round trip of the clean image, whole and in the box
ROUND_TRIP_COLUMNS: tuple[str, ...] = ("psnr_rt", "psnr_rt_in")
ROW_METRICS: tuple[str, ...] = METRIC_COLUMNS + MASKED_COLUMNS + ROUND_TRIP_COLUMNS
SWD_SCALE = 1e3  # the sweep reports SWD x 10^3, as Karras et al. 2018 do
SetKey = tuple[str, str, "int | None"]  # (method, degradation, start_t)


@dataclass(frozen=True)
class SweepDegradation:
    """A degradation and the label written into the CSV (its spec; ``first_stage=model`` for the refiner's own first
    stage).  ``degradation`` None means no-reference mode: the image is the input."""

    label: str
    degradation: Degradation | None


def build_sweep_degradation(spec: str, first_stage: torch.nn.Module | None = None) -> SweepDegradation:
    """A degradation from a spec (``"name:key=value,..."``); ``vq_roundtrip`` and ``local_vq`` without ``first_stage``
    or with ``first_stage=model`` use ``first_stage`` (the refiner's own VQ); ``first_stage=<yaml>`` loads another."""
    name, items = split_spec(spec, unique=False)
    if name in (VQRoundTrip.name, LocalVQ.name) and items.get("first_stage", MODEL_FIRST_STAGE) == MODEL_FIRST_STAGE:
        try:
            # box_at (local_vq) is a word; every other parameter a number
            params: dict[str, Any] = {
                k: v if k == "box_at" else decimal_float(v) for k, v in items.items() if k != "first_stage"
            }
        except ValueError:
            raise ValueError(
                f"degradation spec {spec!r}: {name} takes numbers (codebook_fraction in (0, 1], box sizes) and box_at"
            ) from None
        deg = build_degradation(name, first_stage=first_stage, **params)
        label = ",".join(f"{k}={v}" for k, v in {**deg.params(), "first_stage": MODEL_FIRST_STAGE}.items())
        return SweepDegradation(f"{name}:{label}", deg)
    deg = degradation_from_spec(spec)
    return SweepDegradation(deg.spec, deg)


@dataclass
class SweepExample:
    """One case kept for the example grid: clean (None without reference), input, its mask ``[1, H, W]`` (local
    degradations; else None) and named outputs in order."""

    image: str
    degradation: str
    seed: int
    clean: torch.Tensor | None
    input: torch.Tensor
    mask: torch.Tensor | None = None
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SweepResult:
    """Everything the report needs.

    Attributes:
        rows: one dict per case x method x start_t: ``image, degradation, method, kind ("refiner"/"baseline"),
            start_t, effective_start`` (None for baselines), ``seed, seconds`` (per image) and the metric columns of
            :data:`ROW_METRICS` that were computed (a :class:`Skipped` where a metric was skipped).
        set_metrics: one dict per method x degradation x start_t: ``fid, kid_mean, kid_std`` or ``skipped`` (reason),
            and ``swd`` (x 10^3) with a realism reference.
        methods: ``{name: (kind, description)}`` in run order (baselines, then refiners).
        start_ts: ``{refiner name: start_ts it ran}`` (those outside its windows are left out, see ``notes``).
        reference: False in no-reference mode.  notes: what was skipped and why.
    """

    rows: list[dict[str, Any]]
    set_metrics: list[dict[str, Any]]
    examples: list[SweepExample]
    methods: dict[str, tuple[str, str]]
    start_ts: dict[str, tuple[int, ...]]
    degradations: list[str]
    reference: bool
    notes: list[str]


@dataclass
class _Case(SweepExample):
    """One case (images ``[3, H, W]``); those kept for the grid are its examples as they are."""

    clean_rt: torch.Tensor | None = None  # [3, H, W], the first stage's round trip of the clean image


def _check_start_ts(start_ts: Sequence[int], num_timesteps: int) -> tuple[int, ...]:
    """The distinct ``start_ts`` in order; the CLIs check them against T = 1000, this against the model's own T."""
    for t in start_ts:
        if not 1 <= t <= num_timesteps - 1:
            raise ValueError(f"start_t={t!r} must be an integer in [1, {num_timesteps - 1}]")
    return tuple(sorted({int(t) for t in start_ts}))


def _covered_start_ts(
    name: str, refiner: Any, start_ts: tuple[int, ...], ddim_steps: int, eta: float, notes: list[str]
) -> dict[int, int]:
    """``{start_t: effective start}`` for the start_ts every step of whose tail an expert window serves."""
    covered: dict[int, int] = {}
    for t in start_ts:
        try:
            covered[t] = refiner.plan(t, ddim_steps, eta).effective_start
        except ValueError as exc:
            notes.append(f"{name}: start_t={t} skipped: {one_line(exc)}")
    if not covered:
        raise ValueError(
            f"refiner {name!r} cannot run any of start_t={list(start_ts)} with its expert windows "
            f"({refiner.router.describe_windows()}); choose start_t values inside them or pass allow_outside_window"
        )
    if len(covered) < len(start_ts):
        outside = sorted(set(start_ts) - set(covered))
        logger.warning("%s: start_t %s lie outside its expert windows and are skipped", name, outside)
    return covered


def _example_ts(covered: Sequence[int], n: int | Sequence[int]) -> list[int]:
    """``n`` evenly spread entries of ``covered``, or the entries of ``n`` that are covered."""
    ts = sorted(covered)
    if not isinstance(n, (int, np.integer)):
        return [t for t in ts if t in n]
    if len(ts) <= n:
        return ts
    picks = np.linspace(0, len(ts) - 1, n).round().astype(int)
    return [ts[i] for i in dict.fromkeys(picks.tolist())]


class _Runner:
    """Runs one method at a time over the cases, batched by input shape, and accumulates the rows."""

    def __init__(self, cases: list[_Case], batch_size: int, lpips: LPIPSMetric | Skipped | None, keep_sets: bool):
        self.cases = cases
        self.lpips = lpips
        self.keep_sets = keep_sets
        self.rows: list[dict[str, Any]] = []
        self.sets: dict[SetKey, list[torch.Tensor]] = defaultdict(list)
        self.set_images: dict[SetKey, list[str]] = defaultdict(list)  # the image of each member of a set
        groups: dict[tuple[tuple[int, ...], bool], list[int]] = defaultdict(list)
        for i, case in enumerate(cases):
            groups[(tuple(case.input.shape), case.mask is not None)].append(i)
        self.batches = [idx[s : s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]

    def batches_of(self, masked_only: bool) -> list[list[int]]:
        """The batches (lists of case indices): all, or those of the cases with a mask."""
        return [b for b in self.batches if self.cases[b[0]].mask is not None] if masked_only else self.batches

    def run(
        self,
        method: str,
        fn: Any,
        start_t: int | None,
        effective: int | None,
        keep: set[int],
        bar: tqdm,
        masked_only: bool = False,
    ) -> dict[int, torch.Tensor]:
        """Run ``fn(inputs [B, 3, H, W], seeds, masks [B, 1, H, W] or None) -> outputs`` (a baseline where ``start_t``
        is None) over all cases (or only those with a mask), measure every output; returns the outputs of the cases
        in ``keep`` (``{case index: [3, H, W]}``), the others are dropped once measured."""
        outputs: dict[int, torch.Tensor] = {}
        for batch in self.batches_of(masked_only):
            cases = [self.cases[i] for i in batch]
            x = torch.stack([c.input for c in cases])
            masks = torch.stack([c.mask for c in cases]) if cases[0].mask is not None else None
            started = time.perf_counter()
            out = fn(x, [c.seed for c in cases], masks).detach().float().cpu()
            seconds = (time.perf_counter() - started) / len(cases)
            clean = torch.stack([c.clean for c in cases]) if cases[0].clean is not None else None
            metrics = compute_metrics(out, clean, x, lpips=self.lpips)
            if masks is not None:
                metrics.update(_masked(out, clean, x, masks, self.lpips))
            if cases[0].clean_rt is not None:
                clean_rt = torch.stack([c.clean_rt for c in cases])
                metrics["psnr_rt"] = psnr(out, clean_rt)
                if masks is not None:
                    metrics["psnr_rt_in"] = masked_metrics(out, clean_rt, masks)["psnr_in"]
            for j, (i, case) in enumerate(zip(batch, cases)):
                row: dict[str, Any] = {
                    "image": case.image,
                    "degradation": case.degradation,
                    "method": method,
                    "kind": "baseline" if start_t is None else "refiner",
                    "start_t": start_t,
                    "effective_start": effective,
                    "seed": case.seed,
                    "seconds": seconds,
                }
                for key in ROW_METRICS:
                    if key in metrics:
                        value = metrics[key]
                        row[key] = value if isinstance(value, Skipped) else float(value[j])
                self.rows.append(row)
                if i in keep:
                    outputs[i] = out[j]
                if self.keep_sets:
                    self.sets[(method, case.degradation, start_t)].append(to_uint8(out[j]))  # as saved: 4x less memory
                    self.set_images[(method, case.degradation, start_t)].append(case.image)
            bar.update(1)
        return outputs


def _masked(
    out: torch.Tensor, clean: torch.Tensor | None, x: torch.Tensor, masks: torch.Tensor, lpips: LPIPSMetric | Skipped | None
) -> dict[str, Any]:
    """The :data:`MASKED_COLUMNS` of a batch."""
    references = {"clean": clean, "input": x}
    values = {to: masked_metrics(out, ref, masks, lpips=lpips) for to, ref in references.items() if ref is not None}
    found: dict[str, Any] = {"seam": seam_energy(out, x, masks)}
    for (to, r), metrics in MASKED_METRICS.items():
        found.update({f"{m}_{to}_{r}": values[to][f"{m}_{r}"] for m in metrics if f"{m}_{r}" in values.get(to, {})})
    return found


def run_sweep(
    refiners: Sequence[tuple[str, Any]],
    images: Sequence[SweepImage],
    degradations: Sequence[SweepDegradation] | None,
    start_ts: Sequence[int] = DEFAULT_START_TS,
    seeds: Sequence[int] = (0,),
    *,
    baselines: Sequence[Baseline] = (),
    ddim_steps: int = 50,
    eta: float = 0.0,
    batch_size: int = 8,
    lpips: LPIPSMetric | Skipped | None = None,
    inception: torch.nn.Module | Skipped | None = None,
    realism_reference: Sequence[SweepImage] | None = None,
    n_examples: int = 4,
    example_start_ts: int | Sequence[int] = 4,
    region_modes: Sequence[str] = ("region",),
    whole_image: bool = True,
    round_trip: Baseline | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run every method on every case and measure it.

    Args:
        refiners: ``(name, Refiner)`` pairs, the main one first (its outputs fill the example grid).
        images: the clean images (the artifact images themselves when ``degradations`` is None, no-reference mode).
        start_ts: each in ``[1, T-1]``; those a refiner's windows do not cover are skipped for it, with a note.
        seeds: one case per seed (degradation seed derived from it; refinement seed = it).
        lpips: from :func:`ldm.eval.metrics.load_lpips` (None: no LPIPS columns; Skipped: columns hold the reason).
        inception: from :func:`ldm.eval.metrics.load_inception` (None: no FID/KID; Skipped: recorded with its reason).
        realism_reference: clean images other than the cases' own, of the cases' size, for SWD (None: no SWD).
        n_examples: images per degradation kept for the grid (seed ``seeds[0]``).
        example_start_ts: how many of each refiner's start_ts (evenly spread) the grid shows, or which ones.
        region_modes: any of ``"region"`` (method ``"<name> (region)"``: a start map of ``start_t`` inside the mask of
            a local degradation, 0 outside) and ``"crop"`` (the same, cropped around each box); ``()``: none.
        whole_image: also run every refiner over the whole image (method ``<name>``); False: region modes only.
        round_trip: the first stage's round trip (:func:`ldm.eval.baselines.autoencoder_baseline`) for the
            ``psnr_rt`` / ``psnr_rt_in`` columns (what the first stage loses, taken out of the comparison).
        progress: a tqdm bar over batches (rank 0 only).

    The CLIs check the other arguments (unique method names, local degradations for ``whole_image=False``, realism
    images of the cases' size); ValueError for a start_t or ``ddim_steps`` beyond T, or a refiner that covers none of
    the start_ts.
    """
    seed_list = [int(s) for s in seeds]
    modes = list(dict.fromkeys(region_modes))
    num_timesteps = refiners[0][1].num_timesteps if refiners else 1000
    ts = _check_start_ts(start_ts, num_timesteps)
    check_int_arg("ddim_steps", ddim_steps, 1, num_timesteps)  # refused up front, not per start_t
    notes: list[str] = []
    covered = {name: _covered_start_ts(name, r, ts, ddim_steps, eta, notes) for name, r in refiners}

    reference = degradations is not None
    sweep_degradations = list(degradations) if reference else [SweepDegradation(NO_REFERENCE, None)]
    cases, examples = _build_cases(images, sweep_degradations, seed_list, n_examples)
    if round_trip is not None and reference:
        _add_round_trips(cases, round_trip, batch_size)
    realism = None if realism_reference is None else torch.cat([im.image.float() for im in realism_reference])
    keep_sets = (reference and isinstance(inception, torch.nn.Module)) or realism is not None
    runner = _Runner(cases, batch_size, lpips, keep_sets)
    if not runner.batches_of(masked_only=True):
        modes = []

    n_refiner_runs = sum(len(c) for c in covered.values())
    total = (len(baselines) + n_refiner_runs * whole_image) * len(runner.batches)
    total += len(modes) * n_refiner_runs * len(runner.batches_of(masked_only=True))
    show = progress and is_rank_zero()
    with tqdm(total=total, desc="sweep", unit="batch", disable=not show) as bar:
        for baseline in baselines:
            bar.set_postfix_str(baseline.name)
            out = runner.run(baseline.name, lambda x, _s, _m, b=baseline: b(x), None, None, set(examples), bar)
            if baseline.name != "identity":
                _keep_examples(examples, out, baseline.name)
        for name, refiner in refiners:
            shown = set(_example_ts(list(covered[name]), example_start_ts))
            for t, effective in covered[name].items():
                bar.set_postfix_str(f"{name} t={t}")
                for mode in ([None] if whole_image else []) + modes:  # None: the whole image
                    method = name + REGION_MODES.get(mode, "")
                    keep = {i for i in examples if mode is None or cases[i].mask is not None} if t in shown else set()
                    fn = _refine_fn(refiner, t, ddim_steps, eta, mode)
                    out = runner.run(method, fn, t, effective, keep, bar, masked_only=mode is not None)
                    if t in shown:
                        _keep_examples({i: examples[i] for i in keep}, out, f"{method} t={t}")

    clean = [(c.degradation, c.image, c.clean) for c in cases if c.clean is not None]
    set_metrics = fid_kid_metrics(runner.sets, runner.rows, inception, reference, clean)
    if realism is not None:
        add_swd(set_metrics, runner.sets, realism, clean, notes, runner.set_images)
    notes += [str(metric) for metric in (lpips, inception) if isinstance(metric, Skipped)]
    methods = {b.name: ("baseline", b.description) for b in baselines}
    for name, refiner in refiners:
        if whole_image:
            methods[name] = ("refiner", refiner.describe())
        for mode in modes:
            how = "in place" if mode == "region" else "cropped around each box, at the experts' size"
            methods[name + REGION_MODES[mode]] = ("refiner", f"{refiner.describe()}; only inside the mask ({how})")
    start_ts_run = {name: tuple(c) for name, c in covered.items() if whole_image}
    start_ts_run.update({name + REGION_MODES[m]: tuple(c) for name, c in covered.items() for m in modes})
    return SweepResult(
        rows=runner.rows,
        set_metrics=set_metrics,
        examples=list(examples.values()),
        methods=methods,
        start_ts=start_ts_run,
        degradations=[d.label for d in sweep_degradations],
        reference=reference,
        notes=notes,
    )


def _refine_fn(refiner: Any, t: int, ddim_steps: int, eta: float, mode: str | None) -> Any:
    """``fn(inputs, seeds, masks)`` for :meth:`_Runner.run`: ``refiner`` from ``t`` over the whole image (``mode``
    None) or only inside the masks (a start map of ``t`` inside, 0 outside; ``"crop"``: cropped around each box)."""

    def refine(x: torch.Tensor, seeds: list[int], masks: torch.Tensor | None) -> torch.Tensor:
        if mode is None:
            return refiner.refine_tensors(x, t, seeds, ddim_steps, eta)
        start_map = (masks > 0.5).long() * t
        return refiner.refine_tensors(x, t, seeds, ddim_steps, eta, start_map=start_map, crop_regions=mode == "crop")

    return refine


def _build_cases(
    images: Sequence[SweepImage], degradations: list[SweepDegradation], seeds: list[int], n_examples: int
) -> tuple[list[_Case], dict[int, SweepExample]]:
    cases: list[_Case] = []
    examples: dict[int, SweepExample] = {}
    for deg in degradations:
        for k, image in enumerate(images):
            x = image.image
            for seed in seeds:
                try:
                    clean, inp, mask = _degrade(deg, x, file_seed(seed, f"{deg.label}/{image.name}"))
                except ValueError as exc:  # e.g. an image too small for the degradation's patches
                    raise ValueError(f"degradation {deg.label!r} on image {image.name!r} {tuple(x.shape[-2:])}: {exc}") from exc
                case = _Case(image.name, deg.label, seed, clean, inp, mask)
                if k < n_examples and seed == seeds[0]:
                    examples[len(cases)] = case
                cases.append(case)
    return cases, examples


def _add_round_trips(cases: list[_Case], round_trip: Baseline, batch_size: int) -> None:
    """Set every case's ``clean_rt``: ``round_trip`` of its clean image, run once per distinct image."""
    distinct = {case.image: case.clean for case in cases}  # one clean image per name
    names = list(distinct)
    trips: dict[str, torch.Tensor] = {}
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        for shape in {tuple(distinct[n].shape) for n in chunk}:
            group = [n for n in chunk if tuple(distinct[n].shape) == shape]
            out = round_trip(torch.stack([distinct[n] for n in group])).detach().float().cpu()
            trips.update(zip(group, out))
    for case in cases:
        case.clean_rt = trips[case.image]


def _degrade(
    deg: SweepDegradation, x: torch.Tensor, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """One case's ``(clean [3, H, W] or None, input [3, H, W], mask [1, H, W] or None)`` from ``x`` ``[1, 3, H, W]``."""
    if deg.degradation is None:
        return None, x[0].float(), None
    if isinstance(deg.degradation, LocalDegradation):
        local = deg.degradation.apply_local(x.float(), seed)
        return x[0].float(), local.images[0].cpu(), local.masks[0].cpu()
    return x[0].float(), deg.degradation(x.float(), seed)[0].cpu(), None


def _keep_examples(examples: dict[int, SweepExample], outputs: dict[int, torch.Tensor], label: str) -> None:
    for index, example in examples.items():
        example.outputs[label] = outputs[index]


def _cycled(reference: torch.Tensor, n: int) -> torch.Tensor:
    """``reference`` ``[K, ...]`` repeated in order to ``n`` members ``[n, ...]`` (member ``i`` is image ``i % K``)."""
    return reference[torch.arange(n) % reference.shape[0]]


def add_swd(
    set_metrics: list[dict[str, Any]],
    sets: dict[SetKey, list[torch.Tensor]],
    realism: torch.Tensor,
    clean: Sequence[tuple[str, str, torch.Tensor]],
    notes: list[str],
    images: dict[SetKey, list[str]] | None = None,
) -> None:
    """Join ``swd`` (x 10^3, no interval) and the paired resamples ``swd_bootstrap`` (for the summary's ``gain_swd``)
    of every set's outputs against ``realism`` ``[K, 3, H, W]`` (cycled to the set's size) into ``set_metrics``.
    ``images``: the image of each member of each set (resampled together; None: each member is an image of its own).
    The SWD of the distinct clean images (``clean``: ``(degradation, image, clean image)``) against the same reference
    draws, the floor that sampling noise sets, goes into ``notes``."""
    entries = {(e["method"], e["degradation"], e["start_t"]): e for e in set_metrics}
    prepared: dict[int, PreparedReference] = {}  # the reference side, once per set size
    for key, outputs in sets.items():
        fake = from_uint8(torch.stack(outputs))
        if key not in entries:
            entries[key] = {"method": key[0], "degradation": key[1], "start_t": key[2]}
            set_metrics.append(entries[key])
        n = fake.shape[0]
        if n not in prepared:
            prepared[n] = prepare_reference(_cycled(realism, n))
        clusters = images.get(key) if images is not None else None
        reference_clusters = (torch.arange(n) % realism.shape[0]).tolist()
        # paired with every other set of these cases (same members, same clusters): the summary's gain_swd
        boot = swd_bootstrap(fake, prepared[n], clusters=clusters, reference_clusters=reference_clusters)
        entries[key].update(swd=boot.result.mean * SWD_SCALE, swd_bootstrap=boot)
    if any(n > realism.shape[0] for n in prepared):
        notes.append(
            f"SWD: the realism reference's {realism.shape[0]} images are cycled to the sets' "
            f"{'/'.join(str(n) for n in sorted(prepared))} members; the paired SWD changes (gain_swd) resample its "
            f"{realism.shape[0]} distinct images, not the copies"
        )
    distinct = {image: x for _, image, x in clean}
    if distinct:
        real = torch.stack(list(distinct.values()))
        for n in sorted(prepared):
            floor = swd(_cycled(real, n), prepared[n]).mean
            notes.append(
                f"SWD x 10^3 of the {real.shape[0]} clean images"
                + (f" (cycled to {n} members, as the sets)" if n != real.shape[0] else "")
                + f" against the realism reference: {floor * SWD_SCALE:.3f} (the floor that sampling noise sets; "
                "absolute SWDs have no interval, the paired changes gain_swd do)"
            )
    logger.info("SWD of %d sets against %d realism images", len(sets), realism.shape[0])


def fid_kid_metrics(
    sets: dict[SetKey, list[torch.Tensor]],
    rows: Sequence[dict[str, Any]],
    inception: torch.nn.Module | Skipped | None,
    reference: bool,
    clean: Sequence[tuple[str, str, torch.Tensor]],
) -> list[dict[str, Any]]:
    """FID/KID per method x degradation x start_t of ``rows`` against the clean images of that degradation (``clean``:
    the cases' ``(degradation, image, clean image)``), or ``skipped`` (the reason); empty when ``inception`` is None."""
    if inception is None:
        return []
    keys = list(dict.fromkeys((r["method"], r["degradation"], r["start_t"]) for r in rows))
    if not reference or isinstance(inception, Skipped):
        reason = str(inception) if isinstance(inception, Skipped) else "skipped: FID/KID need clean references"
        return [{"method": m, "degradation": d, "start_t": t, "skipped": reason} for m, d, t in keys]
    real: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for degradation, image, x in clean:
        real[degradation].setdefault(image, x)
    out = []
    for method, degradation, t in keys:
        fake = from_uint8(torch.stack(sets[(method, degradation, t)]))
        reals = torch.stack(list(real[degradation].values()))
        value = fid_kid(reals, fake, feature_extractor=inception, kid_subset_size=min(len(reals), len(fake)))
        entry: dict[str, Any] = {"method": method, "degradation": degradation, "start_t": t}
        entry.update({"skipped": str(value)} if isinstance(value, Skipped) else value)
        out.append(entry)
    return out
