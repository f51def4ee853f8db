"""Lightning callbacks of ``main.py``: run folder and configs, image grids, ``last.ckpt`` on signals and at the end, and
per-step reseeding so that a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import copy
import inspect
import io
import logging
import math
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.data.resumable import derive_seed
from ldm.util import atomic_write_bytes, remove_stale_temp_files

logger = logging.getLogger(__name__)


class SetupCallback(Callback):
    """Creates ``logdir/{checkpoints,configs,images}``, removes the temp files a killed run left there, and saves the
    merged configs as ``configs/<now>-project.yaml`` / ``<now>-lightning.yaml`` (on resume once the checkpoint is
    restored: a resume refused there saves nothing, since the next resume starts from the newest pair)."""

    def __init__(
        self,
        resume: bool,
        now: str,
        logdir: str,
        ckptdir: str,
        cfgdir: str,
        config: dict[str, Any],
        lightning_config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.resume = resume
        self.now = now
        self.logdir = str(logdir)
        self.ckptdir = str(ckptdir)
        self.cfgdir = str(cfgdir)
        self.config = copy.deepcopy(config)
        self.lightning_config = copy.deepcopy(lightning_config)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        images = os.path.join(self.logdir, "images")
        for folder in (self.logdir, self.ckptdir, self.cfgdir, images):
            os.makedirs(folder, exist_ok=True)
        for folder in (self.ckptdir, self.cfgdir, *sorted(p for p in Path(images).iterdir() if p.is_dir())):
            remove_stale_temp_files(folder)
        if not self.resume:
            self._save_configs()
        logger.info("run folder %s (%s)", self.logdir, "resumed" if self.resume else "new")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.resume and trainer.is_global_zero:  # the checkpoint is restored (and accepted) by now
            self._save_configs()

    def _save_configs(self) -> None:
        project = OmegaConf.to_yaml(OmegaConf.create(self.config))
        lightning = OmegaConf.to_yaml(OmegaConf.create({"lightning": self.lightning_config}))
        for suffix, text in (("project", project), ("lightning", lightning)):
            path = os.path.join(self.cfgdir, f"{self.now}-{suffix}.yaml")
            atomic_write_bytes(path, text.encode("utf-8"))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Embed the merged project config (plain dict) so the checkpoint describes its own model and data."""
        checkpoint["config"] = copy.deepcopy(self.config)


class ImageLogger(Callback):
    """latent-diffusion's image logger: PNG grids of ``pl_module.log_images`` every ``batch_frequency`` global steps (or
    batches with ``log_on_batch_idx``), and at steps 1, 2, 4, ... below it with ``increase_log_steps``; rank 0 writes
    ``<logdir>/images/<split>/<key>_gs-<step:06>_e-<epoch:06>_b-<batch:06>.png``.  ``max_images`` per key (``log_images``'
    ``N`` when it takes one); ``clamp`` to [-1, 1], ``rescale`` [-1, 1] to [0, 1] before writing."""

    def __init__(
        self,
        batch_frequency: int,
        max_images: int,
        clamp: bool = True,
        increase_log_steps: bool = True,
        rescale: bool = True,
        disabled: bool = False,
        log_on_batch_idx: bool = False,
        log_first_step: bool = False,
        log_images_kwargs: dict[str, Any] | None = None,
        nrow: int = 4,
    ) -> None:
        super().__init__()
        if batch_frequency < 1:
            raise ValueError(f"ImageLogger batch_frequency={batch_frequency} must be >= 1")
        if max_images < 0:
            raise ValueError(f"ImageLogger max_images={max_images} must be >= 0")
        self.batch_freq = int(batch_frequency)
        self.max_images = int(max_images)
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.nrow = nrow
        self.log_on_batch_idx = log_on_batch_idx
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.log_steps = [2**n for n in range(int(math.log2(self.batch_freq)) + 1)] if increase_log_steps else []
        self.log_steps.append(self.batch_freq)
        self._last_logged: tuple[str, int, int] | None = None

    def check_frequency(self, check_idx: int) -> bool:
        if check_idx == 0:
            return self.log_first_step
        return check_idx % self.batch_freq == 0 or check_idx in self.log_steps

    def _call_kwargs(self, pl_module: pl.LightningModule, split: str) -> dict[str, Any]:
        params = inspect.signature(pl_module.log_images).parameters
        unknown = sorted(set(self.log_images_kwargs) - set(params))
        if unknown:
            raise ValueError(
                f"ImageLogger log_images_kwargs {unknown} are not arguments of "
                f"{type(pl_module).__name__}.log_images (it takes {[p for p in params if p != 'batch']})"
            )
        kwargs = dict(self.log_images_kwargs)
        if "N" in params:
            kwargs.setdefault("N", self.max_images)
        if "split" in params:
            kwargs["split"] = split
        return kwargs

    @torch.no_grad()
    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, split: str) -> None:
        """Call ``log_images`` in eval mode and write one grid per returned key."""
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if self.disabled or self.max_images == 0 or not trainer.is_global_zero or not self.check_frequency(check_idx):
            return
        key = (split, pl_module.current_epoch, check_idx)
        if self._last_logged == key:
            return  # same step again: gradient accumulation, or a later batch of the same validation run
        self._last_logged = key
        if not callable(getattr(pl_module, "log_images", None)):
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.log_images(batch, **self._call_kwargs(pl_module, split))
        finally:
            pl_module.train(was_training)
        root = Path(trainer.default_root_dir) / "images" / split
        for key, value in images.items():
            if not isinstance(value, torch.Tensor) or value.ndim != 4:
                continue
            grid = self.make_grid(value[: self.max_images].detach().float().cpu())
            name = f"{key}_gs-{pl_module.global_step:06}_e-{pl_module.current_epoch:06}_b-{batch_idx:06}.png"
            buffer = io.BytesIO()
            Image.fromarray(grid).save(buffer, format="PNG")
            atomic_write_bytes(root / name, buffer.getvalue())

    def make_grid(self, images: torch.Tensor) -> np.ndarray:
        """``[N, C, H, W]`` in [-1, 1] (C = 1 or 3) -> uint8 ``[rows*H, nrow*W, 3]`` grid with 2-pixel gaps."""
        if self.clamp:
            images = images.clamp(-1.0, 1.0)
        if self.rescale:
            images = (images + 1.0) / 2.0
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if len(images) == 1:  # torchvision returns a lone image without the border
            grid = torch.nn.functional.pad(images[0], (2, 2, 2, 2))
        else:
            grid = torchvision.utils.make_grid(images, nrow=self.nrow, padding=2)
        return (grid.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking and pl_module.global_step > 0:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


class InterruptCheckpoint(Callback):
    """Writes ``ckpt_path`` (``<logdir>/checkpoints/last.ckpt``) when the run is interrupted.

    SIGTERM: Lightning raises ``SIGTERMException`` at the next batch boundary, on every rank at the same step; saved
    there (a completed step), then ``main.py`` exits 0.  SIGUSR1 (chained to any earlier handler, e.g. Lightning's SLURM
    requeue): the ranks agree at the end of the batch, save, and training goes on.  KeyboardInterrupt: saved by rank 0
    alone (other ranks may be stuck in a collective); the step in progress is discarded on resume.
    """

    def __init__(self, ckpt_path: str) -> None:
        super().__init__()
        self.ckpt_path = str(ckpt_path)
        self.saved_step: int | None = None
        self._usr1 = threading.Event()
        self._previous_usr1: Any = None
        self._installed = False

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        self._usr1.set()
        if callable(self._previous_usr1):
            self._previous_usr1(signum, frame)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its own SIGUSR1 handler, which is chained
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            self._previous_usr1 = signal.getsignal(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, self._on_sigusr1)
            self._installed = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._previous_usr1 if self._previous_usr1 is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        requested = self._usr1.is_set()
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self._usr1.clear()
            trainer.save_checkpoint(self.ckpt_path)
            self._saved(trainer, "SIGUSR1")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.ckpt_path)
            self._saved(trainer, "SIGTERM")
        elif isinstance(exception, KeyboardInterrupt):
            if trainer.world_size == 1:
                trainer.save_checkpoint(self.ckpt_path)
            elif trainer.is_global_zero:
                # no barrier: another rank may never reach one after Ctrl+C
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.ckpt_path)
            self._saved(trainer, "KeyboardInterrupt")

    def _saved(self, trainer: pl.Trainer, reason: str) -> None:
        self.saved_step = int(trainer.global_step)
        if trainer.is_global_zero:
            logger.info("%s: saved %s at global step %d", reason, self.ckpt_path, trainer.global_step)


class FinalCheckpoint(Checkpoint):
    """Has every ``save_last`` ModelCheckpoint write ``last.ckpt`` for the final step when training ends off its cadence.

    Lightning writes ``last.ckpt`` only on the cadence, and at the end only when it never wrote one (1700 steps saved
    every 500 would leave step 1500).  Saved at the end of the batch that reaches ``max_steps`` (so resuming continues
    with the next batch), else at the end of training; as a :class:`~pytorch_lightning.callbacks.Checkpoint` it runs
    after the ModelCheckpoints.  Not called after an exception (:class:`InterruptCheckpoint` handles those).
    """

    @staticmethod
    def _save_final(trainer: pl.Trainer) -> None:
        # ModelCheckpoint's own (private) last-checkpoint path keeps its bookkeeping, link mode and weights-only
        # setting consistent; a plain trainer.save_checkpoint would bypass all three
        for saver in trainer.checkpoint_callbacks:
            if not isinstance(saver, ModelCheckpoint) or not saver.save_last:
                continue
            if saver._should_skip_saving_checkpoint(trainer):  # fast_dev_run, sanity check, step already saved
                continue
            saver._save_last_checkpoint(trainer, saver._monitor_candidates(trainer))
            if trainer.is_global_zero:
                logger.info("training ended off the checkpoint cadence: saved last.ckpt at global step %d", trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if 0 <= trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_final(trainer)


class StepSeeding(Callback):
    """Reseeds the global RNGs from ``(seed, global_rank, global_step, micro_batch, phase)`` around every training step.

    Phase 0 comes right before the next batch is fetched (covers augmentations in the main process), phase 1 at
    ``on_train_batch_start`` (timesteps, noise, dropout): the draws of step ``k`` depend on ``k`` alone, so a run
    resumed at step ``k`` continues exactly like the uninterrupted one, and ranks draw different noise.  The seed is
    saved in every checkpoint (``checkpoint["callbacks"]["StepSeeding"]["seed"]``) for ``main.py -r``.
    """

    STATE_KEY = "StepSeeding"

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = int(seed)
        self._step = -1
        self._micro = 0

    @property
    def state_key(self) -> str:  # fixed, so that main.py finds it in checkpoint["callbacks"]
        return self.STATE_KEY

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def _reseed(self, trainer: pl.Trainer, phase: int) -> None:
        """Seed Python's ``random``, NumPy's legacy global RNG and torch (all devices) from one 63-bit seed."""
        seed = derive_seed(self.seed, trainer.global_rank, trainer.global_step, self._micro, phase)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step, self._micro = trainer.global_step, 0
        self._reseed(trainer, 0)

    on_train_epoch_start = on_train_start

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._reseed(trainer, 1)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._step:
            self._step, self._micro = trainer.global_step, 0
        else:
            self._micro += 1
        self._reseed(trainer, 0)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._reseed(trainer, 0)
