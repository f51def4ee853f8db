"""Region refinement: masks and boxes -> a per-pixel start map, its latent version, the feathered composite, crops.

A mask is white = refine, black = keep (latent-diffusion's sampler ``mask`` is the opposite).  A **start map** holds
each pixel's start timestep: a grey mask value ``m`` starts at ``round(m * start_t)``, a box ``x0,y0,x1,y1@s`` at its own
``s``; pixels whose start is 0 come back unchanged (:func:`composite_weight` is exactly 0 there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.imageio import from_pil

DEFAULT_MASK_BLUR = 4  # px of inward feather at a region's edge (ADetailer's default blur)
DEFAULT_REGION_PADDING = 32  # px of context around a region in crop mode (ADetailer's default)
MAX_FEATHER = 256  # px; mask_blur and mask_dilate above this would only cost time (tens of erosion passes per px)
MAX_REGION_SIZE = 4096  # px; a crop is refined at up to 4096 x 4096 (16 MP), far above any expert's training size
MAX_REGION_PADDING = 4096  # px; crops are clipped to the image, so more context changes nothing on images up to 4096 px
# Crop mode refines each connected region in turn (the whole tail of steps per region): a dotted mask of a megapixel
# image would mean hours of work and as many crops in the metadata, so more than this are refused.
MAX_REGIONS = 256
# ASCII digits only (re's \d and int() also read other scripts' digits: "１２" would be 12), at most 9 (no pixel
# coordinate is larger, and int() refuses over 4300 digits in its own words)
_BOX = re.compile(r"^\s*(-?\d{1,9})\s*,\s*(-?\d{1,9})\s*,\s*(-?\d{1,9})\s*,\s*(-?\d{1,9})\s*(?:@\s*(-?\d{1,9})\s*)?$", re.ASCII)


@dataclass(frozen=True)
class Box:
    """A rectangle in pixel coordinates, ``[x0, x1) x [y0, y1)``, with an optional start timestep of its own."""

    x0: int
    y0: int
    x1: int
    y1: int
    start_t: int | None = None

    def describe(self) -> str:
        """``"x0,y0,x1,y1"`` or ``"x0,y0,x1,y1@start_t"`` (the form :func:`parse_box` reads)."""
        return f"{self.x0},{self.y0},{self.x1},{self.y1}" + (f"@{self.start_t}" if self.start_t is not None else "")


def parse_box(text: str) -> Box:
    """``"x0,y0,x1,y1"`` or ``"x0,y0,x1,y1@start_t"`` (integers, pixels, ``x1 > x0``, ``y1 > y0``) -> :class:`Box`."""
    match = _BOX.match(str(text))
    if match is None:
        shown = repr(text) if len(str(text)) <= 60 else repr(str(text)[:57] + "...")
        raise ValueError(f"box {shown} is not x0,y0,x1,y1 or x0,y0,x1,y1@start_t (integer pixel coordinates)")
    x0, y0, x1, y1 = (int(v) for v in match.groups()[:4])
    start = int(match.group(5)) if match.group(5) is not None else None
    if x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
        raise ValueError(f"box {text!r} must have 0 <= x0 < x1 and 0 <= y0 < y1 (pixels; x1, y1 exclusive)")
    if start is not None and start < 1:  # the upper end (T - 1) depends on the checkpoints and is checked with the plan
        raise ValueError(
            f"box {text!r} starts at t={start}: a box's own start_t must be in [1, T-1] (T = 1000 "
            "timesteps by default); leave out @start_t to use the batch's start"
        )
    return Box(x0, y0, x1, y1, start)


def mask_to_array(mask: Image.Image | np.ndarray | torch.Tensor, width: int, height: int) -> np.ndarray:
    """A mask as float32 ``[H, W]`` in ``[0, 1]`` (white = refine) from a PIL image of any mode (EXIF orientation
    applied, 16-bit kept), or an array or tensor ``[H, W]`` / ``[1, H, W]`` / ``[1, 1, H, W]`` (bool, uint8, or float in
    ``[0, 1]``).  Raises ValueError when its size is not the image's."""
    if isinstance(mask, Image.Image):
        arr = mask_luminance(from_pil(mask, source="mask").rgb)
    else:
        arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        while arr.ndim > 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise ValueError(f"a mask array must be [H, W] (or [1, H, W], [1, 1, H, W]), got shape {tuple(arr.shape)}")
        if arr.dtype == np.bool_:
            arr = arr.astype(np.float32)
        elif arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
            if not np.isfinite(arr).all() or (arr.size and (arr.min() < 0 or arr.max() > 1)):
                raise ValueError("a float mask must be finite and in [0, 1] (white = 1 = refine, black = 0 = keep)")
        else:
            raise ValueError(f"a mask array must be bool, uint8 or float, got {arr.dtype}")
    if arr.shape != (height, width):
        raise ValueError(
            f"the mask is {arr.shape[1]}x{arr.shape[0]} but the image is {width}x{height}; masks must have the image's size"
        )
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def mask_luminance(rgb: np.ndarray) -> np.ndarray:
    """A mask image's ``[H, W, 3]`` RGB in ``[0, 1]`` -> its luminance ``[H, W]`` (colour masks count by brightness)."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def build_start_map(
    height: int,
    width: int,
    start_t: int,
    mask: np.ndarray | None = None,
    boxes: Sequence[Box] = (),
    dilate: int = 0,
) -> torch.Tensor:
    """The start map ``[1, 1, H, W]`` (int64 timesteps) of a mask (``[H, W]`` in ``[0, 1]``) and boxes.

    A grey mask value ``m`` starts at ``round(m * start_t)``; a box at its own start or ``start_t``; where they overlap
    the later start (more change) wins.  ``dilate`` grows the map by that many pixels (a square max filter).  Neither
    mask nor boxes: ``start_t`` everywhere.  Raises ValueError for a box outside the image or a map that selects nothing.
    """
    if mask is None and not boxes:
        return torch.full((1, 1, height, width), int(start_t), dtype=torch.long)
    starts = torch.zeros(1, 1, height, width, dtype=torch.long)
    if mask is not None:
        starts = torch.from_numpy(np.rint(mask.astype(np.float64) * start_t).astype(np.int64))[None, None]
    for box in boxes:
        if box.x1 > width or box.y1 > height:
            raise ValueError(
                f"box {box.describe()} lies outside the {width}x{height} image (x1 <= {width}, y1 <= {height} needed)"
            )
        value = int(start_t if box.start_t is None else box.start_t)
        region = starts[..., box.y0 : box.y1, box.x0 : box.x1]
        region.copy_(region.clamp(min=value))
    if dilate > 0:  # a square max filter
        starts = F.max_pool2d(starts.double(), 2 * dilate + 1, stride=1, padding=dilate).to(starts.dtype)
    if not bool((starts > 0).any()):
        what = "the mask selects" if mask is not None else "the boxes select"
        raise ValueError(f"{what} nothing to refine (all black: start 0 everywhere); paint the region to refine white")
    return starts


def latent_start_map(start_map: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel start map ``[B, 1, H, W]`` (sides multiples of ``factor``) -> latent start map ``[B, 1, H/f, W/f]``.

    Conservative: a latent pixel starts if any of its ``f x f`` pixels does (with the latest of their starts), and the
    result is dilated by one latent pixel so that the decoder sees refined context all around the region.
    """
    pooled = F.max_pool2d(start_map.double(), factor, stride=factor)
    return F.max_pool2d(pooled, 3, stride=1, padding=1).to(start_map.dtype)


def composite_weight(start_map: torch.Tensor, blur: int) -> torch.Tensor:
    """The weight ``[B, 1, H, W]`` in ``[0, 1]`` of the refined image in the composite: exactly 0 where the start map
    is 0, rising linearly inward over ``blur`` pixels from the edge of the selected region (``(depth) / (blur + 1)``
    with depth 1 on the edge), 1 deeper inside.  The image border is not an edge: a region touching it is not
    feathered there.  ``blur=0`` is a hard paste."""
    inside = (start_map > 0).to(torch.float32)
    total = inside.clone()
    eroded = inside
    for _ in range(blur):
        eroded = -F.max_pool2d(-eroded, 3, stride=1, padding=1)
        total += eroded
    return total / (blur + 1)


def composite(x: torch.Tensor, refined: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` where ``weight`` is 0 (bit for bit), ``refined`` where it is 1, blended in between (``[B, 3, H, W]``)."""
    blended = x + weight * (refined - x)
    return torch.where(weight <= 0, x, torch.where(weight >= 1, refined, blended))


@dataclass(frozen=True)
class Region:
    """One connected region of a start map: its ``bbox`` ``(x0, y0, x1, y1)`` (exclusive ends) and its ``label`` in
    ``labels``, the label image ``[H, W]`` shared by every region of the map (0 = not selected), so that many regions
    do not need a full-size map each (regions x pixels of memory)."""

    bbox: tuple[int, int, int, int]
    label: int
    labels: np.ndarray

    def pixels(self, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
        """Which pixels of the window ``[x0, x1) x [y0, y1)`` belong to this region: bool ``[1, 1, y1-y0, x1-x0]``."""
        return torch.from_numpy(self.labels[y0:y1, x0:x1] == self.label)[None, None]


def find_regions(start_map: torch.Tensor, limit: int | None = None) -> list[Region]:
    """The connected regions (8-connected) of ``start_map > 0`` (``[1, 1, H, W]``), ordered top to bottom, then left to
    right; memory is one label image for all of them.  With ``limit``, more regions than that are refused (ValueError
    saying how many there are and how to merge them)."""
    from scipy import ndimage

    support = (start_map.reshape(start_map.shape[-2:]) > 0).cpu().numpy()
    labels, count = ndimage.label(support, structure=np.ones((3, 3), dtype=bool))
    if limit is not None and count > limit:
        raise ValueError(
            f"the selection has {count:,} separate regions, more than the {limit} crop mode refines one by one; merge "
            "nearby ones by growing the selection (--mask-dilate PX), or refine in place (without --crop-regions)"
        )
    regions = [
        Region((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), label, labels)
        for label, sl in enumerate(ndimage.find_objects(labels)[:count], start=1)
    ]
    return sorted(regions, key=lambda r: (r.bbox[1], r.bbox[0]))


def region_starts(start_map: torch.Tensor, regions: Sequence[Region]) -> list[int]:
    """The latest start in each of ``regions`` (of ``start_map`` ``[1, 1, H, W]``), by one pass over the labels."""
    from scipy import ndimage

    if not regions:
        return []
    values = start_map.reshape(start_map.shape[-2:]).cpu().numpy()
    peaks = ndimage.maximum(values, regions[0].labels, index=[r.label for r in regions])
    return [int(v) for v in np.atleast_1d(peaks)]


def crop_geometry(
    bbox: tuple[int, int, int, int], padding: int, aspect: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """The crop ``(x0, y0, x1, y1)`` around a region: ``bbox`` grown by ``padding`` on every side, then along its
    shorter side to ``aspect`` (width / height, the experts' training shape) keeping its centre, then shifted inside
    the ``width`` x ``height`` image; a crop larger than the image along a side is clipped to the image there (its
    aspect then differs)."""
    x0, y0, x1, y1 = bbox
    x0, y0, x1, y1 = x0 - padding, y0 - padding, x1 + padding, y1 + padding
    w, h = x1 - x0, y1 - y0
    if w < aspect * h:
        grow = round(aspect * h) - w
        x0, x1 = x0 - grow // 2, x1 + (grow - grow // 2)
    elif w > aspect * h:
        grow = round(w / aspect) - h
        y0, y1 = y0 - grow // 2, y1 + (grow - grow // 2)
    x0, x1 = _fit(x0, x1, width)
    y0, y1 = _fit(y0, y1, height)
    return x0, y0, x1, y1


def region_crops(start_map: torch.Tensor, padding: int) -> list[tuple[int, int, int, int]]:
    """The crops crop mode refines for ``start_map`` ``[1, 1, H, W]``, one per region of :func:`find_regions`, in order
    (square: the experts' training shape).  ValueError for more than :data:`MAX_REGIONS` regions."""
    h, w = start_map.shape[-2:]
    return [crop_geometry(r.bbox, padding, 1.0, w, h) for r in find_regions(start_map, MAX_REGIONS)]


def _fit(lo: int, hi: int, size: int) -> tuple[int, int]:
    """``[lo, hi)`` shifted inside ``[0, size)``, clipped to it when longer."""
    if hi - lo >= size:
        return 0, size
    if lo < 0:
        return 0, hi - lo
    if hi > size:
        return size - (hi - lo), size
    return lo, hi


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images ``[B, C, h, w]`` resized: antialiased bicubic (a good filter both ways), clamped to ``[-1, 1]``."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    out = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(-1.0, 1.0)


def resize_start_map(start_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A start map ``[B, 1, h, w]`` resized conservatively: a target pixel starts with the latest start of the source
    pixels it covers (max pooling when shrinking, nearest when growing)."""
    h, w = start_map.shape[-2:]
    if (h, w) == (height, width):
        return start_map
    grown = F.interpolate(start_map.double(), size=(max(height, h), max(width, w)), mode="nearest")
    return F.adaptive_max_pool2d(grown, (height, width)).to(start_map.dtype)
