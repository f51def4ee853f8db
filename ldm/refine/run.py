"""What one refinement call passes down to its passes (:class:`Run`), its phase timer, and :func:`unique_rows` (so
several samples of one image are encoded once)."""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

import torch

from ldm.refine.conditioning import PromptConditioning
from ldm.sampling import RefinePlan


def unique_rows(x: torch.Tensor) -> tuple[list[int], list[int]]:
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


@dataclass
class Run:
    """One refinement call's plan, generators (one per sample), progress reporting and encoded prompts (None without
    one).  :attr:`steps` is the plan that runs: guided when there is a prompt."""

    plan: RefinePlan
    generators: list[torch.Generator]
    progress: bool
    callback: Callable[[int], None] | None
    clock: PhaseClock
    conditioning: PromptConditioning | None = None
    index: int | None = None  # the one sample of a crop-mode run (its rows of the conditioning)

    def __post_init__(self) -> None:
        self.steps = self.plan if self.conditioning is None else self.conditioning.apply(self.plan, self.index)

    def sample(self, index: int) -> Run:
        """This run for sample ``index`` alone (crop mode refines one image at a time)."""
        return Run(self.plan, [self.generators[index]], self.progress, self.callback, self.clock, self.conditioning,
                    index)  # fmt: skip


class PhaseClock:
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
