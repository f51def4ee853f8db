"""Bootstrap intervals (ldm/eval/stats.py) and SWD's bootstrap (ldm/eval/swd.py): coverage, closed forms, pairing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.eval.stats import (
    SMALL_N_COVERAGE,
    bootstrap_mean,
    bootstrap_paired_difference,
    cluster_resample_weights,
    percentile_interval,
    resample_indices,
)
from ldm.eval.swd import (
    bias_corrected_interval,
    paired_swd_difference,
    projected_wasserstein,
    resampled_wasserstein,
    swd,
    swd_bootstrap,
)


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
    assert same.n == same.cases == 24 and same.reference_n == 24
    assert not hasattr(same, "interval")  # an absolute SWD has no interval: none of it held its coverage
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


# ---------------------------------------------------------------------------------------------------------------------
# the image as the unit: cluster bootstrap, no interval below two images, small-n coverage


def test_exact_copies_per_seed_give_the_interval_of_the_images_alone():
    x = np.random.default_rng(5).normal(20.0, 2.0, 8)
    copies = np.repeat(x, 3)  # a deterministic method: each image's three seeds give the same value
    images = np.repeat(np.arange(8), 3)
    alone, clustered = bootstrap_mean(x, seed=3), bootstrap_mean(copies, seed=3, clusters=images)
    assert (clustered.estimate, clustered.lo, clustered.hi) == pytest.approx((alone.estimate, alone.lo, alone.hi))
    assert clustered.n == 8 and clustered.cases == 24
    # as if independent (the defect): n triples and the interval narrows with no new evidence
    naive = bootstrap_mean(copies, seed=3)
    assert naive.n == 24 and naive.hi - naive.lo < 0.75 * (alone.hi - alone.lo)
    paired = bootstrap_paired_difference(copies + 1.0, copies, clusters=[f"im{i}" for i in images])
    assert paired.n == 8 and paired.lo == pytest.approx(1.0) and paired.hi == pytest.approx(1.0)


def test_cluster_bootstrap_covers_the_mean_when_seeds_share_the_image_effect():
    rng = np.random.default_rng(7)
    trials, clustered, naive = 300, 0, 0
    images = np.repeat(np.arange(30), 3)
    for trial in range(trials):
        values = (rng.normal(0.0, 1.0, 30)[:, None] + rng.normal(0.0, 0.3, (30, 3))).ravel()  # 30 images x 3 seeds
        by_image = bootstrap_mean(values, n_resamples=500, seed=trial, clusters=images)
        by_case = bootstrap_mean(values, n_resamples=500, seed=trial)
        clustered += by_image.lo <= 0.0 <= by_image.hi
        naive += by_case.lo <= 0.0 <= by_case.hi
    # the image effect (sd 1) is shared by its seeds: resampling images holds ~95 %; resampling cases does not (~72 %)
    assert 0.90 <= clustered / trials <= 0.98 and naive / trials < 0.8


def test_unequal_clusters_resample_the_mean_of_all_drawn_rows():
    values = np.array([1.0, 1.0, 1.0, 7.0])  # image a has three rows, image b one
    interval = bootstrap_mean(values, n_resamples=4000, clusters=["a", "a", "a", "b"])
    assert interval.estimate == pytest.approx(2.5) and interval.n == 2 and interval.cases == 4
    # resamples: {a, a} -> 1, {a, b} -> (3 + 7) / 4 = 2.5, {b, b} -> 7; the 2.5 % and 97.5 % quantiles are 1 and 7
    assert (interval.lo, interval.hi) == (pytest.approx(1.0), pytest.approx(7.0))
    with pytest.raises(ValueError, match="one image per value"):
        bootstrap_mean(values, clusters=["a", "b"])


def test_cluster_weights_share_a_count_per_image_and_match_the_plain_bootstrap_for_singletons():
    plain = resample_indices(5, 50, seed=2)
    counts = np.stack([np.bincount(row, minlength=5) for row in plain])
    np.testing.assert_array_equal(cluster_resample_weights(None, 5, 50, seed=2), counts)
    weights = cluster_resample_weights(["x", "x", "y", "z", "z"], 5, 50, seed=2)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 4]).all()
    drawn = cluster_resample_weights(None, 3, 50, seed=2)  # the three images' counts, spread over their members
    np.testing.assert_array_equal(weights, drawn[:, [0, 0, 1, 2, 2]])


def test_no_interval_below_two_images():
    one = bootstrap_mean([3.0])
    assert one.estimate == 3.0 and one.n == 1 and not one.has_interval and np.isnan(one.lo) and np.isnan(one.hi)
    assert one.format() == "3.00 (n = 1, no interval)"
    seeds = bootstrap_mean([3.0, 4.0, 5.0], clusters=["a", "a", "a"])  # one image, three seeds: still one image
    assert seeds.n == 1 and seeds.cases == 3 and not seeds.has_interval and seeds.estimate == pytest.approx(4.0)
    assert not bias_corrected_interval(0.5, np.array([0.4, 0.6]), 1).has_interval
    assert bootstrap_mean([3.0, 4.0]).has_interval


@pytest.mark.parametrize("n", sorted(SMALL_N_COVERAGE))
def test_small_n_percentile_intervals_cover_what_the_notes_say(n):
    rng = np.random.default_rng(n)
    trials, hits = 1500, 0
    for trial in range(trials):
        interval = bootstrap_mean(rng.normal(0.0, 1.0, n), n_resamples=1000, seed=trial)
        hits += interval.lo <= 0.0 <= interval.hi
    # the summary's note quotes these coverages (binomial sd at 1500 trials: about 1 %)
    assert abs(hits / trials - SMALL_N_COVERAGE[n]) < 0.035


def test_swd_resamples_copies_of_an_image_together():
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(8, 3, 16, 16, generator=g) * 2 - 1).repeat_interleave(3, 0)  # 8 images x 3 "seeds"
    reference = torch.rand(24, 3, 16, 16, generator=g) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    clusters = [i // 3 for i in range(24)]
    cycled = [i % 6 for i in range(24)]  # a reference of 6 images cycled to 24 members

    def difference(**kwargs):
        kwargs = dict(n_resamples=200, **kwargs)
        return paired_swd_difference(swd_bootstrap(blurred, reference, **kwargs), swd_bootstrap(images, reference, **kwargs))

    naive, clustered = difference(), difference(clusters=clusters, reference_clusters=cycled)
    assert naive.n == 24 and clustered.n == 8 and clustered.cases == 24
    assert clustered.estimate == naive.estimate  # the estimate is the same SWD; only the resampling differs
    assert clustered.hi - clustered.lo > 1.3 * (naive.hi - naive.lo)  # the copies no longer pose as independent
    boot = swd_bootstrap(images, reference, n_resamples=10, clusters=clusters, reference_clusters=cycled)
    assert boot.reference_n == 6
    with pytest.raises(ValueError, match="clusters"):  # clustered and not: differently drawn, so not paired
        paired_swd_difference(boot, swd_bootstrap(images, reference, n_resamples=10))
