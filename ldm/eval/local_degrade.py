"""Local degradations (``local_*``): one degradation of :mod:`ldm.eval.degrade` inside one random square box per image,
every pixel outside it left exactly as it was, so region refinement can be scored against a known mask.  Boxes are
half-open ``(x0, y0, x1, y1)`` pixels, drawn before the inner degradation draws; masks ``[B, 1, H, W]``, 1 inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ldm.eval.degrade import (
    DEGRADATIONS,
    FRACTION_UNIT,
    MAX_FRACTION,
    MAX_SIGMA,
    BlurNoise,
    ColourBlotches,
    Degradation,
    ElasticWarp,
    PatchShuffle,
    VQRoundTrip,
    check_count,
    check_positive,
    feather_window,
    prepare_input,
    randint,
)
from ldm.util import accepted_keywords

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class LocalResult:
    """Degraded ``images`` ``[B, 3, H, W]``, ``masks`` ``[B, 1, H, W]`` (1 inside the box) and the ``boxes``."""

    images: torch.Tensor
    masks: torch.Tensor
    boxes: tuple[Box, ...]


def box_mask(boxes: tuple[Box, ...] | list[Box], height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``[len(boxes), 1, height, width]`` masks with 1 inside each half-open box ``(x0, y0, x1, y1)``, 0 outside."""
    masks = torch.zeros((len(boxes), 1, height, width), dtype=like.dtype, device=like.device)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, :, y0:y1, x0:x1] = 1
    return masks


BOX_PLACEMENTS: tuple[str, ...] = ("uniform", "edges")
EDGE_FLOOR = 0.01  # of the mean box weight: every position stays possible, a flat image draws uniformly


def edge_weights(image: torch.Tensor, side: int) -> torch.Tensor:
    """``[H - side + 1, W - side + 1]`` float64 weights of the boxes of ``side`` px over ``image`` ``[3, H, W]``: the
    gradient magnitude summed inside each box, plus :data:`EDGE_FLOOR` of their mean (a box on a flat area changes
    nothing)."""
    x = image.detach().to("cpu", torch.float64)
    gy = (x[:, 1:, :] - x[:, :-1, :]).abs().sum(dim=0)
    gx = (x[:, :, 1:] - x[:, :, :-1]).abs().sum(dim=0)
    energy = F.pad(gy, (0, 0, 0, 1)) + F.pad(gx, (0, 1, 0, 0))  # [H, W]
    boxes = F.avg_pool2d(energy[None, None], side, stride=1)[0, 0] * side * side
    return boxes + EDGE_FLOOR * boxes.mean().clamp_min(1e-12)


class LocalDegradation(Degradation):
    """``inner`` inside one random square box per image, of side ``box_size`` of the shorter side (at least 2 px),
    placed uniformly or, with ``box_at="edges"``, by :func:`edge_weights`, and blended in with a raised-cosine window
    over ``box_feather`` of its side at each edge (0: pasted hard)."""

    on_crop: ClassVar[bool] = True  # degrade the box as an image of its own (False: the whole image, then keep the box)

    def __init__(self, inner: Degradation, box_size: float, box_feather: float, box_at: str = "uniform"):
        if box_at not in BOX_PLACEMENTS:
            raise ValueError(f"box_at={box_at!r} must be one of {list(BOX_PLACEMENTS)}")
        check_positive("box_size", box_size)
        check_positive("box_feather", box_feather, allow_zero=True)
        if box_size > 1 or box_feather > 0.5:
            raise ValueError(
                f"box_size must be in (0, 1] (a fraction of the shorter side) and box_feather in [0, 0.5] (a fraction "
                f"of the box side per edge), got box_size={box_size}, box_feather={box_feather}"
            )
        self.inner = inner
        self.box_size = float(box_size)
        self.box_feather = float(box_feather)
        self.box_at = box_at

    def params(self) -> dict[str, Any]:
        """The constructor's parameters (``box_at`` only where it is not the default)."""
        values = {**self.inner.params(), "box_size": self.box_size, "box_feather": self.box_feather, "box_at": self.box_at}
        return {k: values[k] for k in accepted_keywords(type(self)).params if k != "box_at" or self.box_at != "uniform"}

    def draw_box(self, height: int, width: int, generator: torch.Generator, image: torch.Tensor | None = None) -> Box:
        """One image's box ``(x0, y0, x1, y1)``; ``box_at="edges"`` looks for edges in ``image`` ``[3, H, W]``."""
        side = min(max(2, round(self.box_size * min(height, width))), height, width)
        if self.box_at == "edges" and image is not None:
            weights = edge_weights(image, side).flatten()
            index = int(torch.multinomial(weights.to(generator.device), 1, generator=generator))
            y0, x0 = divmod(index, width - side + 1)
        else:
            y0 = randint(height - side + 1, generator)
            x0 = randint(width - side + 1, generator)
        return (x0, y0, x0 + side, y0 + side)

    def apply_local(self, images: torch.Tensor, seed: int | torch.Generator) -> LocalResult:
        """Degrade ``images`` ``[B, 3, H, W]`` in [-1, 1] inside one box each."""
        work, generator = prepare_input(images, seed)
        with torch.no_grad():
            out, boxes = self._local(work, generator)
        masks = box_mask(boxes, images.shape[2], images.shape[3], images)
        return LocalResult(out.clamp(-1.0, 1.0).to(images.dtype), masks, tuple(boxes))

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._local(images, generator)[0]

    def _local(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list[Box]]:
        out = images.clone()
        _, _, h, w = images.shape
        boxes = []
        for i in range(images.shape[0]):
            x0, y0, x1, y1 = box = self.draw_box(h, w, generator, images[i])
            boxes.append(box)
            source = images[i : i + 1, :, y0:y1, x0:x1] if self.on_crop else images[i : i + 1]
            degraded = self.inner._apply(source, generator).clamp(-1.0, 1.0)
            if not self.on_crop:
                degraded = degraded[:, :, y0:y1, x0:x1]
            window = feather_window(y1 - y0, self.box_feather, images)
            # w * new + (1 - w) * old is exactly the input where w = 0 and exactly the degraded crop where w = 1
            out[i, :, y0:y1, x0:x1] = window * degraded[0] + (1 - window) * images[i, :, y0:y1, x0:x1]
        return out, boxes


class LocalWarp(LocalDegradation):
    """A wrong shape: :class:`ElasticWarp` of ``amplitude`` and ``scale`` (fractions of the box side) in a box."""

    name = "local_warp"

    def __init__(
        self,
        amplitude: float = 0.15,
        scale: float = 0.5,
        box_size: float = 0.4,
        box_feather: float = 0.2,
        box_at: str = "uniform",
    ):
        super().__init__(ElasticWarp(amplitude, scale), box_size, box_feather, box_at)


class LocalBlotch(LocalDegradation):
    """A smear of colour: :class:`ColourBlotches` (radius a fraction of the box side) in a box."""

    name = "local_blotch"

    def __init__(
        self,
        n_blobs: int = 1,
        radius: float = 0.25,
        strength: float = 0.6,
        box_size: float = 0.4,
        box_feather: float = 0.2,
        box_at: str = "uniform",
    ):
        super().__init__(ColourBlotches(n_blobs, radius, strength), box_size, box_feather, box_at)


class LocalShuffle(LocalDegradation):
    """A duplicated or swapped patch: :class:`PatchShuffle` (patch side a fraction of the box side) in a box."""

    name = "local_shuffle"

    def __init__(
        self,
        n_patches: int = 1,
        patch_size: float = 0.45,
        mode: str = "duplicate",
        feather: float = 0.1,
        box_size: float = 0.4,
        box_feather: float = 0.0,
        box_at: str = "uniform",
    ):
        super().__init__(PatchShuffle(n_patches, patch_size, mode, feather), box_size, box_feather, box_at)


class LocalVQ(LocalDegradation):
    """A coarse-VQ look: :class:`VQRoundTrip` through ``first_stage`` with ``codebook_fraction`` of its codes, kept in a
    box (the round trip sees the whole image)."""

    name = "local_vq"
    on_crop = False

    def __init__(
        self,
        first_stage: Any,
        codebook_fraction: float = 0.125,
        box_size: float = 0.4,
        box_feather: float = 0.2,
        box_at: str = "uniform",
    ):
        super().__init__(VQRoundTrip(first_stage, codebook_fraction), box_size, box_feather, box_at)


class Pixelate(Degradation):
    """Blockiness: the mean of every ``block`` x ``block`` pixel cell (anchored at the top-left corner; the last row
    and column of cells may be smaller)."""

    name = "pixelate"
    stochastic = False
    MAX_BLOCK: ClassVar[int] = 1024

    def __init__(self, block: int = 4):
        check_count("block", block, 2, self.MAX_BLOCK, " (pixels)")
        self.block = int(block)

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w = images.shape[-2:]
        bh, bw = min(self.block, h), min(self.block, w)  # a cell never exceeds the image: memory stays the image's
        cells = F.avg_pool2d(images, (bh, bw), ceil_mode=True, count_include_pad=False)
        return cells.repeat_interleave(bh, dim=2).repeat_interleave(bw, dim=3)[..., :h, :w]


class PaintDisc(Degradation):
    """A saturated colour painted over the image: an opaque disc of a random fully saturated hue (HSV S = V = 1), of
    radius ``radius`` of the shorter side around the centre, with an anti-aliased edge of one pixel."""

    name = "paint_disc"

    def __init__(self, radius: float = 0.45):
        check_positive("radius", radius, at_most=MAX_FRACTION, unit=FRACTION_UNIT)
        self.radius = float(radius)

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        hue = torch.rand((b,), generator=generator, device=generator.device).to(images.device, images.dtype)
        # HSV (hue, 1, 1) -> RGB in [0, 1]: channel n of (R, G, B) = 1 - clip(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6
        offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype)
        k = (offsets[None] + hue[:, None] * 6.0) % 6.0
        rgb = 1.0 - torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
        ys = torch.arange(h, device=images.device, dtype=images.dtype) + 0.5 - h / 2
        xs = torch.arange(w, device=images.device, dtype=images.dtype) + 0.5 - w / 2
        distance = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2) - self.radius * min(h, w)
        coverage = (0.5 - distance).clamp(0.0, 1.0)
        colour = (rgb * 2.0 - 1.0)[:, :, None, None]
        return coverage * colour + (1.0 - coverage) * images


class LocalPaint(LocalDegradation):
    """A saturated colour blotch over most of a box: :class:`PaintDisc` (radius a fraction of the box side)."""

    name = "local_paint"

    def __init__(self, radius: float = 0.45, box_size: float = 0.4, box_feather: float = 0.0, box_at: str = "uniform"):
        super().__init__(PaintDisc(radius), box_size, box_feather, box_at)


class LocalNoise(LocalDegradation):
    """Heavy noise in a box: i.i.d. Gaussian noise of std ``noise_std`` ([-1, 1] units) per pixel and channel."""

    name = "local_noise"

    def __init__(self, noise_std: float = 0.3, box_size: float = 0.4, box_feather: float = 0.2, box_at: str = "uniform"):
        check_positive("noise_std", noise_std)
        super().__init__(BlurNoise(0.0, noise_std), box_size, box_feather, box_at)


class LocalSmear(LocalDegradation):
    """A smear in a box: Gaussian blur of ``sigma`` pixels (edges beyond the box replicated)."""

    name = "local_smear"

    def __init__(self, sigma: float = 1.5, box_size: float = 0.4, box_feather: float = 0.2, box_at: str = "uniform"):
        check_positive("sigma", sigma, at_most=MAX_SIGMA, unit=" (pixels)")
        super().__init__(BlurNoise(sigma, 0.0), box_size, box_feather, box_at)


class LocalBlock(LocalDegradation):
    """Blockiness in a box: :class:`Pixelate` with cells of ``block`` pixels (anchored at the box's corner)."""

    name = "local_block"

    def __init__(self, block: int = 4, box_size: float = 0.4, box_feather: float = 0.0, box_at: str = "uniform"):
        super().__init__(Pixelate(block), box_size, box_feather, box_at)


class Unchanged(Degradation):
    """No change at all: the control that measures what refining an intact region costs."""

    name = "unchanged"
    stochastic = False

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images.clone()


class LocalNone(LocalDegradation):
    """A box without an artifact (the control): refining it shows what refinement costs where nothing was wrong."""

    name = "local_none"

    def __init__(self, box_size: float = 0.4, box_at: str = "uniform"):
        super().__init__(Unchanged(), box_size, 0.0, box_at)


LOCAL_DEGRADATIONS: tuple[type[LocalDegradation], ...] = (
    LocalWarp,
    LocalBlotch,
    LocalShuffle,
    LocalVQ,
    LocalPaint,
    LocalNoise,
    LocalSmear,
    LocalBlock,
    LocalNone,
)
DEGRADATIONS.update({cls.name: cls for cls in LOCAL_DEGRADATIONS})
