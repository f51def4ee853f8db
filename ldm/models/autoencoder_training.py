"""What :class:`~ldm.models.autoencoder.VQModel` and :class:`~ldm.models.autoencoder_kl.AutoencoderKL` share: reading
a first-stage checkpoint, the batch layout, and their GAN training under Lightning 2 manual optimization.

Lightning 2 advances ``trainer.global_step`` once per ``optimizer.step()``, so it counts optimizer steps, not batches.
The loss is therefore driven by :attr:`GANAutoencoder.generator_steps` (batches trained, saved in checkpoints):
``disc_start: N`` means "the discriminator joins at the N-th batch", and before that it is neither run nor stepped,
so ``global_step == generator_steps`` until ``disc_start`` and grows by 2 per batch afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from einops import rearrange

from ldm.checkpoint import CheckpointError, drop_keys, load_state_dict, strip_prefix
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)


class GANAutoencoder(pl.LightningModule):
    """Base of the first stages: ``Encoder`` / ``Decoder`` and a loss whose discriminator trains alongside.

    Per batch one Adam step of the autoencoder, then (from the loss' ``disc_start`` on) one of the discriminator.
    Subclasses set ``loss_class`` and ``model_name`` and define

    * ``_autoencoder_loss(x, split, batch_idx) -> (loss, log, state)``: the autoencoder objective for ``x``
      ``[B, 3, H, W]`` at :attr:`generator_steps` (``batch_idx`` None in training); ``state`` is what
    * ``_discriminator_loss(x, state, step, split) -> (loss, log)`` needs;
    * ``_autoencoder_parameters()``: what the autoencoder's optimizer updates.

    ``aeloss_name``, ``discloss_name`` and ``log_dict_on_epoch`` keep the log names of their CompVis originals (taming's
    VQGAN and latent-diffusion's AutoencoderKL differ).
    """

    # ldm.train.trainer.configure_ddp reads this: the discriminator gets no gradient before ``disc_start``, which
    # plain DDP refuses ("parameters that were not used in producing the loss") on the second step.
    ddp_find_unused_parameters = True
    loss_class: type[torch.nn.Module]
    model_name: str
    aeloss_name = "train/aeloss"
    discloss_name: str | None = None
    log_dict_on_epoch = True

    def _build_autoencoder(
        self,
        ddconfig: dict[str, Any],
        lossconfig: Mapping[str, Any],
        image_key: str,
        scheduler_config: Mapping[str, Any] | None,
    ) -> None:
        """Check the LR schedule (built now, so that a bad one stops the run before it starts); build the encoder,
        decoder and loss, in CompVis' order (their random initialisation depends on it)."""
        if scheduler_config is not None:
            instantiate_from_config(scheduler_config)
        self.scheduler_config = scheduler_config
        self.image_key = image_key
        self.ddconfig = ddconfig
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)

    def _finish_init(self, monitor: str | None, ckpt_path: str | None, ignore_keys: Sequence[str], unsafe: bool) -> None:
        self.automatic_optimization = False
        self.generator_steps = 0
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, unsafe=unsafe)

    @property
    def downsampling_factor(self) -> int:
        """Spatial reduction of the encoder (4 for vq-f4, 8 for kl-f8)."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    # -------------------------------------------------------------------------------------------------- weights
    def _read_first_stage(self, path: str, unsafe: bool, network: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The state dict at ``path`` (safe loader), a LatentDiffusion checkpoint's ``first_stage_model.*`` prefix
        stripped; a missing file names the configs that train this ``network``."""
        if not Path(path).exists():
            from ldm.models.first_stages import missing_first_stage_hint  # the configs that train this network

            raise CheckpointError(f"first-stage checkpoint {path!r} does not exist; {missing_first_stage_hint(path, network)}")
        sd = load_state_dict(path, unsafe=unsafe)
        if not any(k.startswith(("encoder.", "decoder.")) for k in sd) and any(k.startswith("first_stage_model.") for k in sd):
            sd = strip_prefix(sd, "first_stage_model.")
        return sd

    @staticmethod
    def _drop_ignored(sd: dict[str, torch.Tensor], path: str, ignore_keys: Sequence[str]) -> dict[str, torch.Tensor]:
        sd, dropped = drop_keys(sd, tuple(ignore_keys))
        if dropped:
            logger.info("%s: ignoring %d keys matching %s", path, len(dropped), list(ignore_keys))
        return sd

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

    def _require_loss(self) -> Any:
        if not isinstance(self.loss, self.loss_class):
            article = "an" if self.model_name[0] in "AEIOU" else "a"
            raise ConfigError(
                f"training {article} {self.model_name} needs lossconfig target ldm.modules.losses."
                f"{self.loss_class.__name__}, got {type(self.loss).__name__} (torch.nn.Identity is only for a frozen "
                "first stage)"
            )
        return self.loss

    def _after_autoencoder_step(self, x: torch.Tensor, state: tuple, log: dict[str, torch.Tensor]) -> None:
        """Hook after each autoencoder update (VQModel restarts dead codes here)."""

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One autoencoder update, then (from ``disc_start`` on) one discriminator update, on the same batch."""
        loss_fn = self._require_loss()
        x = self.get_input(batch, self.image_key)
        opt_ae, opt_disc = self.optimizers()
        step = self.generator_steps
        with self.toggled_optimizer(opt_ae):  # discriminator weights get no gradient from the generator loss
            aeloss, log, state = self._autoencoder_loss(x, "train", None)
            opt_ae.zero_grad()
            self.manual_backward(aeloss)
            opt_ae.step()
        if self.scheduler_config is not None:  # manual optimization: Lightning does not step schedulers itself
            for scheduler in self.lr_schedulers():
                scheduler.step()
        self._after_autoencoder_step(x, state, log)
        bs = x.shape[0]
        if loss_fn.discriminator_active(step):
            with self.toggled_optimizer(opt_disc):
                discloss, log_disc = self._discriminator_loss(x, state, step, "train")
                opt_disc.zero_grad()
                self.manual_backward(discloss)
                opt_disc.step()
            log.update(log_disc)
            if self.discloss_name is not None:
                self.log(self.discloss_name, discloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.generator_steps = step + 1
        self.log(self.aeloss_name, aeloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=self.log_dict_on_epoch, batch_size=bs)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Logs ``val/rec_loss`` (the checkpoint monitor) and the other loss terms."""
        loss_fn = self._require_loss()
        x = self.get_input(batch, self.image_key)
        _, log, state = self._autoencoder_loss(x, "val", batch_idx)
        if loss_fn.discriminator_active(self.generator_steps):
            log.update(self._discriminator_loss(x, state, self.generator_steps, "val")[1])
        rec_loss = log.pop("val/rec_loss")
        bs = x.shape[0]
        self.log("val/rec_loss", rec_loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log_dict(log, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)

    def configure_optimizers(self) -> Any:
        """``[Adam(autoencoder), Adam(discriminator)]``, both at ``self.learning_rate`` with betas (0.5, 0.9), as in
        CompVis (whose optimizers leave the KL loss' ``logvar`` at ``logvar_init``); with ``scheduler_config``
        (latent-diffusion's, e.g. :class:`ldm.lr_scheduler.LambdaWarmUpCosineScheduler`) both follow its multiplier
        of the batches trained (stepped once per batch)."""
        loss_fn = self._require_loss()
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise ConfigError(
                f"{self.model_name}.learning_rate is not set: main.py sets it from model.base_learning_rate; when "
                "training from Python, assign model.learning_rate before trainer.fit"
            )
        opt_ae = torch.optim.Adam(self._autoencoder_parameters(), lr=lr, betas=(0.5, 0.9))
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
        else:  # taming / CompVis (Lightning 1, automatic optimization): global_step counted batches
            self.generator_steps = int(checkpoint.get("global_step", 0))
            logger.info("checkpoint has no generator_steps; resuming at batch %d (its global_step)", self.generator_steps)
