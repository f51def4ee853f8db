"""Build the Lightning 2 ``Trainer`` of ``main.py`` from the ``lightning`` config section, merged over
:data:`DEFAULT_LIGHTNING`; checkpoint I/O through :mod:`ldm.checkpoint` (:class:`SafeAtomicCheckpointIO`)."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger

from ldm.checkpoint import load_checkpoint, save_checkpoint
from ldm.train.callbacks import FinalCheckpoint, InterruptCheckpoint, SetupCallback, StepSeeding
from ldm.util import ConfigError, accepted_keywords, get_obj_from_str, instantiate_from_config, one_line

logger = logging.getLogger(__name__)

DEFAULT_LIGHTNING: dict[str, Any] = {
    "callbacks": {
        "image_logger": {
            "target": "ldm.train.callbacks.ImageLogger",
            "params": {"batch_frequency": 750, "max_images": 4, "clamp": True},
        },
        "learning_rate_logger": {
            "target": "pytorch_lightning.callbacks.LearningRateMonitor",
            "params": {"logging_interval": "step"},
        },
    },
    "modelcheckpoint": {
        "target": "pytorch_lightning.callbacks.ModelCheckpoint",
        "params": {"filename": "{epoch:06}-{step:09}", "verbose": True, "save_last": True},
    },
}
# ModelCheckpoint arguments shared by the top-k callback and the separate last.ckpt callback.
LAST_CHECKPOINT_KEYS = (
    "dirpath",
    "verbose",
    "every_n_train_steps",
    "every_n_epochs",
    "train_time_interval",
    "save_on_train_epoch_end",
    "save_weights_only",
)
# Lightning leaves these unchecked: 0 divides by zero in its loops
_AT_LEAST_ONE = ("accumulate_grad_batches", "check_val_every_n_epoch")
_PLAIN_TYPES = (bool, int, float, str, type(None))


def check_trainer_values(trainer_kwargs: dict[str, Any]) -> None:
    """Refuse (:class:`ConfigError`) a ``lightning.trainer`` value outside the plain types (bool, int, float, str,
    None) its ``Trainer`` annotation names (a bool is no int, a float must be finite), and
    ``accumulate_grad_batches`` or ``check_val_every_n_epoch`` below 1; other annotations are left to Lightning."""
    parameters = accepted_keywords(pl.Trainer).params
    for key, value in trainer_kwargs.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "val_check_interval" and number and value <= 0:  # 0: a ZeroDivisionError in Lightning's loop
            raise ConfigError(f"lightning.trainer.{key}={value!r} must be > 0 (a share of an epoch <= 1, or batches)")
        allowed = _plain_types(parameters[key][0]) if key in parameters else None
        if allowed is None:
            continue
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            # sorted: typing caches equal Unions, so the annotation's order depends on which one was created first
            names = " or ".join(sorted(t.__name__ for t in allowed if t is not type(None))) + (
                " or null" if type(None) in allowed else ""
            )
            raise ConfigError(f"lightning.trainer.{key}={value!r} must be {names} (a finite number where float)")
        if key in _AT_LEAST_ONE and value is not None and value < 1:
            raise ConfigError(f"lightning.trainer.{key}={value!r} must be >= 1")


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The types of ``annotation`` when it is a plain type or a union of them, else None."""
    if annotation in _PLAIN_TYPES:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if all(arg in _PLAIN_TYPES for arg in args):
            return args
    return None


def default_lightning_config() -> DictConfig:
    """The ``lightning`` defaults merged under every config (what ``lightning.yaml`` of a run starts from)."""
    return OmegaConf.create({"lightning": DEFAULT_LIGHTNING})


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def build_callbacks(
    lightning_config: DictConfig, model: pl.LightningModule, ckptdir: str, has_validation: bool
) -> list[pl.Callback]:
    """The configured callbacks (image logger, LR monitor, user ones) and the ``ModelCheckpoint``."""
    callbacks: list[pl.Callback] = []
    for name, cfg in (_plain(lightning_config.get("callbacks")) or {}).items():
        if not isinstance(cfg, dict) or "target" not in cfg:
            raise ConfigError(f"lightning.callbacks.{name} must be {{target: ..., params: {{...}}}}, got {cfg!r}")
        try:
            callback = instantiate_from_config(cfg)
        except (ValueError, TypeError) as exc:  # its own argument checks: named by its key, not as the Trainer's
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"lightning.callbacks.{name}: {one_line(exc)}") from exc
        callbacks.append(_built(callback, pl.Callback, f"lightning.callbacks.{name}", cfg["target"]))
    ckpt_cfg = _plain(lightning_config.get("modelcheckpoint")) or dict(DEFAULT_LIGHTNING["modelcheckpoint"])
    if not isinstance(ckpt_cfg, dict) or "target" not in ckpt_cfg or not isinstance(ckpt_cfg.get("params") or {}, dict):
        raise ConfigError(f"lightning.modelcheckpoint must be {{target: ..., params: {{...}}}}, got {ckpt_cfg!r}")
    params = dict(ckpt_cfg.get("params") or {})
    if params.get("dirpath") not in (None, ckptdir):  # latent-diffusion set it over the user's silently
        raise ConfigError(
            f"lightning.modelcheckpoint.params.dirpath={params['dirpath']!r}: checkpoints always go to the run's "
            "checkpoints/ folder (resume and refine find them there); drop it, and choose the run folder with -l/--logdir"
        )
    params["dirpath"] = ckptdir
    monitor = getattr(model, "monitor", None)
    if monitor and "monitor" not in params:
        if has_validation:
            params["monitor"] = monitor
            params.setdefault("save_top_k", 3)
        else:
            logger.warning("no validation data: checkpoints are not ranked on %s (only last.ckpt is kept)", monitor)
    if params.get("monitor") and params.get("save_last"):
        # Lightning defers every save of a monitoring ModelCheckpoint, last.ckpt included, until the first validation:
        # last.ckpt gets its own unmonitored callback, which overwrites a last.ckpt it did not write (an interrupt
        # save, a moved log dir) instead of starting last-v1.ckpt.
        last_params = {k: params[k] for k in LAST_CHECKPOINT_KEYS if k in params}
        callbacks.append(instantiate_from_config(dict(ckpt_cfg, params=dict(params, save_last=False))))
        last_params.update(save_top_k=0, save_last=True, enable_version_counter=False)
        callbacks.append(instantiate_from_config(dict(ckpt_cfg, params=last_params)))
    else:
        if params.get("save_last"):
            params.setdefault("enable_version_counter", False)
        callbacks.append(instantiate_from_config(dict(ckpt_cfg, params=params)))
    return callbacks


def _built(obj: Any, kind: type, key: str, target: str) -> Any:
    """``obj`` if it is a ``kind``; else ConfigError (Lightning failed on it mid-fit, after a run folder was made)."""
    if not isinstance(obj, kind):
        raise ConfigError(
            f"{key}: target {target!r} built a {type(obj).__name__}, not a {kind.__module__}.{kind.__qualname__}; "
            "name a class of that kind"
        )
    return obj


def build_loggers(lightning_config: DictConfig, logdir: str) -> list[Logger]:
    """CSV (always), TensorBoard (when importable) and the configured ``lightning.logger``."""
    extra = _plain(lightning_config.get("logger"))
    loggers: list[Logger] = []
    if extra:
        if not isinstance(extra, dict) or "target" not in extra:
            raise ConfigError(f"lightning.logger must be {{target: ..., params: {{...}}}}, got {extra!r}")
        params = dict(extra.get("params") or {})
        keywords = accepted_keywords(get_obj_from_str(extra["target"]))
        if "save_dir" in keywords.params or keywords.open:
            params.setdefault("save_dir", logdir)
        built = instantiate_from_config(dict(extra, params=params))
        loggers.append(_built(built, Logger, "lightning.logger", extra["target"]))
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        loggers.insert(0, CSVLogger(save_dir=logdir, name="csv"))
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        from pytorch_lightning.loggers import TensorBoardLogger

        if not any(isinstance(lg, TensorBoardLogger) for lg in loggers):
            loggers.append(TensorBoardLogger(save_dir=logdir, name="tensorboard"))
    return loggers


def configure_ddp(strategy: Any, model: pl.LightningModule) -> dict[str, Any]:
    """Give a DDP strategy the ``DistributedDataParallel`` options ``model`` declares (those the strategy has win);
    returns what was added: ``ddp_find_unused_parameters = True`` (VQModel: its discriminator is idle before
    ``disc_start``), ``ddp_sync_buffers = False`` (DDPM: no broadcast of the EMA buffers before every forward)."""
    from pytorch_lightning.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(strategy, DDPStrategy):
        return {}
    wanted: dict[str, Any] = {}
    if getattr(model, "ddp_find_unused_parameters", False):
        wanted["find_unused_parameters"] = True
    if not getattr(model, "ddp_sync_buffers", True):
        # torch >= 2.13 renamed broadcast_buffers (whose False also skipped the initial sync: harmless here, every rank
        # builds the model from the same seed)
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        wanted["forward_sync_buffers" if renamed else "broadcast_buffers"] = False
    kwargs = strategy._ddp_kwargs  # Lightning 2 keeps the DistributedDataParallel kwargs here
    added = {k: v for k, v in wanted.items() if k not in kwargs}
    kwargs.update(added)
    if added:
        logger.info("DDP options for %s: %s", type(model).__name__, added)
    return added


class SafeAtomicCheckpointIO(CheckpointIO):
    """The Trainer's checkpoints written atomically and read through the safe loader, which refuses a crafted pickle
    (:class:`~ldm.checkpoint.UnsafeCheckpointError`) unless ``unsafe`` (``--unsafe-load``)."""

    def __init__(self, unsafe: bool = False) -> None:
        self.unsafe = unsafe

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | str | Any = "cpu",
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """``weights_only`` is ignored: safety comes from ``unsafe``."""
        return load_checkpoint(path, map_location=map_location, unsafe=self.unsafe)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        if Path(path).is_file():
            Path(path).unlink()


def build_trainer(
    lightning_config: DictConfig,
    *,
    model: pl.LightningModule,
    logdir: str,
    ckptdir: str,
    setup_callback: SetupCallback,
    seed: int,
    has_validation: bool,
    unsafe_load: bool = False,
) -> tuple[pl.Trainer, InterruptCheckpoint]:
    """The Trainer for one run and its :class:`InterruptCheckpoint` (to report what an interrupt saved)."""
    trainer_kwargs = dict(_plain(lightning_config.get("trainer")) or {})
    check_trainer_values(trainer_kwargs)
    precision = str(trainer_kwargs.get("precision", ""))
    if precision in ("16-true", "bf16-true") and not getattr(model, "true_half_precision", True):
        raise ConfigError(
            f"lightning.trainer.precision={precision} would cast all of {type(model).__name__}'s buffers to half "
            "precision: the noise schedule (sqrt_alphas_cumprod[0] = 0.99925 becomes 1.0 in bfloat16) and the EMA, "
            "whose updates of (1 - ema_decay) x change then round away; use precision=bf16-mixed or 16-mixed "
            "(float32 weights and buffers, half-precision compute)"
        )
    interrupt = InterruptCheckpoint(f"{ckptdir}/last.ckpt")
    callbacks = [setup_callback, *build_callbacks(lightning_config, model, ckptdir, has_validation)]
    callbacks += [interrupt, FinalCheckpoint(), StepSeeding(seed)]
    trainer = pl.Trainer(
        **trainer_kwargs,
        callbacks=callbacks,
        logger=build_loggers(lightning_config, logdir),
        plugins=[SafeAtomicCheckpointIO(unsafe=unsafe_load)],
        default_root_dir=logdir,
        use_distributed_sampler=False,
    )
    configure_ddp(trainer.strategy, model)
    return trainer, interrupt
