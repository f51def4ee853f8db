"""Datasets and ``DataModuleFromConfig``; the classes are re-exported lazily, so that ``import ldm.data.embedded``
(e.g. for ``heldout_crops``) does not import Lightning."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CachedLatents": "ldm.data.cached_latents",
    "DataModuleFromConfig": "ldm.data.datamodule",
    "EmbeddedPhotos": "ldm.data.embedded",
    "ImageFolderDataset": "ldm.data.image_folder",
    "ImageShards": "ldm.data.shard_stream",
    "LatentShards": "ldm.data.shard_stream",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldm.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
