"""KL-regularised autoencoder (the first stage of latent-diffusion's kl-f4/kl-f8 models and of Stable Diffusion v1).

``Encoder`` (``double_z``) -> 1x1 ``quant_conv`` -> moments ``[B, 2 * embed_dim, h, w]`` ->
:class:`~ldm.modules.distributions.DiagonalGaussianDistribution` -> latent ``z`` ``[B, embed_dim, h, w]`` (a sample in
training, the mean at refinement time) -> 1x1 ``post_quant_conv`` -> ``Decoder``.  Nothing is quantized.

Parameter names are CompVis' (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, and the
training loss' ``loss.*``), so ``models/first_stage_models/kl-f8/model.ckpt`` and the ``first_stage_model.*`` part of
a Stable Diffusion v1 checkpoint load key-for-key.  ``target: ldm.models.autoencoder.AutoencoderKL`` (CompVis'
configs) resolves here through a re-export.

Training (Lightning 2, manual optimization) follows :class:`ldm.models.autoencoder.VQModel`: per batch one Adam step
of the autoencoder (encoder, decoder, the 1x1 convolutions) and, from ``disc_start`` on, one of the discriminator of
:class:`~ldm.modules.losses.LPIPSWithDiscriminator`.  ``disc_start`` counts batches (:attr:`AutoencoderKL.generator_steps`,
saved in checkpoints); Lightning's ``global_step`` counts optimizer steps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from einops import rearrange

from ldm.checkpoint import CheckpointError, drop_keys, load_autoencoder_weights, load_state_dict, strip_prefix
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.sampling.noise import Generators
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)

# the autoencoder's own modules (a checkpoint's other keys, e.g. ``loss.*``, are not part of the network)
KL_AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
VALIDATION_SEED = 1_000_003  # the posterior samples of validation batch i come from seed (i + 1) * this


class AutoencoderKL(pl.LightningModule):
    """latent-diffusion's ``AutoencoderKL``: images ``[B, 3, H, W]`` in [-1, 1] <-> latents ``[B, embed_dim, H / f, W / f]``
    with ``f = 2 ** (len(ch_mult) - 1)`` (8 for kl-f8).

    Args (CompVis' first; then this project's, as in :class:`~ldm.models.autoencoder.VQModel`):
        ddconfig: ``Encoder`` / ``Decoder`` arguments; ``double_z`` must be true (the encoder outputs mean and
            log-variance).
        lossconfig: :class:`~ldm.modules.losses.LPIPSWithDiscriminator` to train; ``torch.nn.Identity`` for a frozen
            first stage.
        embed_dim: latent channels.
        ckpt_path, ignore_keys: weights to start from (see :meth:`init_from_ckpt`) and key prefixes to drop from them.
        image_key: the batch key of the images.
        colorize_nlabels: segmentation inputs; not supported (must be None).
        monitor: the checkpoint monitor (``val/rec_loss``).
        unsafe_load: unpickle arbitrary objects from ``ckpt_path`` (only for files you trust).
        scheduler_config: latent-diffusion's LR multiplier (e.g. ``ldm.lr_scheduler.LambdaWarmUpCosineScheduler``),
            stepped once per batch for both optimizers.
    """

    # the discriminator gets no gradient before ``disc_start``; plain DDP would refuse that (see VQModel)
    ddp_find_unused_parameters = True

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
        if scheduler_config is not None:  # built now, so that a bad schedule stops the run before it starts
            instantiate_from_config(scheduler_config)
        self.scheduler_config = scheduler_config
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.ddconfig = {**dict(ddconfig), "double_z": True}
        self.encoder = Encoder(**self.ddconfig)
        self.decoder = Decoder(**self.ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        z_channels = self.ddconfig["z_channels"]
        self.quant_conv = torch.nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, z_channels, 1)
        self.automatic_optimization = False
        self.generator_steps = 0
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, unsafe=unsafe_load)

    @property
    def downsampling_factor(self) -> int:
        """Spatial reduction of the encoder (8 for kl-f8)."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    # -------------------------------------------------------------------------------------------------- weights
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), unsafe: bool = False) -> None:
        """Load weights from a CompVis-layout checkpoint (unprefixed keys, optional ``loss.*``) or a LatentDiffusion /
        Stable Diffusion checkpoint (``first_stage_model.*`` keys), through the safe loader.

        ``loss.*`` keys this model's loss lacks or shapes differently are dropped with a logged note.  A VQ first
        stage's checkpoint, or one of another network, is refused with a one-line :class:`CheckpointError`.
        """
        if not Path(path).exists():
            from ldm.models.first_stages import missing_first_stage_hint  # the configs that train this network

            raise CheckpointError(f"first-stage checkpoint {path!r} does not exist; {missing_first_stage_hint(path)}")
        sd = load_state_dict(path, unsafe=unsafe)
        if not any(k.startswith(("encoder.", "decoder.")) for k in sd) and any(k.startswith("first_stage_model.") for k in sd):
            sd = strip_prefix(sd, "first_stage_model.")
        if any(k.startswith("quantize.") for k in sd):
            raise CheckpointError(
                f"first-stage checkpoint {path!r} is a VQ autoencoder (it has quantize.* codebook weights), not an "
                "AutoencoderKL; load it with target ldm.models.autoencoder.VQModelInterface (with its n_embed and "
                "ddconfig.double_z: false), or give a KL checkpoint"
            )
        sd, dropped = drop_keys(sd, tuple(ignore_keys))
        if dropped:
            logger.info("%s: ignoring %d keys matching %s", path, len(dropped), list(ignore_keys))
        load_autoencoder_weights(
            self,
            sd,
            path,
            KL_AUTOENCODER_PREFIXES,
            "this AutoencoderKL",
            "AutoencoderKL",
            "is it a KL autoencoder of this architecture?",
        )
        logger.info("restored first stage from %s", path)

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
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` (HWC images ``[B, H, W, C]`` in [-1, 1], latent-diffusion's layout) as ``[B, C, H, W]`` float."""
        if k not in batch:
            raise KeyError(f"batch has no key {k!r} (keys: {sorted(batch)}); set image_key to the dataset's image key")
        x = torch.as_tensor(batch[k])
        if x.ndim == 3:
            x = x[..., None]
        in_channels = self.ddconfig["in_channels"]
        if x.ndim != 4 or x.shape[-1] != in_channels:
            raise ValueError(
                f"batch[{k!r}] has shape {list(x.shape)}; expected HWC images [B, H, W, {in_channels}] "
                "(datasets yield H x W x C arrays, as in latent-diffusion)"
            )
        x = rearrange(x, "b h w c -> b c h w")
        return x.to(device=self.device, dtype=self.dtype, memory_format=torch.contiguous_format)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight, where the adaptive GAN weight balances the gradients."""
        return self.decoder.conv_out.weight

    def _require_loss(self) -> LPIPSWithDiscriminator:
        if not isinstance(self.loss, LPIPSWithDiscriminator):
            raise ConfigError(
                f"training an AutoencoderKL needs lossconfig target ldm.modules.losses.LPIPSWithDiscriminator, got "
                f"{type(self.loss).__name__} (torch.nn.Identity is only for a frozen first stage)"
            )
        return self.loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One autoencoder update, then (from ``disc_start`` on) one discriminator update, on the same batch."""
        loss_fn = self._require_loss()
        x = self.get_input(batch, self.image_key)
        opt_ae, opt_disc = self.optimizers()
        step = self.generator_steps
        with self.toggled_optimizer(opt_ae):  # discriminator weights get no gradient from the generator loss
            xrec, posterior = self(x)
            aeloss, log = loss_fn(x, xrec, posterior, 0, step, last_layer=self.get_last_layer(), split="train")
            opt_ae.zero_grad()
            self.manual_backward(aeloss)
            opt_ae.step()
        if self.scheduler_config is not None:  # manual optimization: Lightning does not step schedulers itself
            for scheduler in self.lr_schedulers():
                scheduler.step()
        bs = x.shape[0]
        if loss_fn.discriminator_active(step):
            with self.toggled_optimizer(opt_disc):
                discloss, log_disc = loss_fn(x, xrec.detach(), posterior, 1, step, split="train")
                opt_disc.zero_grad()
                self.manual_backward(discloss)
                opt_disc.step()
            log.update(log_disc)
            self.log("discloss", discloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.generator_steps = step + 1
        self.log("aeloss", aeloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=False, batch_size=bs)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Logs ``val/rec_loss`` (the checkpoint monitor) and the other loss terms, on posterior samples fixed by
        ``batch_idx`` (comparable across epochs)."""
        loss_fn = self._require_loss()
        x = self.get_input(batch, self.image_key)
        gen = torch.Generator().manual_seed(VALIDATION_SEED * (batch_idx + 1))
        xrec, posterior = self(x, generator=gen)
        step = self.generator_steps
        _, log = loss_fn(x, xrec, posterior, 0, step, last_layer=self.get_last_layer(), split="val")
        if loss_fn.discriminator_active(step):
            log.update(loss_fn(x, xrec, posterior, 1, step, split="val")[1])
        rec_loss = log.pop("val/rec_loss")
        bs = x.shape[0]
        self.log("val/rec_loss", rec_loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log_dict(log, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)

    def configure_optimizers(self) -> Any:
        """``[Adam(autoencoder), Adam(discriminator)]``, both at ``self.learning_rate`` with betas (0.5, 0.9), as in
        latent-diffusion (whose optimizers leave the loss' ``logvar`` at ``logvar_init``); with ``scheduler_config``
        both follow its multiplier of the batches trained."""
        loss_fn = self._require_loss()
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise ConfigError(
                "AutoencoderKL.learning_rate is not set: main.py sets it from model.base_learning_rate; when training "
                "from Python, assign model.learning_rate before trainer.fit"
            )
        ae_params = [
            *self.encoder.parameters(),
            *self.decoder.parameters(),
            *self.quant_conv.parameters(),
            *self.post_quant_conv.parameters(),
        ]
        opt_ae = torch.optim.Adam(ae_params, lr=lr, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        if self.scheduler_config is None:
            return [opt_ae, opt_disc]
        schedule = instantiate_from_config(self.scheduler_config)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule.schedule) for opt in (opt_ae, opt_disc)]
        return [opt_ae, opt_disc], [{"scheduler": s, "interval": "step", "frequency": 1} for s in schedulers]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["generator_steps"] = self.generator_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "generator_steps" in checkpoint:
            self.generator_steps = int(checkpoint["generator_steps"])
        else:  # CompVis (Lightning 1, automatic optimization): global_step counted batches
            self.generator_steps = int(checkpoint.get("global_step", 0))
            logger.info("checkpoint has no generator_steps; resuming at batch %d (its global_step)", self.generator_steps)

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
