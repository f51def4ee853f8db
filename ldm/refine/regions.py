"""Region refinement: masks (white = refine, black = keep: latent-diffusion's sampler ``mask`` is the opposite) and
boxes -> a per-pixel start map, its latent version, the feathered composite, crops; per-file masks and metadata."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoint import sha256_file
from ldm.imageio import decode_image, format_path, from_pil, header_size, is_image_name, load_image
from ldm.sampling import check_int_arg

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
    """A rectangle in pixels, ``[x0, x1) x [y0, y1)``, with an optional start timestep of its own."""

    x0: int
    y0: int
    x1: int
    y1: int
    start_t: int | None = None

    def __post_init__(self) -> None:
        # checked where a box is made (the CLI's parse_box and the Python API alike): a negative coordinate would
        # select another region through Python's negative slicing
        for name in ("x0", "y0", "x1", "y1", "start_t"):
            value = getattr(self, name)
            if value is None and name == "start_t":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"Box.{name}={value!r} must be an integer (pixels; start_t a timestep)")
            object.__setattr__(self, name, int(value))
        _check_box(self.x0, self.y0, self.x1, self.y1, self.start_t, repr(self.describe()))

    def describe(self) -> str:
        """``"x0,y0,x1,y1"`` or ``"x0,y0,x1,y1@start_t"`` (what :func:`parse_box` reads)."""
        return f"{self.x0},{self.y0},{self.x1},{self.y1}" + (f"@{self.start_t}" if self.start_t is not None else "")


def parse_box(text: str) -> Box:
    """``"x0,y0,x1,y1"`` or ``"x0,y0,x1,y1@start_t"`` (integers, pixels, ``x1 > x0``, ``y1 > y0``) -> :class:`Box`."""
    match = _BOX.match(str(text))
    if match is None:
        shown = repr(text) if len(str(text)) <= 60 else repr(str(text)[:57] + "...")
        raise ValueError(f"box {shown} is not x0,y0,x1,y1 or x0,y0,x1,y1@start_t (integer pixel coordinates)")
    x0, y0, x1, y1 = (int(v) for v in match.groups()[:4])
    start = int(match.group(5)) if match.group(5) is not None else None
    _check_box(x0, y0, x1, y1, start, repr(text))  # here first: the message quotes the text as written
    return Box(x0, y0, x1, y1, start)


def _check_box(x0: int, y0: int, x1: int, y1: int, start: int | None, shown: str) -> None:
    if x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
        raise ValueError(f"box {shown} must have 0 <= x0 < x1 and 0 <= y0 < y1 (pixels; x1, y1 exclusive)")
    if start is not None and start < 1:  # the upper end (T - 1) depends on the checkpoints and is checked with the plan
        raise ValueError(
            f"box {shown} starts at t={start}: a box's own start_t must be in [1, T-1] (T = 1000 "
            "timesteps by default); leave out @start_t to use the batch's start"
        )


def mask_to_array(mask: Image.Image | np.ndarray | torch.Tensor, width: int, height: int) -> np.ndarray:
    """A mask as float32 ``[H, W]`` in ``[0, 1]`` (white = refine) from a PIL image of any mode (EXIF orientation
    applied, 16-bit kept), or an array or tensor ``[H, W]`` / ``[1, H, W]`` / ``[1, 1, H, W]`` (bool, uint8, or float in
    ``[0, 1]``).  ValueError for another size than the image's, or another shape or dtype."""
    if isinstance(mask, Image.Image):
        arr = mask_luminance(from_pil(mask, source="mask").rgb)
    else:
        if isinstance(mask, torch.Tensor):  # bf16/fp16 first to float32: numpy has no bfloat16
            mask = mask.detach().cpu()
            arr = (mask.float() if mask.is_floating_point() else mask).numpy()
        elif isinstance(mask, (str, bytes, os.PathLike)):
            raise ValueError("a mask path is not read here: pass Image.open(path) (refine.py --mask reads files)")
        else:
            arr = np.asarray(mask)
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
    """RGB ``[H, W, 3]`` in ``[0, 1]`` -> luminance ``[H, W]`` (colour masks count by brightness)."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def build_start_map(
    height: int,
    width: int,
    start_t: int,
    mask: np.ndarray | None = None,
    boxes: Sequence[Box] = (),
    dilate: int = 0,
) -> torch.Tensor:
    """The start map ``[1, 1, H, W]`` (int64 timesteps; 0 = keep) of a mask (``[H, W]`` in ``[0, 1]``: grey ``m``
    starts at ``round(m * start_t)``) and boxes: a box starts at its own start or ``start_t``; where they overlap the
    later start wins.  ``dilate`` grows the map by that many pixels.  Neither mask nor boxes: ``start_t`` everywhere.
    ValueError for a box outside the image or a map that selects nothing."""
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
    if dilate > 0:  # a square max filter, as a row pass and a column pass: 2k reads per pixel, not k^2 (minutes at 256)
        k = 2 * dilate + 1
        rows = F.max_pool2d(starts.double(), (1, k), stride=1, padding=(0, dilate))
        starts = F.max_pool2d(rows, (k, 1), stride=1, padding=(dilate, 0)).to(starts.dtype)
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
    """The 8-connected regions of ``start_map > 0`` (``[1, 1, H, W]``), top to bottom, then left to right.  With
    ``limit``, more regions than that are refused (ValueError saying how many there are and how to merge them)."""
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
    """The latest start in each of ``regions`` of ``start_map`` ``[1, 1, H, W]``."""
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
    """The square crops crop mode refines for ``start_map`` ``[1, 1, H, W]``, one per region of :func:`find_regions`.
    ValueError for more than :data:`MAX_REGIONS` regions."""
    h, w = start_map.shape[-2:]
    return [crop_geometry(r.bbox, padding, 1.0, w, h) for r in find_regions(start_map, MAX_REGIONS)]


def _fit(lo: int, hi: int, size: int) -> tuple[int, int]:  # [lo, hi) shifted inside [0, size), clipped when longer
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


@dataclass(frozen=True)
class RegionOptions:
    """How a batch selects and refines regions (all off: whole images).

    Attributes:
        mask: a mask file used for every input, or a folder of masks matched to the inputs by stem; None: no mask.
        boxes: rectangles (with optional per-box starts) applied to every input.
        blur, dilate: feather of the composite and growth of the selection, in pixels.
        crop, padding, size: crop mode ("only masked"), its context padding and the side regions are refined at
            (None: the experts' native size), in pixels.
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
        if self.mask is not None and not isinstance(self.mask, Path):
            object.__setattr__(self, "mask", Path(os.fsdecode(self.mask)))  # a str from the Python API
        for box in self.boxes:
            if not isinstance(box, Box):
                raise ValueError(
                    f"boxes must be Box objects (Box(x0, y0, x1, y1) or parse_box('x0,y0,x1,y1')), got "
                    f"{type(box).__name__} {box!r:.60}"
                )
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
        """The mask folder's image files by stem, listed once per run (not per input: a batch would be quadratic).
        OSError when the folder cannot be listed."""
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
        """The mask file, or each image file in the mask folder; OSError when the folder cannot be listed."""
        if self.mask is None:
            return []
        if not self.mask.is_dir():
            return [self.mask]
        return [p for paths in self._mask_index.values() for p in paths]

    def mask_for(self, image: Path) -> Path | None:
        """The mask of ``image`` (None without ``mask``); ValueError when the folder holds none or several for it."""
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
    before its pixels are decoded."""
    if size is not None:
        header = header_size(path)
        # EXIF orientation may transpose the decoded mask, so a transposed header is decoded and compared after
        if header is not None and header not in (size, size[::-1]):
            raise ValueError(f"the mask is {header[0]}x{header[1]} but the image is {size[0]}x{size[1]}; masks must "
                             "have the image's size")  # fmt: skip
    return mask_luminance(load_image(path).rgb), sha256_file(path)


def decode_mask(data: bytes, source: str) -> tuple[np.ndarray, str]:
    """:func:`load_mask` for an encoded mask in memory (the web app's); ``source`` names it in errors."""
    return mask_luminance(decode_image(data, source=source).rgb), hashlib.sha256(data).hexdigest()


def region_metadata(start_map: torch.Tensor, crops: Sequence[tuple[int, ...]] | None) -> dict[str, str]:
    """What a region refinement did to one image: each region's bounding box, latest start and, in crop mode, crop
    (``x0, y0, x1, y1``); the first :data:`MAX_REGIONS` regions, with ``regions_total`` when there are more."""
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
