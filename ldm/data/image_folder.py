"""Image-folder dataset (recursive scan, deterministic train/validation split, resize + crop + flip) and the image
helpers and ``(seed, epoch, index)`` randomness that the other datasets share."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.data.captions import caption_item, check_caption_mode, read_caption_file, sidecar_path
from ldm.imageio.load import LOADER_FORMATS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SPLITS: tuple[str, ...] = ("train", "validation", "all")

# What PIL raises for files it cannot decode: truncated data and unknown formats (OSError and its subclass
# UnidentifiedImageError), malformed headers (SyntaxError, ValueError), premature ends (EOFError) and images larger
# than Image.MAX_IMAGE_PIXELS allows (DecompressionBombError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class UnreadableDatasetError(RuntimeError):
    """Every file of a dataset split failed to decode."""


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: alpha (RGBA, LA, PA, palette or grey with a transparency colour) composited over
    white; 16-bit grey (``I;16*``, and ``I`` holding values above 255) scaled to 8 bits instead of clipped."""
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0.0) > 255.0:
            values = values / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb_image(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """Decode ``path`` (or an open binary file) fully, EXIF-oriented, as RGB; raises one of
    :data:`UNREADABLE_IMAGE_ERRORS` when it cannot.  Only regular files are opened (a FIFO would block the open), and
    only as one of :data:`ldm.imageio.LOADER_FORMATS` (Pillow's EPS plugin would run Ghostscript)."""
    if isinstance(path, (str, bytes, os.PathLike)) and not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path} is not a regular file (device, FIFO or socket)")
    Image.init()
    with Image.open(path, formats=[name for name in LOADER_FORMATS if name in Image.OPEN]) as image:
        image.load()
        return pil_to_rgb(ImageOps.exif_transpose(image))


def resize_short_side(image: Image.Image, size: int, min_side_resize: bool = True) -> Image.Image:
    """Resize (bicubic, antialiased when shrinking) so that the shorter side is exactly ``size`` pixels; with
    ``min_side_resize`` false only an image whose shorter side is below ``size`` (ImageFolderDataset's argument)."""
    width, height = image.size
    if min(width, height) == size or (not min_side_resize and min(width, height) > size):
        return image
    factor = size / min(width, height)
    new_size = (max(size, round(width * factor)), max(size, round(height * factor)))
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def augment_image(
    image: Image.Image, size: int, min_side_resize: bool, random_crop: bool, flip: bool, rng: np.random.Generator
) -> np.ndarray:
    """The training transform: :func:`resize_short_side`, crop ``size`` x ``size`` (uniform with ``random_crop``: top
    then left drawn from ``rng``; else centred), flip with p = 0.5 when ``flip`` (drawn after the crop).  Returns uint8
    ``[size, size, 3]``."""
    image = resize_short_side(image, size, min_side_resize)
    width, height = image.size
    if random_crop:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    else:
        top, left = (height - size) // 2, (width - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    if flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def uint8_to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``[H, W, 3]`` in [-1, 1] (latent-diffusion's ``x / 127.5 - 1``)."""
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).astype(np.float32, copy=False)


class EpochSeededDataset(Dataset):
    """Base class: item ``index``'s augmentations are drawn from ``numpy.random.default_rng([seed, epoch, index])``,
    independent of workers, ranks and fetch order.  The epoch lives in shared memory, so DataLoader workers (forked,
    spawned or persistent) read the current value when they build an item."""

    def __init__(self, seed: int) -> None:
        if int(seed) < 0:
            raise ValueError(f"seed={seed} must be a non-negative integer")
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (DataModuleFromConfig calls it at the start of each epoch; a plain
        DataLoader user must too, or every epoch repeats epoch 0's)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch={epoch} must be non-negative")
        self._epoch.fill_(int(epoch))

    def item_rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        """The generator that draws the augmentations of item ``index`` in ``epoch`` (None: the current one)."""
        return np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch), int(index)])

    @staticmethod
    def _wrap_index(index: int, n: int, what: str) -> int:
        """``index`` in ``[-n, n)`` as a position in ``[0, n)``; IndexError naming ``what`` (the items) otherwise."""
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {what}")
        return index % n


def scan_image_files(root: str | os.PathLike) -> list[Path]:
    """Files under ``root`` with one of :data:`IMAGE_SUFFIXES` (any case), sorted by relative POSIX path; follows
    symlinked folders (each real folder once), ignores hidden ones.  FileNotFoundError / NotADirectoryError for a bad root."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"image folder {str(root)!r} does not exist; point `root` at a folder holding images with suffixes "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} (searched recursively)"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {str(root)!r} is a file, not a folder; pass the folder that holds it")
    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def split_files(files: Sequence[Path], split: str, val_fraction: float, split_seed: int) -> list[Path]:
    """``split`` of ``files`` by a seeded shuffle: ``round(val_fraction * n)`` files (at least one when
    ``val_fraction > 0`` and ``n >= 2``, never all) are validation, the rest training; ``"all"`` keeps every file.
    Adding files re-draws the split."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
    if split == "all":
        return list(files)
    n = len(files)
    n_val = 0 if (val_fraction == 0.0 or n < 2) else min(n - 1, max(1, round(val_fraction * n)))
    val_idx = set(np.random.default_rng(int(split_seed)).permutation(n)[:n_val].tolist())
    return [f for i, f in enumerate(files) if (i in val_idx) == (split == "validation")]


class ImageFolderDataset(EpochSeededDataset):
    """Images found recursively under ``root``, resized, cropped to ``size`` x ``size`` and (train) flipped.

    Args:
        split: ``"train"``, ``"validation"`` (centre crop, no flip) or ``"all"``; ``val_fraction`` of the files are
            held out for validation (give both splits the same value).
        random_crop, flip: uniform random crop (else centred) and horizontal flip (p = 0.5), for train/all only.
        min_side_resize: resize so that the short side equals ``size``; when False only upscale smaller images.
        split_seed: seed of the split, apart from ``seed`` (the crops) so that ``seed`` never moves files between splits.
        captions: ``"off"``, ``"optional"`` (``""`` for an image without ``<stem>.txt``) or ``"required"`` (checked at
            construction).

    Items: ``{image_key: float32 [size, size, 3] in [-1, 1], "file_path_": str}``, plus ``"caption"`` unless off.  An
    unreadable file (or caption) is warned about once, never retried and replaced by the next readable file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 256,
        split: str = "train",
        val_fraction: float = 0.05,
        random_crop: bool = True,
        flip: bool = True,
        min_side_resize: bool = True,
        seed: int = 0,
        image_key: str = "image",
        split_seed: int = 0,
        captions: str = "off",
    ) -> None:
        super().__init__(seed)
        self.captions = check_caption_mode(captions)
        if int(size) < 1:
            raise ValueError(f"size={size} must be a positive number of pixels")
        self.root = Path(root).expanduser()
        self.size = int(size)
        self.split = split
        self.val_fraction = float(val_fraction)
        self.image_key = image_key
        self.min_side_resize = bool(min_side_resize)
        augment = split != "validation"
        self.random_crop = bool(random_crop) and augment
        self.flip = bool(flip) and augment
        all_files = scan_image_files(self.root)
        if not all_files:
            raise FileNotFoundError(
                f"no images found under {str(self.root)!r} (searched recursively for suffixes "
                f"{', '.join(IMAGE_SUFFIXES)}, case-insensitive; hidden files and folders are ignored); add images "
                "or point `root` at the folder that holds them"
            )
        self.files = split_files(all_files, split, self.val_fraction, split_seed)
        if not self.files:
            raise ValueError(
                f"split={split!r} of {str(self.root)!r} is empty: {len(all_files)} image(s), val_fraction="
                f"{self.val_fraction}; use split='all' (and val_fraction=0) for a folder this small, or add images"
            )
        if self.captions == "required":
            missing = [f for f in self.files if not sidecar_path(f).is_file()]
            if missing:
                raise ValueError(
                    f"captions='required', but {len(missing)} of the {len(self.files)} image(s) of split {split!r} under "
                    f"{str(self.root)!r} have no caption file (first: {str(missing[0])!r} has no "
                    f"{sidecar_path(missing[0]).name!r} beside it); add the .txt files or set captions: optional (the "
                    "empty caption for those)"
                )
        self._bad = torch.zeros(len(self.files), dtype=torch.uint8).share_memory_()
        logger.info("ImageFolderDataset %s split=%s: %d of %d image(s)", self.root, split, len(self.files), len(all_files))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_skipped(self) -> int:
        """Files found unreadable so far (each warned about once, never retried)."""
        return int(self._bad.sum().item())

    @property
    def skipped_files(self) -> list[str]:
        return [str(self.files[i]) for i in torch.nonzero(self._bad).flatten().tolist()]

    def load(self, position: int) -> tuple[Image.Image, dict[str, str]] | None:
        """The RGB image of file ``position`` and ``{"caption": text}`` (``{}`` when off), or None after marking the file
        unreadable.  The caption is read first, so a bad one skips the image unread."""
        if self._bad[position].item():
            return None
        path = self.files[position]
        what = str(sidecar_path(path))
        try:
            caption = caption_item(None if self.captions == "off" else read_caption_file(what), self.captions, what)
            return load_rgb_image(path), caption
        except UNREADABLE_IMAGE_ERRORS as error:  # CaptionError is a ValueError
            self._bad[position] = 1
            logger.warning(
                "skipping unreadable image %s (%s: %s); substituting another file (%d unreadable so far)",
                path,
                type(error).__name__,
                error,
                self.num_skipped,
            )
            return None

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        n = len(self.files)
        index = self._wrap_index(index, n, f"{n} images")
        for offset in range(n):
            position = (index + offset) % n
            loaded = self.load(position)
            if loaded is not None:
                image, caption = loaded
                array = augment_image(image, self.size, self.min_side_resize, self.random_crop, self.flip, self.item_rng(index))
                return {self.image_key: uint8_to_model_range(array), "file_path_": str(self.files[position]), **caption}
        raise UnreadableDatasetError(
            f"all {n} image(s) of split {self.split!r} under {str(self.root)!r} are unreadable "
            f"(first ones: {self.skipped_files[:3]}); check the files, e.g. with PIL.Image.open(path).load()"
        )
