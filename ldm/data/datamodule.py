"""``DataModuleFromConfig``: latent-diffusion's data module (one ``{target, params}`` config per split) on Lightning 2."""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ldm.data.resumable import make_resumable, shard_eval_loader
from ldm.data.shard_stream import ShardStream, ShardStreamLoader
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)

SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test", "predict")
_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "validation"),
    "validate": ("validation",),
    "test": ("test",),
    "predict": ("predict",),
    None: SPLIT_NAMES,
}


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy's and Python's global generators from torch's per-worker seed, for third-party datasets that draw
    from ``np.random`` directly."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def set_dataset_epoch(dataset: Dataset, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on ``dataset`` and on the datasets inside ``ConcatDataset`` / ``Subset`` wrappers."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            set_dataset_epoch(part, epoch)
    elif isinstance(dataset, Subset):
        set_dataset_epoch(dataset.dataset, epoch)


class SetDatasetEpoch(pl.Callback):
    """Selects the augmentation epoch of ``trainer.datamodule``'s training dataset, at ``on_train_start`` (a resumed
    run continues with its epoch) and ``on_train_epoch_start``: before the epoch's loader starts its workers."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = getattr(trainer.datamodule, "datasets", {}).get("train")
        if dataset is not None:
            set_dataset_epoch(dataset, trainer.current_epoch)

    on_train_start = on_train_epoch_start


class DataModuleFromConfig(pl.LightningDataModule):
    """Builds each split from a ``{target, params}`` config in :meth:`setup` and serves DataLoaders: a
    :class:`~ldm.data.shard_stream.ShardStream` through its per-rank ``ShardStreamLoader``, others through ``shuffle``
    loaders or, after :meth:`use_resumable_order`, the per-rank resumable loaders of :mod:`ldm.data.resumable`.

    latent-diffusion's signature (its configs build it unchanged), then this project's keywords.

    Args:
        batch_size: items per batch (per rank under DDP).
        train / validation / test / predict: dataset configs, or None for a split without data (no dataloader method).
        wrap, use_worker_init_fn: accepted as in latent-diffusion; DataLoader takes objects with ``__len__`` and
            ``__getitem__`` as they are, and workers are always seeded (:func:`worker_init_fn`), as resuming needs.
        num_workers: loader processes; None: latent-diffusion's ``2 * batch_size``.
        pin_memory: None -> only when the trainer runs on CUDA (without a trainer: when CUDA is available).
        persistent_workers: None -> ``num_workers > 0``.
        drop_last: drop the last incomplete training batch (validation/test never drop); a training split smaller than
            one batch per rank is then refused in :meth:`setup` instead of silently training on nothing.
    """

    def __init__(
        self,
        batch_size: int,
        train: Mapping[str, Any] | None = None,
        validation: Mapping[str, Any] | None = None,
        test: Mapping[str, Any] | None = None,
        predict: Mapping[str, Any] | None = None,
        wrap: bool = False,
        num_workers: int | None = 0,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
        *,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if num_workers is None:
            num_workers = 2 * batch_size if isinstance(batch_size, int) and not isinstance(batch_size, bool) else batch_size
        for name, value, lowest in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:  # int(2.5) trained with 2
                raise ValueError(f"{name}={value!r} must be an integer >= {lowest}")
        if persistent_workers and int(num_workers) == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0 (or leave persistent_workers unset)")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.shuffle_val_dataloader = bool(shuffle_val_dataloader)
        self.shuffle_test_loader = bool(shuffle_test_loader)
        self.persistent_workers = self.num_workers > 0 if persistent_workers is None else bool(persistent_workers)
        self.drop_last = bool(drop_last)
        self.dataset_configs: dict[str, Any] = {}
        for name, config in zip(SPLIT_NAMES, (train, validation, test, predict)):
            if config is None:
                continue
            if not hasattr(config, "keys") or "target" not in config:
                raise ConfigError(
                    f"data config for split {name!r} must be a mapping {{target: pkg.Class, params: {{...}}}}, got {config!r}"
                )
            self.dataset_configs[name] = config
        self.datasets: dict[str, Dataset] = {}
        self._order_seed: int | None = None  # set by use_resumable_order
        if "train" in self.dataset_configs:
            self.train_dataloader = self._train_dataloader
        for name, method in (("validation", "val_dataloader"), ("test", "test_dataloader"), ("predict", "predict_dataloader")):
            if name in self.dataset_configs:
                setattr(self, method, functools.partial(self._eval_loader, name))

    def setup(self, stage: str | None = None) -> None:
        """Instantiate the datasets that ``stage`` needs (None: all); idempotent."""
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"stage={stage!r} is not one of {list(_STAGE_SPLITS)}")
        for name in _STAGE_SPLITS[stage]:
            if name in self.dataset_configs and name not in self.datasets:
                dataset = instantiate_from_config(self.dataset_configs[name])
                if len(dataset) == 0:
                    raise ValueError(f"the {name} dataset built from {self.dataset_configs[name]['target']} is empty")
                self.datasets[name] = dataset
                logger.info("data split %s: %s with %d items", name, type(dataset).__name__, len(dataset))
        dataset = self.datasets.get("train")
        if dataset is not None and self.drop_last:
            world_size = self._rank_world()[1]
            per_rank = math.ceil(len(dataset) / world_size)
            if per_rank < self.batch_size:
                raise ValueError(
                    f"the train dataset has {len(dataset)} items ({per_rank} per rank on {world_size} rank(s)), fewer "
                    f"than batch_size={self.batch_size}; with drop_last=True no batch would be formed. Lower batch_size, "
                    "add data (for EmbeddedPhotos: raise n_samples) or set drop_last: false"
                )
        trainer = self.trainer
        if trainer is not None and dataset is not None and not any(isinstance(c, SetDatasetEpoch) for c in trainer.callbacks):
            trainer.callbacks.append(SetDatasetEpoch())

    def _resolve_pin_memory(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        if self.trainer is not None:
            return isinstance(self.trainer.accelerator, pl.accelerators.CUDAAccelerator)
        return torch.cuda.is_available()

    def use_resumable_order(self, seed: int) -> None:
        """Serve the training loader in :mod:`ldm.data.resumable`'s order and the evaluation loaders split by rank
        (``main.py``, which turns Lightning's ``DistributedSampler`` off); call before the trainer asks for loaders."""
        self._order_seed = int(seed)

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _loader(self, name: str, shuffle: bool, drop_last: bool) -> DataLoader:
        if name not in self.datasets:
            raise RuntimeError(f"the {name} dataset is not built yet: call setup() before asking for its dataloader")
        dataset = self.datasets[name]
        common = {
            "num_workers": self.num_workers,
            "worker_init_fn": worker_init_fn if self.num_workers > 0 else None,
            "pin_memory": self._resolve_pin_memory(),
            "persistent_workers": self.persistent_workers,
        }
        if isinstance(dataset, ShardStream):
            dataset.configure(self.batch_size, *self._rank_world(), shuffle=shuffle, drop_last=drop_last)
            return ShardStreamLoader(dataset, **common)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last, **common)

    def _train_dataloader(self) -> DataLoader:
        loader = self._loader("train", shuffle=True, drop_last=self.drop_last)
        return loader if self._order_seed is None else make_resumable(loader, self._order_seed, *self._rank_world())

    def _eval_loader(self, name: str) -> DataLoader:
        shuffle = {"validation": self.shuffle_val_dataloader, "test": self.shuffle_test_loader}.get(name, False)
        loader = self._loader(name, shuffle=shuffle, drop_last=False)
        return loader if self._order_seed is None else shard_eval_loader(loader, *self._rank_world(), name)
