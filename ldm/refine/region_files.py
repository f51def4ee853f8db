"""Region refinement for image files: masks found and read for each input, region metadata, the grid's mask overlay.

A mask is read with the same robust loader as the inputs (:func:`ldm.imageio.load_image`: any mode, EXIF orientation,
16-bit; colour masks use their luminance).  ``--mask`` names one mask file for every input, or a folder holding one
mask per input, matched by file stem (``photo.png`` <- ``masks/photo.png``, any image suffix).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm.imageio import decode_image, format_path, is_image_name, load_image
from ldm.refine.regions import Box, find_regions


@dataclass(frozen=True)
class RegionOptions:
    """How a batch selects and refines regions (all off: whole images).

    Attributes:
        mask: a mask file used for every input, or a folder of masks matched to the inputs by stem; None: no mask.
        boxes: rectangles (with optional per-box starts) applied to every input.
        blur, dilate: feather of the composite and growth of the selection, in pixels.
        crop, padding, size: crop mode ("only masked"), its context padding and the side regions are refined at
            (None: the experts' native size).
    """

    mask: Path | None = None
    boxes: tuple[Box, ...] = ()
    blur: int = 4
    dilate: int = 0
    crop: bool = False
    padding: int = 32
    size: int | None = None

    @property
    def active(self) -> bool:
        return self.mask is not None or bool(self.boxes)

    def mask_for(self, image: Path) -> Path | None:
        """The mask of ``image`` (None without ``mask``); ValueError naming the folder when it holds none for it."""
        if self.mask is None or not self.mask.is_dir():
            return self.mask
        matches = sorted(p for p in self.mask.iterdir() if p.stem == image.stem and is_image_name(p) and p.is_file())
        if not matches:
            raise ValueError(f"{format_path(image)}: the mask folder {format_path(self.mask)} holds no mask named "
                             f"{image.stem}.<png|jpg|...>")  # fmt: skip
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise ValueError(f"{format_path(image)}: the mask folder holds several masks for it ({names}); keep one")
        return matches[0]

    def as_metadata(self) -> dict[str, str]:
        """The options as PNG text entries."""
        meta = {"mask_blur": str(self.blur), "mask_dilate": str(self.dilate), "crop_regions": str(self.crop)}
        if self.boxes:
            meta["boxes"] = ";".join(b.describe() for b in self.boxes)
        if self.crop:
            meta["region_padding"] = str(self.padding)
        return meta


def load_mask(path: Path) -> tuple[np.ndarray, str]:
    """``(mask [H, W] float32 in [0, 1], sha256 of the file)``; ImageLoadError (one line) when it cannot be read."""
    loaded = load_image(path)
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    return mask_luminance(loaded.rgb), digest


def decode_mask(data: bytes, source: str) -> tuple[np.ndarray, str]:
    """:func:`load_mask` for an encoded mask held in memory (the web app's painted mask); ``source`` names it in
    errors."""
    return mask_luminance(decode_image(data, source=source).rgb), hashlib.sha256(data).hexdigest()


def mask_luminance(rgb: np.ndarray) -> np.ndarray:
    """A mask image's ``[H, W, 3]`` RGB in ``[0, 1]`` -> its luminance ``[H, W]`` (white = refine; colour masks count
    by brightness)."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def region_metadata(start_map: torch.Tensor, crops: Sequence[tuple[int, ...]] | None) -> dict[str, str]:
    """What a region refinement did to one image: each region's bounding box and start (the latest start in it), and
    in crop mode the crop refined for it (``x0, y0, x1, y1``)."""
    regions = []
    for i, (box, own) in enumerate(find_regions(start_map)):
        entry = {"bbox": list(box), "start_t": int(start_map[own.to(start_map.device)].max())}
        if crops is not None:
            entry["crop"] = list(crops[i])
        regions.append(entry)
    return {"regions": json.dumps(regions)}


def mask_overlay(rgb: np.ndarray, start_map: torch.Tensor, top: int) -> np.ndarray:
    """``rgb`` uint8 ``[H, W, 3]`` tinted red where the start map selects, in proportion to the start (for grids)."""
    share = (start_map.reshape(start_map.shape[-2:]).cpu().numpy().astype(np.float32) / max(top, 1))[..., None]
    red = np.array([255, 0, 0], dtype=np.float32)
    return np.clip(rgb.astype(np.float32) * (1 - 0.5 * share) + red * 0.5 * share, 0, 255).round().astype(np.uint8)


def describe_mask(path: Path | None) -> str:
    """A printable path for metadata (empty when there is no mask)."""
    return "" if path is None else format_path(os.fspath(path))
