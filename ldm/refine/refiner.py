"""``Refiner``: SDEdit-style refinement of images with one or more late-steps experts (the Python API).

Pipeline for a batch ``x`` ``[B, 3, H, W]`` in ``[-1, 1]``: reflect-pad to the model's size multiple (first-stage factor
x UNet downsampling factor) -> encode with the shared first stage -> noise to the first DDIM tail step (the grid entries
``<= start_t``; e.g. ``start_t=500`` with 50 steps starts at ``t=481``) -> DDIM tail, each step run by the expert whose
window holds it -> decode -> crop back -> clamp.  Alpha channels are handled by the caller layer (:meth:`Refiner.__call__`
for PIL images, :mod:`ldm.refine.batch` for files).

Reproducibility: each sample's noise comes from its own ``torch.Generator`` seeded with that sample's seed, drawn on the
CPU, so the noise depends on the seed only, not on the batch or the device's RNG.  CPU kernels choose their blocking by
batch size, which changes the last bits of a result; with ``batch_invariant`` (the default on CPU) every sample goes
through the networks alone, so the same image and seed give a bit-identical output whether refined alone or in a batch.
On CUDA batched kernels are used by default (outputs then agree across batch compositions to float rounding).

Speed and memory (:mod:`ldm.refine.speed`): attention runs on the memory-efficient SDPA kernel; images with a side above
768 px are encoded/decoded tile by tile (``tiling``); identical inputs in a batch (several samples of one image) are
encoded once; ``channels_last`` and ``compile`` are options; ``precision="bf16"`` autocasts the networks.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.imageio import crop_padding, from_pil, image_to_tensor, pad_to_multiple, tensor_to_image
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.denoisers import AutocastDenoiser, ChunkedDenoiser, Denoiser
from ldm.models.diffusion.experts import Expert, ExpertRouter
from ldm.models.tiling import TilingConfig
from ldm.refine.loading import (
    CheckpointInfo,
    ConfigSource,
    autocast_dtype,
    check_checkpoint_paths,
    load_expert,
    resolve_device,
)
from ldm.refine.speed import compile_unets, describe_tiling, resolve_tiling, to_channels_last

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class RefinePlan:
    """What a refinement will run.

    Attributes:
        start_t: the requested start timestep.  ddim_steps, eta: the DDIM grid size and noise.
        timesteps: the tail, descending (the grid entries ``<= start_t``).
        routing: runs ``(first t, last t, expert index)`` of consecutive steps served by one expert.
        expert_names: names of the experts, indexed by ``routing``'s expert index.
    """

    start_t: int
    ddim_steps: int
    eta: float
    timesteps: tuple[int, ...]
    routing: tuple[tuple[int, int, int], ...]
    expert_names: tuple[str, ...]

    @property
    def effective_start(self) -> int:
        """The timestep the image is noised to and the first step runs at (``<= start_t``)."""
        return self.timesteps[0]

    def describe_routing(self) -> str:
        """``"t 481-261: a.ckpt; t 241-1: b.ckpt"``."""
        return "; ".join(
            f"t {hi}-{lo}: {self.expert_names[i]}" if hi != lo else f"t {hi}: {self.expert_names[i]}"
            for hi, lo, i in self.routing
        )

    def describe(self) -> str:
        """One line for logs: requested and effective start, step count, routing."""
        return (
            f"start_t={self.start_t} -> first DDIM step at t={self.effective_start} ({len(self.timesteps)} of "
            f"{self.ddim_steps} steps, eta={self.eta:g}); {self.describe_routing()}"
        )


def check_int_arg(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int if it is an integer (not a bool) in ``[lo, hi]``; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise ValueError(f"{name}={value!r} must be an integer in [{lo}, {hi}]")
    return int(value)


def check_eta(eta: Any) -> float:
    """DDIM's ``eta`` as a float if it is a finite number ``>= 0``; else a ValueError saying what is allowed."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta={eta!r} must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like noise)")
    return float(eta)


class Refiner:
    """Refine images with chained window experts.

    Build it with :meth:`from_checkpoints` (or from in-memory models / :class:`Expert` objects).  All experts must
    share the noise schedule and the first stage (checked; one first-stage module is kept).

    Args:
        experts: models or :class:`Expert` objects (window from ``model.window()``, ``[0, T)`` for a plain LDM).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` (``"cuda:N"``) or a ``torch.device``; models are moved there.
        precision: ``"fp32"`` | ``"bf16"`` | ``"fp16"`` (autocast on the device for the networks; the DDIM trajectory
            stays float32; fp16 needs CUDA).
        allow_outside_window: run the nearest expert on steps no window covers (warning) instead of refusing.
        checkpoints: provenance of each expert (set by :meth:`from_checkpoints`, written into output metadata).
        batch_invariant: run the networks one sample at a time so outputs do not depend on the batch (bit-identical
            batched or not); None = True on CPU, False on CUDA (where batching is what makes it fast).
        tiling: first-stage tiling: ``"auto"`` (:data:`ldm.refine.speed.AUTO_TILING`: 512 px tiles with 128 px overlap
            for images with a side above 768 px; VQ first stages only), None (never tile) or a
            :class:`~ldm.models.tiling.TilingConfig`.  Tiles blend seamlessly (see :mod:`ldm.models.tiling`).
        channels_last: store the networks' weights NHWC (often faster convolutions; same results up to rounding).
        compile: ``torch.compile`` the UNets (compiled on the first call per image size; off by default).
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
    ):
        self.device = resolve_device(device)
        self.batch_invariant = self.device.type == "cpu" if batch_invariant is None else bool(batch_invariant)
        self.precision = precision
        self._autocast_dtype = autocast_dtype(precision, self.device)
        self.router = ExpertRouter(experts, allow_outside_window=allow_outside_window)
        self._samplers: dict[tuple[int, float], DDIMSampler] = {}
        for expert in self.router.experts:
            expert.model.to(self.device).eval()
        self.tiling = resolve_tiling(tiling, self.model)
        for expert in self.router.experts:
            expert.model.set_first_stage_tiling(self.tiling)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            to_channels_last(e.model for e in self.router.experts)
        self.compiled = bool(compile)
        if self.compiled:
            compile_unets(e.model for e in self.router.experts)
        self.checkpoints: tuple[CheckpointInfo, ...] = tuple(checkpoints)
        denoiser: Denoiser = self.router
        if self._autocast_dtype is not None:
            denoiser = AutocastDenoiser(denoiser, self.device.type, self._autocast_dtype)
        self.denoiser: Denoiser = ChunkedDenoiser(denoiser, 1) if self.batch_invariant else denoiser

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
    ) -> Refiner:
        """Load one expert per checkpoint (see :func:`ldm.refine.loading.load_expert`) and build a refiner.

        Args:
            paths: one checkpoint per expert (a single path is accepted too).
            device, precision, allow_outside_window: as in :class:`Refiner`.
            ema: use EMA weights where present.
            config: YAML path (or mapping) for checkpoints that carry no model config (e.g. CompVis releases).
            trust_config: let configs stored in checkpoints name classes outside the allow-list.
            unsafe_load: unpickle arbitrary objects (only for files you trust).
            batch_invariant, tiling, channels_last, compile: as in :class:`Refiner`.

        Raises:
            CheckpointError / ConfigError (both ``ValueError``) with one-line reasons; ``ValueError`` for a bad device,
            precision or incompatible experts.  Device and precision are checked before any file is read.
        """
        path_list = [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)
        autocast_dtype(precision, resolve_device(device))
        check_checkpoint_paths(path_list)
        loaded = [load_expert(p, config, ema=ema, trust_config=trust_config, unsafe_load=unsafe_load) for p in path_list]
        experts = [e for e, _ in loaded]
        infos = [i for _, i in loaded]
        refiner = cls(experts, device, precision, allow_outside_window, infos, batch_invariant, tiling, channels_last, compile)
        logger.info("%s", refiner.describe())
        return refiner

    # --------------------------------------------------------------------------------------------------- properties
    @property
    def model(self) -> Any:
        """The first expert's model (schedule, ``q_sample``, the shared first stage)."""
        return self.router.model

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
        return int(self.model.downsampling_factor) * unet

    # --------------------------------------------------------------------------------------------------------- plan
    def _sampler(self, ddim_steps: int, eta: float) -> DDIMSampler:
        """The DDIM sampler of this grid, its schedule tensors built on the device once (cached per ``(steps, eta)``)."""
        key = (check_int_arg("ddim_steps", ddim_steps, 1, self.num_timesteps), check_eta(eta))
        if key not in self._samplers:
            sampler = DDIMSampler(self.model, denoiser=self.denoiser)
            sampler.make_schedule(key[0], ddim_eta=key[1])
            self._samplers[key] = sampler
        return self._samplers[key]

    def plan(self, start_t: int = 500, ddim_steps: int = 50, eta: float = 0.0) -> RefinePlan:
        """Validate the arguments and the expert coverage, and say what will run; does no work on images.

        Raises:
            ValueError: ``start_t`` outside ``[1, T-1]`` or not an integer, ``ddim_steps`` outside ``[1, T]``,
                ``eta`` negative or not finite, tail steps outside every expert window (or in two).
        """
        return self._prepare(start_t, ddim_steps, eta)[1]

    def _prepare(self, start_t: int, ddim_steps: int, eta: float) -> tuple[DDIMSampler, RefinePlan]:
        sampler = self._sampler(ddim_steps, eta)
        tail = sampler.tail_plan(start_t)
        self.router.check_timesteps(tail.timesteps, start_t=tail.start_t)
        return sampler, RefinePlan(
            start_t=tail.start_t,
            ddim_steps=int(ddim_steps),
            eta=float(eta),
            timesteps=tail.timesteps,
            routing=tuple(self.router.routing(tail.timesteps)),
            expert_names=tuple(e.name for e in self.experts),
        )

    def autocast(self) -> AbstractContextManager:
        """The networks' precision as a context manager (autocast for bf16/fp16; nothing for fp32)."""
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    # ------------------------------------------------------------------------------------------------------ tensors
    def refine_tensors(
        self,
        x: torch.Tensor,
        start_t: int = 500,
        seeds: int | Sequence[int] = 0,
        ddim_steps: int = 50,
        eta: float = 0.0,
        progress: bool = False,
        timings: MutableMapping[str, float] | None = None,
    ) -> torch.Tensor:
        """Refine a batch of same-size images.

        Args:
            x: ``[B, 3, H, W]`` float in ``[-1, 1]``, any ``H, W >= 1`` (reflect-padded internally), any device.
            start_t: integer timestep in ``[1, T-1]``; the tail starts at the largest DDIM grid entry ``<= start_t``.
            seeds: one seed per sample (length ``B``), or one int used for every sample.  Sample ``i``'s noise comes
                from ``torch.Generator().manual_seed(seeds[i])`` alone: same seed -> same output, batched or not.
            ddim_steps: size of the DDIM grid over ``[0, T)`` (the tail runs the entries ``<= start_t``).
            eta: DDIM noise (0 deterministic).
            progress: show a tqdm bar over the DDIM steps (rank 0 only).
            timings: when given, filled with the wall time in seconds of each phase: ``encode``, ``sample`` (the DDIM
                tail), ``decode`` (the device is synchronised between phases, which costs a little on CUDA).

        Returns:
            ``[B, 3, H, W]`` float32 in ``[-1, 1]`` on ``x``'s device.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"refine_tensors expects x as a [B, 3, H, W] tensor, got {shape}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"refine_tensors got an empty batch or image: shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor in [-1, 1], got dtype {x.dtype}")
        seed_list = self._seeds(seeds, x.shape[0])
        sampler, plan = self._prepare(start_t, ddim_steps, eta)
        with torch.inference_mode():
            xin = x.detach().to(self.device, torch.float32)
            lo, hi = torch.stack(torch.aminmax(xin)).tolist()  # one device-to-host read
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(
                    f"x must be finite and in [-1, 1] (got min {lo:.4g}, max {hi:.4g}); map [0, 1] images with x * 2 - 1"
                )
            logger.info("refining %d image(s) of %dx%d: %s", x.shape[0], x.shape[3], x.shape[2], plan.describe())
            # at least two latent pixels at the UNet's coarsest level: GroupNorm needs more than one value per group
            padded, padding = pad_to_multiple(xin.clamp(-1.0, 1.0), self.factor, mode="reflect", min_size=2 * self.factor)
            clock = _PhaseClock(self.device, timings)
            unique, inverse = _unique_rows(padded)
            z0 = self._per_chunk(padded[unique], self._encode)[inverse]
            clock.lap("encode")
            generators = [torch.Generator(device="cpu").manual_seed(s) for s in seed_list]
            z, _, _ = sampler.refine(z0, plan.start_t, generator=generators, verbose=progress)
            clock.lap("sample")
            decoded = self._per_chunk(z, self.model.decode_first_stage)
            out = crop_padding(decoded, padding).clamp(-1.0, 1.0)
            clock.lap("decode")
        return out.to(x.device)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` -> scaled latent ``[B, C, H / f, W / f]``."""
        return self.model.get_first_stage_encoding(self.model.encode_first_stage(x))

    def _per_chunk(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` (a first-stage pass) under autocast, one sample at a time when batch-invariant; float32 out."""
        chunks = x.split(1) if self.batch_invariant else (x,)
        with self.autocast():
            return torch.cat([fn(chunk).float() for chunk in chunks])

    @staticmethod
    def _seeds(seeds: int | Sequence[int], batch: int) -> list[int]:
        seed_list = [seeds] * batch if isinstance(seeds, (int, np.integer)) else list(seeds)
        if len(seed_list) != batch:
            raise ValueError(f"got {len(seed_list)} seeds for a batch of {batch}; pass one seed per sample or one int")
        return [check_int_arg("seed", s, 0, MAX_SEED) for s in seed_list]

    # ---------------------------------------------------------------------------------------------------- one image
    def __call__(
        self,
        image: Image.Image | torch.Tensor,
        start_t: int = 500,
        seed: int = 0,
        ddim_steps: int = 50,
        eta: float = 0.0,
    ) -> Image.Image | torch.Tensor:
        """Refine one image.

        Args:
            image: a ``PIL.Image`` of any mode and size (EXIF orientation applied, 16-bit kept in float, alpha kept and
                re-attached), or a tensor ``[3, H, W]`` / ``[B, 3, H, W]`` in ``[-1, 1]``.
            start_t, seed, ddim_steps, eta: as in :meth:`refine_tensors` (a tensor batch uses ``seed`` for every
                sample).

        Returns:
            a PIL image (``RGB``, or ``RGBA`` when the input had transparency) for PIL input; a float32 tensor of the
            input's shape on its device for tensor input.
        """
        if isinstance(image, torch.Tensor):
            if image.ndim == 3:
                return self.refine_tensors(image[None], start_t, seed, ddim_steps, eta)[0]
            return self.refine_tensors(image, start_t, seed, ddim_steps, eta)
        if not isinstance(image, Image.Image):
            raise TypeError(f"Refiner expects a PIL.Image or a torch.Tensor, got {type(image).__name__}")
        loaded = from_pil(image)
        out = self.refine_tensors(image_to_tensor(loaded.rgb), start_t, [seed], ddim_steps, eta)
        rgb = tensor_to_image(out)
        if loaded.alpha is None:
            return Image.fromarray(rgb)
        alpha = np.round(loaded.alpha.astype(np.float64) * 255.0).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]))

    def describe(self) -> str:
        """One line: device, precision, speed options and the experts' windows."""
        options = [self.precision, f"tiling {describe_tiling(self.tiling)}"]
        options += ["batch-invariant"] if self.batch_invariant else ["batched"]
        options += ["channels_last"] * self.channels_last + ["compiled"] * self.compiled
        return f"{len(self.experts)} expert(s) on {self.device} ({', '.join(options)}): {self.router.describe_windows()}"


def _unique_rows(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Indices of the distinct rows of ``x`` ``[B, ...]`` (first occurrences) and, per row, its index among them."""
    unique: list[int] = []
    inverse: list[int] = []
    for i in range(x.shape[0]):
        match = next((k for k, u in enumerate(unique) if torch.equal(x[i], x[u])), None)
        if match is None:
            match = len(unique)
            unique.append(i)
        inverse.append(match)
    return unique, inverse


class _PhaseClock:
    """Writes the wall time of consecutive phases into ``timings`` (nothing, and no device sync, when it is None)."""

    def __init__(self, device: torch.device, timings: MutableMapping[str, float] | None):
        self.device = device
        self.timings = timings
        self._last = time.perf_counter() if timings is not None else 0.0

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = now - self._last
        self._last = now
