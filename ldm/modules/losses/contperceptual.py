"""KL-autoencoder training loss (L1 + LPIPS under a fixed output log-variance, KL to N(0, I), and a PatchGAN) with
latent-diffusion's signatures and state-dict keys, so kl-f8's ``loss.*`` keys load as saved."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.vqperceptual import PatchGANLoss, check_gan_options
from ldm.modules.lpips import build_lpips

logger = logging.getLogger(__name__)


def _compvis_lpips(module: nn.Module) -> nn.Module:
    """The ``lpips`` package's LPIPS with taming's state-dict keys: its ``lins`` ModuleList (an alias of ``lin0..lin4``)
    becomes a plain list, so no ``lins.*`` keys appear; the layers stay registered (moved, saved) as ``linK``."""
    lins = getattr(module, "lins", None)
    if isinstance(lins, nn.ModuleList):
        layers = list(lins)
        del module.lins
        module.lins = layers  # a list of already-registered modules: forward indexes it, nothing is registered twice
    return module


class LPIPSWithDiscriminator(PatchGANLoss):
    """latent-diffusion's KL-autoencoder objective, offline and Lightning-2 friendly.

    Generator (``optimizer_idx=0``), per image ``[3, H, W]`` summed over pixels then averaged over the batch::

        rec   = pixelloss_weight * |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)      (per pixel)
        nll   = sum(rec / exp(logvar) + logvar) / B         (weighted by ``weights`` if given)
        total = nll + kl_weight * sum(KL(q(z|x) || N(0, I))) / B + d_weight * disc_factor * (-mean(D(x_rec)))

    ``logvar`` (``logvar_init``) is frozen, as no latent-diffusion optimizer updates it.  ``d_weight`` and the
    discriminator objective (``optimizer_idx=1``): :class:`PatchGANLoss`.
    """

    zero_weight_without_factor = True  # CompVis: ``d_weight`` 0 when ``disc_factor <= 0``

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        disc_ndf: int = 64,
        perceptual_net: str = "vgg",
        perceptual_pretrained: bool = True,
        perceptual_backbone_path: str | None = None,
    ):
        check_gan_options(
            disc_loss, disc_conditional, perceptual_weight=perceptual_weight, kl_weight=kl_weight, disc_start=disc_start
        )
        lpips = (
            _compvis_lpips(build_lpips(perceptual_net, perceptual_pretrained, perceptual_backbone_path))
            if perceptual_weight > 0
            else None
        )
        super().__init__(
            lpips, disc_start, disc_num_layers, disc_in_channels, disc_factor, disc_weight, use_actnorm, disc_ndf, disc_loss
        )
        self.discriminator_iter_start = self.disc_start  # CompVis' attribute name
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.disc_conditional = disc_conditional
        # frozen: latent-diffusion gives it to no optimizer, so its gradient would be accumulated for nothing
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init, requires_grad=False)
        logger.info(
            "LPIPSWithDiscriminator: %s GAN loss from batch %d, kl weight %g, perceptual weight %g",
            disc_loss,
            self.disc_start,
            kl_weight,
            perceptual_weight,
        )

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: DiagonalGaussianDistribution,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        weights: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for ``inputs`` / ``reconstructions`` ``[B, 3, H, W]`` in [-1, 1] and the encoder's ``posteriors``;
        returns ``(scalar, log dict)``.  ``cond`` is unused; ``weights`` (broadcastable to ``[B, 3, H, W]``) weight the
        per-pixel nll.  Before ``disc_start`` the discriminator loss is a constant 0 that must not be backpropagated.
        """
        if optimizer_idx != 0:
            return self._discriminator_loss(inputs, reconstructions, global_step, split)
        inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
        rec_loss = self.pixel_weight * (inputs - reconstructions).abs()
        if self.perceptual_loss is not None:
            rec_loss = rec_loss + self.perceptual_weight * self.perceptual_loss(inputs, reconstructions)
        batch = inputs.shape[0]
        nll_per_pixel = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted = nll_per_pixel if weights is None else weights * nll_per_pixel
        weighted_nll_loss = weighted.sum() / batch
        nll_loss = nll_per_pixel.sum() / batch
        kl_loss = posteriors.kl()
        kl_loss = kl_loss.sum() / kl_loss.shape[0]
        g_loss, d_weight, disc_factor = self._gan_terms(nll_loss, reconstructions, global_step, last_layer)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor), device=inputs.device),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, log
