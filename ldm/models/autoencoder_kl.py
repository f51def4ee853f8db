"""KL-regularised autoencoder (the first stage of latent-diffusion's kl-f4/kl-f8 models and of Stable Diffusion v1).

``Encoder`` (``double_z``) -> 1x1 ``quant_conv`` -> moments ``[B, 2 * embed_dim, h, w]`` ->
:class:`~ldm.modules.distributions.DiagonalGaussianDistribution` -> latent ``z`` ``[B, embed_dim, h, w]`` (a sample in
training, the mean at refinement time) -> 1x1 ``post_quant_conv`` -> ``Decoder``.  Nothing is quantized.
Parameter names are CompVis' (``loss.*`` included), so kl-f8 and an SD v1 ``first_stage_model.*`` load key-for-key;
CompVis' ``target: ldm.models.autoencoder.AutoencoderKL`` resolves here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.models.autoencoder_training import GANAutoencoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.sampling.noise import Generators
from ldm.util import ConfigError

VALIDATION_SEED = 1_000_003  # the posterior samples of validation batch i come from seed (i + 1) * this


class AutoencoderKL(GANAutoencoder):
    """latent-diffusion's ``AutoencoderKL``: images ``[B, 3, H, W]`` in [-1, 1] <-> latents ``[B, embed_dim, H / f, W / f]``
    with ``f = 2 ** (len(ch_mult) - 1)`` (8 for kl-f8).

    ``lossconfig``: :class:`~ldm.modules.losses.LPIPSWithDiscriminator` to train, ``torch.nn.Identity`` for a frozen
    first stage.  ``scheduler_config``: latent-diffusion's LR multiplier (e.g.
    ``ldm.lr_scheduler.LambdaWarmUpCosineScheduler``), stepped once per batch for both optimizers.
    """

    loss_class = LPIPSWithDiscriminator
    model_name = "AutoencoderKL"
    _load_messages = ("this AutoencoderKL", "AutoencoderKL", "is it a KL autoencoder of this architecture?")
    # latent-diffusion's log names
    aeloss_name = "aeloss"
    discloss_name = "discloss"
    log_dict_on_epoch = False

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        unsafe_load: bool = False,
        scheduler_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if colorize_nlabels is not None:
            raise ConfigError("colorize_nlabels (segmentation inputs) is not supported by this project; remove it")
        if not ddconfig.get("double_z", True):
            raise ConfigError(
                "AutoencoderKL needs ddconfig.double_z: true (its encoder outputs a mean and a log-variance per latent "
                "channel); double_z: false is a VQ first stage's ddconfig (ldm.models.autoencoder.VQModel)"
            )
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ConfigError(f"embed_dim={embed_dim!r} must be a positive number of latent channels")
        self.embed_dim = embed_dim
        self._build_autoencoder({**dict(ddconfig), "double_z": True}, lossconfig, image_key, scheduler_config, monitor)
        z_channels = self.ddconfig["z_channels"]
        self.quant_conv = torch.nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, z_channels, 1)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, unsafe=unsafe_load)

    # ---------------------------------------------------------------------------------------------- the network
    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """``x`` ``[B, 3, H, W]`` in [-1, 1] -> the posterior over latents ``[B, embed_dim, H / f, W / f]``."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, embed_dim, h, w]`` -> image ``[B, 3, h * f, w * f]`` (nothing is quantized)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        input: torch.Tensor,
        sample_posterior: bool = True,
        generator: Generators = None,  # noqa: A002 (CompVis)
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``input`` ``[B, 3, H, W]`` from a posterior sample (from ``generator``; None: the global RNG,
        which main.py reseeds per step) or, with ``sample_posterior=False``, its mean.  Returns ``(xrec, posterior)``."""
        posterior = self.encode(input)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # ------------------------------------------------------------------------------------------------- training
    def _autoencoder_loss(
        self, x: torch.Tensor, split: str, batch_idx: int | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple]:
        """Training reconstructs from a posterior sample of the global RNG (main.py reseeds it per step); validation
        from one fixed by ``batch_idx`` (comparable across epochs)."""
        gen = None if batch_idx is None else torch.Generator().manual_seed(VALIDATION_SEED * (batch_idx + 1))
        xrec, posterior = self(x, generator=gen)
        aeloss, log = self.loss(x, xrec, posterior, 0, self.generator_steps, last_layer=self.get_last_layer(), split=split)
        return aeloss, log, (xrec, posterior)

    def _discriminator_loss(
        self, x: torch.Tensor, state: tuple, step: int, split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xrec, posterior = state
        return self.loss(x, xrec.detach(), posterior, 1, step, split=split)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, only_inputs: bool = False) -> dict[str, torch.Tensor]:  # noqa: N803
        """``{"inputs", "reconstructions", "samples"}``, ``[N, 3, H, W]`` in [-1, 1]: the first ``N`` images, their
        round trip through the posterior mean, and decodes of latents drawn from the prior N(0, I) (seed 0)."""
        x = self.get_input(batch, self.image_key)[:N]
        log = {"inputs": x}
        if not only_inputs:
            xrec, posterior = self(x, sample_posterior=False)
            log["reconstructions"] = xrec
            prior = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0)).to(posterior.mean)
            log["samples"] = self.decode(prior)
        return log
