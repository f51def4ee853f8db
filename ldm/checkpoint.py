"""The one way this project reads and writes weights: safetensors, or ``torch.load(weights_only=True)`` with inert
placeholders for CompVis releases' Lightning-1.x / OmegaConf globals (any other is refused unless unsafe); atomic writes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.util import atomic_write_bytes, one_line

logger = logging.getLogger(__name__)

METADATA_PREFIX = "latesteps."
MAX_METADATA_JSON = 1 << 20  # characters per record; a project config is a few kB

# Globals of Lightning-1.x / OmegaConf checkpoints that may be replaced by inert placeholders.
LEGACY_STUB_PREFIXES: tuple[str, ...] = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "omegaconf.",
    "argparse.Namespace",
    "pathlib.",
    "typing.Any",
)
# Plain containers and numpy array/scalar reconstruction: safe to build for real (they run no user code).
_SAFE_REAL_GLOBALS = (
    *(f"builtins.{name}" for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool", "bytes")),
    "builtins.slice",
    *(f"collections.{name}" for name in ("defaultdict", "OrderedDict", "deque")),
    "numpy.dtype",
    "numpy.ndarray",
    *(f"numpy.{core}.multiarray.{name}" for core in ("core", "_core") for name in ("scalar", "_reconstruct")),
)
_READ_ERRORS = (
    RuntimeError,
    EOFError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
    ValueError,
    OSError,
    LookupError,  # IndexError, KeyError
    TypeError,
    AttributeError,
    struct.error,
)
UNSAFE_HINT = "pass --unsafe-load (Python: unsafe=True) only if you trust this file"
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# LitEma's two scalar buffers. EMA-only releases (Stable Diffusion v1's sd-v1-4.ckpt, v1-5-pruned-emaonly) keep them
# after their EMA weights were copied into model.* and the other model_ema.* entries dropped: such a file has no EMA.
EMA_SCALAR_KEYS = ("model_ema.decay", "model_ema.num_updates")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, of the wrong kind, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need arbitrary code to unpickle and the caller did not opt in."""


class LegacyObject:
    """Inert stand-in for a pickled Lightning/OmegaConf object: it records its arguments and state, nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__} placeholder>"


@functools.cache
def _stub_for(qualname: str) -> type:
    module, _, name = qualname.rpartition(".")
    return type(name, (LegacyObject,), {"__module__": module})


def _real_global(qualname: str) -> Any:
    """The object behind an allow-listed ``module.name`` (numpy may not have every historical alias)."""
    module, _, name = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (``hashlib.file_digest`` needs Python 3.11; 3.10 is supported)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_zip_records(path: Path) -> None:
    """CheckpointError for a torch zip checkpoint with a compressed record: ``torch.save`` stores every record as is,
    while a deflated one is inflated in full by ``torch.load`` before any check (1 MB of zeros became 1 GiB)."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format, or not a checkpoint (torch.load says so)
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: record {info.filename[-80:]!r} is compressed ({info.file_size:,} bytes "
                    f"from {info.compress_size:,}); torch.save never compresses, and a compressed record is inflated "
                    "in full before it can be checked: refused. Re-save the weights with torch.save"
                )


def _torch_load_restricted(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass  # needs globals beyond torch's allow-list: inspect them below
    unsafe_globals = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    real = {g: obj for g in unsafe_globals if g in _SAFE_REAL_GLOBALS and (obj := _real_global(g)) is not None}
    stubbed = [g for g in unsafe_globals if g not in real and any(g == p or g.startswith(p) for p in LEGACY_STUB_PREFIXES)]
    refused = [g for g in unsafe_globals if g not in real and g not in stubbed]
    if refused:
        raise UnsafeCheckpointError(
            f"checkpoint {str(path)!r} would import/run {sorted(refused)[:8]} when unpickled; refused. "
            f"Only tensors and Lightning/OmegaConf metadata are loaded by default; {UNSAFE_HINT}."
        )
    allowed = [(_stub_for(g), g) for g in stubbed] + [(obj, g) for g, obj in real.items()]
    logger.info("checkpoint %s: replacing %d Lightning-1.x globals by placeholders", path, len(stubbed))
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", unsafe: bool = False) -> dict[str, Any]:
    """Read a checkpoint file into a dict: ``.safetensors`` gives ``{"state_dict": tensors, "metadata": {...}}`` (and
    the records of :data:`_RECORDS`); a torch file what was saved (a bare state dict as ``{"state_dict": ...}``).
    Raises ``CheckpointError`` (missing, empty, truncated, not a checkpoint) or ``UnsafeCheckpointError`` (the pickle
    needs code outside the allow-list and ``unsafe`` is False)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path (or train one first)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory; pass the .ckpt/.safetensors file inside it")
    if not path.is_file():  # a FIFO or a device: reading it could block or never end
        raise CheckpointError(f"checkpoint {str(path)!r} is not a regular file; pass the .ckpt/.safetensors file itself")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes); the file was truncated or never written")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    check_zip_records(path)
    try:
        if unsafe:
            logger.warning("loading %s with full pickle (unsafe=True): it can run arbitrary code", path)
            obj = torch.load(path, map_location=map_location, weights_only=False)
        else:
            obj = _torch_load_restricted(path, map_location)
    except UnsafeCheckpointError:
        raise
    except _READ_ERRORS as exc:
        kind = "truncated or corrupt" if path.suffix in CKPT_SUFFIXES else "not a torch or safetensors checkpoint"
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({kind}): {str(exc).splitlines()[0]}") from exc
    if isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": dict(obj)}
    if isinstance(obj, Mapping):
        return dict(obj)
    raise CheckpointError(
        f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict or a Lightning checkpoint dict"
    )


def _load_safetensors(path: Path, map_location: Any) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {exc}") from exc
    return {"state_dict": tensors, "metadata": dict(metadata), **_records_from_metadata(metadata, path)}


def _records_from_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The :data:`_RECORDS` of a ``.safetensors`` header, parsed and checked."""
    records: dict[str, Any] = {}
    for key, (valid, kind) in _RECORDS.items():
        name = METADATA_PREFIX + key
        text = metadata.get(name)
        if text is None:
            continue
        if len(text) > MAX_METADATA_JSON:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: its {name!r} metadata has {len(text)} characters, over "
                f"the limit of {MAX_METADATA_JSON}; the file was not written by this project"
            )
        try:
            records[key] = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: its {name!r} metadata is not valid JSON ({one_line(exc)[:200]})"
            ) from exc
        if not valid(records[key]):
            raise CheckpointError(f"checkpoint {str(path)!r}: its {name!r} metadata must be {kind}, got {text[:80]}")
    return records


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Checkpoint records (besides the state dict) a ``.safetensors`` file keeps in its header, as JSON strings under
# ``latesteps.<record>`` (other tools' metadata keys are left alone): the merged config, the window, the training step,
# and whether the EMA weights were copied into the model's (no model_ema.*); with what each must be when read.
_RECORDS = {
    "config": (lambda v: isinstance(v, dict), "a JSON object"),
    "window": (lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(t) for t in v), "[t_min, t_max] (two integers)"),
    "global_step": (lambda v: v is None or (is_int(v) and v >= 0), "an integer >= 0 or null"),
    "ema_folded": (lambda v: isinstance(v, bool), "true or false"),
}


def load_state_dict(path: str | os.PathLike, map_location: Any = "cpu", unsafe: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: its ``state_dict`` entry, or the file itself if it is a state dict."""
    ckpt = load_checkpoint(path, map_location=map_location, unsafe=unsafe)
    sd = ckpt.get("state_dict")
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no 'state_dict' (top-level keys: {sorted(ckpt)[:10]}); "
            "expected a Lightning checkpoint, a bare state dict, or a .safetensors file"
        )
    check_state_dict(sd, repr(str(path)))
    return dict(sd)


def check_state_dict(sd: Mapping[Any, Any], shown: str) -> None:
    """CheckpointError unless every key of ``sd`` is a str and every value a tensor (the loaders match keys by prefix
    and read shapes); ``shown``: the checkpoint, as messages name it."""
    bad = next(((k, v) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {shown}: its state_dict maps {str(bad[0])[:60]!r} ({type(bad[0]).__name__}) to a "
            f"{type(bad[1]).__name__}; a state dict maps parameter names (str) to tensors"
        )


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError when a floating-point tensor of ``sd`` holds NaN or inf: training from it gives NaN losses (a
    NaN ``scale_factor`` too) and saves NaN checkpoints, exit 0; ``source`` names the checkpoint."""
    broken = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(
            f"{source}: {len(broken)} tensors hold NaN or inf (first: {broken[:3]}); it cannot be trained from"
        )


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a checkpoint atomically: ``.safetensors`` keeps ``obj['state_dict']``, string ``metadata`` and the
    :data:`_RECORDS` of ``obj``; other suffixes ``torch.save``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous() for k, v in obj["state_dict"].items()}
        metadata = {str(k): str(v) for k, v in (obj.get("metadata") or {}).items()}
        metadata.update({METADATA_PREFIX + key: json.dumps(obj[key], sort_keys=True) for key in _RECORDS if key in obj})
        payload = _sorted_metadata(save(tensors, metadata=metadata))
        atomic_write_bytes(path, lambda fh: fh.write(payload))
    else:
        atomic_write_bytes(path, lambda fh: torch.save(dict(obj), fh))


def _sorted_metadata(payload: bytes) -> bytes:
    """``payload`` (a ``.safetensors`` file) with its ``__metadata__`` keys sorted: safetensors writes them in hash-map
    order, so the same weights would get another sha256 each run.  The header keeps its length (space-padded)."""
    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + size])
    metadata = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode()
    if len(text) > size:  # never seen (the same keys, compact); the unsorted file is still a valid one
        return payload
    return payload[:8] + text.ljust(size) + payload[8 + size :]


def has_ema_weights(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` holds EMA weights: ``model_ema.*`` entries beyond :data:`EMA_SCALAR_KEYS`."""
    return any(k.startswith("model_ema.") and k not in EMA_SCALAR_KEYS for k in state_dict)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys that start with ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def drop_keys(state_dict: Mapping[str, Any], ignore_prefixes: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Remove keys starting with any of ``ignore_prefixes``; returns ``(kept, dropped_keys)``."""
    prefixes = tuple(ignore_prefixes)
    kept = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    return kept, [k for k in state_dict if k not in kept]


def check_weights_fit(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> tuple[list[str], list[str]]:
    """Refuse, without loading anything, a ``state_dict`` whose shapes differ from ``module``'s or that shares no key
    with it (the wrong kind of checkpoint); returns ``(missing, unexpected)`` keys.  Only shapes are read, so
    ``module`` may live on the ``meta`` device."""
    own = module.state_dict()
    bad = [k for k, v in state_dict.items() if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if bad:
        first = "; ".join(f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}" for k in bad[:5])
        raise CheckpointError(
            f"{source} does not fit {type(module).__name__}: {len(bad)} tensors differ in shape ({first}). "
            "The config and the checkpoint describe different architectures; use the config saved with the checkpoint."
        )
    if state_dict and own and not set(state_dict) & set(own):
        theirs = sorted({k.split(".", 1)[0] for k in state_dict})[:5]
        ours = sorted({k.split(".", 1)[0] for k in own})[:5]
        raise CheckpointError(
            f"{source} lacks all {len(own)} weights of {type(module).__name__} (no key in common): it is the wrong kind "
            f"of checkpoint for this model (its keys begin with {theirs}, the model's with {ours})"
        )
    return [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]


def load_weights(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = False, source: str = "checkpoint"
) -> tuple[list[str], list[str]]:
    """Load ``state_dict`` into ``module`` after :func:`check_weights_fit`; returns ``(missing, unexpected)``, which
    are an error when ``strict`` and a logged note otherwise."""
    check_weights_fit(module, state_dict, source)
    result = module.load_state_dict(dict(state_dict), strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} does not match {type(module).__name__} key-for-key: {len(missing)} missing "
            f"(first: {missing[:5]}), {len(unexpected)} unexpected (first: {unexpected[:5]})"
        )
    if missing:
        logger.info("%s: %d missing keys (first: %s)", source, len(missing), missing[:5])
    if unexpected:
        logger.info("%s: %d unexpected keys (first: %s)", source, len(unexpected), unexpected[:5])
    return missing, unexpected


def require_weights(missing: Iterable[str], source: str = "checkpoint", optional_prefixes: Iterable[str] = ()) -> None:
    """Refuse ``missing`` keys (of :func:`load_weights` or :func:`check_weights_fit`) outside ``optional_prefixes``:
    the model would run with random weights there."""
    optional = tuple(optional_prefixes)
    needed = [k for k in missing if not (optional and k.startswith(optional))]
    if needed:
        raise CheckpointError(
            f"{source} lacks {len(needed)} weights the model needs (first: {needed[:5]}): it is the wrong "
            "kind (e.g. a first-stage-only checkpoint) or the config describes another model"
        )


def load_autoencoder_weights(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    path: str,
    network_prefixes: tuple[str, ...],
    name: str,
    weights: str,
    question: str,
) -> None:
    """Load a first stage's weights (``state_dict`` already unprefixed) into ``model``: ``loss.*`` keys the model's loss
    lacks or shapes differently are dropped; autoencoder weights (``network_prefixes``) the model lacks, or model
    weights the file lacks, are refused (``name``, ``weights``, ``question``: words of those messages)."""
    own = model.state_dict()
    loss_keys = {k for k in state_dict if k.startswith("loss.") and (k not in own or own[k].shape != state_dict[k].shape)}
    if loss_keys:
        logger.info(
            "%s: dropping %d training-loss keys (loss.*) that this model's loss lacks or shapes differently; "
            "they are not part of the autoencoder",
            path,
            len(loss_keys),
        )
        state_dict = {k: v for k, v in state_dict.items() if k not in loss_keys}
    missing, unexpected = load_weights(model, state_dict, strict=False, source=f"first-stage checkpoint {path!r}")
    extra = [k for k in unexpected if k.startswith(network_prefixes)]
    if extra:
        raise CheckpointError(
            f"first-stage checkpoint {path!r} has {len(extra)} autoencoder weights {name} lacks (first: "
            f"{extra[:5]}): it was trained with another ddconfig (attn_type, attn_resolutions, num_res_blocks, ...); "
            "use the ddconfig it was trained with, or drop the weights on purpose with ignore_keys"
        )
    model_missing = [k for k in missing if not k.startswith("loss.")]
    if model_missing:
        raise CheckpointError(
            f"first-stage checkpoint {path!r} lacks {len(model_missing)} {weights} weights (first: {model_missing[:5]}); "
            f"{question}"
        )
