"""Training losses.  ``ldm.modules.losses.VQLPIPSWithDiscriminator`` is the VQGAN objective (first stage)."""

from ldm.modules.losses.vqperceptual import (
    PerceptualWeightsMissingError,
    VQLPIPSWithDiscriminator,
    adaptive_disc_weight,
    build_lpips,
    codebook_usage,
    hinge_d_loss,
    vanilla_d_loss,
)

__all__ = [
    "PerceptualWeightsMissingError",
    "VQLPIPSWithDiscriminator",
    "adaptive_disc_weight",
    "build_lpips",
    "codebook_usage",
    "hinge_d_loss",
    "vanilla_d_loss",
]
