"""VQGAN training loss (reconstruction + codebook + optional LPIPS + PatchGAN, with an adaptive GAN weight) with
taming-transformers' signature and log names; ``optimizer_idx`` 0 is the generator objective, 1 the discriminator's,
and ``global_step`` counts *batches*.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from torch import nn

from ldm.modules.lpips import build_lpips

logger = logging.getLogger(__name__)

GAN_LOSSES = ("hinge", "vanilla")
PIXEL_LOSSES = ("l1", "l2")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))``; logits of any shape, returns a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating BCE on logits: ``0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec))))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_disc_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float = 1.0
) -> torch.Tensor:
    """``disc_weight * clamp(||grad_L nll|| / (||grad_L g|| + 1e-4), 0, 1e4)`` at ``L = last_layer`` (Esser et al. 2021,
    eq. 7), a detached scalar; both losses must depend on ``last_layer`` with autograd enabled."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


def codebook_usage(indices: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perplexity, share_used)`` of code indices (any shape, in ``[0, n_embed)``): ``exp`` of the entropy of the
    empirical code distribution (1 = one code, ``n_embed`` = uniform use) and the fraction of codes used at least once."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=n_embed).float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -torch.xlogy(probs, probs).sum()
    return entropy.exp(), (counts > 0).float().mean()


def check_gan_options(disc_loss: str, disc_conditional: bool, **non_negative: float) -> None:
    """Constructor checks both objectives share (``non_negative``: the weights and ``disc_start``)."""
    if disc_loss not in GAN_LOSSES:
        raise ValueError(f"disc_loss={disc_loss!r}; choose one of {GAN_LOSSES}")
    if disc_conditional:
        raise ValueError("disc_conditional=True (class-conditional discriminator) is not supported; set it to false")
    if any(value < 0 for value in non_negative.values()):
        given = [f"{name} ({value})" for name, value in non_negative.items()]
        raise ValueError(f"{', '.join(given[:-1])} and {given[-1]} must be >= 0")


class PatchGANLoss(nn.Module):
    """What the VQ and KL objectives share: the frozen LPIPS network, taming's PatchGAN discriminator (``discriminator.main.*``
    keys) and its terms, which start at batch ``global_step >= disc_start`` (the discriminator is not run before).
    Generator term: ``d_weight * disc_factor * (-mean(D(x_rec)))``; discriminator objective:
    ``disc_factor * {hinge,vanilla}_d_loss(D(x), D(x_rec))``.  Subclasses build LPIPS before calling this constructor, so
    that the discriminator's random initialisation comes after it, as in CompVis.
    """

    # latent-diffusion's KL loss leaves the adaptive weight at 0 when ``disc_factor <= 0``; taming's VQ loss computes it
    zero_weight_without_factor = False

    def __init__(
        self,
        perceptual_loss: nn.Module | None,
        disc_start: int,
        disc_num_layers: int,
        disc_in_channels: int,
        disc_factor: float,
        disc_weight: float,
        use_actnorm: bool,
        disc_ndf: int,
        disc_loss: str,
    ):
        super().__init__()
        self.disc_start = int(disc_start)
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.perceptual_loss = perceptual_loss
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers, use_actnorm=use_actnorm
        ).apply(weights_init)

    def train(self, mode: bool = True) -> PatchGANLoss:
        """Switch the discriminator's mode; the frozen LPIPS network always stays in eval mode (no dropout)."""
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    def discriminator_active(self, global_step: int) -> bool:
        return global_step >= self.disc_start

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """CompVis' name for :func:`adaptive_disc_weight` (detached scalar)."""
        return adaptive_disc_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)

    def _gan_terms(
        self, nll_loss: torch.Tensor, reconstructions: torch.Tensor, global_step: int, last_layer: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(g_loss, d_weight, disc_factor)`` of the generator objective; all 0 before ``disc_start``.  ``d_weight`` is
        the adaptive weight at ``last_layer`` (``disc_weight`` without one; 0 with autograd off, as in validation)."""
        zero = torch.zeros((), device=reconstructions.device)
        if not self.discriminator_active(global_step):
            return zero, zero, 0.0
        g_loss = -self.discriminator(reconstructions).mean()
        if not torch.is_grad_enabled() or (self.zero_weight_without_factor and self.disc_factor <= 0):
            d_weight = zero
        elif last_layer is None:
            d_weight = torch.tensor(self.discriminator_weight, device=reconstructions.device)
        else:
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        return g_loss, d_weight, self.disc_factor

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


class VQLPIPSWithDiscriminator(PatchGANLoss):
    """taming's VQGAN objective, offline and Lightning-2 friendly.  Generator (``optimizer_idx=0``)::

        nll   = pixelloss_weight * mean(pixel(x, x_rec)) + perceptual_weight * mean(LPIPS(x, x_rec))
        total = nll + d_weight * disc_factor * (-mean(D(x_rec))) + codebook_weight * codebook_loss

    ``d_weight`` and the discriminator objective (``optimizer_idx=1``): :class:`PatchGANLoss`.  Unlike taming,
    ``pixelloss_weight`` is applied.
    """

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        pixel_loss: str = "l1",
        n_classes: int | None = None,
        perceptual_net: str = "vgg",
        perceptual_pretrained: bool = True,
        perceptual_backbone_path: str | None = None,
    ):
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss={pixel_loss!r}; choose one of {PIXEL_LOSSES}")
        check_gan_options(disc_loss, disc_conditional, perceptual_weight=perceptual_weight, disc_start=disc_start)
        lpips = build_lpips(perceptual_net, perceptual_pretrained, perceptual_backbone_path) if perceptual_weight > 0 else None
        super().__init__(
            lpips, disc_start, disc_num_layers, disc_in_channels, disc_factor, disc_weight, use_actnorm, disc_ndf, disc_loss
        )
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.pixel_loss = pixel_loss
        self.n_classes = n_classes
        logger.info(
            "VQLPIPSWithDiscriminator: %s GAN loss from batch %d, perceptual weight %g, %s pixel loss",
            disc_loss,
            self.disc_start,
            perceptual_weight,
            pixel_loss,
        )

    def set_codebook_size(self, n_embed: int) -> None:
        """Take the codebook size for the usage statistics from the model (``n_classes``, if configured, must agree)."""
        if self.n_classes is not None and self.n_classes != n_embed:
            raise ValueError(f"lossconfig n_classes={self.n_classes} differs from the model's n_embed={n_embed}; drop it")
        self.n_classes = n_embed

    def forward(
        self,
        codebook_loss: torch.Tensor,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        split: str = "train",
        predicted_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for ``inputs`` / ``reconstructions`` ``[B, 3, H, W]`` in [-1, 1]; returns ``(scalar, log dict)``.
        Before ``disc_start`` the discriminator loss is a constant 0 that must not be backpropagated."""
        if optimizer_idx != 0:
            loss, log = self._discriminator_loss(inputs, reconstructions, global_step, split)
        else:
            inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
            diff = inputs - reconstructions
            pixel = (diff.abs() if self.pixel_loss == "l1" else diff.pow(2)).mean()
            if self.perceptual_loss is not None:
                p_loss = self.perceptual_loss(inputs, reconstructions).mean()
            else:
                p_loss = torch.zeros((), device=inputs.device)
            nll_loss = self.pixel_weight * pixel + self.perceptual_weight * p_loss
            codebook = codebook_loss.mean()
            g_loss, d_weight, disc_factor = self._gan_terms(nll_loss, reconstructions, global_step, last_layer)
            loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook
            log = {
                f"{split}/total_loss": loss.detach(),
                f"{split}/quant_loss": codebook.detach(),
                f"{split}/nll_loss": nll_loss.detach(),
                f"{split}/rec_loss": nll_loss.detach(),
                f"{split}/pixel_loss": pixel.detach(),
                f"{split}/p_loss": p_loss.detach(),
                f"{split}/d_weight": d_weight.detach(),
                f"{split}/disc_factor": torch.tensor(float(disc_factor), device=inputs.device),
                f"{split}/g_loss": g_loss.detach(),
            }
        if predicted_indices is not None:
            perplexity, usage = codebook_usage(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/codebook_usage"] = usage
        return loss, log
