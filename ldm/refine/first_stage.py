"""The first stage as refinement uses it: tiling (refinement's memory option), batch invariance and precision composed
around a LatentDiffusion's own first stage, which is only read, never modified."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from ldm.models.tiling import TilingConfig, tileable, tiled_decode, tiled_encode
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)

POSTERIOR_CHOICES = ("mean", "sample")
# Images with a side above 768 px are encoded/decoded tile by tile (512 px tiles, 128 px overlap), which bounds the
# first stage's full-resolution activations (untiled, a 1024 px refinement with the real VQ-f4 goes over the 6 GB
# target: README, Performance).  GroupNorm statistics from one untiled pass on the image downscaled to 512 px, no
# refining pass: the most accurate decode at this geometry of those compared (see ldm.models.tiling).
AUTO_TILING = TilingConfig(min_side=768, tile=512, overlap=128, stat_side=512, stat_passes=0)


def resolve_tiling(tiling: TilingConfig | str | None, model: Any) -> TilingConfig | None:
    """``"auto"`` -> :data:`AUTO_TILING` for VQ and KL first stages (others are never tiled), None -> none, a
    :class:`TilingConfig` as given (ValueError unless the first stage is a VQ or KL and the geometry fits its
    downsampling factor)."""
    if tiling == "auto":
        if not tileable(model.first_stage_model):
            logger.debug("first stage %s is not a VQ or KL: no tiling", type(model.first_stage_model).__name__)
            return None
        tiling = AUTO_TILING
    if tiling is None:
        return None
    if not isinstance(tiling, TilingConfig):
        raise ValueError(f"tiling={tiling!r} must be 'auto', None or a TilingConfig")
    if not tileable(model.first_stage_model):
        raise ValueError(
            f"tiled encode/decode needs a VQ or KL first stage (VQModelInterface, AutoencoderKL); this model has "
            f"{type(model.first_stage_model).__name__}: pass tiling=None"
        )
    tiling.check_factor(model.downsampling_factor)
    return tiling


def describe_tiling(tiling: TilingConfig | None) -> str:
    """``"off"`` or ``"512 px tiles, 128 px overlap, above 768 px, 0 statistics passes"``."""
    if tiling is None or tiling.min_side is None:
        return "off"
    return (
        f"{tiling.tile} px tiles, {tiling.overlap} px overlap, above {tiling.min_side} px, "
        f"{tiling.stat_passes} statistics passes"
    )


@dataclass(eq=False)
class FirstStage:
    """Encode/decode for refinement with ``model``'s first stage and ``scale_factor``.

    Attributes:
        tiling: tile images larger than ``tiling.min_side`` (a VQ or KL first stage), or None.
        batch_invariant: pass one sample at a time (a result then does not depend on its batch).
        autocast: a factory of the networks' precision context (``nullcontext`` for fp32).
        posterior: for a KL first stage, ``"mean"`` (deterministic) or ``"sample"`` (``mean + std * eps`` from
            ``generator``, as LatentDiffusion's training draws it); ignored by first stages that return a tensor (VQ).
        generator: the generator of ``posterior="sample"`` (None: the device's RNG); draws follow the encode calls in
            order, one chunk at a time.
    """

    model: torch.nn.Module
    tiling: TilingConfig | None
    batch_invariant: bool
    autocast: Callable[[], AbstractContextManager]
    posterior: str = "mean"
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.posterior not in POSTERIOR_CHOICES:
            raise ValueError(
                f"posterior={self.posterior!r}: a KL first stage encodes with its posterior's 'mean' (deterministic) or "
                f"a 'sample' (from generator); choose one of {POSTERIOR_CHOICES}"
            )

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each side (4 for VQ-f4, 8 for KL-f8)."""
        return int(self.model.downsampling_factor)

    def encode(self, x: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] (sides multiples of :attr:`factor`) -> scaled latents
        ``[B, C, H / f, W / f]`` float32.  ``generators``: one per image for ``posterior="sample"`` (each image's draw
        then does not depend on the batch); None: the class's ``generator``."""
        if generators is None or self.posterior != "sample":
            return self._per_chunk(x, self._encode_one)
        with torch.no_grad(), self.autocast():
            return torch.cat([self._encode_one(x[i : i + 1], generators[i]).float() for i in range(x.shape[0])])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` -> images ``[B, 3, h * f, w * f]`` float32 (a VQ first stage snaps to its
        codebook; a KL one decodes the latent as is)."""
        return self._per_chunk(z, self._decode_one)

    def _encode_one(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.tiling is not None and self.tiling.applies_to(*x.shape[-2:]):
            encoded = tiled_encode(self.model.first_stage_model, x, self.tiling, self.factor)
        else:
            encoded = self.model.encode_first_stage(x)
        if isinstance(encoded, DiagonalGaussianDistribution):  # a KL posterior: its mean or a sample (VQ: a tensor)
            generator = generator if generator is not None else self.generator
            encoded = encoded.mode() if self.posterior == "mean" else encoded.sample(generator=generator)
        return self.model.get_first_stage_encoding(encoded)

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        f = self.factor
        if self.tiling is not None and self.tiling.applies_to(z.shape[-2] * f, z.shape[-1] * f):
            return tiled_decode(self.model.first_stage_model, z / self.model.scale_factor, self.tiling, f)
        return self.model.decode_first_stage(z)

    def _per_chunk(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        chunks = x.split(1) if self.batch_invariant else (x,)
        with torch.no_grad(), self.autocast():
            return torch.cat([fn(chunk).float() for chunk in chunks])
