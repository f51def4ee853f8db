"""KL-autoencoder training loss: L1 + LPIPS under a (fixed) output log-variance, KL to N(0, I), and a PatchGAN.

:class:`LPIPSWithDiscriminator` keeps latent-diffusion's name, constructor and call signature, so its configs
(``target: ldm.modules.losses.LPIPSWithDiscriminator``) work as written::

    loss, log = loss_fn(inputs, reconstructions, posteriors, optimizer_idx, global_step,
                        last_layer=decoder.conv_out.weight, split="train")

``optimizer_idx`` 0 is the autoencoder (generator) objective, 1 the discriminator objective.  As in
:mod:`ldm.modules.losses.vqperceptual`, ``global_step`` counts *batches* and the discriminator takes part from
``global_step >= disc_start`` on; before that it is neither run nor updated (CompVis runs it with a zero factor).

Its state-dict keys are CompVis' (``logvar``, ``perceptual_loss.{scaling_layer,net,lin0..lin4}.*``,
``discriminator.main.*``), so the ``loss.*`` keys of CompVis' kl-f8 training checkpoint load key-for-key.  The LPIPS
network is built offline (:func:`ldm.modules.lpips.build_lpips`; ``perceptual_pretrained: false`` gives a random
backbone for tests; ``perceptual_weight: 0`` builds none).
"""

from __future__ import annotations

import logging

import torch
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.vqperceptual import GAN_LOSSES, adaptive_disc_weight, hinge_d_loss, vanilla_d_loss
from ldm.modules.lpips import build_lpips

logger = logging.getLogger(__name__)


def _compvis_lpips(module: nn.Module) -> nn.Module:
    """The ``lpips`` package's LPIPS with taming's state-dict keys: its ``lins`` ModuleList (an alias of
    ``lin0..lin4``, which taming's LPIPS lacks) becomes a plain list, so ``lins.*`` keys neither appear in checkpoints
    nor go missing when CompVis' are loaded strict.  The layers stay registered (and moved, and saved) as ``linK``."""
    lins = getattr(module, "lins", None)
    if isinstance(lins, nn.ModuleList):
        layers = list(lins)
        del module.lins
        module.lins = layers  # a list of already-registered modules: forward indexes it, nothing is registered twice
    return module


class LPIPSWithDiscriminator(nn.Module):
    """latent-diffusion's KL-autoencoder objective, offline and Lightning-2 friendly.

    Generator (``optimizer_idx=0``), per image ``[3, H, W]`` summed over pixels then averaged over the batch::

        rec   = pixelloss_weight * |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)      (per pixel)
        nll   = sum(rec / exp(logvar) + logvar) / B         (weighted by ``weights`` if given)
        total = nll + kl_weight * sum(KL(q(z|x) || N(0, I))) / B + d_weight * disc_factor * (-mean(D(x_rec)))

    ``logvar`` is a parameter (``logvar_init``) that, as in latent-diffusion, no optimizer updates (frozen).  ``d_weight`` is
    :func:`~ldm.modules.losses.vqperceptual.adaptive_disc_weight` (``disc_weight`` without ``last_layer``; 0 with
    autograd off, e.g. in validation).  Discriminator (``optimizer_idx=1``):
    ``disc_factor * {hinge,vanilla}_d_loss(D(x), D(x_rec))``.  The GAN terms start at ``global_step >= disc_start``.

    Log keys (``{split}/...``), CompVis': total_loss, logvar, kl_loss, nll_loss, rec_loss (mean per pixel; the
    checkpoint monitor), d_weight, disc_factor, g_loss; disc_loss, logits_real, logits_fake.

    Args beyond CompVis' (appended): ``disc_ndf`` (discriminator width; CompVis' 64), ``perceptual_net``,
    ``perceptual_pretrained``, ``perceptual_backbone_path`` (see :func:`ldm.modules.lpips.build_lpips`).
    """

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
        super().__init__()
        if disc_loss not in GAN_LOSSES:
            raise ValueError(f"disc_loss={disc_loss!r}; choose one of {GAN_LOSSES}")
        if disc_conditional:
            raise ValueError("disc_conditional=True (class-conditional discriminator) is not supported; set it to false")
        if perceptual_weight < 0 or disc_start < 0 or kl_weight < 0:
            raise ValueError(
                f"perceptual_weight ({perceptual_weight}), kl_weight ({kl_weight}) and disc_start ({disc_start}) must be >= 0"
            )
        self.disc_start = int(disc_start)
        self.discriminator_iter_start = self.disc_start  # CompVis' attribute name
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional
        self.disc_loss_name = disc_loss
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.perceptual_loss = (
            _compvis_lpips(build_lpips(perceptual_net, perceptual_pretrained, perceptual_backbone_path))
            if perceptual_weight > 0
            else None
        )
        # output log-variance (a scalar; key ``logvar``).  latent-diffusion gives it to no optimizer, so it stays at
        # logvar_init; frozen here, so that its gradient is not accumulated for nothing.
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init, requires_grad=False)
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers, use_actnorm=use_actnorm
        ).apply(weights_init)
        logger.info(
            "LPIPSWithDiscriminator: %s GAN loss from batch %d, kl weight %g, perceptual weight %g",
            disc_loss,
            self.disc_start,
            kl_weight,
            perceptual_weight,
        )

    def train(self, mode: bool = True) -> LPIPSWithDiscriminator:
        """Switch the discriminator's mode; the frozen LPIPS network always stays in eval mode (no dropout)."""
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms are on at batch ``global_step`` (``>= disc_start``)."""
        return global_step >= self.disc_start

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """CompVis' name for :func:`~ldm.modules.losses.vqperceptual.adaptive_disc_weight` (detached scalar)."""
        return adaptive_disc_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)

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
        returns ``(scalar, log dict)``.  ``cond`` must be None (no conditional discriminator); ``weights``
        (broadcastable to ``[B, 3, H, W]``) weight the per-pixel nll.

        Before ``disc_start`` the discriminator is not evaluated: the generator loss has no GAN term and the
        discriminator loss (``optimizer_idx=1``) is a constant 0 that must not be backpropagated.
        """
        if cond is not None:
            raise ValueError("cond given, but this loss has no conditional discriminator (disc_conditional is false)")
        if optimizer_idx == 0:
            return self._generator_loss(inputs, reconstructions, posteriors, global_step, last_layer, split, weights)
        if optimizer_idx == 1:
            return self._discriminator_loss(inputs, reconstructions, global_step, split)
        raise ValueError(f"optimizer_idx={optimizer_idx!r}; 0 (autoencoder) or 1 (discriminator)")

    def _generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: DiagonalGaussianDistribution,
        global_step: int,
        last_layer: torch.Tensor | None,
        split: str,
        weights: torch.Tensor | float | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        zero = torch.zeros((), device=inputs.device)
        if self.discriminator_active(global_step):
            g_loss = -self.discriminator(reconstructions).mean()
            if not torch.is_grad_enabled() or self.disc_factor <= 0:
                d_weight = zero
            elif last_layer is None:
                d_weight = torch.tensor(self.discriminator_weight, device=inputs.device)
            else:
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            disc_factor = self.disc_factor
        else:
            g_loss, d_weight, disc_factor = zero, zero, 0.0
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

    def _discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int, split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.discriminator_active(global_step):
            zero = torch.zeros((), device=inputs.device)
            return zero, {f"{split}/disc_loss": zero, f"{split}/logits_real": zero, f"{split}/logits_fake": zero}
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        d_loss = self.disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log
