"""VQGAN training loss: reconstruction + codebook + optional LPIPS + PatchGAN, with an adaptive GAN weight.

:class:`VQLPIPSWithDiscriminator` keeps taming-transformers' call signature and log names, so a VQGAN config written
for ``taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator`` works with ``target`` changed to this class::

    loss, log = loss_fn(codebook_loss, inputs, reconstructions, optimizer_idx, global_step,
                        last_layer=decoder.conv_out.weight, split="train", predicted_indices=indices)

``optimizer_idx`` 0 is the autoencoder (generator) objective, 1 the discriminator objective.  ``global_step`` counts
*batches* (generator updates), and the discriminator takes part from ``global_step >= disc_start`` on; before that
it is neither run nor updated (see :meth:`VQLPIPSWithDiscriminator.discriminator_active`).

LPIPS runs offline only: the ImageNet backbone weights are read from torch hub's cache (where torchvision would
have downloaded them) or from ``perceptual_backbone_path``; the calibrated linear layers come from the ``lpips``
package.  Nothing is downloaded.  ``perceptual_weight: 0`` builds no perceptual network at all.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from torch import nn

from ldm.checkpoint import load_state_dict

logger = logging.getLogger(__name__)

# torchvision weight enums of the LPIPS backbones (their ImageNet weights are what ``pretrained=True`` fetches).
LPIPS_BACKBONE_WEIGHTS = {
    "vgg": "VGG16_Weights.IMAGENET1K_V1",
    "alex": "AlexNet_Weights.IMAGENET1K_V1",
    "squeeze": "SqueezeNet1_1_Weights.IMAGENET1K_V1",
}
LPIPS_VERSION = "0.1"
GAN_LOSSES = ("hinge", "vanilla")
PIXEL_LOSSES = ("l1", "l2")


class PerceptualWeightsMissingError(FileNotFoundError):
    """A file the LPIPS perceptual loss needs is not on disk (this project never downloads weights at run time)."""


# ------------------------------------------------------------------------------------------------------------------
# LPIPS, offline


def _check_net(net: str) -> None:
    if net not in LPIPS_BACKBONE_WEIGHTS:
        raise ValueError(f"perceptual_net={net!r} is not an LPIPS backbone; choose one of {sorted(LPIPS_BACKBONE_WEIGHTS)}")


def _backbone_url(net: str) -> str:
    from torchvision.models import get_weight

    return get_weight(LPIPS_BACKBONE_WEIGHTS[net]).url


def lpips_backbone_path(net: str = "vgg") -> Path:
    """Where torch hub caches the ImageNet weights of the LPIPS backbone ``net`` (``$TORCH_HOME/hub/checkpoints``)."""
    _check_net(net)
    return Path(torch.hub.get_dir()) / "checkpoints" / _backbone_url(net).rsplit("/", 1)[-1]


def lpips_linear_path(net: str = "vgg") -> Path:
    """The calibrated LPIPS linear-layer weights shipped inside the ``lpips`` package."""
    _check_net(net)
    import lpips

    return Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"


def _missing_weights_error(what: str, path: Path, how: str) -> PerceptualWeightsMissingError:
    return PerceptualWeightsMissingError(
        f"the LPIPS perceptual loss needs {what}, but {str(path)!r} does not exist. {how} "
        "This project never downloads weights at run time. To train without the perceptual term, set "
        "lossconfig.params.perceptual_weight: 0 (no perceptual network is built then)."
    )


def build_lpips(net: str = "vgg", pretrained: bool = True, backbone_path: str | Path | None = None) -> nn.Module:
    """A frozen ``lpips.LPIPS`` module in eval mode, built without network access.

    Args:
        net: LPIPS backbone, ``"vgg"`` (taming's choice), ``"alex"`` or ``"squeeze"``.
        pretrained: load the backbone's ImageNet weights from ``backbone_path`` (default: torch hub's cache, see
            :func:`lpips_backbone_path`).  ``False`` keeps the backbone randomly initialised (for offline tests);
            the linear layers are always the calibrated ones from the ``lpips`` package.
        backbone_path: a local copy of torchvision's backbone weights (``features.*`` keys).

    Raises:
        PerceptualWeightsMissingError: a weights file is not on disk; the message names it and the way out.
    """
    _check_net(net)
    linear_path = lpips_linear_path(net)
    if not linear_path.exists():
        raise _missing_weights_error(
            "the linear-layer weights of the lpips package", linear_path, "Reinstall the package: pip install lpips."
        )
    if pretrained:
        backbone = Path(backbone_path) if backbone_path is not None else lpips_backbone_path(net)
        if not backbone.exists():
            raise _missing_weights_error(
                f"torchvision's ImageNet weights of its {net} backbone",
                backbone,
                f"Fetch {_backbone_url(net)} on a machine with internet access and put it at that path (torch hub's cache, "
                "$TORCH_HOME/hub/checkpoints), or set lossconfig.params.perceptual_backbone_path to a local copy.",
            )
    import lpips

    with warnings.catch_warnings():
        # lpips builds its backbone through torchvision's deprecated ``pretrained=`` argument (here always False).
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        model = lpips.LPIPS(
            pretrained=False, net=net, version=LPIPS_VERSION, pnet_rand=True, use_dropout=True, verbose=False
        )
    linear = load_state_dict(linear_path)
    own_linear = sorted(k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins."))
    if sorted(linear) != own_linear:
        raise ValueError(f"{linear_path} does not hold the LPIPS {net} linear layers {own_linear} (found {sorted(linear)})")
    model.load_state_dict(linear, strict=False)  # ``lins.*`` alias ``lin0..``: the same parameters
    if pretrained:
        source = load_state_dict(backbone)
        # lpips slices torchvision's ``features`` Sequential: ``sliceK.N.param`` is ``features.N.param``.
        wanted = {name: "features." + name.split(".", 1)[1] for name in model.net.state_dict()}
        absent = [src for src in wanted.values() if src not in source]
        if absent:
            raise ValueError(f"{backbone} is not torchvision's {net} weights: it lacks {absent[:3]}")
        model.net.load_state_dict({name: source[src] for name, src in wanted.items()}, strict=True)
        logger.info("LPIPS %s: backbone weights from %s, linear layers from %s", net, backbone, linear_path)
    else:
        logger.info("LPIPS %s: RANDOM backbone (perceptual_pretrained=False), linear layers from %s", net, linear_path)
    model.requires_grad_(False)
    return model.eval()


# ------------------------------------------------------------------------------------------------------------------
# GAN losses, adaptive weight, codebook statistics


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))``; logits of any shape, returns a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating BCE on logits: ``0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec))))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_disc_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float = 1.0
) -> torch.Tensor:
    """Balance the GAN term against reconstruction at the decoder's last layer (Esser et al. 2021, eq. 7).

    ``disc_weight * clamp(||grad_L nll|| / (||grad_L g|| + 1e-4), 0, 1e4)`` with ``L = last_layer``; detached scalar.
    Both losses must depend on ``last_layer`` with autograd enabled.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


def codebook_usage(indices: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook statistics of a batch of code indices (any shape, long, in ``[0, n_embed)``).

    Returns ``(perplexity, share_used)``: ``exp`` of the entropy of the empirical code distribution (1 = one code,
    ``n_embed`` = uniform use) and the fraction of the codebook that occurs at least once.
    """
    counts = torch.bincount(indices.reshape(-1).long(), minlength=n_embed).float()
    if counts.numel() > n_embed:
        raise ValueError(f"code index {int(indices.max())} is outside the codebook of {n_embed} entries")
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -torch.xlogy(probs, probs).sum()
    return entropy.exp(), (counts > 0).float().mean()


# ------------------------------------------------------------------------------------------------------------------


class VQLPIPSWithDiscriminator(nn.Module):
    """taming's VQGAN objective, offline and Lightning-2 friendly.

    Generator (``optimizer_idx=0``)::

        nll   = pixelloss_weight * mean(pixel(x, x_rec)) + perceptual_weight * mean(LPIPS(x, x_rec))
        total = nll + d_weight * disc_factor * (-mean(D(x_rec))) + codebook_weight * codebook_loss

    with ``d_weight`` from :func:`adaptive_disc_weight` (or ``disc_weight`` when no ``last_layer`` is given; 0
    when autograd is off, e.g. in validation).  Discriminator (``optimizer_idx=1``):
    ``disc_factor * {hinge,vanilla}_d_loss(D(x), D(x_rec))``.  The GAN terms start at ``global_step >= disc_start``
    (``global_step`` counted in batches).  Unlike taming, ``pixelloss_weight`` is applied.

    Log keys (``{split}/...``): total_loss, quant_loss, nll_loss, rec_loss (= nll_loss, taming's name), pixel_loss,
    p_loss, d_weight, disc_factor, g_loss; disc_loss, logits_real, logits_fake; perplexity, codebook_usage when
    ``predicted_indices`` are passed (needs ``n_classes``, which :class:`~ldm.models.autoencoder.VQModel` fills in).
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
        super().__init__()
        if disc_loss not in GAN_LOSSES:
            raise ValueError(f"disc_loss={disc_loss!r}; choose one of {GAN_LOSSES}")
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss={pixel_loss!r}; choose one of {PIXEL_LOSSES}")
        if disc_conditional:
            raise ValueError("disc_conditional=True (class-conditional discriminator) is not supported; set it to false")
        if perceptual_weight < 0 or disc_start < 0:
            raise ValueError(f"perceptual_weight ({perceptual_weight}) and disc_start ({disc_start}) must be >= 0")
        self.disc_start = int(disc_start)
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_loss_name = disc_loss
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.pixel_loss = pixel_loss
        self.n_classes = n_classes
        self.perceptual_loss = (
            build_lpips(perceptual_net, perceptual_pretrained, perceptual_backbone_path) if perceptual_weight > 0 else None
        )
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers, use_actnorm=use_actnorm
        ).apply(weights_init)
        logger.info(
            "VQLPIPSWithDiscriminator: %s GAN loss from batch %d, perceptual weight %g, %s pixel loss",
            disc_loss,
            self.disc_start,
            perceptual_weight,
            pixel_loss,
        )

    def train(self, mode: bool = True) -> VQLPIPSWithDiscriminator:
        """Switch the discriminator's mode; the frozen LPIPS network always stays in eval mode (no dropout)."""
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    def set_codebook_size(self, n_embed: int) -> None:
        """Take the codebook size for the usage statistics from the model (``n_classes``, if configured, must agree)."""
        if self.n_classes is not None and self.n_classes != n_embed:
            raise ValueError(f"lossconfig n_classes={self.n_classes} differs from the model's n_embed={n_embed}; drop it")
        self.n_classes = n_embed

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms are on at batch ``global_step`` (``>= disc_start``)."""
        return global_step >= self.disc_start

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

        Before ``disc_start`` the discriminator is not evaluated: the generator loss has no GAN term and the
        discriminator loss (``optimizer_idx=1``) is a constant 0 that must not be backpropagated.
        """
        if optimizer_idx == 0:
            loss, log = self._generator_loss(codebook_loss, inputs, reconstructions, global_step, last_layer, split)
        elif optimizer_idx == 1:
            loss, log = self._discriminator_loss(inputs, reconstructions, global_step, split)
        else:
            raise ValueError(f"optimizer_idx={optimizer_idx!r}; 0 (autoencoder) or 1 (discriminator)")
        if predicted_indices is not None:
            if self.n_classes is None:
                raise ValueError("predicted_indices given but n_classes (the codebook size) is not set")
            perplexity, usage = codebook_usage(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/codebook_usage"] = usage
        return loss, log

    def _generator_loss(
        self,
        codebook_loss: torch.Tensor,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        global_step: int,
        last_layer: torch.Tensor | None,
        split: str,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
        diff = inputs - reconstructions
        pixel = (diff.abs() if self.pixel_loss == "l1" else diff.pow(2)).mean()
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs, reconstructions).mean()
        else:
            p_loss = torch.zeros((), device=inputs.device)
        nll_loss = self.pixel_weight * pixel + self.perceptual_weight * p_loss
        codebook = codebook_loss.mean()
        zero = torch.zeros((), device=inputs.device)
        if self.discriminator_active(global_step):
            g_loss = -self.discriminator(reconstructions).mean()
            if not torch.is_grad_enabled():
                d_weight = zero
            elif last_layer is None:
                d_weight = torch.tensor(self.discriminator_weight, device=inputs.device)
            else:
                d_weight = adaptive_disc_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)
            disc_factor = self.disc_factor
        else:
            g_loss, d_weight, disc_factor = zero, zero, 0.0
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
