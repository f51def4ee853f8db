"""Diffusion schedule math and small network helpers shared by the UNet.  Timesteps are integer indices ``t`` in
``[0, T)`` into ``alphas_cumprod``; schedules are float64 CPU tensors, cast only where a model registers them."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")
DDIM_DISCRETIZATIONS = ("uniform", "quad")


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """Betas ``[n_timestep]`` (float64) as in latent-diffusion: ``linear`` is linspace in sqrt(beta) space, squared
    (diffusers' "scaled_linear"); ``cosine`` is Nichol & Dhariwal's, clipped to 0.999; ``sqrt_linear`` is linspace in
    beta space and ``sqrt`` its square root."""
    if n_timestep < 1:
        raise ValueError(f"n_timestep={n_timestep} must be a positive number of diffusion steps (e.g. 1000)")
    if schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    if schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(min=0.0, max=0.999)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    raise ValueError(f"beta_schedule={schedule!r} is unknown; choose one of {BETA_SCHEDULES}")


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = True
) -> np.ndarray:
    """The DDIM grid of timestep indices ``[S']`` (int64, ascending): ``uniform`` is ``range(0, T, T // S) + 1`` (S=50,
    T=1000: 1, 21, ..., 981), ``quad`` is ``(linspace(0, sqrt(0.8 T), S) ** 2).astype(int) + 1``; entries ``>= T`` are
    dropped.  ``verbose`` (latent-diffusion's) logs the grid at INFO level instead of printing it."""
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"ddim_num_steps={num_ddim_timesteps} must be in [1, {num_ddpm_timesteps}] (the number of DDPM steps)")
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        grid = np.asarray(list(range(0, num_ddpm_timesteps, c)), dtype=np.int64)
    elif ddim_discr_method == "quad":
        grid = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(np.int64)
    else:
        raise ValueError(f"ddim_discretize={ddim_discr_method!r} is unknown; choose one of {DDIM_DISCRETIZATIONS}")
    steps = grid + 1
    steps = steps[steps < num_ddpm_timesteps]
    if verbose:
        logger.info("selected timesteps for the DDIM sampler: %s", steps)
    return steps


def make_ddim_sampling_parameters(
    alphacums: torch.Tensor, ddim_timesteps: Sequence[int] | np.ndarray, eta: float, verbose: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigmas, alphas, alphas_prev)`` for the DDIM grid, each ``[S]`` float64: ``alphas[i] = alphacums[grid[i]]``,
    ``alphas_prev[i] = alphacums[grid[i-1]]`` (``alphacums[0]`` first, as latent-diffusion), and DDIM eq. 16's
    ``sigmas = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))``.  ``verbose`` (latent-diffusion's) logs them at
    INFO level instead of printing them."""
    if eta < 0:  # a public latent-diffusion function: scripts call it without DDIMSampler
        raise ValueError(f"eta={eta} must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like ancestral noise)")
    alphacums = torch.as_tensor(alphacums, dtype=torch.float64)
    idx = torch.as_tensor(np.asarray(ddim_timesteps), dtype=torch.long)
    alphas = alphacums[idx]
    alphas_prev = torch.cat([alphacums[:1], alphacums[idx[:-1]]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        logger.info("selected alphas for the DDIM sampler: a_t: %s; a_(t-1): %s", alphas, alphas_prev)
        logger.info("eta=%s gives the DDIM sampler this sigma_t schedule: %s", eta, sigmas)
    return sigmas, alphas, alphas_prev


def make_schedule_buffers(
    betas: torch.Tensor, v_posterior: float = 0.0, parameterization: str = "eps"
) -> dict[str, torch.Tensor]:
    """All DDPM schedule quantities (float64 ``[T]`` each) for ``betas`` ``[T]``, named as latent-diffusion's buffers.
    ``posterior_*`` describe q(x_{t-1} | x_t, x_0); ``v_posterior`` mixes beta_t into the posterior variance;
    ``parameterization`` (eps or x0, checked by ``DDPM`` or the diffusers import) sets ``lvlb_weights``."""
    betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")
    if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("betas must be a 1-D schedule with every value in (0, 1)")
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), alphas_cumprod[:-1]])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) + v_posterior * betas
    out = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }
    if parameterization == "eps":
        lvlb = betas**2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod))
    else:
        lvlb = 0.5 * alphas_cumprod.sqrt() / (1.0 - alphas_cumprod)
    lvlb[0] = lvlb[1]
    out["lvlb_weights"] = lvlb
    return out


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embeddings ``[N, dim]`` of integer (or fractional) timesteps ``[N]``: cosine half first, then sine.
    With ``repeat_only`` (latent-diffusion's option) each timestep is repeated ``dim`` times instead, in its dtype."""
    if repeat_only:
        return timesteps[:, None].repeat(1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Gather ``a[t]`` for a batch of timesteps ``t`` ``[B]`` and reshape to ``[B, 1, ..., 1]`` to broadcast on ``x_shape``."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (stable under bf16/fp16 autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's normalization layer: 32 groups, eps 1e-5, float32 compute."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"dims={dims} is unsupported; use 1, 2 or 3")
    return convs[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"dims={dims} is unsupported; use 1, 2 or 3")
    return pools[dims](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def checkpoint(
    func: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], params: Iterable[torch.Tensor], flag: bool
) -> torch.Tensor:
    """Run ``func(*inputs)``, with activation checkpointing when ``flag`` and grad is enabled; ``params`` (latent-
    diffusion's) is not needed: non-reentrant checkpointing routes gradients to every parameter ``func`` touches."""
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def noise_like(
    shape: Sequence[int], device: torch.device | str, repeat: bool = False, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard normal noise ``shape`` (float32) on ``device``; with ``repeat`` one draw ``[1, *shape[1:]]`` shared by
    the whole batch.  Drawn from ``generator`` on its own device (then moved), or from ``device``'s RNG when None."""
    draw_shape = (1, *shape[1:]) if repeat else tuple(shape)
    source = generator.device if generator is not None else device
    noise = torch.randn(draw_shape, generator=generator, device=source, dtype=torch.float32).to(device)
    return noise.repeat(shape[0], *((1,) * (len(shape) - 1))) if repeat else noise
