"""Region refinement for image files: each input's mask (``--mask``: one file for every input, or a folder of masks
matched by stem, listed once per run), region metadata, and the grid's mask overlay.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ldm.checkpoint import sha256_file
from ldm.imageio import decode_image, format_path, header_size, is_image_name, load_image
from ldm.refine.regions import (
    DEFAULT_MASK_BLUR,
    DEFAULT_REGION_PADDING,
    MAX_FEATHER,
    MAX_REGION_PADDING,
    MAX_REGION_SIZE,
    MAX_REGIONS,
    Box,
    find_regions,
    mask_luminance,
    region_starts,
)
from ldm.sampling import check_int_arg


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
    blur: int = DEFAULT_MASK_BLUR
    dilate: int = 0
    crop: bool = False
    padding: int = DEFAULT_REGION_PADDING
    size: int | None = None

    def __post_init__(self) -> None:
        # checked once here, where a batch's options are made, not per image after it is loaded
        check_int_arg("mask_blur", self.blur, 0, MAX_FEATHER)
        check_int_arg("mask_dilate", self.dilate, 0, MAX_FEATHER)
        check_int_arg("region_padding", self.padding, 0, MAX_REGION_PADDING)
        if self.size is not None:  # the lower bound is the experts' factor, checked when the refiner runs
            check_int_arg("region_size", self.size, 1, MAX_REGION_SIZE)

    @property
    def active(self) -> bool:
        return self.mask is not None or bool(self.boxes)

    @cached_property
    def _mask_index(self) -> dict[str, list[Path]]:
        """The mask folder's image files by stem, listed once per run (listing it for every input made a batch
        quadratic).  OSError when the folder cannot be listed."""
        index: dict[str, list[Path]] = {}
        if self.mask is None:
            return index
        with os.scandir(self.mask) as entries:
            for entry in entries:
                path = self.mask / entry.name
                if is_image_name(path):
                    index.setdefault(path.stem, []).append(path)
        return index

    def mask_files(self) -> list[Path]:
        """Every file masks may be read from: the mask file, or each image file in the mask folder (listed once).
        OSError when the mask folder cannot be listed."""
        if self.mask is None:
            return []
        if not self.mask.is_dir():
            return [self.mask]
        return [p for paths in self._mask_index.values() for p in paths]

    def mask_for(self, image: Path) -> Path | None:
        """The mask of ``image`` (None without ``mask``); ValueError naming the folder when it holds none for it."""
        if self.mask is None or not self.mask.is_dir():
            return self.mask
        try:
            candidates = self._mask_index.get(image.stem, [])
        except OSError as exc:
            raise ValueError(f"{format_path(image)}: cannot list the mask folder {format_path(self.mask)}: "
                             f"{exc.strerror or exc}") from None  # fmt: skip
        matches = sorted(p for p in candidates if p.is_file())
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


def load_mask(path: Path, size: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """``(mask [H, W] float32 in [0, 1], sha256 of the file)``; ImageLoadError (one line) when it cannot be read.
    With ``size`` (the image's ``(width, height)``), a mask whose header gives another size is refused (ValueError)
    before its pixels are decoded (a huge mask would otherwise be decoded first)."""
    if size is not None:
        header = header_size(path)
        # EXIF orientation may transpose the decoded mask, so a transposed header is decoded and compared after
        if header is not None and header not in (size, size[::-1]):
            raise ValueError(f"the mask is {header[0]}x{header[1]} but the image is {size[0]}x{size[1]}; masks must "
                             "have the image's size")  # fmt: skip
    return mask_luminance(load_image(path).rgb), sha256_file(path)


def decode_mask(data: bytes, source: str) -> tuple[np.ndarray, str]:
    """:func:`load_mask` for an encoded mask held in memory (the web app's painted mask); ``source`` names it in
    errors."""
    return mask_luminance(decode_image(data, source=source).rgb), hashlib.sha256(data).hexdigest()


def region_metadata(start_map: torch.Tensor, crops: Sequence[tuple[int, ...]] | None) -> dict[str, str]:
    """What a region refinement did to one image: each region's bounding box and start (the latest start in it), and
    in crop mode the crop refined for it (``x0, y0, x1, y1``); the first :data:`MAX_REGIONS` regions, with
    ``regions_total`` when there are more."""
    found = find_regions(start_map)
    listed = found[:MAX_REGIONS]  # in-place mode allows any number of regions; listing them all could take megabytes
    entries = []
    for i, (region, start) in enumerate(zip(listed, region_starts(start_map, listed))):
        entry = {"bbox": list(region.bbox), "start_t": start}
        if crops is not None:
            entry["crop"] = list(crops[i])
        entries.append(entry)
    meta = {"regions": json.dumps(entries)}
    if len(found) > len(listed):
        meta["regions_total"] = str(len(found))
    return meta


def mask_overlay(rgb: np.ndarray, start_map: torch.Tensor, top: int) -> np.ndarray:
    """``rgb`` uint8 ``[H, W, 3]`` tinted red where the start map selects, in proportion to the start (for grids)."""
    share = (start_map.reshape(start_map.shape[-2:]).cpu().numpy().astype(np.float32) / max(top, 1))[..., None]
    red = np.array([255, 0, 0], dtype=np.float32)
    return np.clip(rgb.astype(np.float32) * (1 - 0.5 * share) + red * 0.5 * share, 0, 255).round().astype(np.uint8)
