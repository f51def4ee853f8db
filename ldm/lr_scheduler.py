"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR`` (latent-diffusion's ``scheduler_config`` targets):
``schedule(step)`` is the multiplier of the base learning rate at optimizer step ``step``."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max`` over ``warm_up_steps``, then cosine decay to ``lr_min`` at
    ``max_decay_steps`` (values are multipliers of the base learning rate)."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int):
        for name, value in (("warm_up_steps", warm_up_steps), ("max_decay_steps", max_decay_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer number of steps")
        for name, value in (("lr_min", lr_min), ("lr_max", lr_max), ("lr_start", lr_start)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite multiplier >= 0 of the base learning rate")
        if max_decay_steps <= warm_up_steps:
            raise ValueError(f"max_decay_steps={max_decay_steps} must exceed warm_up_steps={warm_up_steps}")
        self.warm_up_steps = warm_up_steps
        self.max_decay_steps = max_decay_steps
        self.lr_start, self.lr_min, self.lr_max = lr_start, lr_min, lr_max

    def schedule(self, n: int) -> float:
        if n < self.warm_up_steps:
            return (self.lr_max - self.lr_start) / self.warm_up_steps * n + self.lr_start
        t = min((n - self.warm_up_steps) / (self.max_decay_steps - self.warm_up_steps), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))

    __call__ = schedule


class LambdaLinearScheduler:
    """Piecewise schedule over cycles: in cycle ``i`` (length ``cycle_lengths[i]``), linear warm-up from
    ``f_start[i]`` to ``f_max[i]`` over ``warm_up_steps[i]``, then linear decay to ``f_min[i]`` at the cycle's end."""

    def __init__(
        self,
        warm_up_steps: Sequence[int],
        f_min: Sequence[float],
        f_max: Sequence[float],
        f_start: Sequence[float],
        cycle_lengths: Sequence[int],
    ):
        n = len(cycle_lengths)
        if not len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == n:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths must have the same length")
        self.warm_up_steps, self.f_min, self.f_max, self.f_start = warm_up_steps, f_min, f_max, f_start
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0, *itertools.accumulate(self.cycle_lengths)]

    def schedule(self, n: int) -> float:
        # the cycle holding step n; steps past the last cycle stay in it
        c = min(bisect.bisect_right(self.cum_cycles, n) - 1, len(self.cycle_lengths) - 1)
        n = n - self.cum_cycles[c]
        if n < self.warm_up_steps[c]:
            return (self.f_max[c] - self.f_start[c]) / self.warm_up_steps[c] * n + self.f_start[c]
        frac = min((self.cycle_lengths[c] - n) / self.cycle_lengths[c], 1.0)
        return self.f_min[c] + (self.f_max[c] - self.f_min[c]) * max(frac, 0.0)

    __call__ = schedule
