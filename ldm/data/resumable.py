"""What a resumable loader needs from the data layer: seeds derived from integer keys, and an iterator that starts the
epoch at its first ``next()`` and counts the batches it hands out.

Used by the tar-shard loader (:class:`ldm.data.shard_stream.ShardStreamLoader`) and by training's
:class:`ldm.train.data.ResumableDataLoader`; they live here so that ``ldm.data`` imports nothing from ``ldm.train``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (``numpy.random.SeedSequence``), stable across platforms and runs."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


class CountingLoader(Protocol):
    """A loader that :class:`LazyCountingIterator` drives: ``_start_epoch()`` makes the epoch's real iterator (after
    ``set_epoch`` and any pending resume), ``batches_yielded`` counts the batches handed out, ``len()`` is per epoch."""

    batches_yielded: int

    def _start_epoch(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


class LazyCountingIterator:
    """Creates the DataLoader iterator at the first ``next()`` and counts the batches it yields."""

    def __init__(self, loader: CountingLoader) -> None:
        self.loader = loader
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> LazyCountingIterator:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self.loader._start_epoch()
        batch = next(self._it)
        self.loader.batches_yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)
