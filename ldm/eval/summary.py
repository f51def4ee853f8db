"""A sweep's summary (:func:`summarize`): per degradation x method x start_t, ``n`` and every row metric's mean over
cases with its 95 % percentile-bootstrap interval (``m_lo`` / ``m_hi``; none where a value is infinite), the paired
gains of :data:`GAINS`, the set metrics and ``gain_swd`` (paired SWD resamples, < 0: more like clean images); seeded,
so a summary is the same on every run.  :func:`best_start` picks a ``start_t`` by cross-fitting.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ldm.eval.metrics import Skipped
from ldm.eval.stats import CONFIDENCE, N_RESAMPLES, Interval, bootstrap_mean, bootstrap_paired_difference
from ldm.eval.swd import paired_swd_difference
from ldm.eval.sweep import ROW_METRICS, SWD_SCALE, SweepResult

IDENTITY = "identity"  # the artifact itself
ROUND_TRIP = "autoencoder"  # the first stage's round trip of the artifact: a gain over it is the diffusion steps'
# gain column -> (row metric, the baseline it is paired with); > 0: the method is closer than the baseline
GAINS: dict[str, tuple[str, str]] = {
    "gain_psnr_clean_in": ("psnr_clean_in", IDENTITY),
    "gain_psnr_clean": ("psnr_clean", IDENTITY),
    "gain_psnr_rt_in": ("psnr_rt_in", ROUND_TRIP),
    "gain_psnr_rt": ("psnr_rt", ROUND_TRIP),
}
SET_KEYS = ("swd", "swd_lo", "swd_hi", "fid", "kid_mean", "kid_std", "skipped")


def interval_columns(names: tuple[str, ...]) -> tuple[str, ...]:
    """``(m, m_lo, m_hi)`` for each name, in order: the summary's column layout."""
    return tuple(c for m in names for c in (m, f"{m}_lo", f"{m}_hi"))


SUMMARY_METRICS: tuple[str, ...] = interval_columns(ROW_METRICS + tuple(GAINS)) + interval_columns(("gain_swd",))


def format_entry(entry: dict[str, Any], key: str, fmt: str = "{:.2f}", sign: bool = False, missing: str = "n/a") -> str:
    """``"12.34 [11.90, 12.80]"``: column ``key`` of a summary entry with its interval ``key_lo`` / ``key_hi`` where it
    has one; ``sign`` writes ``+`` on positive values; ``missing`` where the column was not measured."""
    value = entry.get(key)
    if not isinstance(value, float):
        return missing
    f = fmt.replace("{:", "{:+") if sign else fmt
    if isinstance(entry.get(f"{key}_lo"), float):
        return f"{f.format(value)} [{f.format(entry[key + '_lo'])}, {f.format(entry[key + '_hi'])}]"
    return f.format(value)


def summarize(
    result: SweepResult, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> list[dict[str, Any]]:
    """One entry per degradation x method x start_t, in run order.  Skipped cells are left out of the means (a column
    skipped everywhere holds the :class:`Skipped` value); an infinite PSNR stays ``inf``, without an interval."""
    groups: dict[tuple[str, str, int | None], list[dict[str, Any]]] = defaultdict(list)
    for row in result.rows:
        groups[(row["degradation"], row["method"], row["start_t"])].append(row)
    sets = {(s["degradation"], s["method"], s["start_t"]): s for s in result.set_metrics}
    order = {name: i for i, name in enumerate(result.methods)}
    deg_order = {d: i for i, d in enumerate(result.degradations)}
    keys = sorted(groups, key=lambda k: (deg_order.get(k[0], 0), order.get(k[1], 0), -1 if k[2] is None else k[2]))
    summary = []
    for key in keys:
        rows = groups[key]
        entry: dict[str, Any] = {
            "degradation": key[0],
            "method": key[1],
            "kind": rows[0]["kind"],
            "start_t": key[2],
            "effective_start": rows[0]["effective_start"],
            "n": len(rows),
            "seconds": float(np.mean([r["seconds"] for r in rows])),
        }
        for column in ROW_METRICS:
            values = [r[column] for r in rows if column in r]
            if not values:
                continue
            numbers = [v for v in values if not isinstance(v, Skipped)]
            entry[column] = float(np.mean(numbers)) if numbers else values[0]
            if numbers and np.isfinite(numbers).all():
                interval = bootstrap_mean(numbers, confidence, n_resamples, seed)
                entry[f"{column}_lo"], entry[f"{column}_hi"] = interval.lo, interval.hi
        for gain, (column, baseline) in GAINS.items():  # paired by image and seed, where every case has finite values
            before = {(r["image"], r["seed"]): r.get(column) for r in groups.get((key[0], baseline, None), [])}
            pairs = [(r.get(column), before.get((r["image"], r["seed"]))) for r in rows]
            if key[1] != baseline and all(isinstance(v, float) and math.isfinite(v) for pair in pairs for v in pair):
                interval = bootstrap_paired_difference(*zip(*pairs), confidence, n_resamples, seed)
                entry[gain], entry[f"{gain}_lo"], entry[f"{gain}_hi"] = interval.estimate, interval.lo, interval.hi
        if key in sets:
            entry.update({k: v for k, v in sets[key].items() if k in SET_KEYS})
            artifact = sets.get((key[0], IDENTITY, None))
            if key[1] != IDENTITY and artifact is not None and "swd_bootstrap" in artifact and "swd_bootstrap" in sets[key]:
                difference = paired_swd_difference(sets[key]["swd_bootstrap"], artifact["swd_bootstrap"], confidence)
                entry["gain_swd"] = difference.estimate * SWD_SCALE
                entry["gain_swd_lo"], entry["gain_swd_hi"] = difference.lo * SWD_SCALE, difference.hi * SWD_SCALE
        summary.append(entry)
    return summary


@dataclass(frozen=True)
class BestStart:
    """A method's best ``start_t`` on one degradation, chosen without looking at the images it is reported on.

    ``start_ts``: the start_t chosen on each half of the images (even and odd positions in name order) by the mean
    gain of ``column`` over ``baseline``.  ``value`` and ``gain`` (with bootstrap intervals over images): each image at
    the start_t chosen on the *other* half (cross-fitting), so picking the best of several does not inflate them.
    """

    method: str
    degradation: str
    column: str
    baseline: str
    start_ts: tuple[int, int]
    value: Interval
    gain: Interval
    baseline_value: Interval
    per_case: dict[tuple[str, int], float]  # (image, seed) -> the cross-fitted value, for paired comparisons


def best_start(
    result: SweepResult,
    method: str,
    degradation: str,
    column: str = "psnr_clean_in",
    baseline: str = IDENTITY,
    picks: tuple[int, int] | None = None,
) -> BestStart | None:
    """The cross-fitted best start of ``method`` on ``degradation``; None when the sweep holds fewer than two cases
    with finite values of ``column`` for the method and the baseline.  ``picks``: the two halves' start_ts given
    instead of chosen (e.g. another column's choice, to read two measures at the same start_ts)."""
    before = {
        (r["image"], r["seed"]): r.get(column)
        for r in result.rows
        if r["method"] == baseline and r["degradation"] == degradation
    }
    after: dict[int, dict[tuple[str, int], float]] = defaultdict(dict)
    for r in result.rows:
        if r["method"] == method and r["degradation"] == degradation and isinstance(r.get(column), float):
            after[r["start_t"]][(r["image"], r["seed"])] = r[column]
    cases = sorted(k for k, v in before.items() if isinstance(v, float) and np.isfinite(v))
    cases = [k for k in cases if all(k in values and np.isfinite(values[k]) for values in after.values())]
    if len(cases) < 2 or not after:
        return None
    halves = (cases[0::2], cases[1::2])
    ts = sorted(after)

    def chosen(half: list[tuple[str, int]]) -> int:
        gains = [np.mean([after[t][k] - before[k] for k in half]) for t in ts]
        return ts[int(np.argmax(gains))]

    if picks is None:
        picks = (chosen(halves[0]), chosen(halves[1]))
    values, base, per_case = [], [], {}
    for pick, half in ((picks[1], halves[0]), (picks[0], halves[1])):  # each half at the other half's choice
        values += [after[pick][k] for k in half]
        base += [before[k] for k in half]
        per_case.update({k: after[pick][k] for k in half})
    return BestStart(
        method,
        degradation,
        column,
        baseline,
        picks,
        bootstrap_mean(values),
        bootstrap_paired_difference(values, base),
        bootstrap_mean(base),
        per_case,
    )


def compare_best(a: BestStart, b: BestStart) -> Interval:
    """``a``'s cross-fitted value minus ``b``'s on the cases both hold (e.g. two refiners on the same images), with a
    paired bootstrap interval over those cases."""
    common = sorted(set(a.per_case) & set(b.per_case))
    return bootstrap_paired_difference([a.per_case[k] for k in common], [b.per_case[k] for k in common])
