"""Denoisers: callables ``(x [B, C, H, W], t [B] long, cond) -> eps [B, C, H, W]`` that samplers step with.

A sampler only ever sees this interface, so classifier-free guidance (:class:`CFGDenoiser`) and routing between
window experts (:mod:`ldm.models.diffusion.experts`) are wrappers, not branches inside the DDIM step.
"""

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
