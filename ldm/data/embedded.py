"""The embedded default dataset: real photographs shipped inside scikit-image (no download, works offline).  The
held-out photographs (:data:`HELDOUT_PHOTOS`) give only validation items and :func:`heldout_crops`: a photograph is
either seen in training or never, as a user's own image is."""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ldm.data.image_folder import EpochSeededDataset, resize_short_side, uint8_to_model_range

logger = logging.getLogger(__name__)

MAX_SHORT_SIDE = 512
# Crops beyond 4x the photographs' short side would only be upsampled copies, and a mistyped size must not allocate
# gigabytes (size=100000: 30 GB per crop).
MAX_SIZE = 4 * MAX_SHORT_SIDE
DEFAULT_SCALE: tuple[float, float] = (1.0, 3.0)  # source pixels per crop pixel: small crops still hold structure
_HELDOUT_STREAM = 1_000_003  # separates the held-out draws from the training draws of the same seed

# photograph -> the ``skimage.data`` function that returns it (in order: training draws index into these tuples); not
# used: cat (chelsea again), lfw_subset and microaneurysms (too small).  Greyscale ones are opt-in, as three channels.
COLOR_PHOTOS: dict[str, str] = {
    **{name: name for name in ("astronaut", "coffee", "chelsea", "rocket")},
    "motorcycle": "stereo_motorcycle",
    **{name: name for name in ("immunohistochemistry", "hubble_deep_field", "retina")},
}
GRAY_PHOTOS: dict[str, str] = {
    name: name for name in ("camera", "moon", "coins", "grass", "gravel", "brick", "clock", "cell", "page", "text")
}
PHOTO_LOADERS: dict[str, str] = {**COLOR_PHOTOS, **GRAY_PHOTOS}
HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "coffee")
TRAIN_PHOTOS: tuple[str, ...] = tuple(name for name in COLOR_PHOTOS if name not in HELDOUT_PHOTOS)
DEFAULT_PHOTOS = TRAIN_PHOTOS
SPLIT_PHOTOS: dict[str, tuple[str, ...]] = {"train": TRAIN_PHOTOS, "validation": HELDOUT_PHOTOS}


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """The photograph ``name`` as read-only uint8 ``[H, W, 3]`` (cached per process), its short side downscaled to at
    most :data:`MAX_SHORT_SIDE` so that ``scale`` means about the same amount of scene on every photograph."""
    from skimage import data

    image = getattr(data, PHOTO_LOADERS[name])()
    image = np.asarray(image[0] if isinstance(image, tuple) else image)  # stereo_motorcycle: (left, right, disparity)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)
    if min(image.shape[:2]) > MAX_SHORT_SIDE:
        image = np.asarray(resize_short_side(Image.fromarray(image), MAX_SHORT_SIDE))
    image.setflags(write=False)
    return image


def _check_scale(scale: float | Sequence[float]) -> tuple[float, float]:
    # a number (numpy's too) or a pair; a string or three numbers reach the message below ('12' was (1.0, 2.0))
    pair = (scale, scale) if isinstance(scale, numbers.Real) else () if isinstance(scale, (str, bytes)) else scale
    try:
        low, high = (float(s) for s in pair)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0.0 < low <= high:
        raise ValueError(f"scale={scale!r} must be a positive number or a pair (low, high) with 0 < low <= high")
    return low, high


def check_photos(photos: Sequence[str] | None, split: str) -> tuple[str, ...]:
    """The photographs of ``split``: ``photos``, or the split's default when None.  ValueError for an unknown name, an
    empty list, or a photograph of the other split (the two never share one)."""
    if split not in SPLIT_PHOTOS:
        raise ValueError(f"split={split!r} is not one of {sorted(SPLIT_PHOTOS)}")
    names = SPLIT_PHOTOS[split] if photos is None else tuple(photos)
    unknown = [n for n in names if n not in PHOTO_LOADERS]
    if not names or unknown:
        raise ValueError(
            f"photos={list(names)} must be a non-empty list of embedded photos (unknown: {unknown}); "
            f"available: {sorted(PHOTO_LOADERS)}"
        )
    if split == "train":
        leaked = [n for n in names if n in HELDOUT_PHOTOS]
        if leaked:
            raise ValueError(
                f"photos={list(names)} holds {leaked}, held out for validation and evaluation; train on any of "
                f"{sorted(set(PHOTO_LOADERS) - set(HELDOUT_PHOTOS))}"
            )
    else:
        seen = [n for n in names if n not in HELDOUT_PHOTOS]
        if seen:
            raise ValueError(
                f"photos={list(names)} holds {seen}, which training may use; validate on the held-out "
                f"{list(HELDOUT_PHOTOS)} only"
            )
    return names


def sample_crop(photo: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator, flip: bool) -> np.ndarray:
    """A ``size`` x ``size`` uint8 crop anywhere in ``photo`` ``[H, W, 3]``, covering ``size * s`` source pixels
    (``s`` log-uniform in ``scale``, shrunk when the photograph is too small) resized to ``size`` (bicubic); with
    ``flip`` mirrored horizontally with probability 0.5."""
    height, width = photo.shape[:2]
    s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1])))
    side = max(1, min(round(size * s), height, width))
    y = int(rng.integers(0, height - side + 1))
    x = int(rng.integers(0, width - side + 1))
    crop = photo[y : y + side, x : x + side]
    if side != size:
        crop = np.asarray(Image.fromarray(crop).resize((size, size), resample=Image.Resampling.BICUBIC))
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.array(crop, dtype=np.uint8, order="C")


def _heldout_crop(i: int, size: int, seed: int, scale: tuple[float, float], photos: tuple[str, ...]) -> np.ndarray:
    rng = np.random.default_rng([int(seed), _HELDOUT_STREAM, int(i)])
    return sample_crop(load_photo(photos[i % len(photos)]), size, scale, rng, flip=False)


def heldout_crops(
    size: int,
    n: int,
    seed: int = 0,
    scale: float | Sequence[float] = DEFAULT_SCALE,
    photos: Sequence[str] = HELDOUT_PHOTOS,
) -> list[np.ndarray]:
    """``n`` clean uint8 ``[size, size, 3]`` crops of the held-out photographs, never seen by :class:`EmbeddedPhotos`
    training; crop ``i`` comes from ``photos[i % len(photos)]``, positions and scales are fixed by ``seed``."""
    if int(size) < 1 or int(n) < 0:
        raise ValueError(f"size={size} must be positive and n={n} non-negative")
    _check_size(size)
    scale_range, names = _check_scale(scale), check_photos(photos, "validation")
    return [_heldout_crop(i, int(size), seed, scale_range, names) for i in range(int(n))]


def _check_size(size: int) -> None:
    if int(size) > MAX_SIZE:
        raise ValueError(
            f"size={size} px is above {MAX_SIZE} px: the embedded photographs are at most {MAX_SHORT_SIDE} px on their "
            "short side, so such crops would only be upsampled copies (and need gigabytes); use a folder of large "
            "images (ldm.data.image_folder.ImageFolderDataset) for large crops"
        )


class EmbeddedPhotos(EpochSeededDataset):
    """Random crops of scikit-image's bundled photographs: the dataset that needs no download.

    Args:
        split: ``"train"`` (random photograph, scale, position and flip, drawn from ``(seed, epoch, index)``) or
            ``"validation"`` (``heldout_crops(size, n_samples, seed, scale, photos)``, no flip).
        n_samples: length of an epoch (training) / number of validation crops.
        scale: source pixels per output pixel, a number or a ``(low, high)`` range drawn log-uniformly.
        photos: the photographs to use; None: :data:`TRAIN_PHOTOS` for training, :data:`HELDOUT_PHOTOS` for validation.

    Items: ``{image_key: float32 [size, size, 3] in [-1, 1], "photo_": name}``.
    """

    def __init__(
        self,
        size: int = 64,
        split: str = "train",
        n_samples: int = 512,
        seed: int = 0,
        scale: float | Sequence[float] = DEFAULT_SCALE,
        image_key: str = "image",
        photos: Sequence[str] | None = None,
        flip: bool = True,
    ) -> None:
        super().__init__(seed)
        if int(size) < 1 or int(n_samples) < 1:
            raise ValueError(f"size={size} and n_samples={n_samples} must be positive integers")
        _check_size(size)
        self.photos = check_photos(photos, split)
        self.size = int(size)
        self.split = split
        self.n_samples = int(n_samples)
        self.scale = _check_scale(scale)
        self.image_key = image_key
        self.flip = bool(flip)
        small = [name for name in self.photos if min(load_photo(name).shape[:2]) < self.size]
        if small:
            logger.warning("EmbeddedPhotos: %s are smaller than size=%d; their crops are upscaled", small, self.size)

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        index = self._wrap_index(index, self.n_samples, f"n_samples={self.n_samples}")
        if self.split == "validation":
            name = self.photos[index % len(self.photos)]
            crop = _heldout_crop(index, self.size, self.seed, self.scale, self.photos)
        else:
            rng = self.item_rng(index)
            name = self.photos[int(rng.integers(len(self.photos)))]
            crop = sample_crop(load_photo(name), self.size, self.scale, rng, flip=self.flip)
        return {self.image_key: uint8_to_model_range(crop), "photo_": name}
