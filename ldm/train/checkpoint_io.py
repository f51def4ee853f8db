"""Lightning checkpoint I/O through :mod:`ldm.checkpoint`: atomic writes, safe reads.

Every checkpoint the Trainer writes (``last.ckpt``, top-k, interrupt saves) goes to a temp file in the target folder and
is moved into place with ``os.replace``, so a killed job never leaves a half-written ``.ckpt``.  Every checkpoint the
Trainer reads (``main.py -r``) goes through :func:`ldm.checkpoint.load_checkpoint`, i.e. ``torch.load(weights_only=True)``:
a crafted pickle is refused with :class:`~ldm.checkpoint.UnsafeCheckpointError` unless ``--unsafe-load`` was given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO

from ldm.checkpoint import load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


class SafeAtomicCheckpointIO(CheckpointIO):
    """``CheckpointIO`` that saves atomically via :func:`ldm.checkpoint.save_checkpoint` and loads via the safe loader.

    Args:
        unsafe: allow full pickle loading (``--unsafe-load``); only for checkpoints you trust.
    """

    def __init__(self, unsafe: bool = False) -> None:
        self.unsafe = unsafe

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | str | Any = "cpu",
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint through the safe loader (``weights_only`` is ignored: safety comes from ``unsafe``)."""
        return load_checkpoint(path, map_location=map_location, unsafe=self.unsafe)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Delete a checkpoint file (ModelCheckpoint rotating its top-k)."""
        path = Path(path)
        if path.is_file():
            path.unlink()
            logger.debug("removed checkpoint %s", path)

    def teardown(self) -> None:
        """Nothing to release."""
