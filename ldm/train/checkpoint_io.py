"""Lightning checkpoint I/O through :mod:`ldm.checkpoint`: every checkpoint the Trainer writes (``last.ckpt``, top-k,
interrupt saves) is written atomically (a killed job never leaves a half-written ``.ckpt``); every one it reads
(``main.py -r``) goes through the safe loader, which refuses a crafted pickle
(:class:`~ldm.checkpoint.UnsafeCheckpointError`) unless ``--unsafe-load`` was given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO

from ldm.checkpoint import load_checkpoint, save_checkpoint


class SafeAtomicCheckpointIO(CheckpointIO):
    """``CheckpointIO`` that saves atomically and loads via the safe loader (``unsafe``: ``--unsafe-load``)."""

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
