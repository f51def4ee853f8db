"""Local degradations: an artifact applied inside one random box per image, and the box and mask it used.

The artifacts late-steps refinement exists for are local and structural: a wrong shape, a smear, a duplicated patch,
a coarse-VQ look in one place.  Each class here applies one degradation of :mod:`ldm.eval.degrade` inside a square
box and leaves every pixel outside the box exactly as it was, so that region refinement (refine only the box) can be
evaluated against a known mask:

* ``local_warp`` (:class:`ElasticWarp`), ``local_blotch`` (:class:`ColourBlotches`) and ``local_shuffle``
  (:class:`PatchShuffle`) degrade the box cut out as an image of its own, so their spatial parameters are fractions of
  the box side;
* ``local_vq`` (:class:`VQRoundTrip`) round-trips the whole image through a coarse codebook and keeps the box of it
  (the first stage sees the box's surroundings, so the box's content is what a coarse VQ makes of it in place).

The box side is ``box_size`` of the shorter image side (at least 2 px), its position uniform over the image.  The
degraded box is blended in with a raised-cosine window that tapers over ``box_feather`` of the side at each edge
(0: pasted hard).  Randomness: the box is drawn first from the seed's generator, then the inner degradation draws
from the same generator, image after image.

``degradation(images, seed)`` returns the degraded images like every :class:`Degradation` (so the sweep, the
registry and ``scripts/degrade.py`` take these as they are); :meth:`LocalDegradation.apply_local` also returns the
boxes and the masks.  Boxes are ``(x0, y0, x1, y1)`` pixel coordinates, half-open (the format of ``refine.py --box``);
masks are ``[B, 1, H, W]`` with 1 inside the box and 0 outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ldm.eval.degrade import (
    ColourBlotches,
    Degradation,
    ElasticWarp,
    PatchShuffle,
    VQRoundTrip,
    check_images,
    check_positive,
    feather_window,
    randint,
    register_degradation,
    seed_generator,
)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class LocalResult:
    """Degraded ``images`` ``[B, 3, H, W]`` (input dtype and device), ``masks`` ``[B, 1, H, W]`` (1 inside the box, 0
    outside; the images' dtype and device) and the ``boxes`` ``(x0, y0, x1, y1)`` in pixels, one per image."""

    images: torch.Tensor
    masks: torch.Tensor
    boxes: tuple[Box, ...]


def box_mask(boxes: tuple[Box, ...] | list[Box], height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``[len(boxes), 1, height, width]`` masks with 1 inside each half-open box ``(x0, y0, x1, y1)``, 0 outside."""
    masks = torch.zeros((len(boxes), 1, height, width), dtype=like.dtype, device=like.device)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, :, y0:y1, x0:x1] = 1
    return masks


class LocalDegradation(Degradation):
    """``inner`` applied inside one random square box per image (see the module docstring); subclasses name the
    inner degradation and its parameters."""

    on_crop: ClassVar[bool] = True  # degrade the box as an image of its own (False: the whole image, then keep the box)

    def __init__(self, inner: Degradation, box_size: float, box_feather: float):
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

    def params(self) -> dict[str, Any]:
        return {**self.inner.params(), "box_size": self.box_size, "box_feather": self.box_feather}

    def box_side(self, height: int, width: int) -> int:
        """Side of the box in pixels for a ``height`` x ``width`` image."""
        return min(max(2, round(self.box_size * min(height, width))), height, width)

    def draw_box(self, height: int, width: int, generator: torch.Generator) -> Box:
        """A box ``(x0, y0, x1, y1)`` of side :meth:`box_side`, uniform over the image."""
        side = self.box_side(height, width)
        y0 = randint(height - side + 1, generator)
        x0 = randint(width - side + 1, generator)
        return (x0, y0, x0 + side, y0 + side)

    def apply_local(self, images: torch.Tensor, seed: int | torch.Generator) -> LocalResult:
        """Degrade ``images`` ``[B, 3, H, W]`` in [-1, 1] inside one box each; returns the images, masks and boxes."""
        check_images(images)
        generator = seed_generator(seed)
        work = images if images.dtype in (torch.float32, torch.float64) else images.float()
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
            x0, y0, x1, y1 = box = self.draw_box(h, w, generator)
            boxes.append(box)
            source = images[i : i + 1, :, y0:y1, x0:x1] if self.on_crop else images[i : i + 1]
            degraded = self.inner._apply(source, generator).clamp(-1.0, 1.0)
            if not self.on_crop:
                degraded = degraded[:, :, y0:y1, x0:x1]
            window = feather_window(y1 - y0, self.box_feather, images)
            # w * new + (1 - w) * old is exactly the input where w = 0 and exactly the degraded crop where w = 1
            out[i, :, y0:y1, x0:x1] = window * degraded[0] + (1 - window) * images[i, :, y0:y1, x0:x1]
        return out, boxes


@register_degradation
class LocalWarp(LocalDegradation):
    """A wrong shape: :class:`ElasticWarp` of ``amplitude`` and ``scale`` (fractions of the box side) in a box."""

    name = "local_warp"

    def __init__(self, amplitude: float = 0.15, scale: float = 0.5, box_size: float = 0.4, box_feather: float = 0.2):
        super().__init__(ElasticWarp(amplitude, scale), box_size, box_feather)


@register_degradation
class LocalBlotch(LocalDegradation):
    """A smear of colour: :class:`ColourBlotches` (radius a fraction of the box side) in a box."""

    name = "local_blotch"

    def __init__(
        self, n_blobs: int = 1, radius: float = 0.25, strength: float = 0.6, box_size: float = 0.4, box_feather: float = 0.2
    ):
        super().__init__(ColourBlotches(n_blobs, radius, strength), box_size, box_feather)


@register_degradation
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
    ):
        super().__init__(PatchShuffle(n_patches, patch_size, mode, feather), box_size, box_feather)


@register_degradation
class LocalVQ(LocalDegradation):
    """A coarse-VQ look: :class:`VQRoundTrip` through ``first_stage`` with ``codebook_fraction`` of its codes, kept in a
    box (the round trip sees the whole image)."""

    name = "local_vq"
    on_crop = False

    def __init__(self, first_stage: Any, codebook_fraction: float = 0.125, box_size: float = 0.4, box_feather: float = 0.2):
        super().__init__(VQRoundTrip(first_stage, codebook_fraction), box_size, box_feather)


LOCAL_DEGRADATIONS: tuple[type[LocalDegradation], ...] = (LocalWarp, LocalBlotch, LocalShuffle, LocalVQ)
