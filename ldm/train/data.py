"""The data side of ``main.py``: resumable per-rank loaders (:mod:`ldm.data.resumable`) for the run's datamodule, and
the checks made before a run folder exists (every dataset yields a first item; cached latents match the first stage).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities.model_helpers import is_overridden
from torch.utils.data import IterableDataset

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.latent_format import FIRST_STAGE_SHA_KEY, INDEX_NAME, check_first_stage, read_index
from ldm.data.resumable import make_resumable, shard_eval_loader


def install_data_hooks(datamodule: Any, trainer: Any, seed: int) -> None:
    """Serve ``datamodule``'s loaders for ``trainer``'s rank in the resumable order of :mod:`ldm.data.resumable`: a
    :class:`~ldm.data.datamodule.DataModuleFromConfig` builds them so itself; another class gets its loader methods
    wrapped on the instance (rank and world size read when Lightning asks for the loaders)."""
    if isinstance(datamodule, DataModuleFromConfig):
        datamodule.use_resumable_order(seed)
        return
    original_train = datamodule.train_dataloader

    def train_dataloader(self: Any) -> Any:
        return make_resumable(original_train(), seed, trainer.global_rank, trainer.world_size)

    datamodule.train_dataloader = types.MethodType(train_dataloader, datamodule)
    for name, what in (("val_dataloader", "validation"), ("test_dataloader", "test")):
        original = getattr(datamodule, name, None)
        if original is None or not is_overridden(name, datamodule):
            continue

        def eval_dataloader(self: Any, _orig: Any = original, _what: str = what) -> Any:
            loaders = _orig()
            if isinstance(loaders, (list, tuple)):
                return type(loaders)(shard_eval_loader(dl, trainer.global_rank, trainer.world_size, _what) for dl in loaders)
            return shard_eval_loader(loaders, trainer.global_rank, trainer.world_size, _what)

        setattr(datamodule, name, types.MethodType(eval_dataloader, datamodule))


def check_first_items(datamodule: Any) -> None:
    """Load the first item of every map-style dataset ``datamodule`` has set up, in this process, so that a dataset of
    corrupt files fails before the run folder exists, not in a DataLoader worker (whatever it raises propagates)."""
    for dataset in (getattr(datamodule, "datasets", None) or {}).values():
        if isinstance(dataset, IterableDataset):
            continue
        try:
            size = len(dataset)
        except TypeError:
            continue
        if size > 0:
            dataset[0]


def check_cached_first_stage(datamodule: Any, model: Any) -> None:
    """Refuse (:class:`~ldm.data.latent_format.FirstStageMismatchError`) cached latents that ``model``'s first stage
    did not encode, before the run folder exists: a map-style dataset whose index or first item carries
    ``first_stage_sha256``, or an iterable one read from a cache folder with an ``index.json`` (a pattern of shards is
    checked at its first batch instead)."""
    first_stage = getattr(model, "first_stage_model", None)
    if first_stage is None:
        return
    found: dict[str, str] = {}  # split -> the sha256 of the first stage that encoded it
    configs = getattr(datamodule, "dataset_configs", None) or {}
    for name, dataset in (getattr(datamodule, "datasets", None) or {}).items():
        if isinstance(dataset, IterableDataset):
            params = (configs.get(name) or {}).get("params") or {}
            root = params.get("shards") if isinstance(params, dict) else None
            if isinstance(root, str) and (Path(root) / INDEX_NAME).is_file():
                found[name] = read_index(root).first_stage_sha256
            continue
        sha = getattr(getattr(dataset, "index", None), "first_stage_sha256", None)
        if isinstance(sha, str):
            found[name] = sha
            continue
        try:
            item = dataset[0] if len(dataset) > 0 else None
        except TypeError:
            continue
        if isinstance(item, dict) and isinstance(item.get(FIRST_STAGE_SHA_KEY), str):
            found[name] = item[FIRST_STAGE_SHA_KEY]
    for name, sha in found.items():
        check_first_stage(sha, first_stage, where=f"the cached latents of data.params.{name}")
