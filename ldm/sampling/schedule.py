"""Which timesteps a refinement runs (README, "Which steps run") and each solver's per-step coefficients: pure functions
over ``alphas_cumprod``.  Step ``i`` runs at ``timesteps[i]`` and moves the latent to ``levels[i]`` (0 after the lowest)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_ddim_timesteps


@dataclass(frozen=True)
class NoiseSchedule:
    """A diffusion model's noise schedule, as the samplers need it (all on the CPU).

    Attributes:
        alphas_cumprod: ``[T]`` float64 (the solvers' coefficients are computed from it in float64).
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: ``[T]`` float32, the coefficients ``q_sample`` noises with
            (:meth:`from_model` takes the model's own buffers, so a latent noised here equals ``model.q_sample``).
    """

    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_model(cls, model: Any) -> NoiseSchedule:
        """The schedule of a DDPM / LatentDiffusion (its ``alphas_cumprod`` and ``q_sample`` buffers)."""
        return cls(
            model.alphas_cumprod.detach().to("cpu", torch.float64),
            model.sqrt_alphas_cumprod.detach().to("cpu", torch.float32),
            model.sqrt_one_minus_alphas_cumprod.detach().to("cpu", torch.float32),
        )

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor | np.ndarray | Sequence[float]) -> NoiseSchedule:
        """A schedule from ``alphas_cumprod`` ``[T]`` alone (the ``q_sample`` coefficients computed in float64);
        ValueError unless :func:`check_alphas_cumprod` accepts it (else coefficients or log-SNR steps would be NaN)."""
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        check_alphas_cumprod(acp)
        return cls(acp, acp.sqrt().float(), (1.0 - acp).sqrt().float())


def check_alphas_cumprod(acp: torch.Tensor) -> None:
    """Raise a one-line ValueError, naming the first offending index, unless ``acp`` is a valid ``alphas_cumprod``
    ``[T]`` (float64): 1-D, ``T >= 1``, finite, strictly inside (0, 1) and strictly decreasing."""
    fix = "pass torch.cumprod(1 - betas, 0) for betas [T] in (0, 1)"
    if acp.ndim != 1 or acp.numel() == 0:
        raise ValueError(f"alphas_cumprod has shape {tuple(acp.shape)}; a noise schedule is 1-D with T >= 1 values: {fix}")
    bad_value = ~(torch.isfinite(acp) & (acp > 0) & (acp < 1))
    bad_order = torch.zeros_like(bad_value)
    bad_order[1:] = ~(acp[1:] < acp[:-1])
    bad = (bad_value | bad_order).nonzero()
    if bad.numel() == 0:
        return
    i = int(bad[0, 0])
    if bad_value[i]:
        raise ValueError(f"alphas_cumprod[{i}]={acp[i].item()!r} is not a finite value strictly inside (0, 1): {fix}")
    raise ValueError(
        f"alphas_cumprod[{i}]={acp[i].item()!r} is not below alphas_cumprod[{i - 1}]={acp[i - 1].item()!r}; "
        f"alphas_cumprod must strictly decrease: {fix}"
    )


def grid_tail(start_t: int, ddim_steps: int, num_timesteps: int, t_min: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(timesteps, levels)``: the DDIM grid entries ``t_min <= t <= start_t`` of a ``ddim_steps``-entry uniform grid,
    descending (may be empty; the caller says what to change), and the level each moves to: the grid entry below it
    (also when ``t_min`` leaves that entry out), 0 below the lowest."""
    grid = [int(t) for t in make_ddim_timesteps("uniform", ddim_steps, num_timesteps, verbose=False)]
    below = dict(zip(grid, [0, *grid[:-1]]))
    timesteps = tuple(t for t in reversed(grid) if t_min <= t <= start_t)
    return timesteps, tuple(below[t] for t in timesteps)


def exact_tail(alphas_cumprod: torch.Tensor, start_t: int, tail_steps: int) -> tuple[int, ...]:
    """``tail_steps`` (``1 <= K <= start_t``) distinct integer timesteps from ``start_t`` down, uniform in log-SNR.

    The ideal levels split ``[lambda(start_t), lambda(0)]`` (``lambda = log(alpha / sigma)``, linear between integer
    timesteps) into K equal parts, each rounded to the nearest timestep, the first ``start_t`` itself; where rounding
    would repeat a timestep (near t = 0, where consecutive timesteps are far apart in log-SNR) the steps are pushed apart
    to consecutive integers.  The last step moves the latent to timestep 0.
    """
    k = int(tail_steps)
    acp = alphas_cumprod.to(torch.float64).numpy()
    lam = 0.5 * np.log(acp / (1.0 - acp))  # decreasing in t
    targets = np.linspace(lam[start_t], lam[0], k + 1)[:-1]
    ideal = np.interp(targets, lam[::-1], np.arange(len(lam), dtype=np.float64)[::-1])
    t = [int(round(v)) for v in ideal]
    t[0] = int(start_t)
    for i in range(k - 1, 0, -1):  # distinct and >= 1, from the bottom up
        t[i] = max(t[i], t[i + 1] + 1 if i < k - 1 else 1)
    for i in range(1, k):  # below start_t, from the top down (possible since k <= start_t)
        t[i] = min(t[i], t[i - 1] - 1)
    return tuple(t)


def _at(alphas_cumprod: torch.Tensor, timesteps: Sequence[int]) -> torch.Tensor:
    return alphas_cumprod.to(torch.float64)[torch.as_tensor(list(timesteps), dtype=torch.long)]


def ddim_coefficients(
    alphas_cumprod: torch.Tensor, timesteps: Sequence[int], levels: Sequence[int], eta: float
) -> dict[str, torch.Tensor]:
    """``a_t``, ``a_prev`` and ``sigma``, each ``[n]`` float64: ``alphas_cumprod`` at each step and at its level, and
    DDIM's noise ``eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))`` (DDIM eq. 16)."""
    a_t, a_prev = _at(alphas_cumprod, timesteps), _at(alphas_cumprod, levels)
    return {"a_t": a_t, "a_prev": a_prev, "sigma": eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))}


def dpmpp_2m_coefficients(
    alphas_cumprod: torch.Tensor, timesteps: Sequence[int], levels: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Per-step coefficients ``[n]`` (float64) of DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction).

    With ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``lambda = log(alpha / sigma)`` and ``h_i = lambda(level_i)
    - lambda(t_i)``, step i moves ``x`` to ``ratio_i * x + gain_i * D_i`` where ``ratio = sigma(level) / sigma(t)``,
    ``gain = -alpha(level) * expm1(-h)`` and ``D_i = (1 + w_i) x0_i - w_i x0_{i-1}`` with ``w_i = h_i / (2 h_{i-1})``
    (``w_0 = 0``: the first step is first order, i.e. DDIM with eta = 0).  ``alpha_t``/``sigma_t`` give the x0 prediction
    ``(x - sigma_t eps) / alpha_t``.
    """
    a_t, a_next = _at(alphas_cumprod, timesteps), _at(alphas_cumprod, levels)
    h = 0.5 * torch.log(a_next / (1 - a_next)) - 0.5 * torch.log(a_t / (1 - a_t))
    w = torch.zeros_like(h)
    w[1:] = h[1:] / (2.0 * h[:-1])
    return {
        "alpha_t": a_t.sqrt(),
        "sigma_t": (1 - a_t).sqrt(),
        "ratio": ((1 - a_next) / (1 - a_t)).sqrt(),
        "gain": -a_next.sqrt() * torch.expm1(-h),
        "w": w,
    }
