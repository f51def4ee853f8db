"""Latent distributions of first stages (latent-diffusion's ``ldm.modules.distributions``)."""

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl

__all__ = ["DiagonalGaussianDistribution", "normal_kl"]
