"""``Refiner``: SDEdit-style refinement of images ``[B, 3, H, W]`` in ``[-1, 1]`` with one or more late-steps experts:
reflect-pad, encode, noise to the plan's first step, denoise, decode, crop back, clamp."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.imageio import crop_padding, from_pil, image_to_tensor, pad_to_multiple, tensor_to_image
from ldm.models.diffusion.experts import CheckpointInfo, Expert, ExpertRouter
from ldm.models.tiling import TilingConfig
from ldm.refine.conditioning import PromptArg, check_chain, encode_prompts, prompts_for_batch, share_condition_encoders
from ldm.refine.first_stage import POSTERIOR_CHOICES, FirstStage, describe_tiling, resolve_tiling
from ldm.refine.loading import ConfigSource, autocast_dtype, check_checkpoint_paths, load_expert, resolve_device
from ldm.refine.regions import (
    DEFAULT_MASK_BLUR,
    DEFAULT_REGION_PADDING,
    MAX_REGION_SIZE,
    MAX_REGIONS,
    Box,
    RegionOptions,
    build_start_map,
    composite,
    composite_weight,
    crop_geometry,
    find_regions,
    latent_start_map,
    mask_to_array,
    resize,
    resize_start_map,
)
from ldm.refine.request import MAX_SEED, RefineRequest, start_timestep
from ldm.refine.shipped import expand_names
from ldm.sampling import NoiseSchedule, RefinePlan, build_plan, check_int_arg, randn, resolve_start, run_tail
from ldm.sampling.denoisers import AutocastDenoiser, ChunkedDenoiser, Denoiser
from ldm.sampling.guidance import Guidance, guided_plan

logger = logging.getLogger(__name__)


def unique_rows(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Indices of the distinct rows of ``x`` ``[B, ...]`` (first occurrences) and each row's index among them."""
    unique: list[int] = []
    inverse: list[int] = []
    for i in range(x.shape[0]):
        inverse.append(next((k for k, u in enumerate(unique) if torch.equal(x[i], x[u])), len(unique)))
        if inverse[-1] == len(unique):
            unique.append(i)
    return unique, inverse


class PhaseClock:
    """Writes the wall time of consecutive phases into ``timings`` (nothing, and no device sync, when it is None)."""

    def __init__(self, device: torch.device, timings: MutableMapping[str, float] | None):
        self.device = device
        self.timings = timings
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = now - self._last
        self._last = now


@dataclass(frozen=True)
class Run:
    """One refinement call: the plan, one generator per sample, progress reporting, each expert's guidance (or None)."""

    plan: RefinePlan
    generators: list[torch.Generator]
    progress: bool
    callback: Callable[[int], None] | None
    clock: PhaseClock
    guidance: list[Guidance | None] | None = None

    @cached_property
    def steps(self) -> RefinePlan:
        return self.plan if self.guidance is None else guided_plan(self.plan, self.guidance)

    def sample(self, index: int) -> Run:
        """This run for sample ``index`` alone (crop mode)."""
        guidance = None if self.guidance is None else [g if g is None else g.sample(index) for g in self.guidance]
        return dataclasses.replace(self, generators=[self.generators[index]], guidance=guidance)


class Refiner:
    """Refine images with chained window experts (build it with :meth:`from_checkpoints`, or from models /
    :class:`Expert` objects).  All experts must share the noise schedule and the first stage (checked); the models are
    moved to ``device`` and set to eval mode, nothing else in them is changed.

    Args:
        experts: models or :class:`Expert` objects (window from ``model.window()``, ``[0, T)`` for a plain LDM).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` (``"cuda:N"``) or a ``torch.device``.
        precision: ``"fp32"`` | ``"bf16"`` | ``"fp16"`` (CUDA only): autocast for the networks; the trajectory stays
            float32.
        allow_outside_window: run the nearest expert on steps no window covers (warning) instead of refusing.
        checkpoints: provenance of each expert (written into output metadata).
        batch_invariant: run the networks one sample at a time: CPU kernels block by batch size, which changes the
            last bits, so only then is an output bit-identical batched or not.  None: True on CPU, False on CUDA.
        tiling: ``"auto"`` (:data:`ldm.refine.first_stage.AUTO_TILING`), None or a :class:`~ldm.models.tiling.TilingConfig`.
        channels_last, compile: store the networks' weights NHWC (same results up to rounding); ``torch.compile`` the
            UNets (on the first call per image size).
        allow_unconditional_experts: run the unconditional experts of a chain with text-conditioned ones without the
            prompt instead of refusing (:mod:`ldm.refine.conditioning`).
        first_stage_posterior: a KL first stage encodes with its posterior's ``"mean"`` (deterministic) or a
            ``"sample"`` from each sample's own generator (before its noise); VQ first stages ignore it.
    """

    def __init__(
        self,
        experts: Sequence[Expert | Any],
        device: str | torch.device = "auto",
        precision: str = "fp32",
        allow_outside_window: bool = False,
        checkpoints: Sequence[CheckpointInfo] = (),
        batch_invariant: bool | None = None,
        tiling: TilingConfig | str | None = "auto",
        channels_last: bool = False,
        compile: bool = False,
        allow_unconditional_experts: bool = False,
        first_stage_posterior: str = "mean",
    ):
        self.device = resolve_device(device)
        self.batch_invariant = self.device.type == "cpu" if batch_invariant is None else bool(batch_invariant)
        self.precision = precision
        self._autocast_dtype = autocast_dtype(precision, self.device)
        self.router = ExpertRouter(experts, allow_outside_window=allow_outside_window)
        self.allow_unconditional_experts = bool(allow_unconditional_experts)
        self.channels_last = bool(channels_last)
        self.compiled = bool(compile)
        for expert in self.router.experts:
            expert.model.to(self.device).eval()
            if self.channels_last:  # NHWC weights give NHWC activations (inputs need no conversion)
                expert.model.to(memory_format=torch.channels_last)
            if self.compiled:  # in place, state-dict keys unchanged; compiled on the first call per input shape
                expert.model.model.diffusion_model.compile()
        self.tiling = resolve_tiling(tiling, self.model)
        self.first_stage = FirstStage(self.model, self.tiling, self.batch_invariant, self.autocast,
                                      posterior=first_stage_posterior)  # fmt: skip
        self.checkpoints: tuple[CheckpointInfo, ...] = tuple(checkpoints)
        self.schedule = NoiseSchedule.from_model(self.model)
        denoisers = self.router.denoisers  # with this refiner's precision and batch invariance:
        if self._autocast_dtype is not None:
            denoisers = [AutocastDenoiser(d, self.device.type, self._autocast_dtype) for d in denoisers]
        self.denoisers: tuple[Denoiser, ...] = tuple(ChunkedDenoiser(d, 1) if self.batch_invariant else d for d in denoisers)
        self._plans: dict[tuple[Any, ...], RefinePlan] = {}

    @classmethod
    def from_checkpoints(
        cls,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        ema: bool = True,
        config: ConfigSource = None,
        allow_outside_window: bool = False,
        trust_config: bool = False,
        unsafe_load: bool = False,
        batch_invariant: bool | None = None,
        tiling: TilingConfig | str | None = "auto",
        channels_last: bool = False,
        compile: bool = False,
        allow_unconditional_experts: bool = False,
        first_stage_posterior: str = "mean",
    ) -> Refiner:
        """Load one expert per checkpoint (:func:`ldm.refine.loading.load_expert`) and build a refiner whose experts
        hold one first-stage module (checked equal first) and one copy of identical text encoders.  ``paths``: one
        checkpoint per expert (or a single path), or the short name of shipped experts (``"demo"``:
        :mod:`ldm.refine.shipped`).

        Raises:
            CheckpointError / ConfigError (both ``ValueError``) with one-line reasons; ``ValueError`` for a bad device
            or precision (before any file is read) or incompatible experts.
        """
        path_list = expand_names([paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths))
        autocast_dtype(precision, resolve_device(device))
        if first_stage_posterior not in POSTERIOR_CHOICES:  # before any file is read
            raise ValueError(f"first_stage_posterior={first_stage_posterior!r} must be one of {POSTERIOR_CHOICES}")
        check_checkpoint_paths(path_list)
        loaded = [load_expert(p, config, ema=ema, trust_config=trust_config, unsafe_load=unsafe_load) for p in path_list]
        experts = [e for e, _ in loaded]
        infos = [i for _, i in loaded]
        if config is not None and all(i.config_source == "checkpoint" for i in infos):
            logger.warning("config=%s is not used: every checkpoint holds its own model config", str(config)[:200])
        refiner = cls(experts, device, precision, allow_outside_window, infos, batch_invariant, tiling, channels_last, compile,
                      allow_unconditional_experts, first_stage_posterior)  # fmt: skip
        for expert in experts[1:]:  # these models are ours: keep one copy of the (identical, checked) first stage
            expert.model.first_stage_model = experts[0].model.first_stage_model
        share_condition_encoders(experts)  # and of identical text encoders
        logger.info("%s", refiner.describe())
        return refiner

    @property
    def model(self) -> Any:
        """The first expert's model (schedule, first stage)."""
        return self.router.experts[0].model

    @property
    def experts(self) -> tuple[Expert, ...]:
        return self.router.experts

    @property
    def num_timesteps(self) -> int:
        return self.router.num_timesteps

    @property
    def factor(self) -> int:
        """Image sides are padded to a multiple of this (and to at least twice it): first-stage factor x the UNets'
        downsampling factor."""
        unet = max(int(getattr(e.model.model.diffusion_model, "downsampling_factor", 1)) for e in self.experts)
        return self.first_stage.factor * unet

    @property
    def native_size(self) -> int:
        """The experts' training image side in pixels: what crop mode resizes a region to by default."""
        return int(self.model.image_size) * self.first_stage.factor

    def plan(
        self,
        start_t: int | None = None,
        ddim_steps: int | None = None,
        eta: float = 0.0,
        *,
        tail_steps: int | None = None,
        sampler: str = "ddim",
        strength: float | None = None,
    ) -> RefinePlan:
        """The :class:`~ldm.sampling.RefinePlan` of :class:`~ldm.refine.request.RefineRequest`'s arguments (built and
        validated once per set).  ValueError for an argument outside what is allowed, or steps outside every expert
        window (or in two)."""
        start = start_timestep(start_t, strength, self.num_timesteps)
        key = (start, ddim_steps, tail_steps, eta, sampler)
        try:
            hash(key)
        except TypeError:  # a list or dict: build_plan would refuse it, after "unhashable type" here
            shown = {"ddim_steps": ddim_steps, "tail_steps": tail_steps, "eta": eta, "sampler": sampler}
            bad = next(name for name, value in shown.items() if getattr(value, "__hash__", None) is None)
            raise ValueError(f"{bad}={shown[bad]!r:.60} must be a single value, not a {type(shown[bad]).__name__}") from None
        if key not in self._plans:
            self._plans[key] = build_plan(
                self.schedule,
                start,
                self.denoisers,
                self.device,
                ddim_steps=ddim_steps,
                tail_steps=tail_steps,
                eta=eta,
                sampler=sampler,
                assign=self.router.assign,
                expert_names=[e.name for e in self.experts],
            )
        return self._plans[key]

    def plan_for(self, request: RefineRequest) -> RefinePlan:
        """The plan of ``request`` (the checks that need the experts: ``T``, windows)."""
        return self.plan(request.plan_start(self.num_timesteps), **request.plan_arguments())

    def autocast(self) -> AbstractContextManager:
        """The networks' precision: autocast for bf16/fp16, nothing for fp32."""
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def refine_tensors(
        self,
        x: torch.Tensor,
        start_t: int | None = None,
        seeds: int | Sequence[int] = 0,
        ddim_steps: int | None = None,
        eta: float = 0.0,
        progress: bool = False,
        timings: MutableMapping[str, float] | None = None,
        *,
        tail_steps: int | None = None,
        sampler: str = "ddim",
        strength: float | None = None,
        start_map: torch.Tensor | None = None,
        mask_blur: int = DEFAULT_MASK_BLUR,
        crop_regions: bool = False,
        region_padding: int = DEFAULT_REGION_PADDING,
        region_size: int | None = None,
        callback: Callable[[int], None] | None = None,
        prompt: PromptArg = None,
    ) -> torch.Tensor:
        """Refine a batch of same-size images, whole or by region.

        Args:
            x: ``[B, 3, H, W]`` float in ``[-1, 1]``, any ``H, W >= 1`` (reflect-padded internally), any device.
            start_t, ddim_steps, eta, tail_steps, sampler, strength: as in :class:`~ldm.refine.request.RefineRequest`.
            seeds: one seed per sample, or one int for every sample; sample ``i``'s noise comes from
                ``torch.Generator().manual_seed(seeds[i])`` alone.
            start_map: None (the whole image) or each pixel's start timestep, ``[B, 1, H, W]`` integers in ``[0,
                start_t]`` (:mod:`ldm.refine.regions`; 0 = keep, bit for bit); the refined region is composited with a
                feather of ``mask_blur`` px.
            crop_regions: refine each connected region of the start map in its own crop ("only masked"): grown by
                ``region_padding`` px and to a square, resized to ``region_size`` px (default :attr:`native_size`),
                refined, resized back and pasted in turn (at most :data:`~ldm.refine.regions.MAX_REGIONS`).
            progress: a tqdm bar over the steps (rank 0 only).  callback: called with each finished step's index.
            timings: filled with the wall time in seconds of the phases ``encode``, ``sample``, ``decode`` (the device
                is synchronised between phases).
            prompt: for text-conditioned experts (required by them, refused without them): one
                :class:`~ldm.imageio.prompt.Prompt` (or str) for every sample, or one per sample (one guidance scale
                per call); mixed chains: :mod:`ldm.refine.conditioning`.

        Returns:
            ``[B, 3, H, W]`` float32 in ``[-1, 1]`` on ``x``'s device.
        """
        regions = RegionOptions(blur=mask_blur, crop=crop_regions, padding=region_padding, size=region_size)
        refuse_unused_region_options(regions, start_map is not None)
        request = RefineRequest(start_t=start_t, strength=strength, ddim_steps=ddim_steps, tail_steps=tail_steps,
                                sampler=sampler, eta=eta, regions=regions)  # fmt: skip
        return self.refine(x, request, seeds, start_map=start_map, prompt=prompt, progress=progress, timings=timings,
                           callback=callback)  # fmt: skip

    def refine(
        self,
        x: torch.Tensor,
        request: RefineRequest,
        seeds: int | Sequence[int] | None = None,
        *,
        start_map: torch.Tensor | None = None,
        prompt: PromptArg = None,
        progress: bool = False,
        timings: MutableMapping[str, float] | None = None,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """:meth:`refine_tensors` as ``request`` says; without a ``start_map``, the request's boxes make one (its mask
        file is not read here: pass its ``start_map``, see :meth:`region_start_map`).  A given ``start_map`` is used as
        it is: it is taken to be what the request's mask, boxes and dilation built (``refine_files`` and the app pass
        both).  ``seeds`` and ``prompt`` default to the request's."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"refine_tensors expects x as a [B, 3, H, W] tensor, got {shape}")
        if 0 in x.shape:
            raise ValueError(f"refine_tensors got an empty batch or image: shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor in [-1, 1], got dtype {x.dtype}")
        if request.n_samples > 1 and seeds is None:  # a row is one sample: refine_files passes each row's seed
            raise ValueError(
                f"n_samples={request.n_samples}: Refiner.refine returns one sample per row; repeat the rows "
                f"(x.repeat_interleave({request.n_samples}, 0)) with one seed each, or use refine_files"
            )
        seed_list = self._seeds(request.seed if seeds is None else seeds, x.shape[0])
        plan = self.plan_for(request)
        prompts = prompts_for_batch(request.prompt if prompt is None else prompt, x.shape[0])
        check_chain(self.experts, plan, prompts is not None, self.allow_unconditional_experts)
        regions = request.regions
        if start_map is None and regions.mask is not None:  # refined whole, it would change every pixel outside it
            raise ValueError(
                "the request names a mask file, which Refiner.refine does not read: pass its start map "
                "(start_map=refiner.region_start_map(H, W, start_t, None, mask, boxes, dilate)[1]), call "
                "refiner(image, mask=...), or use refine_files"
            )
        if start_map is None and regions.boxes:
            _, start_map = self.region_start_map(x.shape[-2], x.shape[-1], request.start_t, request.strength, None,
                                                 regions.boxes, regions.dilate)  # fmt: skip
        if regions.crop and start_map is None:
            raise ValueError("crop_regions needs a start map (a mask or boxes): there is no region to crop")
        size = (self.native_size if regions.size is None
                else check_int_arg("region_size", regions.size, self.factor, MAX_REGION_SIZE))  # fmt: skip
        with torch.no_grad():  # not inference_mode: its tensors refuse in-place ops and autograd afterwards
            # contiguous: a channels_last view of the same values took other kernels and other bytes
            xin = x.detach().to(self.device, torch.float32, memory_format=torch.contiguous_format)
            lo, hi = torch.stack(torch.aminmax(xin)).tolist()  # one device-to-host read
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(
                    f"x must be finite and in [-1, 1] (got min {lo:.4g}, max {hi:.4g}); map [0, 1] images with x * 2 - 1"
                )
            xin = xin.clamp(-1.0, 1.0)
            starts = None if start_map is None else self._check_start_map(start_map, xin, plan)
            logger.info("refining %d image(s) of %dx%d: %s", x.shape[0], x.shape[3], x.shape[2], plan.describe())
            generators = [torch.Generator(device="cpu").manual_seed(s) for s in seed_list]
            clock = PhaseClock(self.device, timings)  # the prompts' encoding counts in the "encode" phase
            # guidance wraps the cached plan's denoisers for this call only (the plan cache stays unguided)
            guidance = (
                None if prompts is None else encode_prompts(self.experts, plan, prompts, self.batch_invariant, self.autocast)
            )
            run = Run(plan, generators, progress, callback, clock, guidance)
            if starts is None:
                out = self._generate(xin, run)
            elif regions.crop:
                out = torch.cat([self._refine_crops(xin[i : i + 1], starts[i : i + 1], run, i, regions.blur,
                                                   regions.padding, size) for i in range(xin.shape[0])])  # fmt: skip
            else:
                out = composite(xin, self._generate(xin, run, starts), composite_weight(starts, regions.blur))
        return out.to(x.device)

    def _check_start_map(self, start_map: Any, x: torch.Tensor, plan: RefinePlan) -> torch.Tensor:
        b, _, h, w = x.shape
        if not isinstance(start_map, torch.Tensor) or start_map.ndim != 4 or start_map.shape[1] != 1:
            shape = tuple(start_map.shape) if isinstance(start_map, torch.Tensor) else type(start_map).__name__
            raise ValueError(f"start_map must be a [B, 1, H, W] tensor of timesteps, got {shape}")
        if start_map.shape[0] not in (1, b) or tuple(start_map.shape[-2:]) != (h, w):
            raise ValueError(
                f"start_map {tuple(start_map.shape)} does not match the images {tuple(x.shape)}: need [{b}, 1, {h}, {w}]"
            )
        if start_map.is_floating_point() or start_map.is_complex() or start_map.dtype == torch.bool:
            raise ValueError(f"start_map must hold integer timesteps, got {start_map.dtype}")
        starts = start_map.to(self.device, torch.long).expand(b, 1, h, w)
        lo, hi = torch.stack(torch.aminmax(starts)).tolist()
        if lo < 0 or hi > plan.start_t:
            raise ValueError(
                f"start_map holds timesteps from {lo} to {hi}; they must lie in [0, start_t={plan.start_t}] (raise "
                "start_t to the map's largest start)"
            )
        return starts

    def _generate(self, x: torch.Tensor, run: Run, start_map: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``x`` ``[B, 3, H, W]``, run the plan (per-pixel starts: ``start_map`` ``[B, 1, H, W]``), decode: the
        refined image, not yet composited, ``[B, 3, H, W]`` in ``[-1, 1]``."""
        # at least two latent pixels at the UNet's coarsest level: GroupNorm needs more than one value per group
        padded, padding = pad_to_multiple(x, self.factor, mode="reflect", min_size=2 * self.factor)
        unique, inverse = unique_rows(padded)
        if self.first_stage.posterior == "sample":  # each sample's own draw from its generator, before its noise
            z0 = self.first_stage.encode(padded, run.generators)
        else:
            z0 = self.first_stage.encode(padded[unique])[inverse]
        run.clock.lap("encode")
        latent_map = None
        if start_map is not None:  # replicate: a map that covers the image covers its padding too
            map_padded, _ = pad_to_multiple(start_map, self.factor, mode="replicate", min_size=2 * self.factor)
            latent_map = latent_start_map(map_padded, self.first_stage.factor)
        noise = randn(tuple(z0.shape), z0, run.generators)
        z, _ = run_tail(run.steps, z0, noise, start_map=latent_map, generators=run.generators, callback=run.callback,
                        progress=run.progress)  # fmt: skip
        run.clock.lap("sample")
        out = crop_padding(self.first_stage.decode(z), padding).clamp(-1.0, 1.0)
        run.clock.lap("decode")
        return out

    def _refine_crops(
        self, x: torch.Tensor, start_map: torch.Tensor, run: Run, index: int, blur: int, padding: int, size: int
    ) -> torch.Tensor:
        """Crop mode for one image ``[1, 3, H, W]``: each region refined in its crop at ``size`` px, pasted in turn."""
        current = x.clone()
        h, w = x.shape[-2:]
        sample_run = run.sample(index)
        for region in find_regions(start_map, MAX_REGIONS):
            x0, y0, x1, y1 = crop_geometry(region.bbox, padding, 1.0, w, h)
            crop = current[..., y0:y1, x0:x1]
            # the region's own pixels within its crop only: no full-size map per region
            starts = start_map[..., y0:y1, x0:x1] * region.pixels(x0, y0, x1, y1).to(start_map.device)
            scale = size / math.sqrt((x1 - x0) * (y1 - y0))
            sh, sw = max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale))
            refined = self._generate(resize(crop, sh, sw), sample_run, resize_start_map(starts, sh, sw))
            back = resize(refined, y1 - y0, x1 - x0)
            current[..., y0:y1, x0:x1] = composite(crop, back, composite_weight(starts, blur))
        return current

    @staticmethod
    def _seeds(seeds: int | Sequence[int], batch: int) -> list[int]:
        if isinstance(seeds, torch.Tensor) and seeds.ndim == 0:
            seeds = seeds.item()
        if isinstance(seeds, (int, np.integer)):
            seed_list = [seeds] * batch
        elif isinstance(seeds, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(seeds, (str, bytes)):
            seed_list = [s.item() if isinstance(s, (np.ndarray, torch.Tensor)) and s.ndim == 0 else s for s in seeds]
        else:
            raise ValueError(f"seeds must be an int or one int per sample, got {type(seeds).__name__} {seeds!r:.40}")
        if len(seed_list) != batch:
            raise ValueError(f"got {len(seed_list)} seeds for a batch of {batch}; pass one seed per sample or one int")
        return [check_int_arg("seed", s, 0, MAX_SEED) for s in seed_list]

    def __call__(
        self,
        image: Image.Image | torch.Tensor,
        start_t: int | None = None,
        seed: int = 0,
        ddim_steps: int | None = None,
        eta: float = 0.0,
        *,
        tail_steps: int | None = None,
        sampler: str = "ddim",
        strength: float | None = None,
        mask: Image.Image | np.ndarray | torch.Tensor | None = None,
        boxes: Sequence[Box] = (),
        crop_regions: bool = False,
        mask_blur: int = DEFAULT_MASK_BLUR,
        mask_dilate: int = 0,
        region_padding: int = DEFAULT_REGION_PADDING,
        region_size: int | None = None,
        prompt: PromptArg = None,
    ) -> Image.Image | torch.Tensor:
        """Refine one image, whole or by region.

        Args:
            image: a ``PIL.Image`` of any mode and size (EXIF orientation applied, 16-bit kept in float, alpha kept and
                re-attached), or a tensor ``[3, H, W]`` / ``[B, 3, H, W]`` in ``[-1, 1]`` (every sample uses ``seed``).
            mask: white = refine at ``start_t``, black = keep, grey = a proportional start (a PIL image of the image's
                size, or an array/tensor ``[H, W]``).  boxes: :class:`~ldm.refine.regions.Box` rectangles, each with an
                optional start of its own (the plan then starts at the largest).  mask_dilate: grow the selection by
                this many pixels first.  Pixels outside the (dilated) selection come back unchanged.
            the others: as in :meth:`refine_tensors`.

        Returns:
            a PIL image (``RGB``, or ``RGBA`` when the input had transparency) for PIL input; a float32 tensor of the
            input's shape on its device for tensor input.
        """
        if isinstance(image, torch.Tensor):
            batch = image[None] if image.ndim == 3 else image
        elif isinstance(image, Image.Image):
            loaded = from_pil(image)
            batch = image_to_tensor(loaded.rgb)
        else:
            raise TypeError(f"Refiner expects a PIL.Image or a torch.Tensor, got {type(image).__name__}")
        if isinstance(boxes, Box):
            raise ValueError("boxes must be a list of Box, got one Box: pass boxes=[Box(...)]")
        regions = RegionOptions(boxes=tuple(boxes), blur=mask_blur, dilate=mask_dilate, crop=crop_regions,
                                padding=region_padding, size=region_size)  # fmt: skip
        refuse_unused_region_options(regions, mask is not None or bool(boxes))
        request = RefineRequest(start_t=start_t, strength=strength, ddim_steps=ddim_steps, tail_steps=tail_steps,
                                sampler=sampler, eta=eta, seed=seed, regions=regions)  # fmt: skip
        starts = None
        if mask is not None or boxes:
            _, starts = self.region_start_map(batch.shape[-2], batch.shape[-1], start_t, strength, mask, boxes, mask_dilate)
        out = self.refine(batch, request, seed, start_map=starts, prompt=prompt)
        if isinstance(image, torch.Tensor):
            return out[0] if image.ndim == 3 else out
        rgb = tensor_to_image(out)
        if loaded.alpha is None:
            return Image.fromarray(rgb)
        alpha = np.round(loaded.alpha.astype(np.float64) * 255.0).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]))

    def region_start_map(
        self,
        height: int,
        width: int,
        start_t: int | None,
        strength: float | None,
        mask: Image.Image | np.ndarray | torch.Tensor | None,
        boxes: Sequence[Box],
        mask_dilate: int = 0,
    ) -> tuple[int, torch.Tensor]:
        """``(plan start_t, start map [1, 1, H, W])`` of a mask and boxes on a ``height`` x ``width`` image: the plan
        starts at the larger of ``start_t`` (or ``strength``) and every box's own start; ``mask_dilate`` as checked by
        :class:`~ldm.refine.regions.RegionOptions`.  ValueError for an invalid start, a mask of another size, a box
        outside the image or an empty selection."""
        start = start_timestep(start_t, strength, self.num_timesteps)
        top = max([start, *(resolve_start(b.start_t, None, self.num_timesteps) for b in boxes if b.start_t is not None)])
        array = None if mask is None else mask_to_array(mask, width, height)
        return top, build_start_map(height, width, start, array, boxes, mask_dilate)

    def describe(self) -> str:
        """One line: device, precision, speed options, the experts' windows."""
        options = [self.precision, f"tiling {describe_tiling(self.tiling)}"]
        options += ["batch-invariant"] if self.batch_invariant else ["batched"]
        options += ["channels_last"] * self.channels_last + ["compiled"] * self.compiled
        return f"{len(self.experts)} expert(s) on {self.device} ({', '.join(options)}): {self.router.describe_windows()}"


def refuse_unused_region_options(regions: RegionOptions, selection: bool) -> None:
    """ValueError naming the region options of a keyword call that would do nothing: ``region_padding`` /
    ``region_size`` without ``crop_regions``, ``mask_blur`` / ``mask_dilate`` without a mask, boxes or start map."""
    unused = []
    if not regions.crop:
        unused += ["region_padding"] * (regions.padding != DEFAULT_REGION_PADDING)
        unused += ["region_size"] * (regions.size is not None)
    if not selection:
        unused += ["mask_blur"] * (regions.blur != DEFAULT_MASK_BLUR) + ["mask_dilate"] * bool(regions.dilate)
    if unused:
        raise ValueError(
            f"{', '.join(unused)} given, but they would do nothing here (region_padding and region_size apply with "
            "crop_regions=True, mask_blur and mask_dilate with a mask, boxes or start_map): drop them"
        )
