"""Denoisers: callables ``(x [B, C, H, W], t [B] long, cond) -> eps [B, C, H, W]`` that samplers step with.

A sampler only ever sees this interface, so classifier-free guidance (:class:`CFGDenoiser`), mixed precision
(:class:`AutocastDenoiser`), batch-invariant evaluation (:class:`ChunkedDenoiser`) and routing between window experts
(:mod:`ldm.models.diffusion.experts`) are wrappers, not branches inside the DDIM step.

Two optional methods let a sampler talk to a denoiser without a host-device sync:

* ``for_timestep(t: int) -> Denoiser``: the callable that serves timestep ``t`` (the sampler knows each step's timestep
  as a Python int, so an expert router picks its expert without reading ``t`` back from the device);
* ``check_timesteps(timesteps: Sequence[int], start_t: int | None) -> None``: raise before any work if some step cannot
  be served (a timestep outside every expert window).

Use :func:`resolve_denoiser` and :func:`check_denoiser_timesteps`, which fall back gracefully for plain callables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ldm.modules.diffusionmodules.util import extract_into_tensor


class Denoiser(Protocol):
    """Predicts the noise ``eps`` in ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


def resolve_denoiser(denoiser: Denoiser, t: int) -> Denoiser:
    """The callable serving integer timestep ``t``: ``denoiser.for_timestep(t)`` when it has that method, else itself."""
    pick = getattr(denoiser, "for_timestep", None)
    return pick(int(t)) if pick is not None else denoiser


def check_denoiser_timesteps(denoiser: Denoiser, timesteps: Sequence[int], start_t: int | None = None) -> None:
    """Ask ``denoiser`` (if it can tell) whether it serves every timestep in ``timesteps``; raises ``ValueError`` if not."""
    check = getattr(denoiser, "check_timesteps", None)
    if check is not None:
        check([int(t) for t in timesteps], start_t=start_t)


class ModelDenoiser:
    """Wraps a DDPM/LatentDiffusion: eps from ``apply_model``, converting an ``x0``-parameterised output to eps."""

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        out = self.model.apply_model(x, t, cond)
        if self.model.parameterization == "eps":
            return out
        sqrt_ab = extract_into_tensor(self.model.sqrt_alphas_cumprod, t, x.shape).to(x.dtype)
        sqrt_1mab = extract_into_tensor(self.model.sqrt_one_minus_alphas_cumprod, t, x.shape).to(x.dtype)
        return (x - sqrt_ab * out) / sqrt_1mab


def _concat_cond(uncond: Any, cond: Any) -> Any:
    """Stack unconditional and conditional inputs along the batch (tensors, lists of tensors, or dicts of lists)."""
    if isinstance(cond, dict):
        return {k: _concat_cond(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, list):
        return [torch.cat([u, c]) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


class CFGDenoiser:
    """Classifier-free guidance: ``eps_u + scale * (eps_c - eps_u)``, both branches in one batched call."""

    def __init__(self, inner: Denoiser, scale: float, uncond: Any):
        if uncond is None:
            raise ValueError("classifier-free guidance needs unconditional_conditioning (e.g. the empty-prompt embedding)")
        self.inner = inner
        self.scale = float(scale)
        self.uncond = uncond

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        x_in = torch.cat([x, x])
        t_in = torch.cat([t, t])
        e_u, e_c = self.inner(x_in, t_in, _concat_cond(self.uncond, cond)).chunk(2)
        return e_u + self.scale * (e_c - e_u)

    def for_timestep(self, t: int) -> CFGDenoiser:
        """Guidance around the inner denoiser's callable for timestep ``t``."""
        return CFGDenoiser(resolve_denoiser(self.inner, t), self.scale, self.uncond)

    def check_timesteps(self, timesteps: Sequence[int], start_t: int | None = None) -> None:
        check_denoiser_timesteps(self.inner, timesteps, start_t)


class AutocastDenoiser:
    """Runs the inner denoiser under ``torch.autocast(device_type, dtype)`` and returns eps in ``x``'s dtype.

    Only the network runs in reduced precision; the DDIM trajectory (``x_t``, ``pred_x0``) stays in ``x``'s dtype
    (float32), so rounding does not accumulate over the steps.
    """

    def __init__(self, inner: Denoiser, device_type: str, dtype: torch.dtype):
        self.inner = inner
        self.device_type = device_type
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            eps = self.inner(x, t, cond)
        return eps.to(x.dtype)

    def for_timestep(self, t: int) -> AutocastDenoiser:
        """Autocast around the inner denoiser's callable for timestep ``t``."""
        return AutocastDenoiser(resolve_denoiser(self.inner, t), self.device_type, self.dtype)

    def check_timesteps(self, timesteps: Sequence[int], start_t: int | None = None) -> None:
        check_denoiser_timesteps(self.inner, timesteps, start_t)


class ChunkedDenoiser:
    """Runs the inner denoiser on chunks of at most ``chunk_size`` samples and concatenates the results.

    With ``chunk_size=1`` every sample goes through the network alone, so its result cannot depend on which other
    samples share the batch (CPU kernels pick blocking by batch size, which changes the last bits).  ``cond`` must be
    None or a tensor indexed along the batch.
    """

    def __init__(self, inner: Denoiser, chunk_size: int = 1):
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        self.inner = inner
        self.chunk_size = int(chunk_size)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if x.shape[0] <= self.chunk_size:
            return self.inner(x, t, cond)
        if cond is not None and not isinstance(cond, torch.Tensor):
            raise ValueError("ChunkedDenoiser supports cond=None or a tensor indexed along the batch")
        parts = []
        for start in range(0, x.shape[0], self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            parts.append(self.inner(x[sl], t[sl], None if cond is None else cond[sl]))
        return torch.cat(parts)

    def for_timestep(self, t: int) -> ChunkedDenoiser:
        """Chunking around the inner denoiser's callable for timestep ``t``."""
        return ChunkedDenoiser(resolve_denoiser(self.inner, t), self.chunk_size)

    def check_timesteps(self, timesteps: Sequence[int], start_t: int | None = None) -> None:
        check_denoiser_timesteps(self.inner, timesteps, start_t)
