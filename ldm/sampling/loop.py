"""Running a :class:`~ldm.sampling.plan.RefinePlan` with no checks and no device-to-host reads.  With a start map, a
latent pixel not yet active enters step ``i`` as the clean latent noised to *this step's* level with the start's noise
(as diffusers' inpainting: one step off would be a seam; a held noise field does not flicker); pixels that never start
end as the clean latent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.sampling.noise import Generators, randn
from ldm.sampling.plan import RefinePlan
from ldm.sampling.steps import ddim_step, dpmpp_2m_step
from ldm.util import is_rank_zero

StepCallback = Callable[[int], None]


def noise_to_start(plan: RefinePlan, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``q_sample(z0, effective_start, noise)``: the clean latent ``[B, C, h, w]`` noised to the plan's first step."""
    c = plan.coefficients
    return c["sqrt_a"][0] * z0 + c["sqrt_1ma"][0] * noise


def run_tail(
    plan: RefinePlan,
    z0: torch.Tensor,
    noise: torch.Tensor,
    *,
    start_map: torch.Tensor | None = None,
    generators: Generators = None,
    cond: Any = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDEdit: noise the clean latent ``z0`` ``[B, C, h, w]`` with ``noise`` (same shape) and run the plan; returns
    ``(z, pred_x0)``, the latent after the last step (at timestep 0's level) and that step's x0 prediction.

    Args:
        start_map: None (every pixel starts at the first step) or each latent pixel's start timestep, ``[B, 1, h, w]``
            integer on ``z0``'s device; a constant map at or above the first step gives bit for bit no map's result.
        generators: DDIM's per-step noise when ``eta > 0`` (one generator, or one per sample).
        callback: called with each finished step's index.  progress: a tqdm bar over the steps (rank 0 only).
    """
    if start_map is None:
        return _loop(plan, noise_to_start(plan, z0, noise), None, generators, cond, callback, progress)
    return _loop(plan, z0, (z0, noise, start_map), generators, cond, callback, progress)


def run_steps(
    plan: RefinePlan,
    x: torch.Tensor,
    *,
    generators: Generators = None,
    cond: Any = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the plan from a latent ``x`` ``[B, C, h, w]`` already at the first step's level (e.g. pure noise).  Returns
    ``(z, pred_x0)`` as :func:`run_tail`."""
    return _loop(plan, x, None, generators, cond, callback, progress)


def _loop(
    plan: RefinePlan,
    x: torch.Tensor,
    hold: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    generators: Generators,
    cond: Any,
    callback: StepCallback | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    c = plan.coefficients
    ddim = plan.sampler == "ddim"
    stochastic = ddim and plan.eta > 0
    batch = x.shape[0]
    pred_x0 = x
    x0_prev: torch.Tensor | None = None
    active_prev: torch.Tensor | None = None  # pixels that were denoised at the previous step (region refinement)
    steps = tqdm(plan.timesteps, desc=plan.sampler, disable=not (progress and is_rank_zero()), leave=False)
    for i, t_int in enumerate(steps):
        if hold is not None:
            z0, eps, start_map = hold
            held = c["sqrt_a"][i] * z0 + c["sqrt_1ma"][i] * eps
            x = held if active_prev is None else torch.where(active_prev, x, held)
        t = torch.full((batch,), t_int, device=x.device, dtype=torch.long)
        e_t = plan.denoisers[i](x, t, cond)
        if ddim:
            noise = randn(tuple(x.shape), x, generators) if stochastic else None
            x, pred_x0 = ddim_step(x, e_t, c["a_t"][i], c["a_prev"][i], c["sigma"][i], noise)
        else:
            pred_x0 = (x - c["sigma_t"][i] * e_t) / c["alpha_t"][i]
            x = dpmpp_2m_step(x, pred_x0, x0_prev, c["ratio"][i], c["gain"][i], c["w"][i], active_prev)
            x0_prev = pred_x0
        if hold is not None:
            active_prev = hold[2] >= t_int
        if callback is not None:
            callback(i)
    if hold is not None:
        x = torch.where(active_prev, x, hold[0])
    return x, pred_x0
