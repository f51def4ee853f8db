"""The refinement plan: every choice of a refinement, validated once and frozen, with its coefficients on the device
(:func:`build_plan`); :mod:`ldm.sampling.loop` runs it without checking again."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ldm.sampling.denoisers import Denoiser
from ldm.sampling.schedule import NoiseSchedule, ddim_coefficients, dpmpp_2m_coefficients, exact_tail, grid_tail
from ldm.windows import describe_start

SAMPLERS = ("ddim", "dpmpp_2m")
DEFAULT_DDIM_STEPS = 50
# assign(timesteps, what) -> index of the denoiser serving each timestep; raises ValueError for steps it cannot serve
Assign = Callable[[Sequence[int], str], Sequence[int]]


def check_int_arg(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int if it is an integer (not a bool) in ``[lo, hi]``; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise ValueError(f"{name}={value!r} must be an integer in [{lo}, {hi}]")
    return int(value)


def check_eta(eta: Any) -> float:
    """DDIM's ``eta`` as a float if it is a number in ``[0, 1]``; else a ValueError.  Above 1 a step's noise
    ``sigma_t`` can exceed ``sqrt(1 - alpha_prev)`` and the step's direction term is the root of a negative number."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) or not 0 <= eta <= 1:
        raise ValueError(f"eta={eta!r} must be a number in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like noise)")
    return float(eta)


def check_solver(sampler: Any, eta: Any) -> float:
    """``eta`` as a float if ``sampler`` is one of :data:`SAMPLERS` and ``eta`` fits it (> 0: DDIM only); else ValueError."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; choose one of {list(SAMPLERS)}")
    eta = check_eta(eta)
    if eta > 0 and sampler != "ddim":
        raise ValueError(f"eta={eta:g} applies to the ddim sampler only; {sampler} is deterministic: pass eta=0")
    return eta


def resolve_start(start_t: Any, strength: Any, num_timesteps: int) -> int:
    """The start timestep from ``start_t`` or from img2img's ``strength`` ``s`` in ``(0, 1]`` (not both):
    ``min(round(s * T), T - 1)`` (``T - 1`` is the noisiest level a latent can be noised to).  ValueError for both, a
    non-integer or out-of-range ``start_t``, or a strength outside ``(0, 1]`` or rounding to timestep 0."""
    top = num_timesteps - 1
    if strength is not None:
        if start_t is not None:
            raise ValueError("start_t and strength were both given: pass one (strength s means start_t = round(s * T))")
        number = (int, float, np.integer, np.floating)
        ok = not isinstance(strength, bool) and isinstance(strength, number) and math.isfinite(strength)
        if not ok or not 0 < strength <= 1:
            raise ValueError(f"strength={strength!r} must be a number in (0, 1] (the share of the noise levels to redo)")
        start = min(int(round(float(strength) * num_timesteps)), top)
        if start < 1:
            raise ValueError(f"strength={strength!r} rounds to start_t=0 (no step): use strength > {0.5 / num_timesteps:g}")
        return start
    if isinstance(start_t, bool) or not isinstance(start_t, (int, np.integer)):
        raise ValueError(f"start_t={start_t!r} must be an integer timestep in [1, {top}]")
    if not 1 <= int(start_t) <= top:
        raise ValueError(
            f"start_t={start_t} is outside [1, {top}]: it is a timestep index t (t = {num_timesteps} - step), e.g. 500 = "
            f"halfway; 1 changes almost nothing, {top} almost everything"
        )
    return int(start_t)


@dataclass(frozen=True)
class RefinePlan:
    """What a refinement runs, frozen.

    Attributes:
        start_t: the requested start timestep.  effective_start: the level the latent is noised to and the first step
            runs at (``<= start_t``; equal to it with ``tail_steps``).
        timesteps: the steps, descending (integer timesteps).  levels: the level each step moves the latent to.
        sampler, eta: the solver and DDIM's noise.  ddim_steps / tail_steps: how the steps were chosen (one is None).
        experts: index of the expert serving each step.  expert_names: names, indexed by ``experts``.
        denoisers: the callable of each step.  coefficients: per-step tensors ``[n]`` on the device (float32 unless
            built with another ``dtype``).
    """

    start_t: int
    timesteps: tuple[int, ...]
    levels: tuple[int, ...]
    sampler: str
    eta: float
    ddim_steps: int | None
    tail_steps: int | None
    experts: tuple[int, ...]
    expert_names: tuple[str, ...]
    num_timesteps: int
    denoisers: tuple[Denoiser, ...] = field(repr=False, compare=False)
    coefficients: dict[str, torch.Tensor] = field(repr=False, compare=False)

    @property
    def effective_start(self) -> int:
        return self.timesteps[0]

    @property
    def routing(self) -> tuple[tuple[int, int, int], ...]:
        """Runs of consecutive steps served by one expert: ``((first t, last t, expert index), ...)``."""
        runs = []
        for i, run in itertools.groupby(zip(self.timesteps, self.experts), key=lambda step: step[1]):
            ts = [t for t, _ in run]
            runs.append((ts[0], ts[-1], i))
        return tuple(runs)

    def describe_routing(self) -> str:
        """``"t 481-261 (steps 519-739): a.ckpt; t 241-1 (steps 759-999): b.ckpt"``."""
        steps = self.num_timesteps
        return "; ".join(
            f"t {hi}-{lo} (steps {steps - hi}-{steps - lo}): {self.expert_names[i]}"
            if hi != lo
            else f"t {hi} (step {steps - hi}): {self.expert_names[i]}"
            for hi, lo, i in self.routing
        )

    def describe(self) -> str:
        """One line for logs: requested and effective start, steps, solver, routing."""
        if self.tail_steps is not None:
            how = f"{len(self.timesteps)} exact step(s) from t={self.effective_start}"
        else:
            # CompVis' grid steps every T // ddim_steps timesteps: above T / 2 steps it has more entries than asked
            size = len(grid_tail(self.num_timesteps - 1, self.ddim_steps, self.num_timesteps)[0])
            of = f"{self.ddim_steps}" if size == self.ddim_steps else f"the grid's {size} (ddim_steps={self.ddim_steps})"
            how = f"first DDIM grid step at t={self.effective_start} ({len(self.timesteps)} of {of} steps)"
        solver = f"{self.sampler}, eta={self.eta:g}" if self.sampler == "ddim" else self.sampler
        return f"{describe_start(self.start_t, self.num_timesteps)} -> {how}, {solver}; {self.describe_routing()}"


def select_timesteps(
    alphas_cumprod: torch.Tensor, start_t: int, ddim_steps: Any, tail_steps: Any, t_min: int = 0
) -> tuple[tuple[int, ...], tuple[int, ...], int | None, int | None]:
    """The steps for ``start_t``: ``(timesteps, levels, ddim_steps, tail_steps)`` with exactly one count set:
    ``ddim_steps`` (the grid mode; default :data:`DEFAULT_DDIM_STEPS`) or ``tail_steps`` (exact, ``1 <= K <= start_t``;
    not both).  See :mod:`ldm.sampling.schedule`."""
    num_timesteps = int(alphas_cumprod.shape[0])
    if tail_steps is not None:
        if ddim_steps is not None:
            raise ValueError(
                f"ddim_steps={ddim_steps!r} and tail_steps={tail_steps!r} were both given: ddim_steps picks the DDIM grid "
                "entries <= start_t, tail_steps runs exactly K steps from start_t; pass one"
            )
        k = check_int_arg("tail_steps", tail_steps, 1, start_t)
        timesteps = exact_tail(alphas_cumprod, start_t, k)
        return timesteps, (*timesteps[1:], 0), None, k  # each step moves to the next one's timestep, the last to 0
    steps = DEFAULT_DDIM_STEPS if ddim_steps is None else check_int_arg("ddim_steps", ddim_steps, 1, num_timesteps)
    timesteps, levels = grid_tail(start_t, steps, num_timesteps, t_min)
    if not timesteps:
        first = grid_tail(num_timesteps - 1, steps, num_timesteps)[0][-1]
        raise ValueError(
            f"start_t={start_t} holds no step of the {steps}-step DDIM grid (its lowest entry is t={first}): raise "
            "start_t, use more ddim_steps, or use tail_steps for an exact step count"
        )
    return timesteps, levels, steps, None


def build_plan(
    schedule: NoiseSchedule,
    start_t: int,
    denoisers: Sequence[Denoiser],
    device: torch.device | str,
    *,
    ddim_steps: int | None = None,
    tail_steps: int | None = None,
    eta: float = 0.0,
    sampler: str = "ddim",
    assign: Assign | None = None,
    expert_names: Sequence[str] = ("model",),
    t_min: int = 0,
    dtype: torch.dtype = torch.float32,
) -> RefinePlan:
    """Validate a refinement's arguments and build its :class:`RefinePlan`.

    Args:
        start_t: integer timestep in ``[1, T-1]``.  denoisers: one per expert.  device: the coefficients' (the latents').
        ddim_steps, tail_steps: see :func:`select_timesteps`.  assign: the router (None: every step runs
            ``denoisers[0]``).  t_min: grid mode only: leave out grid steps below it (a window's own tail).
        dtype: of the coefficients (float32 for refinement, float64 for numerical checks).

    Raises:
        ValueError: any argument outside what is allowed, or steps no expert may serve; each message says what to change.
    """
    num_timesteps = schedule.num_timesteps
    start_t = resolve_start(start_t, None, num_timesteps)
    eta = check_solver(sampler, eta)
    acp = schedule.alphas_cumprod
    timesteps, levels, ddim_steps, tail_steps = select_timesteps(acp, start_t, ddim_steps, tail_steps, t_min)
    what = f"{describe_start(start_t, num_timesteps)}, {len(timesteps)} steps from t={timesteps[0]},"
    experts = tuple(int(i) for i in assign(timesteps, what)) if assign is not None else (0,) * len(timesteps)
    index = torch.as_tensor(list(timesteps), dtype=torch.long)
    coefficients = {"sqrt_a": schedule.sqrt_alphas_cumprod[index], "sqrt_1ma": schedule.sqrt_one_minus_alphas_cumprod[index]}
    if sampler == "ddim":
        coefficients.update(ddim_coefficients(acp, timesteps, levels, eta))
    else:
        coefficients.update(dpmpp_2m_coefficients(acp, timesteps, levels))
    on_device = {k: v.to(device=device, dtype=dtype) for k, v in coefficients.items()}
    return RefinePlan(
        start_t=start_t,
        timesteps=timesteps,
        levels=levels,
        sampler=sampler,
        eta=eta,
        ddim_steps=ddim_steps,
        tail_steps=tail_steps,
        experts=experts,
        expert_names=tuple(expert_names),
        num_timesteps=num_timesteps,
        denoisers=tuple(denoisers[i] for i in experts),
        coefficients=on_device,
    )
