"""SWD (ldm/eval/swd.py): closed-form cases, brute-force 1-D Wasserstein, a scipy pyramid reference, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.stats import wasserstein_distance

from ldm.eval.swd import (
    extract_patches,
    laplacian_pyramid,
    projected_wasserstein,
    pyramid_down,
    pyramid_resolutions,
    pyramid_up,
    random_directions,
    resampled_wasserstein,
    sliced_wasserstein,
    swd,
)


def _images(seed: int, shape=(3, 3, 32, 32)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


KERNEL = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0  # the paper's code: cv2.pyrDown's filter


def _scipy_down(x: np.ndarray) -> np.ndarray:
    return ndimage.convolve(x, KERNEL[None, None], mode="mirror")[:, :, ::2, ::2]


def _scipy_up(x: np.ndarray) -> np.ndarray:
    up = np.zeros((*x.shape[:2], 2 * x.shape[2], 2 * x.shape[3]))
    up[:, :, ::2, ::2] = x
    return ndimage.convolve(up, KERNEL[None, None] * 4.0, mode="mirror")


def test_pyramid_matches_scipy_reference_and_reconstructs():
    x = _images(0, (2, 3, 32, 24))
    np.testing.assert_allclose(pyramid_down(x).numpy(), _scipy_down(x.numpy()), atol=1e-12)
    low = pyramid_down(x)
    np.testing.assert_allclose(pyramid_up(low, (32, 24)).numpy(), _scipy_up(low.numpy()), atol=1e-12)
    levels = laplacian_pyramid(x, 3)
    assert [tuple(level.shape[-2:]) for level in levels] == [(32, 24), (16, 12), (8, 6)]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = pyramid_up(rebuilt, tuple(band.shape[-2:])) + band
    torch.testing.assert_close(rebuilt, x, rtol=0, atol=1e-12)


def test_resolutions_halve_down_to_16():
    assert pyramid_resolutions(64, 64) == [64, 32, 16]
    assert pyramid_resolutions(96, 128) == [96, 48, 24]
    assert pyramid_resolutions(12, 40) == [12]


def test_extract_patches_cuts_the_named_windows():
    level = _images(1, (2, 3, 10, 12))
    ys, xs = torch.tensor([[0, 3], [2, 1]]), torch.tensor([[5, 0], [1, 5]])
    patches = extract_patches(level, ys, xs, 5)
    assert patches.shape == (4, 3, 5, 5)
    torch.testing.assert_close(patches[1], level[0, :, 3:8, 0:5])
    torch.testing.assert_close(patches[3], level[1, :, 1:6, 5:10])


@given(st.integers(2, 12), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_sorted_matching_equals_brute_force_wasserstein(n, dim, seed):
    """Per direction, the sorted-projection distance equals scipy's 1-D W1 and the cost of the optimal assignment."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=g, dtype=torch.float64)
    b = torch.randn(n, dim, generator=g, dtype=torch.float64) * 2 + 0.5
    directions = random_directions(dim, 5, g)
    per_direction = projected_wasserstein(a, b, directions)
    pa, pb = (a @ directions).numpy(), (b @ directions).numpy()
    for k in range(directions.shape[1]):
        assert per_direction[k].item() == pytest.approx(wasserstein_distance(pa[:, k], pb[:, k]), abs=1e-12)
        cost = np.abs(pa[:, k][:, None] - pb[:, k][None, :])
        rows, cols = linear_sum_assignment(cost)
        assert per_direction[k].item() == pytest.approx(cost[rows, cols].mean(), abs=1e-12)
    assert sliced_wasserstein(a, b, directions) == pytest.approx(per_direction.mean().item(), abs=1e-15)


def test_shifted_descriptors_give_the_mean_projected_shift():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(50, 7, generator=g, dtype=torch.float64)
    shift = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.0, 0.25, 1.0], dtype=torch.float64)
    directions = random_directions(7, 64, g)
    expected = (shift @ directions).abs().mean().item()
    assert expected > 0.5
    assert sliced_wasserstein(a, a + shift, directions) == pytest.approx(expected, abs=1e-12)
    assert sliced_wasserstein(a, a, directions) == 0.0


def test_identical_sets_give_zero_and_different_sets_a_positive_distance():
    x = _images(4)
    result = swd(x, x.clone())
    assert result.resolutions == (32, 16) and result.per_level == (0.0, 0.0) and result.mean == 0.0
    assert swd(x, _images(5)).mean > 0.01


def test_constant_shift_only_moves_the_low_pass_level():
    """A colour offset leaves the band-pass levels alone; "reference" normalisation sees it in the low-pass level
    (the paper's per-set normalisation does not see it at all)."""
    x = _images(6, (3, 3, 64, 64))
    offset = torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64).view(1, 3, 1, 1)
    shifted = swd(x + offset, x, normalize="reference")
    assert shifted.per_level[0] == pytest.approx(0.0, abs=1e-12) and shifted.per_level[1] == pytest.approx(0.0, abs=1e-12)
    assert shifted.per_level[2] > 0.1
    assert swd(x + offset, x).mean == pytest.approx(0.0, abs=1e-12)


def test_low_pass_shift_has_the_closed_form_value():
    """For a constant offset c_k on channel k, the low-pass descriptors move by c_k / std_k on channel k's 49 entries
    (reference statistics), so that level's SWD is the mean |direction . shift| over the seeded directions."""
    x = _images(7, (2, 3, 16, 16))  # one level: the low-pass level is the image
    offset = torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64)
    result = swd(x + offset.view(1, 3, 1, 1), x, normalize="reference", seed=11, patches_per_image=20, n_directions=32)
    g = torch.Generator().manual_seed(11)
    ys = torch.randint(16 - 7 + 1, (2, 20), generator=g)
    xs = torch.randint(16 - 7 + 1, (2, 20), generator=g)
    patches = extract_patches(x, ys, xs, 7)
    std = patches.std(dim=(0, 2, 3), unbiased=False)
    shift = (offset / std).repeat_interleave(49)
    expected = (shift @ random_directions(147, 32, g)).abs().mean().item()
    assert result.per_level == (pytest.approx(expected, abs=1e-12),)


def test_resampled_wasserstein_equals_weighted_samples_on_the_grid_and_scipy_on_a_fine_one():
    """Each weighting equals the W1 of the samples it describes (an image drawn twice counts twice), computed here
    one direction at a time in numpy on the same pooled-quantile grid, and comes near scipy's exact W1 as the grid
    grows."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 2, 40, generator=gen, dtype=torch.float64)  # [K, B, P]
    b = torch.randn(3, 3, 40, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    weights_a = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    weights_b = torch.tensor([[1.0, 1.0, 1.0], [0.0, 3.0, 0.0], [1.0, 2.0, 0.0]])
    got = resampled_wasserstein(a, b, weights_a, weights_b, grid_points=64)
    assert got.shape == (3, 3)
    for r in range(3):
        for k in range(3):
            xs = np.concatenate([np.repeat(a[k, i].numpy(), int(w)) for i, w in enumerate(weights_a[r])])
            ys = np.concatenate([np.repeat(b[k, j].numpy(), int(w)) for j, w in enumerate(weights_b[r])])
            grid = np.quantile(np.concatenate([a[k].numpy().ravel(), b[k].numpy().ravel()]), np.linspace(0, 1, 64))
            cdf_x = np.array([(xs <= g).mean() for g in grid])
            cdf_y = np.array([(ys <= g).mean() for g in grid])
            expected = float(np.sum(np.abs(cdf_x - cdf_y)[:-1] * np.diff(grid)))
            assert got[r, k].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    fine = resampled_wasserstein(a, b, weights_a[:1], weights_b[:1], grid_points=20001)
    exact = [wasserstein_distance(a[k].numpy().ravel(), b[k].numpy().ravel()) for k in range(3)]
    assert fine[0].numpy() == pytest.approx(exact, rel=2e-3)


def test_deterministic_with_a_seed():
    x, y = _images(8), _images(9)
    assert swd(x, y, seed=1) == swd(x, y, seed=1)
    assert swd(x, y, seed=1).mean != swd(x, y, seed=2).mean
    torch.manual_seed(0)
    first = swd(x, y, seed=3)
    torch.manual_seed(1)
    assert swd(x, y, seed=3) == first  # the global RNG plays no part


def test_more_distortion_gives_a_larger_distance():
    x = _images(10, (4, 3, 32, 32))
    smooth = laplacian_pyramid(x, 2)[1]
    blurred = pyramid_up(smooth, (32, 32))
    assert swd(blurred, x).mean > swd(0.5 * blurred + 0.5 * x, x).mean > 0


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        (torch.zeros(2, 3, 16, 16), torch.zeros(3, 3, 16, 16), {}, "same shape"),
        (torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16), {"normalize": "own"}, "normalize"),
    ],
)
def test_bad_arguments_say_what_is_allowed(a, b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        swd(a, b, **kwargs)
