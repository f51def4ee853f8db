"""Timestep windows, shared by training and routing: step <-> t conversion, validation, which window serves each
timestep.  A window is half-open, ``[t_min, t_max)`` in timestep indices ``t`` in ``[0, T)``; step k of T is
``t = T - k``, so steps 500-750 are ``t in [250, 500)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Window = tuple[int, int]


def validate_window(t_min: Any, t_max: Any, num_timesteps: int) -> Window:
    """Check ``0 <= t_min < t_max <= num_timesteps`` (integers) and return ``(t_min, t_max)``."""
    ok_types = all(isinstance(v, int) and not isinstance(v, bool) for v in (t_min, t_max))
    if not ok_types or not 0 <= t_min < t_max <= num_timesteps:
        raise ValueError(
            f"window t_min={t_min!r}, t_max={t_max!r} is invalid: need integers 0 <= t_min < t_max <= {num_timesteps}. "
            f"Sampling steps a-b of {num_timesteps} are t in [{num_timesteps}-b, {num_timesteps}-a), e.g. steps 500-750 "
            "-> t_min=250, t_max=500; steps 750-1000 -> t_min=0, t_max=250."
        )
    return int(t_min), int(t_max)


def steps_to_window(step_start: int, step_end: int, num_timesteps: int = 1000) -> Window:
    """Sampling steps ``[step_start, step_end]`` of ``num_timesteps`` -> timestep window ``[T - step_end, T - step_start)``."""
    return validate_window(num_timesteps - step_end, num_timesteps - step_start, num_timesteps)


def window_to_steps(t_min: int, t_max: int, num_timesteps: int = 1000) -> tuple[int, int]:
    """Timestep window ``[t_min, t_max)`` -> sampling steps ``(T - t_max, T - t_min)``."""
    return num_timesteps - t_max, num_timesteps - t_min


def describe_window(window: Window, num_timesteps: int, name: str | None = None) -> str:
    """``"[250, 500) = steps 500-750 (name)"``."""
    a, b = window_to_steps(*window, num_timesteps)
    return f"[{window[0]}, {window[1]}) = steps {a}-{b}" + (f" ({name})" if name else "")


def describe_start(start_t: int, num_timesteps: int) -> str:
    """``"start_t=400 (step 600)"``."""
    return f"start_t={start_t} (step {num_timesteps - start_t})"


def format_timesteps(timesteps: Sequence[int], num_timesteps: int, limit: int = 12) -> str:
    """``"t=781, 761, ..., 501 (steps 219-499, 15 grid steps)"``: a readable list of timesteps and their steps."""
    ts = sorted({int(t) for t in timesteps}, reverse=True)
    shown = ts if len(ts) <= limit else [*ts[: limit // 2], "...", *ts[-(limit // 2) :]]
    steps = f"steps {num_timesteps - ts[0]}-{num_timesteps - ts[-1]}" if len(ts) > 1 else f"step {num_timesteps - ts[0]}"
    return f"t={', '.join(str(t) for t in shown)} ({steps}, {len(ts)} grid step{'s' if len(ts) != 1 else ''})"


def assign_windows(
    windows: Sequence[Window],
    timesteps: Sequence[int],
    num_timesteps: int,
    names: Sequence[str] | None = None,
    allow_outside: bool = False,
    what: str = "the steps",
) -> tuple[list[int], list[int]]:
    """Which window serves each timestep: ``(index per timestep, timesteps no window covers)`` (the second list is
    empty unless ``allow_outside``, which sends such a timestep to the nearest window).  ``names`` name the experts and
    ``what`` the run in messages.  ValueError for a timestep covered by two windows (always: which expert runs would be
    ambiguous), or by none (unless ``allow_outside``)."""
    names = list(names) if names is not None else [f"expert {i}" for i in range(len(windows))]
    described = "; ".join(describe_window(w, num_timesteps, n) for w, n in zip(windows, names))
    ts = [int(t) for t in timesteps]
    covering = {t: [i for i, (lo, hi) in enumerate(windows) if lo <= t < hi] for t in ts}
    overlaps = {t: idx for t, idx in covering.items() if len(idx) > 1}
    if overlaps:
        pairs = sorted({tuple(idx) for idx in overlaps.values()})
        both = "; ".join(" and ".join(describe_window(windows[i], num_timesteps, names[i]) for i in pair) for pair in pairs)
        raise ValueError(
            f"{what} has steps covered by more than one expert window: "
            f"{format_timesteps(list(overlaps), num_timesteps)} lie in {both}. Windows must not overlap on the steps you "
            f"run; pass experts whose windows tile the range (all windows: {described})"
        )
    gaps = [t for t in ts if not covering[t]]
    if gaps and not allow_outside:
        raise ValueError(
            f"{what} runs steps outside every expert window: {described}; uncovered: "
            f"{format_timesteps(gaps, num_timesteps)}. {_gap_hint(ts, gaps)}"
        )

    def nearest(t: int) -> int:  # the window t lies the fewest timesteps outside of (the first on a tie)
        return min(range(len(windows)), key=lambda i: (max(windows[i][0] - t, t - windows[i][1] + 1, 0), i))

    return [covering[t][0] if covering[t] else nearest(t) for t in ts], gaps


def _gap_hint(ts: list[int], gaps: list[int]) -> str:
    add = "add an expert whose window covers"
    nearest = "pass --allow-outside-window (allow_outside_window=True) to run the nearest expert there."
    if any(t < min(gaps) for t in ts):
        return f"Use a start_t below {min(gaps)} (--start-t), {add} the uncovered steps, or {nearest}"
    return f"The lowest steps are uncovered, so no start_t avoids them: {add} them, or {nearest}"
