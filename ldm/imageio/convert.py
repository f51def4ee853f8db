"""Arrays <-> model tensors (``[B, 3, H, W]`` in ``[-1, 1]``), padding to the model's factor and back, side-by-side grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PAD_MODES = ("reflect", "replicate", "constant")


def image_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """Float ``[H, W, 3]`` in ``[0, 1]`` (as :func:`ldm.imageio.load_image` returns, which checks the range) or uint8
    ``[H, W, 3]`` -> ``[1, 3, H, W]`` float32 CPU tensor in ``[-1, 1]``."""
    rgb = np.asarray(rgb)
    unit = rgb.astype(np.float32) / np.float32(255.0) if rgb.dtype == np.uint8 else rgb.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1).unsqueeze(0)
    return (tensor * 2.0 - 1.0).contiguous()


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """One image ``[1, 3, H, W]`` or ``[3, H, W]`` in ``[-1, 1]`` (any device/dtype) -> uint8 ``[H, W, 3]`` by
    :func:`to_uint8` (the inverse of :func:`image_to_tensor` on uint8 input).  ValueError for NaN or infinite values (a
    sampler that diverged) instead of arbitrary pixels."""
    x = (x[0] if x.ndim == 4 else x).detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("tensor_to_image: the tensor holds NaN or infinite values (did sampling diverge?)")
    return np.ascontiguousarray(to_uint8(x).permute(1, 2, 0).numpy())


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` of any shape, float dtype and device -> uint8 of the same shape and device: ``(x + 1) *
    127.5`` rounded to nearest, values outside ``[-1, 1]`` clamped first.  The one ``[-1, 1]`` -> uint8 mapping."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 values of any shape (tensor, or array -> CPU tensor) -> float32 in ``[-1, 1]``: latent-diffusion's ``x /
    127.5 - 1`` (bit-identical to :func:`image_to_tensor`'s ``x / 255 * 2 - 1`` on every uint8 value)."""
    tensor = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return tensor.float() / 127.5 - 1.0


@dataclass(frozen=True)
class Padding:
    """Pixels added on each side by :func:`pad_to_multiple`, and the original size."""

    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.height + self.top + self.bottom, self.width + self.left + self.right

    @property
    def is_zero(self) -> bool:
        return self.top == self.bottom == self.left == self.right == 0


def pad_to_multiple(
    x: torch.Tensor,
    multiple: int,
    mode: str = "reflect",
    min_size: int | tuple[int, int] = 1,
) -> tuple[torch.Tensor, Padding]:
    """Pad ``[B, C, H, W]`` so both sides are multiples of ``multiple`` (the model's size factor) and at least
    ``min_size`` (an int or ``(height, width)``), split between the two sides of each axis (an odd pixel bottom/right:
    the model sees the image centred); returns ``(padded, padding)`` for :func:`crop_padding`. ``"reflect"`` mirrors
    without repeating the edge and continues periodically where the pad is as large as the image (where ``torch``
    refuses): ``abc`` padded by 5 on the right gives ``abc b a b c b``; a size-1 axis repeats its pixel. ``"replicate"``
    repeats the edge pixel, ``"constant"`` pads zeros."""
    min_h, min_w = (min_size, min_size) if isinstance(min_size, int) else tuple(min_size)
    height, width = int(x.shape[-2]), int(x.shape[-1])
    target_h = math.ceil(max(height, min_h) / multiple) * multiple
    target_w = math.ceil(max(width, min_w) / multiple) * multiple
    top, left = (target_h - height) // 2, (target_w - width) // 2
    padding = Padding(top, target_h - height - top, left, target_w - width - left, height, width)
    if padding.is_zero:
        return x, padding
    if mode == "constant":
        return F.pad(x, (padding.left, padding.right, padding.top, padding.bottom), mode="constant", value=0.0), padding
    rows = _pad_indices(height, padding.top, padding.bottom, mode, x.device)
    cols = _pad_indices(width, padding.left, padding.right, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols), padding


def _pad_indices(size: int, before: int, after: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source index of every output position along one axis of length ``before + size + after``."""
    positions = torch.arange(-before, size + after, device=device)
    if mode == "replicate" or size == 1:
        return positions.clamp(0, size - 1)
    period = 2 * (size - 1)
    folded = positions.remainder(period)
    return torch.where(folded < size, folded, period - folded)


def crop_padding(x: torch.Tensor, padding: Padding, scale: float = 1) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on ``[..., H', W']`` where ``H' = padded height * scale`` (``2`` for a 2x
    upsampler's output; ``0.25`` for a VQ-f4 latent, which needs every padding amount divisible by 4)."""
    top, left = round(padding.top * scale), round(padding.left * scale)
    return x[..., top : top + round(padding.height * scale), left : left + round(padding.width * scale)]


def side_by_side(images: Sequence[np.ndarray], pad: int = 8, fill: int = 255) -> np.ndarray:
    """uint8 ``[H_i, W_i, 3]`` images left to right, ``pad`` pixels apart and around, centred vertically on a ``fill``
    background: uint8 ``[max H + 2 pad, sum W + (n + 1) pad, 3]``."""
    arrays = [np.asarray(img) for img in images]
    height = max(img.shape[0] for img in arrays) + 2 * pad
    width = sum(img.shape[1] for img in arrays) + (len(arrays) + 1) * pad
    canvas = np.full((height, width, 3), fill, dtype=np.uint8)
    x = pad
    for img in arrays:
        y = pad + (height - 2 * pad - img.shape[0]) // 2
        canvas[y : y + img.shape[0], x : x + img.shape[1]] = img
        x += img.shape[1] + pad
    return canvas
