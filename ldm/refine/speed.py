"""Tiling, refinement's memory option (channels_last and ``torch.compile`` are :class:`~ldm.refine.Refiner`'s flags).
Attention needs no option: the first stage's and the UNet's attention give SDPA contiguous ``q, k, v``, so its
memory-efficient kernels serve them.
"""

from __future__ import annotations

import logging
from typing import Any

from ldm.models.tiling import TilingConfig, tileable

logger = logging.getLogger(__name__)


# Images with a side above 768 px are encoded/decoded tile by tile (512 px tiles, 128 px overlap), which bounds the
# first stage's full-resolution activations (untiled, a 1024 px refinement with the real VQ-f4 goes over the 6 GB
# target: README, Performance).  GroupNorm statistics from one untiled pass on the image downscaled to 512 px, no
# refining pass: the most accurate decode at this geometry of those compared (see ldm.models.tiling).
AUTO_TILING = TilingConfig(min_side=768, tile=512, overlap=128, stat_side=512, stat_passes=0)


def resolve_tiling(tiling: TilingConfig | str | None, model: Any) -> TilingConfig | None:
    """The tiling a refiner uses: ``"auto"`` -> :data:`AUTO_TILING` for VQ and KL first stages (others are never
    tiled), None -> none, a :class:`TilingConfig` as given (ValueError unless the first stage is a VQ or KL and the
    geometry fits its downsampling factor)."""
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
