"""The cached-latent format written by ``scripts/cache_latents.py`` and read by the training datasets.  A cache is a
folder: ``index.json`` (:class:`CacheIndex`, written last), ``plan.json`` (the settings a resumed run must match),
webdataset shards ``latents-000000.tar`` of one sample per source image (``<key>.latent.npy``: float32/float16
``[V, C, h, w]``, V variants (crops x flips) of the unscaled latent ``first_stage_model.encode(x)``, so one cache serves
``scale_by_std`` and fixed scales; ``<key>.json``: source, variants' top/left/flip, first_stage_sha256; ``<key>.txt``:
the caption, if any), each with a sidecar ``latents-000000.json`` (byte spans of its members, skipped inputs)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import tokenize
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.data.captions import CAPTION_KEY
from ldm.data.tar_shards import MAX_SHARD_SAMPLES
from ldm.util import ConfigError

FORMAT = "latesteps-latents/1"
INDEX_NAME = "index.json"
PLAN_NAME = "plan.json"
# batch keys of a cached-latent item (the model reads them; see LatentDiffusion.cached_first_stage_encoding)
CACHED_LATENT_KEY = "cached_latent"
FIRST_STAGE_SHA_KEY = "first_stage_sha256"
LATENT_EXT = "latent.npy"
STORAGE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
MAX_LATENT_ELEMENTS = 1 << 28  # 1 GiB of float32 per sample: far above any real latent, refuses absurd headers


class FirstStageMismatchError(ConfigError):
    """Cached latents were made by another first stage than the model's."""


def first_stage_sha256(module: torch.nn.Module) -> str:
    """sha256 (hex) of a first stage's weights (not of a file: the same weights from another file or from inside a
    LatentDiffusion checkpoint match): over its ``state_dict()`` entries in sorted key order, each hashed as
    ``key \\0 dtype \\0 shape \\0`` followed by its raw little-endian bytes.  Training-loss entries (``loss.*``) are
    left out: they are not part of the autoencoder and differ between a training and an inference config."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        if key.startswith("loss."):
            continue
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_HASH_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def cached_first_stage_sha256(module: torch.nn.Module) -> str:
    """:func:`first_stage_sha256`, recomputed only when a weight tensor was replaced or modified in place (tensor
    identity and version counter), so that checking every training batch costs microseconds."""
    stamp = tuple((t.data_ptr(), t._version) for t in itertools.chain(module.parameters(), module.buffers()))
    hit = _HASH_CACHE.get(module)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = first_stage_sha256(module)
    _HASH_CACHE[module] = (stamp, value)
    return value


def check_first_stage(hashes: str | Sequence[str], module: torch.nn.Module, where: str = "cached latents") -> None:
    """:class:`FirstStageMismatchError` unless every entry of ``hashes`` is the hash of ``module``'s weights."""
    given = {hashes} if isinstance(hashes, str) else set(hashes)
    ours = cached_first_stage_sha256(module)
    others = sorted(given - {ours})
    if others:
        raise FirstStageMismatchError(
            f"{where} were encoded by a first stage with weights sha256 {others[0]}, but this model's first stage has "
            f"sha256 {ours}; re-run scripts/cache_latents.py with this model's config, or set the model's "
            "first_stage_config.params.ckpt_path to the first stage the cache was made with"
        )


def encode_npy(array: np.ndarray) -> bytes:
    """``array`` as .npy bytes (format 1.0, C order, no pickle): the same array gives the same bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes, shape: Sequence[int] | None = None, what: str = "latent") -> np.ndarray:
    """A read-only float32/float16 array from .npy bytes, checked before allocation: dtype, C order, ``shape`` when
    given (``-1`` matches any size), a payload of exactly the header's elements; then that every value is finite.
    Raises ValueError naming ``what`` for anything else."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy version {version} is not supported")
    # numpy parses the header with the tokenizer and ast.literal_eval: mangled ones also raise these
    except (ValueError, SyntaxError, tokenize.TokenError, RecursionError) as exc:
        raise ValueError(f"{what}: not a valid .npy array ({type(exc).__name__}: {exc})") from exc
    array_shape, fortran, dtype = header
    # numpy accepts any Python ints as dimensions (2**64 included): bound each before anything multiplies them
    if not all(type(d) is int and 0 <= d <= MAX_LATENT_ELEMENTS for d in array_shape):
        raise ValueError(
            f"{what}: the .npy header's shape {tuple(array_shape)} is not a latent's (each side must be an "
            f"integer in [0, {MAX_LATENT_ELEMENTS:,}])"
        )
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"{what}: dtype {dtype} is not one of {sorted(STORAGE_DTYPES)} (little-endian)")
    if fortran:
        raise ValueError(f"{what}: Fortran-ordered arrays are not written by cache_latents.py")
    if shape is not None and (len(array_shape) != len(shape) or any(s != -1 and s != a for s, a in zip(shape, array_shape))):
        raise ValueError(f"{what}: shape {tuple(array_shape)} does not match the expected {tuple(shape)}")
    count = math.prod(array_shape)  # Python ints: no overflow
    if count > MAX_LATENT_ELEMENTS or count * dtype.itemsize != len(data) - stream.tell():
        raise ValueError(
            f"{what}: header says {tuple(array_shape)} {dtype} but the member holds {len(data) - stream.tell()} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(array_shape)
    # a NaN or inf latent would turn the loss (and, through the optimizer, every weight) into NaN
    bad = count - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ValueError(
            f"{what}: {bad} of its {count} values are NaN or infinite; a latent must be finite "
            "(re-encode the image with cache_latents.py)"
        )
    return array


def choose_variant(rng: np.random.Generator, n_crops: int, stored_flip: bool, random_crop: bool, flip: bool) -> int:
    """The variant an epoch uses, drawn as ImageFolderDataset draws its augmentation: the crop (``rng.integers(n_crops)``
    with ``random_crop`` and several crops, else the middle one), then the flip (``rng.random() < 0.5``, with ``flip``
    and stored flips).  With one crop this is the image dataset's draw with ``random_crop: false`` (same seed, same
    inputs)."""
    crop = int(rng.integers(n_crops)) if random_crop and n_crops > 1 else (n_crops - 1) // 2
    flipped = bool(flip and stored_flip and rng.random() < 0.5)
    return crop * (2 if stored_flip else 1) + int(flipped)


@dataclass(frozen=True)
class CacheIndex:
    """Contents of ``<root>/index.json``: ``size`` the crop side in pixels, ``latent_shape`` ``[C, h, w]``, ``dtype``
    the storage dtype name, ``shards`` ``[(file name, samples)]`` in order, ``skipped`` unreadable inputs, ``captions``
    how many samples have a ``.txt`` member (0: no key in the file), ``settings`` the rest (for people)."""

    root: Path
    first_stage_sha256: str
    size: int
    latent_shape: tuple[int, int, int]
    dtype: str
    n_crops: int
    flip: bool
    shards: tuple[tuple[str, int], ...]
    skipped: int
    settings: Mapping[str, Any]
    captions: int = 0

    @property
    def num_samples(self) -> int:
        return sum(count for _, count in self.shards)

    @property
    def variants(self) -> int:
        return self.n_crops * (2 if self.flip else 1)

    def shard_paths(self) -> list[str]:
        return [str(self.root / name) for name, _ in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "first_stage_sha256": self.first_stage_sha256,
            "size": self.size,
            "latent_shape": list(self.latent_shape),
            "dtype": self.dtype,
            "n_crops": self.n_crops,
            "flip": self.flip,
            "shards": [{"name": name, "samples": count} for name, count in self.shards],
            "skipped": self.skipped,
            "settings": dict(self.settings),
            # only when there are captions: the index of a cache without them keeps the bytes it had before captions
            **({"captions": self.captions} if self.captions else {}),
        }


def read_index(root: str | os.PathLike) -> CacheIndex:
    """Read and validate ``<root>/index.json``; raises :class:`ConfigError` (one line) for a missing or bad index."""
    root = Path(root).expanduser()
    path = root / INDEX_NAME
    if not path.is_file():
        hint = " (a cache_latents.py run was interrupted: run it again to finish)" if (root / PLAN_NAME).is_file() else ""
        raise ConfigError(f"{path} does not exist{hint}; make a latent cache with scripts/cache_latents.py --out {root}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: deep nesting
        raise ConfigError(f"{path} is not a latent-cache index ({type(exc).__name__}: {exc}); re-run cache_latents.py") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a latent-cache index (a JSON object); re-run cache_latents.py")
    if data.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {_shown(data.get('format'))} is not {FORMAT!r}; re-run cache_latents.py")
    shards_value = _index_field(path, data, "shards", list, "a list of {name, samples}")
    shards = []
    for i, entry in enumerate(shards_value):
        where = f"shards[{i}]"
        if not isinstance(entry, dict):
            raise _index_error(path, where, entry, "an object {name, samples}")
        name = _index_field(path, entry, "name", str, "a plain file name (a string)", where)
        count = _index_field(path, entry, "samples", int, "an integer sample count", where)
        if Path(name).name != name or name in ("", ".", ".."):
            raise _index_error(path, f"{where}.name", name, "a plain file name in the cache folder")
        if not 0 <= count <= MAX_SHARD_SAMPLES:
            raise _index_error(path, f"{where}.samples", count, f"a sample count in [0, {MAX_SHARD_SAMPLES:,}]")
        shards.append((name, count))
    shape = _index_field(path, data, "latent_shape", list, "a list [C, h, w] of positive integers")
    if len(shape) != 3 or any(type(v) is not int or v < 1 for v in shape):
        raise _index_error(path, "latent_shape", shape, "a list [C, h, w] of positive integers")
    dtype = _index_field(path, data, "dtype", str, f"one of {sorted(STORAGE_DTYPES)}")
    if dtype not in STORAGE_DTYPES:
        raise _index_error(path, "dtype", dtype, f"one of {sorted(STORAGE_DTYPES)}")
    size = _index_field(path, data, "size", int, "a positive integer (pixels)")
    n_crops = _index_field(path, data, "n_crops", int, "an integer >= 1")
    skipped = _index_field(path, data, "skipped", int, "an integer >= 0", default=0)
    captions = _index_field(path, data, "captions", int, "an integer >= 0", default=0)
    for key, value, low in (("size", size, 1), ("n_crops", n_crops, 1), ("skipped", skipped, 0), ("captions", captions, 0)):
        if value < low:
            raise _index_error(path, key, value, f"an integer >= {low}")
    return CacheIndex(
        root=root,
        first_stage_sha256=_index_field(path, data, "first_stage_sha256", str, "a sha256 (a string)"),
        size=size,
        latent_shape=tuple(shape),  # type: ignore[arg-type]
        dtype=dtype,
        n_crops=n_crops,
        flip=_index_field(path, data, "flip", bool, "true or false"),
        shards=tuple(shards),
        skipped=skipped,
        settings=_index_field(path, data, "settings", dict, "an object", default={}),
        captions=captions,
    )


def _index_field(
    path: Path, data: dict[str, Any], key: str, kind: type, rule: str, where: str = "", default: Any = None
) -> Any:
    """``data[key]`` if its type is exactly ``kind`` (no bool for int, no "false" for bool), else a one-line
    ConfigError naming the file and the key; a missing key gives ``default`` if there is one (not None)."""
    name = f"{where}.{key}" if where else key
    if key not in data:
        if default is not None:
            return default
        raise ConfigError(
            f"{path}: key {name!r} is missing; it must be {rule}. Re-run scripts/cache_latents.py to write the index again"
        )
    value = data[key]
    if type(value) is not kind:
        raise _index_error(path, name, value, rule)
    return value


def _index_error(path: Path, name: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(
        f"{path}: {name} is {_shown(value)} ({type(value).__name__}), but it must be {rule}. Fix the "
        "value or re-run scripts/cache_latents.py to write the index again"
    )


def _shown(value: Any, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[:limit]}..."


def latent_item(
    array: np.ndarray, variant: int, sha256: str, source: str, caption: str | None = None
) -> dict[str, torch.Tensor | str]:
    """The training item of one cached sample: ``{cached_latent: float32 [C, h, w], first_stage_sha256, file_path_}``,
    plus ``caption`` when one is given (a reader with captions on gives ``""`` for a sample without one)."""
    latent = torch.from_numpy(np.array(array[variant], dtype=np.float32))
    item: dict[str, torch.Tensor | str] = {CACHED_LATENT_KEY: latent, FIRST_STAGE_SHA_KEY: sha256, "file_path_": source}
    if caption is not None:
        item[CAPTION_KEY] = caption
    return item
