"""Training losses.  ``ldm.modules.losses.VQLPIPSWithDiscriminator`` is the VQGAN objective and
``ldm.modules.losses.LPIPSWithDiscriminator`` the KL-autoencoder objective (latent-diffusion's import path)."""

from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator", "VQLPIPSWithDiscriminator"]
