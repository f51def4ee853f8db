"""Training losses.  ``ldm.modules.losses.VQLPIPSWithDiscriminator`` is the VQGAN objective (first stage)."""

from ldm.modules.losses.vqperceptual import (
    VQLPIPSWithDiscriminator,
    adaptive_disc_weight,
    codebook_usage,
    hinge_d_loss,
    vanilla_d_loss,
)

__all__ = [
    "VQLPIPSWithDiscriminator",
    "adaptive_disc_weight",
    "codebook_usage",
    "hinge_d_loss",
    "vanilla_d_loss",
]
