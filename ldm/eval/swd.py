"""Realism without pretrained weights: the sliced Wasserstein distance (SWD) between Laplacian-pyramid patch sets
(Karras et al. 2018, section 5 and appendix D, written here from that description).

Each image is decomposed into a Laplacian pyramid (5x5 binomial filter, mirrored borders, as ``cv2.pyrDown``/``pyrUp``)
down to 16 px; from every level 7x7 patches are cut at random positions, the same in both sets (identical sets are at
distance 0 exactly), and normalised per colour channel, each set by its own statistics (``"each"``, the paper: blind to
a per-channel gain or offset) or both by the reference's (``"reference"``: a colour cast counts).  Per level, random
unit directions project both sets to 1-D, where Wasserstein-1 of equal-size sets is the mean absolute difference of the
sorted values; the SWD is the mean over directions, then over levels (raw values; the paper prints them x 10^3).
Everything is float64 on the CPU, seeded by ``seed`` alone.  Only the paired change between two sets
(:func:`paired_swd_difference`) has a confidence interval, see :func:`swd_bootstrap`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldm.eval.degrade import check_count
from ldm.eval.metrics import separable_filter
from ldm.eval.stats import Interval, cluster_index, cluster_resample_weights, percentile_interval

PATCH_SIZE = 7
PATCHES_PER_IMAGE = 128
N_DIRECTIONS = 512  # the paper: 4 repeats of 128 directions
MIN_RESOLUTION = 16
NORMALIZATIONS: tuple[str, ...] = ("each", "reference")

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16.0


@dataclass(frozen=True)
class SWDResult:
    """SWD of two image sets: ``per_level`` (finest first, the last is the low-pass level), at ``resolutions`` px
    (the shorter side of each level), and their ``mean``."""

    resolutions: tuple[int, ...]
    per_level: tuple[float, ...]
    mean: float


def _blur(x: torch.Tensor, gain: float) -> torch.Tensor:
    return separable_filter(x, (_BINOMIAL * gain**0.5).tolist())


def pyramid_down(x: torch.Tensor) -> torch.Tensor:
    """Blur and keep every second pixel: ``[B, C, H, W]`` -> ``[B, C, ceil(H / 2), ceil(W / 2)]`` (``cv2.pyrDown``)."""
    return _blur(x, 1.0)[:, :, ::2, ::2]


def pyramid_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-insert to ``size`` (``[H, W]``, at most twice ``x``'s) and blur with 4x the kernel (``cv2.pyrUp``)."""
    up = x.new_zeros((*x.shape[:2], *size))
    up[:, :, ::2, ::2] = x[:, :, : (size[0] + 1) // 2, : (size[1] + 1) // 2]
    return _blur(up, 4.0)


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``levels`` band-pass images of ``images`` ``[B, C, H, W]``, finest first (level ``i``: about ``H / 2**i`` x
    ``W / 2**i`` px); the last is the low-pass residual.  Summing back up (``pyramid_up``) restores ``images``."""
    pyramid = [images]
    for _ in range(levels - 1):
        low = pyramid_down(pyramid[-1])
        pyramid[-1] = pyramid[-1] - pyramid_up(low, tuple(pyramid[-1].shape[-2:]))
        pyramid.append(low)
    return pyramid


def pyramid_resolutions(height: int, width: int, min_resolution: int = MIN_RESOLUTION) -> list[int]:
    """Shorter sides of the levels: halving from ``min(height, width)`` (always kept) while >= ``min_resolution``."""
    side, sides = min(height, width), []
    while not sides or side >= min_resolution:
        sides.append(side)
        side = (side + 1) // 2
    return sides


def extract_patches(level: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The patches of ``level`` ``[B, C, H, W]`` at corners ``ys``, ``xs`` ``[B, P]``: ``[B * P, C, p, p]``."""
    b, c = level.shape[:2]
    offsets = torch.arange(patch_size)
    rows = (ys[:, :, None] + offsets)[:, :, :, None]  # [B, P, p, 1]
    cols = (xs[:, :, None] + offsets)[:, :, None, :]  # [B, P, 1, p]
    batch = torch.arange(b)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[batch, rows, cols]  # [B, P, p, p, C]
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, c, patch_size, patch_size)


def channel_statistics(descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation ``[1, C, 1, 1]`` of ``[N, C, p, p]`` patches (over N, p, p)."""
    mean = descriptors.mean(dim=(0, 2, 3), keepdim=True)
    std = descriptors.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return mean, std.clamp_min(1e-12)


def random_directions(dim: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random unit vectors in ``dim`` dimensions, as the columns of a float64 ``[dim, n]`` matrix."""
    directions = torch.randn((dim, n), generator=generator, device=generator.device, dtype=torch.float64).cpu()
    return directions / directions.norm(dim=0, keepdim=True)


def projected_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """1-D Wasserstein-1 distance ``[K]`` between ``a`` and ``b`` ``[N, D]`` projected on each column of
    ``directions`` ``[D, K]``: the mean absolute difference of the sorted projections (equal-size sets)."""
    return (_sorted_projections(a, directions) - _sorted_projections(b, directions)).abs().mean(dim=1)


def _sorted_projections(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, D]`` projected on each column of ``directions`` ``[D, K]`` and sorted: ``[K, N]`` float64."""
    return torch.sort((directions.t() @ x.double().t()).contiguous(), dim=1).values  # contiguous: sort along memory


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """The sliced Wasserstein distance of ``a``, ``b`` ``[N, D]``: :func:`projected_wasserstein` averaged over the
    directions ``[D, K]``."""
    return float(projected_wasserstein(a, b, directions).mean())


@dataclass(frozen=True)
class PreparedReference:
    """The reference side of :func:`swd` for image sets of ``shape`` ``(B, C, H, W)``, per level: patch positions,
    directions, the reference's normalised descriptors, their channel statistics and sorted projections.  The draws
    depend only on ``seed``, the shape and the settings, so every set compared with one reference reuses them."""

    shape: tuple[int, ...]
    seed: int
    settings: tuple[int, int, int, int, str]  # patch_size, patches_per_image, n_directions, min_resolution, normalize
    sides: tuple[int, ...]
    positions: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    directions: tuple[torch.Tensor, ...]
    descriptors: tuple[torch.Tensor, ...]
    statistics: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    sorted_projections: tuple[torch.Tensor, ...]


def prepare_reference(
    reference: torch.Tensor,
    *,
    seed: int = 0,
    patch_size: int = PATCH_SIZE,
    patches_per_image: int = PATCHES_PER_IMAGE,
    n_directions: int = N_DIRECTIONS,
    min_resolution: int = MIN_RESOLUTION,
    normalize: str = "each",
) -> PreparedReference:
    """:class:`PreparedReference` for sets of ``reference``'s shape: finite float images of at least ``patch_size``
    px (unchecked here); the settings are positive integers (``min_resolution`` >= 2, ``seed`` >= 0)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}; choose one of {list(NORMALIZATIONS)}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    sides = pyramid_resolutions(*reference.shape[-2:], min_resolution)
    levels = laplacian_pyramid(reference.detach().cpu().double(), len(sides))
    # every position first, then each level's directions: the order of the draws is part of the metric.  Positions:
    # top-left corners [B, patches_per_image] of patches wholly inside the level, uniform, with replacement
    positions, shape = [], (reference.shape[0], patches_per_image)
    for h, w in (level.shape[-2:] for level in levels if min(level.shape[-2:]) >= patch_size):
        ys = torch.randint(h - patch_size + 1, shape, generator=generator)
        positions.append((ys, torch.randint(w - patch_size + 1, shape, generator=generator)))
    directions, descriptors, statistics, projections = [], [], [], []
    for level, (ys, xs) in zip(levels, positions):
        db = extract_patches(level, ys, xs, patch_size)
        mean_b, std_b = channel_statistics(db)
        db = ((db - mean_b) / std_b).flatten(1)
        d = random_directions(db.shape[1], n_directions, generator)
        directions.append(d)
        descriptors.append(db)
        statistics.append((mean_b, std_b))
        projections.append(_sorted_projections(db, d))
    settings = (patch_size, patches_per_image, n_directions, min_resolution, normalize)
    per_level = (tuple(values) for values in (positions, directions, descriptors, statistics, projections))
    return PreparedReference(tuple(reference.shape), int(seed), settings, tuple(sides[: len(positions)]), *per_level)


def _image_descriptors(images: torch.Tensor, prepared: PreparedReference) -> list[torch.Tensor]:
    """``images``' normalised descriptors ``[B * P, D]`` per level at ``prepared``'s patch positions (image-major)."""
    if tuple(images.shape) != prepared.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reference {prepared.shape} must have the same shape "
            "(equal-size sets of equal-size images); crop or resize them to one size"
        )
    levels = laplacian_pyramid(
        images.detach().cpu().double(), len(pyramid_resolutions(*images.shape[-2:], prepared.settings[3]))
    )
    out = []
    for level, (ys, xs), (mean_b, std_b) in zip(levels, prepared.positions, prepared.statistics):
        da = extract_patches(level, ys, xs, prepared.settings[0])
        mean_a, std_a = (mean_b, std_b) if prepared.settings[4] == "reference" else channel_statistics(da)
        out.append(((da - mean_a) / std_a).flatten(1))
    return out


def swd(
    images: torch.Tensor,
    reference: torch.Tensor | PreparedReference,
    *,
    seed: int = 0,
    patch_size: int = PATCH_SIZE,
    patches_per_image: int = PATCHES_PER_IMAGE,
    n_directions: int = N_DIRECTIONS,
    min_resolution: int = MIN_RESOLUTION,
    normalize: str = "each",
) -> SWDResult:
    """SWD (raw values) between ``images`` and ``reference``, ``[B, C, H, W]`` float sets of one shape in any value
    range.  ``reference`` may be a :class:`PreparedReference`, whose seed and settings then apply (not the keywords)."""
    if not isinstance(reference, PreparedReference):
        names = ("patch_size", "patches_per_image", "n_directions", "min_resolution", "normalize")
        settings = dict(zip(names, (patch_size, patches_per_image, n_directions, min_resolution, normalize)))
        reference = prepare_reference(reference, seed=seed, **settings)
    return _swd_result(_image_descriptors(images, reference), reference)


def _swd_result(descriptors: list[torch.Tensor], prepared: PreparedReference) -> SWDResult:
    per_level = [
        float((_sorted_projections(da, d) - pb).abs().mean())
        for da, d, pb in zip(descriptors, prepared.directions, prepared.sorted_projections)
    ]
    return SWDResult(prepared.sides, tuple(per_level), float(sum(per_level) / len(per_level)))


def image_cdfs(projections: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Per-image empirical CDFs on a grid: ``projections`` ``[K, B, P]`` (K directions, B images, P patches each) and
    ``grid`` ``[K, G]`` -> ``[K, B, G]``, the fraction of each image's P values at or below each grid point."""
    ordered = torch.sort(projections, dim=2).values.contiguous()
    points = grid[:, None, :].expand(-1, projections.shape[1], -1).contiguous()
    return torch.searchsorted(ordered, points, right=True).to(projections.dtype) / projections.shape[2]


def resampled_wasserstein(
    a: torch.Tensor, b: torch.Tensor, weights_a: torch.Tensor, weights_b: torch.Tensor, grid_points: int = 256
) -> torch.Tensor:
    """1-D Wasserstein-1 distances ``[R, K]`` between image-weighted patch distributions, for R weightings at once.

    ``a`` ``[K, B, P]`` and ``b`` ``[K, B', P]`` hold K projections of the patches of each image; ``weights_a``
    ``[R, B]`` and ``weights_b`` ``[R, B']`` weigh the images (rows are normalised), e.g. bootstrap draw counts.
    ``W1 = integral |F_a - F_b|`` over a grid of ``grid_points`` quantiles of the pooled values per direction (step
    CDFs held to the next point), so a resample costs one matrix product instead of a sort.
    """
    a, b = a.double(), b.double()
    pooled = torch.cat([a.flatten(1), b.flatten(1)], dim=1)
    levels = torch.linspace(0, 1, grid_points, dtype=pooled.dtype)
    grid = torch.quantile(pooled, levels, dim=1).t().contiguous()  # [K, G]
    widths = grid[:, 1:] - grid[:, :-1]  # [K, G - 1]
    wa, wb = (w / w.sum(dim=1, keepdim=True) for w in (weights_a.double(), weights_b.double()))
    # F_a - F_b in one product of the signed weights with both sets' CDFs, then |.| in place and the sum over the grid
    # as a contraction: [R, K, G] is the only large tensor, written once (this loop is memory-bound)
    cdfs = torch.cat([image_cdfs(a, grid), image_cdfs(b, grid)], dim=1)[..., :-1]  # [K, B + B', G - 1]
    difference = torch.einsum("rb,kbg->rkg", torch.cat([wa, -wb], dim=1), cdfs)
    return torch.einsum("rkg,kg->rk", difference.abs_(), widths)


def swd_bootstrap(
    images: torch.Tensor,
    reference: torch.Tensor | PreparedReference,
    *,
    seed: int = 0,
    n_resamples: int = 400,
    resample_directions: int = 64,
    clusters: Sequence[Hashable] | None = None,
    reference_clusters: Sequence[Hashable] | None = None,
) -> SWDBootstrap:
    """:func:`swd` (over all directions) and its bootstrap resamples over images, for :func:`paired_swd_difference`.

    Each resample draws the images of ``images`` with replacement and, independently, those of ``reference``; every
    image keeps its patches (normalised once by the full sets' statistics).  ``clusters`` ``[B]`` names the source
    image of each member of ``images`` (e.g. one image refined with several seeds) and ``reference_clusters`` those of
    ``reference`` (e.g. a smaller reference set cycled to ``B``): members of one cluster are drawn together (None: every
    member is an image of its own).  A resample's SWD is :func:`resampled_wasserstein` on ``resample_directions`` of
    each level's directions.  A tensor ``reference`` is prepared with :func:`swd`'s defaults (``seed`` seeds the
    resamples either way).  Two calls with the same ``seed`` and clusters on sets of one shape are paired.

    No interval of the SWD itself is formed: drawing images twice makes two sets look less alike, and a percentile
    interval of these resamples (bias-shifted or not) covered neither the large-sample SWD (0 % at 8 and 32 images)
    nor the estimate's own spread (about 4x too wide).  The paired *difference* of two sets' SWDs to one reference
    cancels that bias and holds its coverage.
    """
    prepared = reference if isinstance(reference, PreparedReference) else prepare_reference(reference, seed=seed)
    check_count("n_resamples", n_resamples, 1, 10**6)
    check_count("resample_directions", resample_directions, 1, prepared.settings[2])
    descriptors = _image_descriptors(images, prepared)
    result = _swd_result(descriptors, prepared)
    n = images.shape[0]
    own, n_images = cluster_index(clusters, n)
    theirs, n_reference = cluster_index(reference_clusters, n)
    resampled = torch.zeros(n_resamples, dtype=torch.float64)
    weights = [torch.from_numpy(cluster_resample_weights(c, n, n_resamples, seed + i)) for i, c in enumerate((own, theirs))]
    generator = torch.Generator().manual_seed(int(seed))
    for da, db, directions in zip(descriptors, prepared.descriptors, prepared.directions):
        chosen = directions[:, torch.randperm(directions.shape[1], generator=generator)[:resample_directions]]
        pa = (chosen.t() @ da.t()).reshape(-1, n, da.shape[0] // n)  # [K, B, P]
        pb = (chosen.t() @ db.t()).reshape(-1, n, db.shape[0] // n)
        resampled += resampled_wasserstein(pa, pb, *weights).mean(dim=1)
    resampled = (resampled / len(descriptors)).numpy()
    pairing = (seed, prepared.seed, prepared.settings, tuple(images.shape), resample_directions)
    pairing += (tuple(own.tolist()), tuple(theirs.tolist()))
    return SWDBootstrap(result, resampled, n_images, n, n_reference, pairing)


@dataclass(frozen=True)
class SWDBootstrap:
    """:func:`swd_bootstrap`'s answer: the SWD (``result``), the ``resampled`` values ``[R]``, the number of distinct
    images ``n`` (clusters) among the set's ``cases`` members, ``reference_n`` those of the reference, and ``pairing``:
    what must match for two results to be paired."""

    result: SWDResult
    resampled: np.ndarray
    n: int
    cases: int
    reference_n: int
    pairing: tuple[Any, ...] = ()


def bias_corrected_interval(
    estimate: float, resampled: np.ndarray, n: int, confidence: float = 0.95, cases: int = 0
) -> Interval:
    """The percentile interval of ``resampled`` shifted by the bootstrap's bias estimate (their mean - ``estimate``);
    none (NaN) below two images, as :func:`~ldm.eval.stats.percentile_interval`."""
    interval = percentile_interval(estimate, resampled, n, confidence, cases)
    bias = float(np.mean(resampled)) - estimate
    return Interval(estimate, interval.lo - bias, interval.hi - bias, n, confidence, cases)


def paired_swd_difference(after: SWDBootstrap, before: SWDBootstrap, confidence: float = 0.95) -> Interval:
    """``after - before`` (e.g. the SWD of refined images minus that of the artifact images, same cases) with a
    bias-corrected interval from their paired resamples (both from :func:`swd_bootstrap` with the same seed and
    clusters), over the ``n`` distinct images (no interval below two)."""
    if after.resampled.shape != before.resampled.shape or after.pairing != before.pairing:
        raise ValueError(
            "paired SWD resamples need two swd_bootstrap results of the same seed, settings, set size, clusters and "
            "resamples; call swd_bootstrap with the same arguments on both sets"
        )
    estimate = after.result.mean - before.result.mean
    return bias_corrected_interval(estimate, after.resampled - before.resampled, after.n, confidence, after.cases)
