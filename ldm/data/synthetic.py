"""A synthetic image family with a known generative process (:func:`draw_scene`, then :func:`render_scene`): soft-edged
flat discs and rectangles on a flat background, which tiny models learn in minutes on a CPU.

An image is identified by its *image seed* in ``[0, 2**63)``: training draws only from ``[0, HELDOUT_START)``, held-out
images (:func:`heldout_image_seed`) only from above, so no held-out image is ever a training image.  The evaluation's
streams (``seed`` 0 for the cases, 1 for the realism reference) are disjoint from the validation split's
(:data:`VALIDATION_STREAM` and up).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm.data.image_folder import EpochSeededDataset, uint8_to_model_range

PALETTE: np.ndarray = np.array(
    [
        [230, 57, 70],  # red
        [244, 162, 97],  # orange
        [233, 196, 106],  # yellow
        [42, 157, 143],  # teal
        [38, 70, 83],  # dark slate
        [69, 123, 157],  # blue
        [168, 218, 220],  # light cyan
        [241, 250, 238],  # off-white
    ],
    dtype=np.uint8,
)
PALETTE.setflags(write=False)
SHAPE_KINDS: tuple[str, ...] = ("disc", "rectangle")
HELDOUT_START = 1 << 62  # image seeds at or above this are never drawn for training
STREAM_BITS = 32  # a held-out stream holds 2**32 images
MAX_STREAM = (1 << (62 - STREAM_BITS)) - 1
VALIDATION_STREAM = 1 << 20  # the dataset's validation split uses held-out streams from here on, the evaluation's below
MAX_SIZE = 1024
MAX_SAMPLES = 10**7  # items per epoch: the loader's sampler holds a permutation of them


@dataclass(frozen=True)
class Shape:
    """One shape of a scene, in fractions of the image side: ``kind`` (:data:`SHAPE_KINDS`), ``colour`` (an index into
    :data:`PALETTE`), centre ``(cx, cy)`` and half-extents ``(rx, ry)`` (equal for a disc, its radius)."""

    kind: str
    colour: int
    cx: float
    cy: float
    rx: float
    ry: float


@dataclass(frozen=True)
class Scene:
    """A drawn image before rendering: the background's palette index and the shapes in painting order."""

    background: int
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class ShapesFamily:
    """The family's parameters: ``n_min``..``n_max`` shapes per image, radii in ``[radius_min, radius_max]`` (fractions of
    the side), soft edges ``edge`` px wide at ``reference_size`` px (scaled with the rendered size); the defaults are the
    family the synthetic configs train on."""

    n_min: int = 2
    n_max: int = 4
    radius_min: float = 0.12
    radius_max: float = 0.3
    edge: float = 3.0
    reference_size: int = 32

    def __post_init__(self) -> None:
        for name in ("n_min", "n_max", "reference_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name}={value!r} must be an integer")
        for name in ("radius_min", "radius_max", "edge"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name}={value!r} must be a number")
        if not 1 <= self.n_min <= self.n_max <= 64:
            raise ValueError(f"shapes per image: need 1 <= n_min <= n_max <= 64, got n_min={self.n_min}, n_max={self.n_max}")
        if not 0 < self.radius_min <= self.radius_max <= 1:
            raise ValueError(
                f"shape radius: need 0 < radius_min <= radius_max <= 1 (fractions of the side), got "
                f"{self.radius_min}, {self.radius_max}"
            )
        if not 0 < self.edge <= 16 or not 8 <= self.reference_size <= MAX_SIZE:
            raise ValueError(
                f"edge={self.edge} must be in (0, 16] px and reference_size={self.reference_size} in [8, {MAX_SIZE}]"
            )


def draw_scene(image_seed: int, family: ShapesFamily = ShapesFamily()) -> Scene:
    """The scene of ``image_seed`` (an integer in ``[0, 2**63)``): deterministic, independent of any other draw, in
    fractions of the image side (one seed renders the same scene at any size).  Later shapes occlude earlier ones."""
    rng = np.random.default_rng(int(image_seed))
    n_colours = len(PALETTE)
    background = int(rng.integers(n_colours))
    shapes = []
    for _ in range(int(rng.integers(family.n_min, family.n_max + 1))):
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        colour = int(rng.integers(n_colours - 1))
        colour += colour >= background  # any colour but the background's
        cx, cy = (float(v) for v in rng.uniform(0.0, 1.0, 2))
        r = float(rng.uniform(family.radius_min, family.radius_max))
        rx, ry = (r, r) if kind == "disc" else (r * float(rng.uniform(0.6, 1.0)), r * float(rng.uniform(0.6, 1.0)))
        shapes.append(Shape(kind, colour, cx, cy, rx, ry))
    return Scene(background, tuple(shapes))


def render_scene(scene: Scene, size: int, family: ShapesFamily = ShapesFamily()) -> np.ndarray:
    """``scene`` as a uint8 ``[size, size, 3]`` image: a shape covers a pixel by ``clip(0.5 - d / edge, 0, 1)``, ``d``
    the signed distance (px, negative inside) of the pixel centre to its outline, ``edge`` = ``family.edge`` px at
    ``family.reference_size``."""
    size = _check_size(size)
    edge = family.edge * size / family.reference_size
    centres = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres, fractions of the side
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    canvas = np.broadcast_to(PALETTE[scene.background].astype(np.float64), (size, size, 3)).copy()
    for shape in scene.shapes:
        dx, dy = np.abs(xs - shape.cx), np.abs(ys - shape.cy)
        if shape.kind == "disc":
            distance = np.hypot(dx, dy) - shape.rx
        else:  # signed distance to an axis-aligned rectangle
            ox, oy = dx - shape.rx, dy - shape.ry
            distance = np.hypot(np.maximum(ox, 0), np.maximum(oy, 0)) + np.minimum(np.maximum(ox, oy), 0)
        coverage = np.clip(0.5 - distance * size / edge, 0.0, 1.0)[..., None]
        canvas = coverage * PALETTE[shape.colour] + (1.0 - coverage) * canvas
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render_shapes(image_seed: int, size: int, family: ShapesFamily = ShapesFamily()) -> np.ndarray:
    """The image of ``image_seed``: uint8 ``[size, size, 3]``."""
    return render_scene(draw_scene(image_seed, family), size, family)


def train_image_seed(seed: int, epoch: int, index: int) -> int:
    """The image seed of training item ``index`` in ``epoch`` for dataset ``seed``: uniform in ``[0, HELDOUT_START)``."""
    return int(np.random.default_rng([int(seed), int(epoch), int(index)]).integers(0, HELDOUT_START))


def heldout_image_seed(index: int, seed: int = 0) -> int:
    """The image seed of held-out image ``index`` of stream ``seed`` (``2**32`` images each, disjoint): in
    ``[HELDOUT_START, 2**63)``, never a training seed."""
    if not 0 <= int(index) < 1 << STREAM_BITS or not 0 <= int(seed) <= MAX_STREAM:
        raise ValueError(f"held-out index {index} must be in [0, 2**{STREAM_BITS}) and seed {seed} in [0, {MAX_STREAM}]")
    return HELDOUT_START + (int(seed) << STREAM_BITS) + int(index)


def heldout_shapes(n: int, size: int, seed: int = 0, family: ShapesFamily = ShapesFamily()) -> list[np.ndarray]:
    """``n`` held-out images (uint8 ``[size, size, 3]``) of stream ``seed``; training never draws them."""
    if int(n) < 0:
        raise ValueError(f"n={n} must be non-negative")
    return [render_shapes(heldout_image_seed(i, seed), size, family) for i in range(int(n))]


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= MAX_SIZE:
        raise ValueError(f"size={size!r} must be an integer number of pixels in [8, {MAX_SIZE}]")
    return int(size)


class SyntheticShapes(EpochSeededDataset):
    """The synthetic family as a dataset: unlimited, deterministic by seed, with a held-out split.

    ``split``: ``"train"`` (new image seeds every epoch, drawn from ``(seed, epoch, index)`` in the training range) or
    ``"validation"`` (the fixed held-out images of stream ``VALIDATION_STREAM + seed``); ``n_samples``: an epoch's
    length / the number of validation images; ``n_min`` ... ``edge``: the family (:class:`ShapesFamily`).
    Items: ``{image_key: float32 [size, size, 3] in [-1, 1], "image_seed_": int}``.
    """

    def __init__(
        self,
        size: int = 32,
        split: str = "train",
        n_samples: int = 512,
        seed: int = 0,
        image_key: str = "image",
        n_min: int = 2,
        n_max: int = 4,
        radius_min: float = 0.12,
        radius_max: float = 0.3,
        edge: float = 3.0,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        super().__init__(seed)
        if not isinstance(image_key, str) or not image_key:
            raise ValueError(f"image_key={image_key!r} must be a non-empty string")
        if split not in ("train", "validation"):
            raise ValueError(f"split={split!r} is not one of ['train', 'validation']")
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or not 1 <= n_samples <= MAX_SAMPLES:
            raise ValueError(f"n_samples={n_samples!r} must be an integer in [1, {MAX_SAMPLES}] (the length of an epoch)")
        if split == "validation" and VALIDATION_STREAM + self.seed > MAX_STREAM:
            raise ValueError(f"seed={seed} is too large for the validation split (at most {MAX_STREAM - VALIDATION_STREAM})")
        self.size = _check_size(size)
        self.split = split
        self.n_samples = int(n_samples)
        self.image_key = image_key
        self.family = ShapesFamily(n_min, n_max, radius_min, radius_max, edge)

    def __len__(self) -> int:
        return self.n_samples

    def image_seed(self, index: int) -> int:
        index = self._wrap_index(index, self.n_samples, f"n_samples={self.n_samples}")
        if self.split == "validation":
            return heldout_image_seed(index, VALIDATION_STREAM + self.seed)
        return train_image_seed(self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
        image_seed = self.image_seed(index)
        image = render_shapes(image_seed, self.size, self.family)
        return {self.image_key: uint8_to_model_range(image), "image_seed_": image_seed}
