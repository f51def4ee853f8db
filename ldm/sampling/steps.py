"""One update per solver, as pure functions of tensors (no model, no checks; coefficients: :mod:`ldm.sampling.schedule`)."""

from __future__ import annotations

import torch


def ddim_step(
    x: torch.Tensor,
    e_t: torch.Tensor,
    a_t: torch.Tensor,
    a_prev: torch.Tensor,
    sigma_t: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (DDIM eq. 12) from ``x_t`` ``[B, C, H, W]`` and its predicted noise ``e_t`` to ``(x_prev,
    pred_x0)``: ``pred_x0 = (x_t - sqrt(1 - a_t) e_t) / sqrt(a_t)``, ``x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev -
    sigma_t^2) e_t + sigma_t noise``.  ``a_t``, ``a_prev``: ``alphas_cumprod`` at this step and at the level it moves to
    (broadcastable); ``noise``: standard normal, required when ``sigma_t > 0``."""
    pred_x0 = (x - (1.0 - a_t).sqrt() * e_t) / a_t.sqrt()
    x_prev = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma_t**2).sqrt() * e_t
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


def dpmpp_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor | None,
    ratio: torch.Tensor,
    gain: torch.Tensor,
    w: torch.Tensor,
    second_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) update of the latent ``x`` ``[B, C, H, W]`` to the step's level: ``ratio * x + gain * D``
    with ``D = (1 + w) x0 - w x0_prev`` (coefficients: :func:`ldm.sampling.schedule.dpmpp_2m_coefficients`).

    ``x0_prev``: the previous step's data prediction (possibly by another expert), or None for a first-order step.
    ``second_order``: optional bool mask broadcastable to ``x``: where False the step is first order (``D = x0``), e.g.
    for latent pixels whose previous prediction was made while they were held (region refinement).
    """
    if x0_prev is None:
        return ratio * x + gain * x0
    d = (1.0 + w) * x0 - w * x0_prev
    if second_order is not None:
        d = torch.where(second_order, d, x0)
    return ratio * x + gain * d
