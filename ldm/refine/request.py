"""``RefineRequest``: every option of one refinement, with its default, written once.

``scripts/refine.py`` builds one from its flags, the web app from its JSON (:class:`ldm.app.handlers.RefineSettings`)
and the Python API from :meth:`ldm.refine.Refiner.__call__`'s / :meth:`~ldm.refine.Refiner.refine_tensors`' keywords.
It is validated once, where it is built (``__post_init__``: every check that does not need the experts), and the
layers below take it unchanged: :func:`ldm.refine.batch.refine_files` -> :meth:`ldm.refine.Refiner.refine` -> the plan
(:meth:`ldm.refine.Refiner.plan_for`, which adds the checks that need the experts: the start against ``T``, the steps
against the expert windows).  A new refinement option is a field here, its use in the plan or the loop, and its flag.

The region options (mask file, boxes, feather, dilation, crop mode) are a :class:`~ldm.refine.region_files.RegionOptions`
(validated when it is made); the prompt is a :class:`~ldm.imageio.prompt.Prompt` (validated when it is made).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ldm.imageio.prompt import Prompt
from ldm.refine.region_files import RegionOptions
from ldm.sampling import check_int_arg, check_solver, resolve_start

DEFAULT_START_T = 500
MAX_SEED = 2**63 - 1
MAX_SAMPLES = 1_000_000  # samples per input: a bound on names and loops (the app has its own, smaller one)


@dataclass(frozen=True)
class RefineRequest:
    """What one refinement runs (see the module docstring).

    Attributes:
        start_t: integer timestep to noise to (``[1, T-1]``; default 500), or ``strength`` ``s`` in ``(0, 1]``
            (``start_t = min(round(s * T), T - 1)``); not both.  Boxes with a later start of their own move the plan's
            start up (:meth:`plan_start`).
        ddim_steps: the DDIM grid size (the steps are its entries ``<= start``; default 50), or ``tail_steps``: exactly
            K steps from the start itself; not both.
        sampler: ``"ddim"`` or ``"dpmpp_2m"`` (DPM-Solver++(2M)).  eta: DDIM noise, a finite number ``>= 0`` (0:
            deterministic); DDIM only.
        seed, n_samples: sample ``k`` of an input uses seed ``seed + k`` (``seed + n_samples - 1 <= 2**63 - 1``).
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
        if self.start_t is not None and (isinstance(self.start_t, bool) or not isinstance(self.start_t, int)):
            raise ValueError(f"start_t={self.start_t!r} must be an integer timestep (t = T - step)")
        # its range [1, T - 1] and the strength's (0, 1] are checked with T when the plan is built
        # the step counts are checked with the start and T when the plan is built (Refiner.plan_for)
        check_solver(self.sampler, self.eta)
        check_int_arg("seed", self.seed, 0, MAX_SEED)
        check_int_arg("n_samples", self.n_samples, 1, MAX_SAMPLES)
        if self.seed + self.n_samples - 1 > MAX_SEED:
            raise ValueError(f"seed {self.seed} with {self.n_samples} samples would use seeds up to "
                             f"{self.seed + self.n_samples - 1}; the last seed must be at most {MAX_SEED}")  # fmt: skip
        if not isinstance(self.regions, RegionOptions):
            raise ValueError(f"regions must be a RegionOptions, got {type(self.regions).__name__}")
        # crop mode without a mask or boxes is refused where the region is known: a tensor start map passed to
        # Refiner.refine is one too
        if self.prompt is not None and not isinstance(self.prompt, Prompt):
            raise ValueError(f"prompt must be a Prompt (ldm.imageio.prompt), got {type(self.prompt).__name__}")

    def replace(self, **changes: Any) -> RefineRequest:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def start(self, num_timesteps: int) -> int:
        """The start timestep for ``T = num_timesteps``: ``start_t``, or the one ``strength`` gives, or the default."""
        start_t = DEFAULT_START_T if self.start_t is None and self.strength is None else self.start_t
        return resolve_start(start_t, self.strength, num_timesteps)

    def plan_start(self, num_timesteps: int) -> int:
        """The plan's first step: :meth:`start`, or a box's later start of its own (each checked against ``T``)."""
        starts = [resolve_start(b.start_t, None, num_timesteps) for b in self.regions.boxes if b.start_t is not None]
        return max([self.start(num_timesteps), *starts])

    def plan_arguments(self) -> dict[str, Any]:
        """``ddim_steps`` / ``eta`` / ``tail_steps`` / ``sampler`` for :meth:`ldm.refine.Refiner.plan`."""
        return {"ddim_steps": self.ddim_steps, "eta": self.eta, "tail_steps": self.tail_steps, "sampler": self.sampler}

    def sample_seeds(self) -> list[int]:
        """The seed of each sample of an input: ``seed, seed + 1, ..., seed + n_samples - 1``."""
        return [self.seed + k for k in range(self.n_samples)]
