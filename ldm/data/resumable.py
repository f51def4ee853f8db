"""Deterministic, per-rank data order, resumable mid-epoch: Lightning 2 resumes exactly only with a *stateful* training
loader (``state_dict`` / ``load_state_dict``); a resumed run skips the batches already trained on *by index*."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

from ldm.util import ConfigError

logger = logging.getLogger(__name__)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (``numpy.random.SeedSequence``), stable across platforms and runs."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


class ResumableLoaderState:
    """``state_dict()`` -> ``{"epoch": int, "batches": int}`` (plain ints: loads with ``weights_only``); a loaded state
    makes the next iteration of that epoch skip the batches already trained on.  A subclass gives ``_epoch_now()`` and
    ``_start_epoch()`` (the epoch's real iterator, after :meth:`_resume_skip`)."""

    batches_yielded: int = 0
    _pending: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self._epoch_now()), "batches": int(self.batches_yielded)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._pending = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def __iter__(self) -> Iterator[Any]:
        # a generator: the epoch's real iterator is created at the first next(), after Lightning's set_epoch
        for batch in self._start_epoch():
            self.batches_yielded += 1
            yield batch

    def _resume_skip(self, how: str) -> int:
        """Batches the epoch starting now skips: a loaded state's count if it is of this epoch (used once), else 0."""
        epoch, batches = self._pending or (-1, 0)
        self._pending = None
        skip = batches if epoch == self._epoch_now() and batches > 0 else 0
        if skip:
            logger.info("resuming epoch %d at batch %d (%s)", epoch, batches, how)
        self.batches_yielded = skip
        return skip


class ShardedEpochSampler(Sampler[int]):
    """Indices ``rank::world_size`` of the epoch's order of ``size`` samples (``randperm`` seeded by ``(seed, epoch)``
    with ``shuffle``, else ``0..size-1``), padded by repetition to a multiple of ``world_size`` (or, with
    ``drop_last``, cut); an iteration may start ``skip`` indices in (once, for a resumed epoch)."""

    def __init__(
        self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = False
    ) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (Lightning calls it every epoch)."""
        self.epoch = int(epoch)

    def skip_next(self, n: int) -> None:
        """The next iteration starts ``n`` indices into this rank's order (resuming mid-epoch)."""
        self._skip = int(n)

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: self.size - self.size % self.world_size]
        elif self.size % self.world_size and self.size > 0:
            pad = self.world_size - self.size % self.world_size
            order = order + (order * (pad // len(order) + 1))[:pad]
        return iter(order[self.rank :: self.world_size][start:])

    def __len__(self) -> int:
        return self.size // self.world_size if self.drop_last else -(-self.size // self.world_size)


class ResumableDataLoader(ResumableLoaderState, DataLoader):
    """DataLoader over a :class:`ShardedEpochSampler` whose position within the epoch survives a checkpoint."""

    def __init__(self, *args: Any, worker_seed: int = 0, **loader_kwargs: Any) -> None:
        super().__init__(*args, **loader_kwargs)
        self.worker_seed = worker_seed

    def _epoch_now(self) -> int:
        return self.sampler.epoch

    def _start_epoch(self) -> Iterator[Any]:
        sampler: ShardedEpochSampler = self.sampler
        skipped = self._resume_skip("skipping by index")
        if skipped:
            sampler.skip_next(skipped * int(self.batch_size or 1))
        if self.generator is not None:
            self.generator.manual_seed(derive_seed(self.worker_seed, sampler.epoch, sampler.rank))
        return DataLoader.__iter__(self)


# the DataLoader arguments a loader rebuilt around another sampler keeps
_KEPT_ARGS = ("batch_size", "drop_last", "num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
              "persistent_workers", "pin_memory_device", "in_order")  # fmt: skip
_WORKER_ARGS = ("prefetch_factor", "multiprocessing_context")  # DataLoader refuses them without worker processes


def _loader_kwargs(loader: DataLoader) -> dict[str, Any]:
    names = _KEPT_ARGS + _WORKER_ARGS if loader.num_workers > 0 else _KEPT_ARGS
    return {name: getattr(loader, name) for name in names}


def _convertible(loader: Any, what: str, world_size: int) -> bool:
    reason = None
    if not isinstance(loader, DataLoader):
        reason = f"it is a {type(loader).__name__}, not a torch DataLoader"
    elif isinstance(loader.dataset, IterableDataset):
        reason = "its dataset is iterable-style (no length, no indices)"
    elif loader.batch_size is None:
        reason = "it uses a custom batch_sampler"
    elif not isinstance(loader.sampler, (RandomSampler, SequentialSampler, ShardedEpochSampler)):
        reason = f"it uses a custom sampler ({type(loader.sampler).__name__})"
    if reason is None:
        return True
    if world_size > 1:
        raise ConfigError(
            f"the {what} loader cannot be sharded across {world_size} processes: {reason}. Return a DataLoader over "
            "a map-style dataset with shuffle=True/False (main.py shards it per rank)"
        )
    logger.warning("the %s loader is used as is (%s): resuming mid-epoch restarts its order", what, reason)
    return False


def make_resumable(loader: Any, seed: int, rank: int, world_size: int) -> Any:
    """The training loader rebuilt as a :class:`ResumableDataLoader` for this rank; worker seeds derive from ``(seed,
    epoch, rank)``.  A loader that splits its data by rank and resumes by itself (``splits_by_rank = True``:
    :class:`ldm.data.shard_stream.ShardStreamLoader`) is returned as it is; iterable-style datasets and custom samplers
    are left alone (with a warning) on one process and refused for several."""
    if getattr(loader, "splits_by_rank", False) or not _convertible(loader, "training", world_size):
        return loader
    shuffle = isinstance(loader.sampler, RandomSampler) or getattr(loader.sampler, "shuffle", False)
    sampler = ShardedEpochSampler(len(loader.dataset), shuffle, seed, rank, world_size)
    return ResumableDataLoader(
        loader.dataset, sampler=sampler, generator=torch.Generator(), worker_seed=seed, **_loader_kwargs(loader)
    )


def shard_eval_loader(loader: Any, rank: int, world_size: int, what: str) -> Any:
    """A validation/test loader split across ranks in order (``rank::world_size``) and with its own generator.

    The generator (fixed seed) keeps creating its iterator from drawing on the global RNG, so that validating, or
    Lightning preparing validation while it restarts, never shifts the training run's random stream.
    """
    if getattr(loader, "splits_by_rank", False):
        return loader
    if world_size == 1 or not _convertible(loader, what, world_size):
        if isinstance(loader, DataLoader) and loader.generator is None:
            loader.generator = torch.Generator().manual_seed(0)
        return loader
    sampler = ShardedEpochSampler(len(loader.dataset), False, 0, rank, world_size)
    return DataLoader(loader.dataset, sampler=sampler, generator=torch.Generator().manual_seed(0), **_loader_kwargs(loader))
