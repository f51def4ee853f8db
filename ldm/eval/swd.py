"""Realism without pretrained weights: the sliced Wasserstein distance (SWD) between Laplacian-pyramid patch sets.

This is the metric of Karras et al. 2018 ("Progressive Growing of GANs", section 5 and appendix D; the
``metrics/sliced_wasserstein.py`` of their code), written here from that description:

1. every image of a set is decomposed into a Laplacian pyramid (5x5 binomial filter ``[1, 4, 6, 4, 1] / 16`` in both
   directions, mirrored borders, as OpenCV's ``pyrDown``/``pyrUp``), from the full resolution down to 16 px; the last
   level is the low-pass residual;
2. from every level, ``patches_per_image`` 7x7 neighbourhoods are cut at random positions of every image (the same
   positions in both sets: a paired draw, so two identical sets are at distance 0 exactly and the sampling noise of
   the comparison is smaller); each patch is a descriptor of ``3 * 7 * 7 = 147`` values;
3. descriptors are normalised per colour channel (mean 0, standard deviation 1 over all patches and pixels of a
   level).  ``normalize="each"`` (the paper's choice) normalises each set by its own statistics, which makes the
   metric blind to a per-channel gain or offset of a whole set; ``"reference"`` normalises both sets by those of the
   second (reference) set, so that a colour cast or a loss of contrast over the set counts too;
4. per level, ``n_directions`` random unit directions (``torch.randn`` normalised, from the seeded generator) project
   both descriptor sets to 1-D; each projection is sorted, and the 1-D Wasserstein-1 distance between two equal-size
   empirical distributions is the mean absolute difference of the sorted values;
5. the level's SWD is the mean over directions, and the metric the mean over levels.  The paper reports SWD x 10^3;
   the functions here return the raw values.

Lower is more alike; identical sets give 0.  Randomness comes only from ``seed`` (patch positions first, then the
directions of each level, finest first), so one seed gives the same value on every run.  Everything is computed in
float64 on the CPU (the sets are small).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    """``[B, C, H, W]`` convolved with ``gain`` x the 5x5 binomial kernel, mirrored borders (scipy's ``mode="mirror"``).

    Separable, as five shifted slices per direction: exact, and much faster than a grouped float64 ``conv2d`` on CPU.
    """
    k = (_BINOMIAL * gain**0.5).tolist()
    h, w = x.shape[-2:]
    x = F.pad(x, (2, 2, 0, 0), mode="reflect")
    x = sum(k[j] * x[..., j : j + w] for j in range(5))
    x = F.pad(x, (0, 0, 2, 2), mode="reflect")
    return sum(k[j] * x[..., j : j + h, :] for j in range(5))


def pyramid_down(x: torch.Tensor) -> torch.Tensor:
    """Blur and keep every second pixel: ``[B, C, H, W]`` -> ``[B, C, ceil(H / 2), ceil(W / 2)]`` (``cv2.pyrDown``)."""
    return _blur(x, 1.0)[:, :, ::2, ::2]


def pyramid_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-insert to ``size`` (``[H, W]``, at most twice ``x``'s) and blur with 4x the kernel (``cv2.pyrUp``)."""
    up = x.new_zeros((*x.shape[:2], *size))
    up[:, :, ::2, ::2] = x[:, :, : (size[0] + 1) // 2, : (size[1] + 1) // 2]
    return _blur(up, 4.0)


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``levels`` band-pass images, finest first; the last is the low-pass residual.

    ``images`` ``[B, C, H, W]``; level ``i`` has about ``H / 2**i`` x ``W / 2**i`` pixels.  Summing the levels back up
    (``pyramid_up`` of the coarser plus the band) restores ``images`` exactly.
    """
    pyramid = [images]
    for _ in range(levels - 1):
        low = pyramid_down(pyramid[-1])
        pyramid[-1] = pyramid[-1] - pyramid_up(low, tuple(pyramid[-1].shape[-2:]))
        pyramid.append(low)
    return pyramid


def pyramid_resolutions(height: int, width: int, min_resolution: int = MIN_RESOLUTION) -> list[int]:
    """Shorter sides of the pyramid levels: halving from ``min(height, width)`` while at least ``min_resolution``
    (always the full resolution itself)."""
    side, sides = min(height, width), []
    while not sides or side >= min_resolution:
        sides.append(side)
        side = (side + 1) // 2
    return sides


def patch_positions(
    n_images: int, height: int, width: int, patches_per_image: int, patch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners ``(ys, xs)``, each ``[n_images, patches_per_image]`` (long), of patches lying wholly inside
    a ``height`` x ``width`` level, uniform and independent (with replacement)."""
    shape = (n_images, patches_per_image)
    ys = torch.randint(height - patch_size + 1, shape, generator=generator, device=generator.device)
    xs = torch.randint(width - patch_size + 1, shape, generator=generator, device=generator.device)
    return ys.cpu(), xs.cpu()


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
    ``directions`` ``[D, K]``: the mean absolute difference of the sorted projections (equal-size empirical
    distributions are matched in order)."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"descriptor sets must be [N, D] of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    pa = torch.sort((directions.t() @ a.double().t()).contiguous(), dim=1).values  # [K, N]: sort along memory
    pb = torch.sort((directions.t() @ b.double().t()).contiguous(), dim=1).values
    return (pa - pb).abs().mean(dim=1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """The sliced Wasserstein distance of descriptor sets ``a``, ``b`` ``[N, D]``: the mean of
    :func:`projected_wasserstein` over the directions ``[D, K]``."""
    return float(projected_wasserstein(a, b, directions).mean())


def _check_sets(images: torch.Tensor, reference: torch.Tensor, patch_size: int) -> None:
    for name, x in (("images", images), ("reference", reference)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a float tensor [B, C, H, W], got {what}")
    if images.shape != reference.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reference {tuple(reference.shape)} must have the same shape "
            "(equal-size sets of equal-size images); crop or resize them to one size"
        )
    if images.shape[0] < 1 or min(images.shape[-2:]) < patch_size:
        raise ValueError(f"SWD needs at least one image of at least {patch_size}x{patch_size}, got {tuple(images.shape)}")


def swd(
    images: torch.Tensor,
    reference: torch.Tensor,
    *,
    seed: int = 0,
    patch_size: int = PATCH_SIZE,
    patches_per_image: int = PATCHES_PER_IMAGE,
    n_directions: int = N_DIRECTIONS,
    min_resolution: int = MIN_RESOLUTION,
    normalize: str = "each",
) -> SWDResult:
    """SWD between the Laplacian-pyramid patch sets of ``images`` and ``reference`` (see the module docstring).

    Args:
        images, reference: ``[B, C, H, W]`` float sets of the same shape (any value range: descriptors are normalised
            per channel), e.g. refined images and clean images.
        seed: seeds the patch positions and the directions.
        patch_size, patches_per_image, n_directions, min_resolution: the paper's 7, 128, 512 (4 x 128) and 16.
        normalize: ``"each"`` (the paper) or ``"reference"`` (both sets by the reference's statistics).

    Returns:
        :class:`SWDResult` (raw values; the paper prints them x 10^3).
    """
    _check_sets(images, reference, patch_size)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}; choose one of {list(NORMALIZATIONS)}")
    for name, value in (("patches_per_image", patches_per_image), ("n_directions", n_directions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    sides = pyramid_resolutions(*images.shape[-2:], min_resolution)
    levels_a = laplacian_pyramid(images.detach().cpu().double(), len(sides))
    levels_b = laplacian_pyramid(reference.detach().cpu().double(), len(sides))
    positions = [
        patch_positions(images.shape[0], *level.shape[-2:], patches_per_image, patch_size, generator)
        for level in levels_a
        if min(level.shape[-2:]) >= patch_size
    ]
    per_level = []
    for level_a, level_b, (ys, xs) in zip(levels_a, levels_b, positions):
        da = extract_patches(level_a, ys, xs, patch_size)
        db = extract_patches(level_b, ys, xs, patch_size)
        mean_b, std_b = channel_statistics(db)
        mean_a, std_a = (mean_b, std_b) if normalize == "reference" else channel_statistics(da)
        da = ((da - mean_a) / std_a).flatten(1)
        db = ((db - mean_b) / std_b).flatten(1)
        per_level.append(sliced_wasserstein(da, db, random_directions(da.shape[1], n_directions, generator)))
    return SWDResult(tuple(sides[: len(per_level)]), tuple(per_level), float(sum(per_level) / len(per_level)))
