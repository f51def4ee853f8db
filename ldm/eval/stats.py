"""Percentile-bootstrap confidence intervals over images (Efron & Tibshirani 1993, ch. 13): resample the images with
replacement, read the interval off the resampled statistic's quantiles.  A *paired* interval (the same resampled images
for both quantities) says whether one method beats another on the same images: it excludes the between-image variance
both share.  Randomness comes only from ``seed`` (a numpy generator of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """``estimate`` (the statistic on all ``n`` items) and its ``confidence`` interval ``[lo, hi]``."""

    estimate: float
    lo: float
    hi: float
    n: int
    confidence: float = CONFIDENCE

    def format(self, fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(self.estimate)} [{fmt.format(self.lo)}, {fmt.format(self.hi)}]"


def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[n_resamples, n]`` indices drawn uniformly with replacement from ``range(n)`` (generator seeded by ``seed``)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def percentile_interval(estimate: float, resampled: np.ndarray, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The percentile interval of ``resampled`` statistics ``[R]`` around ``estimate``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(np.asarray(resampled, dtype=np.float64), [tail, 1 - tail])
    return Interval(float(estimate), float(lo), float(hi), int(n), float(confidence))


def _finite(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of numbers, one per image, got {type(values).__name__}") from None
    if array.ndim != 1:
        raise ValueError(f"{what} must be one number per image (1-D), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"no {what} to bootstrap")
    if not np.isfinite(array).all() or not np.isfinite(array.sum()):
        raise ValueError(f"{what} hold non-finite values (e.g. an infinite PSNR of an identical image); drop them first")
    return array


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` (one per image) and its percentile-bootstrap interval."""
    array = _finite(values, "values")
    idx = resample_indices(array.size, n_resamples, seed)
    return percentile_interval(float(array.mean()), array[idx].mean(axis=1), array.size, confidence)


def bootstrap_paired_difference(
    after: Sequence[float] | np.ndarray,
    before: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of ``after - before`` (paired by image, e.g. PSNR of the refined image minus that of the artifact) and
    its percentile-bootstrap interval over images."""
    a, b = _finite(after, "values after"), _finite(before, "values before")
    if a.shape != b.shape:
        raise ValueError(f"paired values need one pair per image, got {a.size} and {b.size} values")
    return bootstrap_mean(a - b, confidence, n_resamples, seed)
