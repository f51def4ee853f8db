"""The posterior of a KL-regularised first stage (latent-diffusion's ``DiagonalGaussianDistribution``, CompVis'
method names; ``sample`` also takes a ``torch.Generator``, so training and refinement draws are reproducible)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ldm.sampling.noise import Generators, randn

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # CompVis' clamp of the encoder's log-variance


class DiagonalGaussianDistribution:
    """A diagonal Gaussian over latents ``[B, C, h, w]`` from the encoder's moments ``parameters`` ``[B, 2 * C, h, w]``
    (mean, then log-variance, clamped to ``[-30, 20]`` as in CompVis: ``exp(logvar)`` stays finite and ``exp(0.5 *
    logvar)`` above 0 in float32).  ``deterministic``: a point mass at the mean (``sample`` = mean, ``kl``/``nll`` 0).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Generators = None) -> torch.Tensor:
        """``mean + std * eps`` ``[B, C, h, w]`` with ``eps ~ N(0, I)`` from ``generator`` (one, one per sample, or
        None for the device's RNG; drawn in float32 on the generator's device, see :func:`ldm.sampling.noise.draw`)."""
        return self.mean + self.std * randn(tuple(self.mean.shape), self.mean, generator)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """``KL(self || other)`` per sample ``[B]`` (nats, summed over ``C, h, w``); ``other=None`` is ``N(0, I)``.
        Deterministic: zeros ``[B]`` (CompVis' ``tensor([0.])``; ``sum(kl) / kl.shape[0]`` is 0 either way)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` ``[B, C, h, w]`` (nats), summed over ``dims``; 0 when deterministic."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

    def mode(self) -> torch.Tensor:
        """The mean ``[B, C, h, w]`` (the most likely latent; what refinement encodes with by default)."""
        return self.mean


def normal_kl(
    mean1: torch.Tensor | float, logvar1: torch.Tensor | float, mean2: torch.Tensor | float, logvar2: torch.Tensor | float
) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats (broadcasting; at least one
    argument must be a tensor)."""
    like = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if like is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (x if isinstance(x, torch.Tensor) else torch.tensor(x).to(like) for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))
