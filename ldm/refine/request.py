"""``RefineRequest``: every option of one refinement, with its default, written once and validated where it is built
(the checks that need the experts: ``Refiner.plan_for``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ldm.imageio.prompt import Prompt
from ldm.refine.regions import RegionOptions
from ldm.sampling import check_int_arg, check_solver, resolve_start

DEFAULT_START_T = 500
MAX_SEED = 2**32 - 1  # torch seeds its CPU generator with the low 32 bits: seeds 0 and 2**32 drew the same noise
MAX_SAMPLES = 1_000_000  # samples per input: a bound on names and loops (the app has its own, smaller one)


def start_timestep(start_t: int | None, strength: float | None, num_timesteps: int) -> int:
    """``start_t``, or the one ``strength`` gives for ``T = num_timesteps``, or :data:`DEFAULT_START_T`."""
    if start_t is None and strength is None:
        start_t = DEFAULT_START_T
    return resolve_start(start_t, strength, num_timesteps)


@dataclass(frozen=True)
class RefineRequest:
    """What one refinement runs.

    Attributes:
        start_t: integer timestep to noise to (``[1, T-1]``; default 500), or ``strength`` ``s`` in ``(0, 1]``
            (``start_t = min(round(s * T), T - 1)``); not both.  Boxes with a later start of their own move the plan's
            start up (:meth:`plan_start`).
        ddim_steps: the DDIM grid size (the steps are its entries ``<= start``; default 50), or ``tail_steps``: exactly
            K steps from the start itself; not both.
        sampler: ``"ddim"`` or ``"dpmpp_2m"`` (DPM-Solver++(2M)).  eta: DDIM noise, a finite number ``>= 0`` (0:
            deterministic); DDIM only.
        seed, n_samples: sample ``k`` of an input uses seed ``seed + k`` (``seed + n_samples - 1 <= 2**32 - 1``).
        regions: masks / boxes / crop mode (the default: whole images).
        prompt: the prompt of text-conditioned experts (None: unconditional experts).
    """

    start_t: int | None = None
    strength: float | None = None
    ddim_steps: int | None = None
    tail_steps: int | None = None
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0
    n_samples: int = 1
    regions: RegionOptions = field(default_factory=RegionOptions)
    prompt: Prompt | None = None

    def __post_init__(self) -> None:
        if self.start_t is not None and self.strength is not None:
            raise ValueError("start_t and strength were both given: pass one (strength s means start_t = round(s * T))")
        if self.start_t is not None:
            if isinstance(self.start_t, bool) or not isinstance(self.start_t, (int, np.integer)):
                raise ValueError(f"start_t={self.start_t!r} must be an integer timestep (t = T - step)")
            object.__setattr__(self, "start_t", int(self.start_t))  # a numpy integer as a plain int (metadata, JSON)
        # start_t's range [1, T - 1], the strength's (0, 1] and the step counts are checked with T (Refiner.plan_for)
        check_solver(self.sampler, self.eta)
        check_int_arg("seed", self.seed, 0, MAX_SEED)
        check_int_arg("n_samples", self.n_samples, 1, MAX_SAMPLES)
        if self.seed + self.n_samples - 1 > MAX_SEED:
            raise ValueError(f"seed {self.seed} with {self.n_samples} samples would use seeds up to "
                             f"{self.seed + self.n_samples - 1}; the last seed must be at most {MAX_SEED}")  # fmt: skip
        if not isinstance(self.regions, RegionOptions):
            raise ValueError(f"regions must be a RegionOptions, got {type(self.regions).__name__}")
        if self.prompt is not None and not isinstance(self.prompt, Prompt):
            raise ValueError(f"prompt must be a Prompt (ldm.imageio.prompt), got {type(self.prompt).__name__}")

    def replace(self, **changes: Any) -> RefineRequest:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def start(self, num_timesteps: int) -> int:
        return start_timestep(self.start_t, self.strength, num_timesteps)

    def plan_start(self, num_timesteps: int) -> int:
        """The plan's first step: :meth:`start`, or a box's later start of its own."""
        starts = [resolve_start(b.start_t, None, num_timesteps) for b in self.regions.boxes if b.start_t is not None]
        return max([self.start(num_timesteps), *starts])

    def plan_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`ldm.refine.Refiner.plan`."""
        return {"ddim_steps": self.ddim_steps, "eta": self.eta, "tail_steps": self.tail_steps, "sampler": self.sampler}

    def sample_seeds(self) -> list[int]:
        """``seed, seed + 1, ..., seed + n_samples - 1``."""
        return [self.seed + k for k in range(self.n_samples)]
