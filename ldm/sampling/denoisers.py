"""Denoisers: callables ``(x [B, C, H, W], t [B] long, cond) -> eps [B, C, H, W]``, and wrappers for guidance,
precision and batch invariance, so none is a branch inside a solver step (``ldm.sampling`` imports no ``ldm.models``)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ldm.modules.diffusionmodules.util import extract_into_tensor


class Denoiser(Protocol):
    """Predicts the noise ``eps`` in ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


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


def stack_cond(uncond: Any, cond: Any) -> Any:
    """``[uncond, cond]`` along the batch, keeping the nesting (tensors, lists or dicts of them)."""
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond])
    if isinstance(cond, dict):
        return {k: stack_cond(uncond[k], cond[k]) for k in cond}
    return [stack_cond(u, c) for u, c in zip(uncond, cond)]


class CFGDenoiser:
    """Classifier-free guidance: ``eps_u + scale * (eps_c - eps_u)``, both branches in one batched call."""

    def __init__(self, inner: Denoiser, scale: float, uncond: Any):
        if uncond is None:
            raise ValueError("classifier-free guidance needs unconditional_conditioning (e.g. the empty-prompt embedding)")
        self.inner = inner
        self.scale = float(scale)
        self.uncond = uncond

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        e_u, e_c = self.inner(torch.cat([x, x]), torch.cat([t, t]), stack_cond(self.uncond, cond)).chunk(2)
        return e_u + self.scale * (e_c - e_u)


class AutocastDenoiser:
    """Runs the inner denoiser under ``torch.autocast(device_type, dtype)`` and returns eps in ``x``'s dtype: only the
    network runs in reduced precision, so rounding does not accumulate over the trajectory's steps."""

    def __init__(self, inner: Denoiser, device_type: str, dtype: torch.dtype):
        self.inner = inner
        self.device_type = device_type
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            eps = self.inner(x, t, cond)
        return eps.to(x.dtype)


class ChunkedDenoiser:
    """Runs the inner denoiser on chunks of at most ``chunk_size`` samples (``cond``: None or a tensor ``[B, ...]``).
    With ``chunk_size=1`` a sample's result cannot depend on its batch (CPU kernels block by batch size)."""

    def __init__(self, inner: Denoiser, chunk_size: int = 1):
        self.inner = inner
        self.chunk_size = int(chunk_size)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        n = self.chunk_size
        if x.shape[0] <= n:
            return self.inner(x, t, cond)
        starts = range(0, x.shape[0], n)
        return torch.cat([self.inner(x[s : s + n], t[s : s + n], None if cond is None else cond[s : s + n]) for s in starts])
