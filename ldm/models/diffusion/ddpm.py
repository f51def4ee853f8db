"""latent-diffusion's import path (``target: ldm.models.diffusion.ddpm.LatentDiffusion``) for the classes of
:mod:`ldm.models.diffusion.base` (DDPM) and :mod:`ldm.models.diffusion.latent` (LatentDiffusion)."""

from ldm.models.diffusion.base import DDPM, DiffusionWrapper
from ldm.models.diffusion.latent import LatentDiffusion

__all__ = ["DDPM", "DiffusionWrapper", "LatentDiffusion"]
