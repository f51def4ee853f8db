"""Tiled first-stage encode/decode (VQ and KL alike) with overlap blending, so that large images fit in memory.

Only the convolutional full-resolution part runs tile by tile; the mid block (global attention) runs on the whole
latent.  GroupNorm statistics are shared across tiles (a tile of sky would otherwise be normalised unlike one of
grass): from one untiled pass on the input downscaled to ``stat_side``, and/or ``stat_passes`` tiled passes that each
sum statistics over the part each tile owns.  The defaults (no refining pass) decode closest to the untiled network:
refining passes mix statistics gathered under different normalisations of earlier layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.models.autoencoder import AutoencoderKL, VQModelInterface, quantize_latent
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


@dataclass(frozen=True)
class TilingConfig:
    """When and how to tile, in image pixels.

    ``min_side``: tile only images whose height or width exceeds it (None: never tile).  ``tile`` and ``overlap``:
    multiples of the first stage's downsampling factor.  ``stat_side``: see the module docstring (None with
    ``stat_passes=0``: each tile is normalised with its own statistics, as in diffusers' tiled VAE).
    """

    min_side: int | None = 1024
    tile: int = 512
    overlap: int = 128
    stat_side: int | None = 512
    stat_passes: int = 0

    def __post_init__(self) -> None:
        if self.tile <= 0 or self.overlap < 0 or self.overlap >= self.tile:
            raise ValueError(f"tiling needs 0 <= overlap < tile; got tile={self.tile}, overlap={self.overlap}")
        if self.stat_passes < 0:
            raise ValueError(f"stat_passes={self.stat_passes} must be >= 0")
        if self.stat_side is not None and self.stat_side <= 0:
            raise ValueError(f"stat_side={self.stat_side} must be a positive number of pixels or None")

    def applies_to(self, height: int, width: int) -> bool:
        """Whether an image of ``height`` x ``width`` pixels is tiled."""
        return self.min_side is not None and max(height, width) > self.min_side

    def check_factor(self, factor: int) -> None:
        """Raise if the tile geometry does not align with the first stage's downsampling ``factor``."""
        if self.tile % factor or self.overlap % factor:
            raise ValueError(
                f"tile={self.tile} and overlap={self.overlap} must be multiples of the first-stage factor {factor}"
            )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` overlap."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    return [*range(0, length - tile, stride), length - tile]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool, device: torch.device) -> torch.Tensor:
    """1-D blending weights ``[length]``: across an interior overlap 0 for the outer quarter (pixels whose context is
    the tile's zero padding), then a linear ramp to 1 over the middle half, so neighbouring tiles hand over smoothly."""
    w = torch.ones(length, device=device, dtype=torch.float32)
    if overlap > 0:
        margin = overlap // 4
        width = max(overlap - 2 * margin, 1)
        d = torch.arange(length, device=device, dtype=torch.float32)
        rise = ((d - margin + 1) / (width + 1)).clamp(0, 1)
        if not at_start:
            w = torch.minimum(w, rise)
        if not at_end:
            w = torch.minimum(w, rise.flip(0))
    return w


class GroupNormStatistics:
    """Replaces the GroupNorm layers of a module by normalisation with shared (global) statistics.

    ``record()`` accumulates each layer's per-group sum / sum of squares over every call (while normalising with the
    current statistics if any, else the call's own); ``use()`` normalises with the accumulated statistics.
    """

    def __init__(self, module: nn.Module):
        self.layers = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.mean: list[torch.Tensor | None] = [None] * len(self.layers)
        self.var: list[torch.Tensor | None] = [None] * len(self.layers)
        self._sums: list[list[torch.Tensor | float]] = []
        self._recording = False
        self.core: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)

    def _core_of(self, x: torch.Tensor) -> torch.Tensor:
        """The part of a tile's activation ``x`` that the tile owns (fractions ``self.core`` of its height/width)."""
        h, w = x.shape[-2:]
        fy0, fy1, fx0, fx1 = self.core
        return x[
            ...,
            round(fy0 * h) : max(round(fy1 * h), round(fy0 * h) + 1),
            round(fx0 * w) : max(round(fx1 * w), round(fx0 * w) + 1),
        ]

    def _forward(self, i: int, layer: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        g = layer.num_groups
        xg = x.float().reshape(b, g, -1)
        if self._recording:
            own = self._core_of(x).double().reshape(b, g, -1)
            acc = self._sums[i]
            acc[0] = acc[0] + own.sum(-1)
            acc[1] = acc[1] + own.square().sum(-1)
            acc[2] += own.shape[-1]
        if self.mean[i] is None:
            mean, var = xg.mean(-1), xg.var(-1, unbiased=False)
        else:
            mean, var = self.mean[i], self.var[i]
        out = (xg - mean[..., None]) * torch.rsqrt(var[..., None] + layer.eps)
        out = out.reshape(x.shape)
        if layer.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            out = out * layer.weight.float().reshape(shape) + layer.bias.float().reshape(shape)
        return out.to(x.dtype)

    @contextmanager
    def _patched(self) -> Iterator[None]:
        for i, layer in enumerate(self.layers):
            layer.forward = lambda x, i=i, layer=layer: self._forward(i, layer, x)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    @contextmanager
    def record(self) -> Iterator[None]:
        """Accumulate statistics over the calls inside the context; they become the shared statistics on exit."""
        self._sums = [[0.0, 0.0, 0] for _ in self.layers]
        self._recording = True
        try:
            with self._patched():
                yield
        finally:
            self._recording = False
        for i, (s, sq, n) in enumerate(self._sums):
            if n:
                mean = s / n
                self.mean[i] = mean.float()
                self.var[i] = (sq / n - mean.square()).clamp(min=0).float()

    @contextmanager
    def use(self) -> Iterator[None]:
        """Normalise with the shared statistics inside the context."""
        with self._patched():
            yield


def _core_bounds(starts: list[int], i: int, size: int, length: int) -> tuple[float, float]:
    """Fractions of tile ``i`` (of ``size``) that it owns: the overlaps with its neighbours are split in half."""
    lo = 0 if i == 0 else (starts[i] + starts[i - 1] + size) // 2 - starts[i]
    hi = size if i == len(starts) - 1 else (starts[i + 1] + starts[i] + size) // 2 - starts[i]
    return lo / size, min(hi, length - starts[i]) / size


def _blend_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float,
    out_channels: int,
    stats: GroupNormStatistics | None = None,
) -> torch.Tensor:
    b, _, h, w = x.shape
    out_h, out_w = round(h * scale), round(w * scale)
    out = torch.zeros(b, out_channels, out_h, out_w, device=x.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, out_h, out_w, device=x.device, dtype=torch.float32)
    o_overlap = round(overlap * scale)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            if stats is not None:
                stats.core = (*_core_bounds(ys, iy, th, h), *_core_bounds(xs, ix, tw, w))
            piece = fn(x[:, :, y0 : y0 + th, x0 : x0 + tw]).float()
            oy, ox = round(y0 * scale), round(x0 * scale)
            ph, pw = piece.shape[-2:]
            wy = _ramp(ph, o_overlap, y0 == 0, y0 + th >= h, x.device)
            wx = _ramp(pw, o_overlap, x0 == 0, x0 + tw >= w, x.device)
            wt = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, oy : oy + ph, ox : ox + pw] += piece * wt
            weight[:, :, oy : oy + ph, ox : ox + pw] += wt
    return (out / weight).to(x.dtype)


def downscaled_size(height: int, width: int, side: int, min_size: int = 1) -> tuple[int, int]:
    """The ``(height, width)`` :func:`downscale_to` gives an image of that size (pixels)."""
    factor = math.ceil(max(height, width) / side)
    if factor <= 1:
        return height, width
    return tuple(min(n, max(min_size, round(n / factor))) for n in (height, width))


def downscale_to(x: torch.Tensor, side: int, min_size: int = 1) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` area-downscaled by the smallest integer factor that brings ``max(H, W)`` to ``<= side``.

    No axis shrinks below ``min_size`` pixels: a 16x20000 image keeps its short side rather than becoming one pixel
    thin, which an encoder's strided convolutions cannot take and which would leave statistics mostly of zero padding.
    """
    size = downscaled_size(x.shape[-2], x.shape[-1], side, min_size)
    if size == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=size, mode="area")


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float,
    out_channels: int,
    norm_owner: nn.Module | None = None,
    stat_passes: int = 0,
    stat_side: int | None = None,
    stat_min_size: int = 1,
) -> torch.Tensor:
    """Apply a spatially local map ``fn`` to ``x`` ``[B, C, H, W]`` tile by tile and blend the results.

    ``fn`` maps a tile ``[B, C, t, t]`` to ``[B, out_channels, t * scale, t * scale]`` (``scale`` 4 for an f4 decoder's
    up path, 1/4 for its encoder's down path); ``tile``, ``overlap`` and ``stat_side`` are in input pixels.  With
    ``norm_owner`` (the module holding ``fn``'s GroupNorm layers) the GroupNorms share statistics (module docstring);
    ``stat_min_size``: see :func:`downscale_to`.  Returns ``[B, out_channels, H * scale, W * scale]``.
    """
    if norm_owner is None or (stat_side is None and stat_passes == 0):  # each tile normalised by its own statistics
        return _blend_tiles(fn, x, tile, overlap, scale, out_channels)
    stats = GroupNormStatistics(norm_owner)
    if stat_side is not None:
        with stats.record():  # one untiled pass: every layer normalised with its own (downscaled) statistics
            fn(downscale_to(x, stat_side, stat_min_size))
    for _ in range(stat_passes):
        with stats.record():  # normalise with the current statistics (a tile's own where none yet), gather new ones
            _blend_tiles(fn, x, tile, overlap, scale, out_channels, stats)
    with stats.use():
        return _blend_tiles(fn, x, tile, overlap, scale, out_channels)


def tileable(first_stage: nn.Module) -> bool:
    """Whether :func:`tiled_encode` / :func:`tiled_decode` take ``first_stage``: a VQ (``VQModelInterface``) or a KL
    (``AutoencoderKL``) first stage (both have the split ``Encoder`` / ``Decoder`` and the two 1x1 convolutions)."""
    return isinstance(first_stage, (VQModelInterface, AutoencoderKL))


def tiled_encode(
    first_stage: nn.Module, x: torch.Tensor, tiling: TilingConfig, factor: int
) -> torch.Tensor | DiagonalGaussianDistribution:
    """``first_stage.encode(x)`` with the encoder's down path tiled (a :func:`tileable` first stage):
    ``[B, 3, H, W]`` -> the VQ pre-quantization latent ``[B, embed_dim, H/f, W/f]``, or the KL posterior over it (its
    moments come from the blended tiles; take ``.mode()`` or ``.sample(generator)``)."""
    enc = first_stage.encoder
    stats = (enc, tiling.stat_passes, tiling.stat_side)
    # each of the log2(factor) strided convolutions needs 2 pixels; 2 latent pixels, as the refiner pads images to
    h = tiled_apply(enc.forward_high, x, tiling.tile, tiling.overlap, 1 / factor, enc.high_channels, *stats, 2 * factor)
    h = first_stage.quant_conv(enc.forward_low(h))
    return DiagonalGaussianDistribution(h) if isinstance(first_stage, AutoencoderKL) else h


def tiled_decode(
    first_stage: nn.Module, z: torch.Tensor, tiling: TilingConfig, factor: int, force_not_quantize: bool = False
) -> torch.Tensor:
    """``first_stage.decode(z)`` with the decoder's up path tiled (a :func:`tileable` first stage):
    ``[B, embed_dim, h, w] -> [B, 3, h*f, w*f]``; a VQ one snaps ``z`` to its codebook first (unless
    ``force_not_quantize``, as ``VQModelInterface.decode``), a KL one decodes ``z`` as is."""
    if isinstance(first_stage, VQModelInterface) and not force_not_quantize:
        z = quantize_latent(first_stage.quantize, z)
    dec = first_stage.decoder
    h = dec.forward_low(first_stage.post_quant_conv(z))
    stats = (dec, tiling.stat_passes, None if tiling.stat_side is None else max(1, tiling.stat_side // factor))
    tile, overlap = tiling.tile // factor, tiling.overlap // factor
    return tiled_apply(dec.forward_high, h, tile, overlap, factor, dec.conv_out.out_channels, *stats, 2)
