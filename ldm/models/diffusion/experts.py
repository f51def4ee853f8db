"""Chained window experts: route each DDIM step to the model trained on that step's timestep.

A late-steps expert is trained on a window ``[t_min, t_max)`` of timesteps (``LateStepsLatentDiffusion.window()``); a
plain full-range ``LatentDiffusion`` covers ``[0, T)``.  :class:`ExpertRouter` is a denoiser (see
:mod:`ldm.models.diffusion.denoisers`): the sampler never branches on experts, it asks the router for the callable
that serves each step's timestep (``for_timestep(t)``, no device sync) and, before any work, whether every step is
served (``check_timesteps``).

Rules enforced by the router:

* every step is covered by exactly one window.  A gap (no window) or an overlap (two windows) is a ``ValueError`` that
  lists the windows (also as sampling "steps a-b": step k is timestep ``t = T - k``) and the offending steps;
  ``allow_outside_window=True`` runs the nearest expert on a gap (logged as a warning), overlaps stay errors;
* all experts share one noise schedule (``alphas_cumprod``), one latent scale (``scale_factor``) and one first stage
  (the same weights, compared tensor by tensor).  After the check the experts hold the *same* first-stage module,
  so only one copy is kept in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.models.diffusion.denoisers import Denoiser, ModelDenoiser
from ldm.models.diffusion.latesteps import validate_window, window_to_steps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expert:
    """A diffusion model with the timestep window ``[t_min, t_max)`` it serves, and a name for messages."""

    model: Any
    window: tuple[int, int]
    name: str

    @classmethod
    def from_model(cls, model: Any, name: str | None = None, window: Sequence[int] | None = None) -> Expert:
        """Wrap ``model``; the window defaults to ``model.window()`` or, for a model without one, ``[0, T)``."""
        num_timesteps = int(model.num_timesteps)
        if window is None:
            get_window = getattr(model, "window", None)
            window = get_window() if get_window is not None else (0, num_timesteps)
        t_min, t_max = validate_window(int(window[0]), int(window[1]), num_timesteps)
        return cls(model, (t_min, t_max), name or type(model).__name__)

    def covers(self, t: int) -> bool:
        return self.window[0] <= t < self.window[1]

    def distance(self, t: int) -> int:
        """How many timesteps ``t`` lies outside the window (0 inside)."""
        t_min, t_max = self.window
        return t_min - t if t < t_min else max(0, t - (t_max - 1))

    def describe(self, num_timesteps: int) -> str:
        """``"[250, 500) = steps 500-750 (name)"``."""
        a, b = window_to_steps(*self.window, num_timesteps)
        return f"[{self.window[0]}, {self.window[1]}) = steps {a}-{b} ({self.name})"


def format_timesteps(timesteps: Sequence[int], num_timesteps: int, limit: int = 12) -> str:
    """``"t=781, 761, ..., 501 (steps 219-499, 15 grid steps)"``: a readable list of timesteps and their steps."""
    ts = sorted({int(t) for t in timesteps}, reverse=True)
    shown = ts if len(ts) <= limit else [*ts[: limit // 2], "...", *ts[-(limit // 2) :]]
    steps = f"steps {num_timesteps - ts[0]}-{num_timesteps - ts[-1]}" if len(ts) > 1 else f"step {num_timesteps - ts[0]}"
    return f"t={', '.join(str(t) for t in shown)} ({steps}, {len(ts)} grid step{'s' if len(ts) != 1 else ''})"


def _first_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ in shape or value (and keys present in only one of the two)."""
    only = sorted(set(a) ^ set(b))
    differ = [k for k in a if k in b and (a[k].shape != b[k].shape or not torch.equal(a[k], b[k]))]
    return only + differ


def check_compatible(experts: Sequence[Expert]) -> None:
    """Raise ``ValueError`` unless all experts share the noise schedule, the latent scale and the first-stage weights.

    The message names the experts that differ and what differs (the first mismatching first-stage tensors).
    """
    ref = experts[0]
    ref_acp = ref.model.alphas_cumprod.detach().to("cpu", torch.float64)
    ref_scale = float(ref.model.scale_factor) if hasattr(ref.model, "scale_factor") else 1.0
    ref_fs = {k: v.detach().cpu() for k, v in ref.model.first_stage_model.state_dict().items()}
    for other in experts[1:]:
        acp = other.model.alphas_cumprod.detach().to("cpu", torch.float64)
        if acp.shape != ref_acp.shape or not torch.allclose(acp, ref_acp, rtol=1e-6, atol=1e-9):
            detail = (
                f"T={acp.shape[0]} vs T={ref_acp.shape[0]}"
                if acp.shape != ref_acp.shape
                else f"max |difference| {float((acp - ref_acp).abs().max()):.3g} at t={int((acp - ref_acp).abs().argmax())}"
            )
            raise ValueError(
                f"experts {other.name!r} and {ref.name!r} use different noise schedules (alphas_cumprod: {detail}); "
                "chained experts must be trained with the same timesteps, beta_schedule, linear_start and linear_end"
            )
        scale = float(other.model.scale_factor) if hasattr(other.model, "scale_factor") else 1.0
        if scale != ref_scale:
            raise ValueError(
                f"experts {other.name!r} and {ref.name!r} scale latents differently (scale_factor {scale:.6g} vs "
                f"{ref_scale:.6g}); their latent spaces do not match"
            )
        if other.model.first_stage_model is ref.model.first_stage_model:
            continue
        fs = {k: v.detach().cpu() for k, v in other.model.first_stage_model.state_dict().items()}
        bad = _first_differences(fs, ref_fs)
        if bad:
            raise ValueError(
                f"experts {other.name!r} and {ref.name!r} have different first stages: {len(bad)} of "
                f"{len(ref_fs)} tensors differ (first: {', '.join(bad[:5])}). Chained experts must share one "
                "autoencoder: train them from the same first-stage checkpoint (first_stage_config.params.ckpt_path)"
            )


def unify_first_stage(experts: Sequence[Expert]) -> None:
    """Point every expert at the first expert's first-stage module (call after :func:`check_compatible`)."""
    shared = experts[0].model.first_stage_model
    for expert in experts[1:]:
        expert.model.first_stage_model = shared


class ExpertRouter:
    """A :class:`~ldm.models.diffusion.denoisers.Denoiser` that sends each step to the expert whose window holds it.

    Args:
        experts: :class:`Expert` objects, or models (wrapped with :meth:`Expert.from_model`).
        allow_outside_window: on a timestep no window covers, run the nearest expert and log a warning instead of
            raising.  Overlapping windows are refused either way (which expert should run would be ambiguous).
        share_first_stage: after the compatibility check, make all experts hold one first-stage module.

    Raises:
        ValueError: empty list, or experts that differ in noise schedule, latent scale or first-stage weights.
    """

    def __init__(
        self,
        experts: Sequence[Expert | Any],
        allow_outside_window: bool = False,
        share_first_stage: bool = True,
    ):
        wrapped = [e if isinstance(e, Expert) else Expert.from_model(e, name=f"expert {i}") for i, e in enumerate(experts)]
        if not wrapped:
            raise ValueError("ExpertRouter needs at least one expert")
        check_compatible(wrapped)
        if share_first_stage:
            unify_first_stage(wrapped)
        self.experts: tuple[Expert, ...] = tuple(wrapped)
        self.allow_outside_window = bool(allow_outside_window)
        self.num_timesteps = int(wrapped[0].model.num_timesteps)
        self._denoisers = [ModelDenoiser(e.model) for e in wrapped]
        self._choice: dict[int, int] = {}
        self._warned: set[int] = set()  # uncovered timesteps already reported (warn once per timestep)

    @property
    def model(self) -> Any:
        """The first expert's model: it supplies the schedule, ``q_sample`` and the shared first stage."""
        return self.experts[0].model

    def describe_windows(self) -> str:
        return "; ".join(e.describe(self.num_timesteps) for e in self.experts)

    # ------------------------------------------------------------------------------------------------------ routing
    def assign(self, timesteps: Sequence[int], start_t: int | None = None) -> list[int]:
        """Index of the expert serving each timestep of ``timesteps`` (in order).

        Raises ``ValueError`` for timesteps covered by several windows, and for timesteps no window covers unless
        ``allow_outside_window`` (then the nearest expert serves them, with a warning).
        """
        ts = [int(t) for t in timesteps]
        covering = {t: [i for i, e in enumerate(self.experts) if e.covers(t)] for t in ts}
        overlaps = {t: idx for t, idx in covering.items() if len(idx) > 1}
        if overlaps:
            pairs = sorted({tuple(idx) for idx in overlaps.values()})
            names = "; ".join(" and ".join(self.experts[i].describe(self.num_timesteps) for i in pair) for pair in pairs)
            raise ValueError(
                f"{self._what(ts, start_t)} has steps covered by more than one expert window: "
                f"{format_timesteps(list(overlaps), self.num_timesteps)} lie in {names}. Windows must not overlap on the "
                f"steps you run; pass experts whose windows tile the range (all windows: {self.describe_windows()})"
            )
        gaps = [t for t in ts if not covering[t]]
        if gaps and not self.allow_outside_window:
            raise ValueError(
                f"{self._what(ts, start_t)} runs steps outside every expert window: {self.describe_windows()}; "
                f"uncovered: {format_timesteps(gaps, self.num_timesteps)}. {self._gap_hint(ts, gaps)}"
            )
        choice = [covering[t][0] if covering[t] else self._nearest(t) for t in ts]
        new_gaps = [t for t in gaps if t not in self._warned]
        if new_gaps:
            self._warned.update(new_gaps)
            used = sorted({self._nearest(t) for t in new_gaps})
            logger.warning(
                "allow_outside_window: %s outside every expert window (%s) run by the nearest expert (%s)",
                format_timesteps(new_gaps, self.num_timesteps),
                self.describe_windows(),
                ", ".join(self.experts[i].name for i in used),
            )
        self._choice.update(zip(ts, choice))
        return choice

    def check_timesteps(self, timesteps: Sequence[int], start_t: int | None = None) -> None:
        """Raise before any work if some timestep cannot be served (see :meth:`assign`)."""
        self.assign(timesteps, start_t)

    def for_timestep(self, t: int) -> Denoiser:
        """The denoiser of the expert serving integer timestep ``t`` (no device sync)."""
        return self._denoisers[self._index_for(int(t))]

    def routing(self, timesteps: Sequence[int]) -> list[tuple[int, int, int]]:
        """Runs of consecutive steps served by one expert: ``[(first t, last t, expert index), ...]``."""
        ts = [int(t) for t in timesteps]
        runs: list[tuple[int, int, int]] = []
        for t, i in zip(ts, self.assign(ts)):
            if runs and runs[-1][2] == i:
                runs[-1] = (runs[-1][0], t, i)
            else:
                runs.append((t, t, i))
        return runs

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """eps for ``x`` ``[B, C, H, W]`` at timesteps ``t`` ``[B]``.

        Samplers should call :meth:`for_timestep` instead; this entry point reads ``t`` back to the host to route and
        supports a batch mixing timesteps of different experts (``cond``: None or a tensor indexed along the batch).
        """
        values = t.tolist()
        experts = [self._index_for(v) for v in values]
        if len(set(experts)) == 1:
            return self._denoisers[experts[0]](x, t, cond)
        if cond is not None and not isinstance(cond, torch.Tensor):
            raise ValueError("a batch mixing timesteps of several experts supports cond=None or a tensor only")
        out = torch.empty_like(x)
        which = torch.tensor(experts, device=x.device)
        for i in sorted(set(experts)):
            sel = which == i
            out[sel] = self._denoisers[i](x[sel], t[sel], None if cond is None else cond[sel]).to(out.dtype)
        return out

    # ------------------------------------------------------------------------------------------------------ helpers
    def _index_for(self, t: int) -> int:
        if t not in self._choice:
            self.assign([t])
        return self._choice[t]

    def _nearest(self, t: int) -> int:
        return min(range(len(self.experts)), key=lambda i: (self.experts[i].distance(t), i))

    def _what(self, ts: list[int], start_t: int | None) -> str:
        if start_t is None:
            return f"the DDIM grid ({len(ts)} steps, t={max(ts)} down to {min(ts)})"
        return f"start_t={start_t} (first DDIM step t={ts[0]}, {len(ts)} steps)"

    def _gap_hint(self, ts: list[int], gaps: list[int]) -> str:
        lowest_gap = min(gaps)
        if any(t < lowest_gap for t in ts):
            return (
                f"Use a start_t below {lowest_gap} (--start-t), add an expert whose window covers the uncovered steps, "
                "or pass --allow-outside-window (allow_outside_window=True) to run the nearest expert there."
            )
        return (
            "The lowest steps are uncovered, so no start_t avoids them: add an expert whose window covers them, or pass "
            "--allow-outside-window (allow_outside_window=True) to run the nearest expert there."
        )
