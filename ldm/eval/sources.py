"""The images a sweep evaluates on (:class:`SweepImage`): crops of the held-out photographs, held-out images of the
synthetic family (never drawn for training), or every image of a folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm import imageio


@dataclass(frozen=True)
class SweepImage:
    """One image of the sweep: ``image`` ``[1, 3, H, W]`` in [-1, 1] on the CPU (clean, or in no-reference mode the
    artifact image itself) and its name."""

    name: str
    image: torch.Tensor


def heldout_images(n: int = 8, size: int = 32, seed: int = 0) -> list[SweepImage]:
    """``n`` crops of the held-out photographs (:data:`ldm.data.embedded.HELDOUT_PHOTOS`, never seen by
    :class:`ldm.data.embedded.EmbeddedPhotos` training), named ``heldout_<i>_<photo>``."""
    from ldm.data.embedded import HELDOUT_PHOTOS, heldout_crops

    crops = heldout_crops(size, n, seed=seed)
    return [
        SweepImage(f"heldout_{i:03d}_{HELDOUT_PHOTOS[i % len(HELDOUT_PHOTOS)]}", imageio.image_to_tensor(crop))
        for i, crop in enumerate(crops)
    ]


def folder_image_paths(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> tuple[list[Path], int]:
    """The image files under ``folder`` (recursive) and how many were left out: those under ``exclude`` (an output
    folder inside ``folder``), so that a report written there is not read as images by the next run."""
    paths = imageio.find_images([Path(folder)])[0]
    if exclude is None:
        return paths, 0
    root, out = os.path.realpath(folder), os.path.realpath(exclude)
    if out == root or os.path.commonpath([root, out]) != root:  # the folder itself, or outside it: nothing to leave out
        return paths, 0
    kept = [p for p in paths if os.path.commonpath([os.path.realpath(p), out]) != out]
    return kept, len(paths) - len(kept)


def images_at(folder: str | os.PathLike, paths: list[Path]) -> list[SweepImage]:
    """The images ``paths`` under ``folder``, named by their path relative to it, alpha dropped; an unreadable file is
    an error naming it."""
    return [SweepImage(p.relative_to(folder).as_posix(), imageio.image_to_tensor(imageio.load_image(p).rgb)) for p in paths]


def folder_images(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[SweepImage]:
    """Every image under ``folder`` (less those under ``exclude``, see :func:`folder_image_paths`), as :func:`images_at`."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {imageio.format_path(root)} does not exist or is not a folder")
    paths = folder_image_paths(root, exclude)[0]
    if not paths:
        raise FileNotFoundError("; ".join(imageio.find_images([root])[1]) or f"no images under {imageio.format_path(root)}")
    return images_at(root, paths)


def synthetic_images(n: int = 8, size: int = 32, seed: int = 0) -> list[SweepImage]:
    """``n`` held-out images of the synthetic family (:func:`ldm.data.synthetic.heldout_shapes`, stream ``seed``),
    named ``synthetic_<seed>_<i>``; training never draws them."""
    from ldm.data.synthetic import heldout_shapes

    return [
        SweepImage(f"synthetic_{seed}_{i:04d}", imageio.image_to_tensor(image))
        for i, image in enumerate(heldout_shapes(n, size, seed=seed))
    ]


# The synthetic method check's artifacts (ldm.eval.local_degrade): boxes of half the side, placed where the shapes' edges
# are; local_none is the control (nothing wrong in the box: what refining costs).  Start timesteps it sweeps.
SYNTHETIC_ARTIFACTS: tuple[str, ...] = (
    "local_none:box_size=0.5,box_at=edges",
    "local_noise:noise_std=0.4,box_size=0.5,box_at=edges",
    "local_block:block=8,box_size=0.5,box_at=edges",
    "local_smear:sigma=3,box_size=0.5,box_at=edges",
    "local_warp:amplitude=0.3,box_size=0.5,box_at=edges",
    "local_paint:box_size=0.5,box_at=edges",
)
SYNTHETIC_START_TS: tuple[int, ...] = (25, 50, 100, 200, 300)
