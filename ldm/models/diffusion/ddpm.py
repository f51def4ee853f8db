"""latent-diffusion's import path for its diffusion models: ``ldm.models.diffusion.ddpm.DDPM`` / ``.LatentDiffusion``.

CompVis configs name ``target: ldm.models.diffusion.ddpm.LatentDiffusion``; the classes live in
:mod:`ldm.models.diffusion.base` (DDPM) and :mod:`ldm.models.diffusion.latent` (LatentDiffusion), which import each other
in one direction only.
"""

from ldm.models.diffusion.base import DDPM, DiffusionWrapper, training_noise
from ldm.models.diffusion.latent import LatentDiffusion

__all__ = ["DDPM", "DiffusionWrapper", "LatentDiffusion", "training_noise"]
