"""The first stage as refinement uses it: tiling, batch invariance and precision composed around a model, not set in it.

:class:`FirstStage` encodes images to scaled latents and decodes them back through a LatentDiffusion's own first stage
(``encode_first_stage`` / ``get_first_stage_encoding`` / ``decode_first_stage``, or the tiled passes of
:mod:`ldm.models.tiling` for large images with a VQ first stage).  The model is only read, never modified, so the same
model can be trained, or refined with other options, elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from ldm.models.tiling import TilingConfig, tiled_vq_decode, tiled_vq_encode


class FirstStage:
    """Encode/decode for refinement.

    Args:
        model: the LatentDiffusion whose first stage and ``scale_factor`` are used.
        tiling: tile images larger than ``tiling.min_side`` (a VQ first stage; see :mod:`ldm.refine.speed`), or None.
        batch_invariant: pass one sample at a time (a result then does not depend on its batch).
        autocast: a factory of the networks' precision context (e.g. ``torch.autocast``; ``nullcontext`` for fp32).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tiling: TilingConfig | None,
        batch_invariant: bool,
        autocast: Callable[[], AbstractContextManager],
    ):
        self.model = model
        self.tiling = tiling
        self.batch_invariant = batch_invariant
        self.autocast = autocast

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each side (4 for VQ-f4)."""
        return int(self.model.downsampling_factor)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] (sides multiples of :attr:`factor`) -> scaled latents
        ``[B, C, H / f, W / f]`` float32."""
        return self._per_chunk(x, self._encode_one)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` -> images ``[B, 3, h * f, w * f]`` float32 (a VQ first stage snaps to its
        codebook)."""
        return self._per_chunk(z, self._decode_one)

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiling is not None and self.tiling.applies_to(*x.shape[-2:]):
            h = tiled_vq_encode(self.model.first_stage_model, x, self.tiling, self.factor)
            return self.model.get_first_stage_encoding(h)
        return self.model.get_first_stage_encoding(self.model.encode_first_stage(x))

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        f = self.factor
        if self.tiling is not None and self.tiling.applies_to(z.shape[-2] * f, z.shape[-1] * f):
            return tiled_vq_decode(self.model.first_stage_model, z / self.model.scale_factor, self.tiling, f)
        return self.model.decode_first_stage(z)

    def _per_chunk(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        chunks = x.split(1) if self.batch_invariant else (x,)
        with torch.no_grad(), self.autocast():
            return torch.cat([fn(chunk).float() for chunk in chunks])
