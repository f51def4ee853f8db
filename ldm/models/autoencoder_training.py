"""What ``VQModel`` and ``AutoencoderKL`` share: checkpoint loading (with where-to-get-it hints) and GAN training under
Lightning 2 manual optimization.

Lightning 2's ``global_step`` counts optimizer steps (2 per batch once the discriminator trains), so the loss is driven
by :attr:`GANAutoencoder.generator_steps`, the batches trained: ``disc_start: N`` means "from the N-th batch".
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from einops import rearrange

from ldm.checkpoint import CheckpointError, check_finite, drop_keys, load_autoencoder_weights, load_state_dict, strip_prefix
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FIRST_STAGE_CKPT_KEY = "model.params.first_stage_config.params.ckpt_path"
# the first stages CompVis released with latent-diffusion (scripts/download_first_stages.sh there)
COMPVIS_FIRST_STAGES = ("kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16")
COMPVIS_URL = "https://ommer-lab.com/files/latent-diffusion/{name}.zip"
NETWORK_KEYS = ("ddconfig", "n_embed", "embed_dim")
# "(scripts/quickstart.py --domain synthetic runs exactly this)" in a config's comment
_RUNS_THIS = re.compile(r"\((?:python\s+)?(scripts/[\w./-]+\.py[^()\n]*?)\s+runs exactly this\)")


def compvis_name(ckpt_path: str) -> str | None:
    """``vq-f4`` for ``models/first_stage_models/vq-f4/model.ckpt`` (a CompVis download location), else None."""
    parts = Path(str(ckpt_path)).parts
    if len(parts) >= 4 and parts[-4:-2] == ("models", "first_stage_models") and parts[-1] == "model.ckpt":
        return parts[-2] if parts[-2] in COMPVIS_FIRST_STAGES else None
    return None


def _network(params: Mapping[str, Any] | None) -> str | None:
    """A canonical text of a first stage's network (None when it lacks one of :data:`NETWORK_KEYS`)."""
    if not isinstance(params, Mapping) or any(key not in params for key in NETWORK_KEYS):
        return None
    try:
        return json.dumps({key: params[key] for key in NETWORK_KEYS}, sort_keys=True, default=list)
    except (TypeError, ValueError):
        return None


@lru_cache(maxsize=4)
def _autoencoder_configs(root: str) -> tuple[tuple[str, str, str | None], ...]:
    """``(network, path, script)`` of every autoencoder training config under ``root`` (unreadable files skipped)."""
    import yaml

    found = []
    for path in sorted(Path(root).rglob("*.yaml")):
        try:
            text = path.read_text(encoding="utf-8")
            data = yaml.safe_load(text)
            model = data["model"]
            target, params = model["target"], model["params"]
        except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
            continue
        if not isinstance(target, str) or not target.endswith(".VQModel"):
            continue
        network = _network(params)
        if network is not None:
            script = _RUNS_THIS.search(text)
            found.append((network, str(path), script.group(1).strip() if script else None))
    return tuple(found)


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (as a user would type it), else as is."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path


def missing_first_stage_hint(ckpt_path: str, params: Mapping[str, Any] | None = None, key: str = FIRST_STAGE_CKPT_KEY) -> str:
    """What to do about a first-stage checkpoint ``ckpt_path`` that is not there, for a first stage with ``params``
    (its ``ddconfig``, ``n_embed``, ``embed_dim``), derived from data: CompVis' download when ``ckpt_path`` is
    ``models/first_stage_models/<name>/model.ckpt`` of a released model, and the ``configs/**/*.yaml`` autoencoder
    config of the same network (and the script its comment says "runs exactly this")."""
    hints = []
    name = compvis_name(ckpt_path)
    if name is not None:
        hints.append(
            f"put CompVis' {name} weights there ({COMPVIS_URL.format(name=name)}, unzip to "
            f"models/first_stage_models/{name}/model.ckpt)"
        )
    network = _network(params)  # None (no network given) matches no config
    trainers = [(_shown(path), script) for net, path, script in _autoencoder_configs(str(CONFIGS)) if net == network]
    own = CONFIGS / "autoencoder" / f"{(name or '').replace('-', '_')}.yaml"
    if not trainers and name is not None and own.is_file():  # CompVis' location, another network: its own config
        trainers = [(_shown(str(own)), None)]
    if trainers:
        config, script = trainers[0]
        also = ""
        if script:
            also = f" (or python {script}, which runs exactly this; its checkpoints land in <outdir>/checkpoints/)"
        hints.append(
            f"train it with python main.py --base {config} -t{also} and pass {key}=<its checkpoint> "
            "(main.py writes logs/<run>/checkpoints/last.ckpt)"
        )
    if not hints:
        hints.append(
            "train a first stage of this network (an autoencoder config under configs/, python main.py "
            f"--base <config> -t) and pass {key}=<its logs/<run>/checkpoints/last.ckpt>"
        )
    return "; or ".join(hints)


class GANAutoencoder(pl.LightningModule):
    """Base of the first stages: ``Encoder`` / ``Decoder`` and a loss whose discriminator trains alongside.

    Subclasses set ``loss_class``, ``model_name`` and ``_load_messages`` and define
    ``_autoencoder_loss(x, split, batch_idx) -> (loss, log, state)`` (``batch_idx`` None in training) and
    ``_discriminator_loss(x, state, step, split) -> (loss, log)``; ``aeloss_name``, ``discloss_name`` and
    ``log_dict_on_epoch`` keep the log names of their CompVis originals.
    """

    # ldm.train.trainer.configure_ddp reads this: the discriminator gets no gradient before ``disc_start``, which
    # plain DDP refuses ("parameters that were not used in producing the loss") on the second step.
    ddp_find_unused_parameters = True
    loss_class: type[torch.nn.Module]
    model_name: str
    # load_autoencoder_weights' words for this model, its weights, and what a checkpoint it cannot take should be
    _load_messages: tuple[str, str, str]
    aeloss_name = "train/aeloss"
    discloss_name: str | None = None
    log_dict_on_epoch = True

    def _build_autoencoder(
        self,
        ddconfig: dict[str, Any],
        lossconfig: Mapping[str, Any],
        image_key: str,
        scheduler_config: Mapping[str, Any] | None,
        monitor: str | None,
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
        self.automatic_optimization = False
        self.generator_steps = 0
        if monitor is not None:
            self.monitor = monitor

    @property
    def downsampling_factor(self) -> int:
        """Spatial reduction of the encoder (4 for vq-f4, 8 for kl-f8)."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    # -------------------------------------------------------------------------------------------------- weights
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), unsafe: bool = False) -> None:
        """Load weights from a CompVis-layout checkpoint (unprefixed keys) or a LatentDiffusion / Stable Diffusion one
        (``first_stage_model.*``) through the safe loader; a checkpoint of the other kind of first stage (a KL model
        looks for a VQ codebook before ``ignore_keys`` can hide it) or of another network is refused in one line."""
        if not Path(path).exists():
            network = {key: getattr(self, key) for key in NETWORK_KEYS if hasattr(self, key)}
            raise CheckpointError(f"first-stage checkpoint {path!r} does not exist; {missing_first_stage_hint(path, network)}")
        sd = load_state_dict(path, unsafe=unsafe)
        if not any(k.startswith(("encoder.", "decoder.")) for k in sd) and any(k.startswith("first_stage_model.") for k in sd):
            sd = strip_prefix(sd, "first_stage_model.")
        vq = hasattr(self, "quantize")
        if not vq and any(k.startswith("quantize.") for k in sd):
            raise CheckpointError(
                f"first-stage checkpoint {path!r} is a VQ autoencoder (it has quantize.* codebook weights), not an "
                "AutoencoderKL; load it with target ldm.models.autoencoder.VQModelInterface (with its n_embed and "
                "ddconfig.double_z: false), or give a KL checkpoint"
            )
        sd, dropped = drop_keys(sd, tuple(ignore_keys))
        if dropped:
            logger.info("%s: ignoring %d keys matching %s", path, len(dropped), list(ignore_keys))
        check_finite(sd, f"first-stage checkpoint {path!r}")
        quant_conv, post_quant_conv = sd.get("quant_conv.weight"), sd.get("post_quant_conv.weight")
        if (
            vq
            and quant_conv is not None
            and post_quant_conv is not None
            and quant_conv.ndim == post_quant_conv.ndim == 4
            and not any(k.startswith("quantize.") for k in sd)
            and quant_conv.shape[0] == 2 * post_quant_conv.shape[1]
        ):
            # a KL encoder emits mean and log-variance (2 x embed_dim channels); a VQ's quant_conv emits embed_dim
            raise CheckpointError(
                f"first-stage checkpoint {path!r} is an AutoencoderKL (quant_conv gives {quant_conv.shape[0]} = 2 x "
                f"{post_quant_conv.shape[1]} channels, a Gaussian posterior, and there is no codebook), not a VQ: use "
                "target: ldm.models.autoencoder.AutoencoderKL with ddconfig.double_z: true in first_stage_config"
            )
        # the autoencoder's own modules (a checkpoint's other keys, e.g. ``loss.*``, are not part of the network)
        own = tuple(f"{name}." for name, _ in self.named_children() if name != "loss")
        load_autoencoder_weights(self, sd, path, own, *self._load_messages)
        logger.info("restored first stage from %s", path)

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
        CompVis; with ``scheduler_config`` both follow its multiplier of the batches trained."""
        loss_fn = self._require_loss()
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise ConfigError(
                f"{self.model_name}.learning_rate is not set: main.py sets it from model.base_learning_rate; when "
                "training from Python, assign model.learning_rate before trainer.fit"
            )
        # every parameter but the loss' (in registration order: encoder, decoder, [quantize,] quant_conv, post_quant_conv)
        autoencoder = [p for name, p in self.named_parameters() if not name.startswith("loss.")]
        opt_ae = torch.optim.Adam(autoencoder, lr=lr, betas=(0.5, 0.9))
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
