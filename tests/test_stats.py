"""Bootstrap intervals (ldm/eval/stats.py) and SWD's bootstrap (ldm/eval/swd.py): coverage, closed forms, pairing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.eval.stats import bootstrap_mean, bootstrap_paired_difference, percentile_interval, resample_indices
from ldm.eval.swd import paired_swd_difference, projected_wasserstein, resampled_wasserstein, swd, swd_bootstrap


@pytest.mark.parametrize("distribution", ["normal", "exponential"])
def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time(distribution):
    rng = np.random.default_rng(0)
    trials, n, hits = 400, 60, 0
    for trial in range(trials):
        sample = rng.normal(2.0, 3.0, n) if distribution == "normal" else rng.exponential(2.0, n)
        interval = bootstrap_mean(sample, n_resamples=1000, seed=trial)
        hits += interval.lo <= 2.0 <= interval.hi
    # binomial(400, 0.95) has sd 1.1 %; the percentile bootstrap runs a little under nominal at n = 60 when skewed
    assert 0.90 <= hits / trials <= 0.98


def test_mean_interval_width_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(1)
    narrow = bootstrap_mean(rng.normal(0, 1, 1600), seed=0)
    wide = bootstrap_mean(rng.normal(0, 1, 100), seed=0)
    ratio = (wide.hi - wide.lo) / (narrow.hi - narrow.lo)
    assert 3.2 < ratio < 4.8  # sqrt(1600 / 100) = 4
    assert abs((narrow.hi - narrow.lo) - 2 * 1.96 / 40) < 0.015  # the normal-theory width 2 * 1.96 * sigma / sqrt(n)


def test_paired_difference_of_a_constant_shift_is_exact_and_pairing_removes_shared_variance():
    before = np.random.default_rng(2).normal(20.0, 5.0, 50)
    shifted = bootstrap_paired_difference(before + 1.5, before)
    assert shifted.estimate == pytest.approx(1.5) and shifted.lo == pytest.approx(1.5) and shifted.hi == pytest.approx(1.5)
    noisy = before + 1.5 + np.random.default_rng(3).normal(0, 0.1, 50)
    paired = bootstrap_paired_difference(noisy, before)
    assert paired.lo > 1.4 and paired.hi < 1.6  # the images' own spread (5 dB) is not in it
    unpaired = bootstrap_mean(noisy)
    assert unpaired.hi - unpaired.lo > 10 * (paired.hi - paired.lo)


def test_intervals_are_seeded_and_match_numpy_quantiles():
    values = np.arange(10.0)
    assert bootstrap_mean(values, seed=4) == bootstrap_mean(values, seed=4)
    resampled = values[resample_indices(10, 500, seed=4)].mean(axis=1)
    expected = np.quantile(resampled, [0.025, 0.975])
    interval = percentile_interval(4.5, resampled, 10)
    assert (interval.lo, interval.hi) == (pytest.approx(expected[0]), pytest.approx(expected[1]))
    assert interval.format("{:.1f}").startswith("4.5 [")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bootstrap_mean([]), "no values"),
        (lambda: bootstrap_mean([1.0, float("inf")]), "non-finite"),
        (lambda: bootstrap_paired_difference([1.0, 2.0], [1.0]), "one pair per image"),
        (lambda: percentile_interval(0.0, np.zeros(3), 3, confidence=1.5), "confidence"),
        (lambda: bootstrap_mean([[1.0, 2.0], [3.0, 4.0]]), "one number per image"),
        (lambda: bootstrap_paired_difference([[1.0], [2.0]], [[1.0, 2.0]]), "one number per image"),
        (lambda: bootstrap_mean([1e308, 1e308]), "non-finite"),
    ],
)
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_resampled_wasserstein_with_equal_weights_is_the_sorted_difference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 8, 40, generator=g, dtype=torch.float64)
    b = torch.randn(5, 8, 40, generator=g, dtype=torch.float64) * 1.3 + 0.2
    ones = torch.ones(1, 8, dtype=torch.float64)
    exact = projected_wasserstein(a.reshape(5, -1).t(), b.reshape(5, -1).t(), torch.eye(5, dtype=torch.float64))
    gridded = resampled_wasserstein(a, b, ones, ones, grid_points=1024)[0]
    assert torch.allclose(gridded, exact, rtol=0.02)
    # an image drawn twice counts twice: the same as repeating it (up to the grid, which the pooled values place)
    weights = torch.tensor([[2.0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.float64)
    repeated = torch.cat([a[:, :1], a[:, :1], a[:, 2:]], dim=1)
    twice = resampled_wasserstein(a, b, weights, ones, grid_points=2048)
    assert torch.allclose(twice, resampled_wasserstein(repeated, b, ones, ones, grid_points=2048), atol=2e-3)


def test_swd_bootstrap_estimate_is_swd_and_paired_differences_find_a_real_change():
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(24, 3, 16, 16, generator=g) * 2 - 1
    reference = torch.rand(24, 3, 16, 16, generator=g) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(clean, 3, 1, 1, count_include_pad=False)
    same = swd_bootstrap(clean, reference, n_resamples=100)
    assert same.result.mean == swd(clean, reference).mean
    assert same.interval.lo <= same.result.mean <= same.interval.hi and same.interval.n == 24
    assert paired_swd_difference(same, same).estimate == 0.0
    changed = swd_bootstrap(blurred, reference, n_resamples=100)
    difference = paired_swd_difference(changed, same)
    assert difference.lo > 0  # blurring noise images makes them less like noise, with confidence
    with pytest.raises(ValueError, match="same seed"):
        paired_swd_difference(changed, swd_bootstrap(clean[:12], reference[:12], n_resamples=100))
    with pytest.raises(ValueError, match="same seed"):  # another seed: not paired, although the sizes match
        paired_swd_difference(changed, swd_bootstrap(clean, reference, n_resamples=100, seed=1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_resamples": 0}, "n_resamples must be an integer in"),
        ({"resample_directions": 0}, "resample_directions must be an integer in"),
        ({"resample_directions": 10**6}, "resample_directions must be an integer in"),
    ],
)
def test_swd_bootstrap_refuses_bad_settings(kwargs, match):
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match=match):
        swd_bootstrap(x, x, **kwargs)
