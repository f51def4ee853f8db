"""A sweep's summary (:func:`summarize`, seeded: the same on every run) and :func:`best_start`, which picks a
``start_t`` by cross-fitting over images.  The unit of every interval is the image: an image's rows of all seeds are
resampled together (a cluster bootstrap), so running more seeds never narrows an interval as if they were more images.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ldm.eval.metrics import Skipped
from ldm.eval.stats import (
    CONFIDENCE,
    MIN_INTERVAL_N,
    N_RESAMPLES,
    SMALL_N,
    SMALL_N_COVERAGE,
    Interval,
    bootstrap_mean,
    bootstrap_paired_difference,
)
from ldm.eval.swd import paired_swd_difference
from ldm.eval.sweep import ROW_METRICS, SWD_SCALE, SweepResult

logger = logging.getLogger(__name__)

IDENTITY = "identity"  # the artifact itself
ROUND_TRIP = "autoencoder"  # the first stage's round trip of the artifact: a gain over it is the diffusion steps'
# gain column -> (row metric, the baseline it is paired with); > 0: the method is closer than the baseline
GAINS: dict[str, tuple[str, str]] = {
    "gain_psnr_clean_in": ("psnr_clean_in", IDENTITY),
    "gain_psnr_clean": ("psnr_clean", IDENTITY),
    "gain_psnr_rt_in": ("psnr_rt_in", ROUND_TRIP),
    "gain_psnr_rt": ("psnr_rt", ROUND_TRIP),
}
SET_KEYS = ("fid", "kid_mean", "kid_std", "skipped")
Case = tuple[str, int]  # (image, seed)


def interval_columns(names: tuple[str, ...]) -> tuple[str, ...]:
    """``(m, m_lo, m_hi, m_n)`` for each name, in order: the summary's column layout."""
    return tuple(c for m in names for c in (m, f"{m}_lo", f"{m}_hi", f"{m}_n"))


# the columns with m_lo / m_hi / m_n; swd's interval stays blank (an absolute SWD has none, see ldm.eval.swd)
INTERVAL_METRICS: tuple[str, ...] = ROW_METRICS + tuple(GAINS) + ("gain_swd", "swd")


def format_entry(entry: dict[str, Any], key: str, fmt: str = "{:.2f}", sign: bool = False, missing: str = "n/a") -> str:
    """``"12.34 [11.90, 12.80]"``: column ``key`` of a summary entry with its interval ``key_lo`` / ``key_hi`` where it
    has one; ``sign`` writes ``+`` on positive values; ``missing`` where the column was not measured."""
    value = entry.get(key)
    if not isinstance(value, float):
        return missing
    f = fmt.replace("{:", "{:+") if sign else fmt
    lo, hi = entry.get(f"{key}_lo"), entry.get(f"{key}_hi")
    if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
        return f"{f.format(value)} [{f.format(lo)}, {f.format(hi)}]"
    return f.format(value)


def _put(entry: dict[str, Any], column: str, interval: Interval) -> None:
    """``column`` = the estimate, ``column_n`` = its images and, where it has one, its interval."""
    entry[column], entry[f"{column}_n"] = interval.estimate, interval.n
    if interval.has_interval:
        entry[f"{column}_lo"], entry[f"{column}_hi"] = interval.lo, interval.hi


def summarize(
    result: SweepResult, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> list[dict[str, Any]]:
    """One entry per degradation x method x start_t, in run order: ``n`` (distinct images), ``cases`` (rows: images x
    seeds), ``seeds``, and per metric (and per gain of :data:`GAINS`, ``gain_swd``: < 0 is more like clean images) the
    mean over its values, ``m_n`` (the images it averages: skipped cells are left out) and ``m_lo`` / ``m_hi`` (a 95 %
    cluster bootstrap over images; none below two images or where a value is infinite, e.g. ``inf`` PSNR).  A column
    skipped everywhere holds the :class:`Skipped` value; set metrics (``swd``, FID/KID) have no interval."""
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
            "n": len({r["image"] for r in rows}),
            "cases": len(rows),
            "seeds": len({r["seed"] for r in rows}),
            "seconds": float(np.mean([r["seconds"] for r in rows])),
        }
        for column in ROW_METRICS:
            measured = [r for r in rows if column in r]
            if not measured:
                continue
            kept = [r for r in measured if not isinstance(r[column], Skipped)]
            if not kept:
                entry[column] = measured[0][column]
                continue
            numbers = [r[column] for r in kept]
            if np.isfinite(numbers).all():
                _put(entry, column, bootstrap_mean(numbers, confidence, n_resamples, seed, [r["image"] for r in kept]))
            else:  # an infinite PSNR: the mean, without an interval
                entry[column], entry[f"{column}_n"] = float(np.mean(numbers)), len({r["image"] for r in kept})
        for gain, (column, baseline) in GAINS.items():  # paired by image and seed, where every case has finite values
            before = {(r["image"], r["seed"]): r.get(column) for r in groups.get((key[0], baseline, None), [])}
            pairs = [(r.get(column), before.get((r["image"], r["seed"]))) for r in rows]
            if key[1] != baseline and all(isinstance(v, float) and math.isfinite(v) for pair in pairs for v in pair):
                after, base = zip(*pairs)
                clusters = [r["image"] for r in rows]
                _put(entry, gain, bootstrap_paired_difference(after, base, confidence, n_resamples, seed, clusters))
        own, artifact = sets.get(key, {}), sets.get((key[0], IDENTITY, None), {})
        entry.update({k: v for k, v in own.items() if k in SET_KEYS})
        if "swd" in own:
            entry["swd"] = own["swd"]
            if "swd_bootstrap" in own:
                entry["swd_n"] = own["swd_bootstrap"].n
        if key[1] != IDENTITY and "swd_bootstrap" in artifact and "swd_bootstrap" in own:
            difference = paired_swd_difference(own["swd_bootstrap"], artifact["swd_bootstrap"], confidence)
            estimate, lo, hi = (v * SWD_SCALE for v in (difference.estimate, difference.lo, difference.hi))
            _put(entry, "gain_swd", Interval(estimate, lo, hi, difference.n, difference.confidence, difference.cases))
        summary.append(entry)
    return summary


def summary_notes(summary: Sequence[dict[str, Any]]) -> list[str]:
    """What a reader of ``summary`` (from :func:`summarize`) must know about its n and intervals, one line each: the
    images x seeds behind n, the blank intervals (fewer than two images; the absolute SWD) and the too-narrow ones."""
    notes = []
    seeded = [s for s in summary if s.get("seeds", 1) > 1]
    if seeded:
        shapes = sorted({(s["n"], s["seeds"]) for s in seeded})
        counts = ", ".join(f"n = {n} images × {k} seeds" for n, k in shapes)
        swd = any("gain_swd" in s for s in seeded)
        notes.append(
            f"n counts images ({counts}; column cases: the rows averaged): every interval resamples images, each with "
            "all its seeds' rows"
            + (" (and in gain_swd all its seeds' outputs)" if swd else "")
            + ", so extra seeds are never counted as extra images"
        )
    counted = [(s, k[: -len("_n")], v) for s in summary for k, v in s.items() if k.endswith("_n") and isinstance(v, int)]
    if any(n < MIN_INTERVAL_N for _, m, n in counted if m != "swd"):
        notes.append(f"no interval where fewer than {MIN_INTERVAL_N} images are averaged (m_n): those cells are blank")
    small = sorted({n for s, m, n in counted if f"{m}_lo" in s and n < SMALL_N})
    if small:
        coverage = ", ".join(f"{100 * c:.0f} % at n = {n}" for n, c in SMALL_N_COVERAGE.items())
        notes.append(
            f"intervals over fewer than {SMALL_N} images (here n = {', '.join(map(str, small))}) are too narrow: a "
            f"95 % percentile-bootstrap interval of a mean covers it about {coverage} (normal data)"
        )
    if any(isinstance(s.get("swd"), float) for s in summary):
        notes.append(
            "SWD has no interval (swd_lo / swd_hi blank): no bootstrap interval of an absolute SWD covers it; the "
            "paired change against the artifact on the same images (gain_swd) has its 95 % interval"
        )
    return notes


@dataclass(frozen=True)
class BestStart:
    """A method's best ``start_t`` on one degradation, chosen without looking at the images it is reported on.
    ``start_ts``: the start_t chosen on each half of the images (even and odd positions in name order, with all their
    seeds) by the mean gain of ``column`` over ``baseline``; ``value`` and ``gain``: each image at the start_t chosen
    on the *other* half (cross-fitting), so picking the best of several does not inflate them."""

    method: str
    degradation: str
    column: str
    baseline: str
    start_ts: tuple[int, int]
    value: Interval
    gain: Interval
    baseline_value: Interval
    per_case: dict[Case, float]  # (image, seed) -> the cross-fitted value, for paired comparisons


def best_start(
    result: SweepResult,
    method: str,
    degradation: str,
    column: str = "psnr_clean_in",
    baseline: str = IDENTITY,
    picks: tuple[int, int] | None = None,
) -> BestStart | None:
    """The cross-fitted best start of ``method`` on ``degradation``; None when the sweep holds fewer than two images
    with finite values of ``column`` for the method and the baseline.  ``picks``: the two halves' start_ts given
    instead of chosen (e.g. another column's choice, to read two measures at the same start_ts)."""
    before = {
        (r["image"], r["seed"]): r.get(column)
        for r in result.rows
        if r["method"] == baseline and r["degradation"] == degradation
    }
    after: dict[int, dict[Case, float]] = defaultdict(dict)
    for r in result.rows:
        if r["method"] == method and r["degradation"] == degradation and isinstance(r.get(column), float):
            after[r["start_t"]][(r["image"], r["seed"])] = r[column]
    cases = sorted(k for k, v in before.items() if isinstance(v, float) and np.isfinite(v))
    cases = [k for k in cases if all(k in values and np.isfinite(values[k]) for values in after.values())]
    images = sorted({image for image, _ in cases})
    if len(images) < 2 or not after:
        return None
    # the halves split images, never one image's seeds: a choice made on an image must not be reported on it
    sides = [set(images[0::2]), set(images[1::2])]
    halves = ([k for k in cases if k[0] in sides[0]], [k for k in cases if k[0] in sides[1]])
    ts = sorted(after)

    def chosen(half: list[Case]) -> int:
        gains = [np.mean([after[t][k] - before[k] for k in half]) for t in ts]
        return ts[int(np.argmax(gains))]

    if picks is None:
        picks = (chosen(halves[0]), chosen(halves[1]))
    logger.debug("%s on %s: start_t %s chosen on the two halves of %d images", method, degradation, picks, len(images))
    values, base, clusters, per_case = [], [], [], {}
    for pick, half in ((picks[1], halves[0]), (picks[0], halves[1])):  # each half at the other half's choice
        values += [after[pick][k] for k in half]
        base += [before[k] for k in half]
        clusters += [k[0] for k in half]
        per_case.update({k: after[pick][k] for k in half})
    return BestStart(
        method,
        degradation,
        column,
        baseline,
        picks,
        bootstrap_mean(values, clusters=clusters),
        bootstrap_paired_difference(values, base, clusters=clusters),
        bootstrap_mean(base, clusters=clusters),
        per_case,
    )


def compare_best(a: BestStart, b: BestStart) -> Interval:
    """``a``'s cross-fitted value minus ``b``'s on the cases both hold (e.g. two refiners on the same images), with a
    paired cluster-bootstrap interval over their images."""
    common = sorted(set(a.per_case) & set(b.per_case))
    clusters = [image for image, _ in common]
    return bootstrap_paired_difference([a.per_case[k] for k in common], [b.per_case[k] for k in common], clusters=clusters)
