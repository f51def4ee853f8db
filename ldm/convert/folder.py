"""Reading a diffusers pipeline folder, all of it untrusted: its layout, JSON configs (size-bounded, objects only, no
NaN/Infinity) and weight files (tensors only; safetensors shapes come from the header, checked before any is built).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import load_state_dict, sha256_file
from ldm.convert.common import DiffusersFormatError
from ldm.imageio import format_path
from ldm.util import one_line

MODEL_INDEX = "model_index.json"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MAX_JSON_BYTES = 16 << 20  # a scheduler config with 100k trained betas is ~2 MB
# model_index.json's classes -> the LDM part they are (any *Scheduler is the scheduler)
ROLES = {
    **dict.fromkeys(("UNet2DModel", "UNet2DConditionModel"), "unet"),
    **dict.fromkeys(("VQModel", "AutoencoderKL", "AsymmetricAutoencoderKL", "AutoencoderTiny"), "first_stage"),
}
SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
DEFAULT_COMPONENTS = {"unet": ("unet",), "first_stage": ("vqvae", "vae"), "scheduler": ("scheduler",)}


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with ``model_index.json`` or ``unet/config.json``."""
    root = Path(path)
    return root.is_dir() and ((root / MODEL_INDEX).is_file() or (root / "unet" / CONFIG_NAME).is_file())


def read_json(path: Path, shown: str) -> dict[str, Any]:
    """A JSON object from an untrusted file (at most :data:`MAX_JSON_BYTES`; NaN/Infinity refused)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    if not path.is_file():
        raise DiffusersFormatError(f"{shown} is missing (or not a file)")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise DiffusersFormatError(f"{shown} is {size} bytes; a config is at most {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DiffusersFormatError(f"{shown} is not valid JSON: {one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise DiffusersFormatError(f"{shown} holds a JSON {type(data).__name__}, not an object")
    return data


class WeightFile:
    """The floating-point tensors of one component: ``shapes`` (``{name: shape}``) first, then :meth:`tensors`.
    ``.safetensors`` shapes come from the header (nothing allocated); a ``.bin`` is unpickled by
    :func:`ldm.checkpoint.load_state_dict` (tensors only unless ``unsafe``).  Names where ``skip(name)`` are left unread.
    """

    def __init__(self, path: Path, shown: str, unsafe: bool, skip: Callable[[str], bool]):
        self.path, self.shown, self.skip = path, shown, skip
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._tensors: dict[str, torch.Tensor] | None = None
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as fh:
                    for name in fh.keys():
                        if not skip(name):
                            piece = fh.get_slice(name)
                            self._add(name, piece.get_dtype(), piece.get_dtype() in SAFETENSORS_FLOATS, piece.get_shape())
            except (SafetensorError, OSError, ValueError) as exc:
                raise DiffusersFormatError(f"{shown} is not a readable safetensors file: {one_line(exc)}") from exc
        else:
            tensors = {k: v for k, v in load_state_dict(path, unsafe=unsafe).items() if not skip(str(k))}
            for name, value in tensors.items():
                if not isinstance(value, torch.Tensor):
                    raise DiffusersFormatError(f"{shown}: entry {name!r} is a {type(value).__name__}, not a tensor")
                self._add(name, str(value.dtype), value.is_floating_point(), value.shape)
            self._tensors = {str(k): v for k, v in tensors.items()}

    def _add(self, name: str, dtype: str, floating: bool, shape: Any) -> None:
        if not floating:
            raise DiffusersFormatError(f"{self.shown}: tensor {name!r} has dtype {dtype}; model weights are floating point")
        self.shapes[str(name)] = tuple(int(s) for s in shape)

    def tensors(self, rename: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """All tensors as float32, keyed by ``rename[name]`` (names absent from ``rename`` keep their name)."""
        if self._tensors is None:
            from safetensors.torch import load_file

            self._tensors = {k: v for k, v in load_file(str(self.path), device="cpu").items() if not self.skip(k)}
        return {rename.get(k, k): v.to(torch.float32) for k, v in self._tensors.items()}


@dataclass
class Component:
    """One sub-folder of the pipeline: its config and weight file (None for a scheduler)."""

    name: str
    config: dict[str, Any]
    config_file: Path
    weights_file: Path | None = None

    def source(self) -> str:
        return f"{self.name}/{self.config_file.name}"


@dataclass
class LDMFolder:
    """A pipeline folder with its configs read (weights not yet); ``read``: the files the conversion reads."""

    root: Path
    unet: Component
    first_stage: Component
    scheduler: Component
    read: list[Path] = field(default_factory=list)
    text_encoder: Component | None = None

    @property
    def shown(self) -> str:
        return format_path(self.root)

    def digest(self) -> str:
        """sha256 of the lines ``<relative path> NUL <sha256 of the file>\\n`` of the files read, sorted by relative path."""
        digest = hashlib.sha256()
        for path in sorted(set(self.read), key=lambda p: p.relative_to(self.root).as_posix()):
            digest.update(f"{path.relative_to(self.root).as_posix()}\0{sha256_file(path)}\n".encode())
        return digest.hexdigest()


def open_ldm_folder(path: str | os.PathLike) -> LDMFolder:
    """Read the configs of a diffusers LDM folder's UNet, first stage and scheduler (found by class in
    ``model_index.json``, else by the names ``unet``, ``vqvae`` or ``vae``, ``scheduler``); a ``DiffusersFormatError``
    refuses a missing part, unreadable JSON or a conditioning component."""
    root, shown = Path(path), format_path(path)
    if not root.is_dir():
        raise DiffusersFormatError(f"{shown} is not a folder")
    names = _component_names(root, shown)
    read: list[Path] = [root / MODEL_INDEX] if (root / MODEL_INDEX).is_file() else []
    parts = {
        role: _read_component(root, shown, name, cls, None if role == "scheduler" else WEIGHT_NAMES, read)
        for role, (name, cls) in names.items()
    }
    return LDMFolder(root, parts["unet"], parts["first_stage"], parts["scheduler"], read)


def _read_component(
    root: Path, shown: str, name: str, cls: str | None, weight_names: tuple[str, ...] | None, read: list[Path]
) -> Component:
    """Sub-folder ``name``: its config (``_class_name`` defaulting to ``cls``) and the first of ``weight_names`` it
    holds (None: a scheduler); the files are appended to ``read``."""
    config_file = root / name / (SCHEDULER_CONFIG if weight_names is None else CONFIG_NAME)
    config = read_json(config_file, f"{shown}/{name}/{config_file.name}")
    if cls is not None:
        config.setdefault("_class_name", cls)
    read.append(config_file)
    weights = None
    if weight_names is not None:  # the config was read, so the sub-folder exists
        weights = next((root / name / w for w in weight_names if (root / name / w).is_file()), None)
        if weights is None and any((root / name / f"{w}.index.json").exists() for w in weight_names):
            raise DiffusersFormatError(
                f"{shown}/{name}/ holds sharded weights (*.index.json), which are not supported; save the "
                "model unsharded (save_pretrained(..., max_shard_size='100GB'))"
            )
        if weights is None:
            raise DiffusersFormatError(f"{shown}/{name}/ holds no {' or '.join(weight_names)}")
        read.append(weights)
    return Component(name, config, config_file, weights)


def _component_names(root: Path, shown: str) -> dict[str, tuple[str, str | None]]:
    """``{role: (sub-folder, class from model_index.json or None)}`` for the roles unet, first_stage, scheduler."""
    index_file = root / MODEL_INDEX
    if not index_file.is_file():
        found = {}
        for role, candidates in DEFAULT_COMPONENTS.items():
            name = next((c for c in candidates if (root / c).is_dir()), None)
            if name is None:
                raise DiffusersFormatError(
                    f"{shown} has no {' or '.join(c + '/' for c in candidates)} sub-folder "
                    f"(and no {MODEL_INDEX} naming the pipeline's parts)"
                )
            found[role] = (name, None)
        return found
    index = read_json(index_file, f"{shown}/{MODEL_INDEX}")
    found = {}
    for name, entry in index.items():
        if name.startswith("_") or entry is None or (isinstance(entry, list) and entry[-1:] == [None]):
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise DiffusersFormatError(f"{shown}/{MODEL_INDEX}: entry {name!r} must be [library, class], got {entry!r}")
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise DiffusersFormatError(f"{shown}/{MODEL_INDEX}: component name {name!r} is not a plain folder name")
        cls = entry[1]
        role = ROLES.get(cls, "scheduler" if cls.endswith("Scheduler") else None)
        if role is None:
            raise DiffusersFormatError(
                f"{shown}/{MODEL_INDEX}: component {name!r} ({cls}) is not part of an unconditional LDM (UNet2DModel + "
                "VQModel + scheduler); conditional pipelines are not supported"
            )
        if role in found:
            raise DiffusersFormatError(
                f"{shown}/{MODEL_INDEX}: components {found[role][0]!r} and {name!r} both look like the {role.replace('_', ' ')}"
            )
        found[role] = (name, cls)
    missing = [role.replace("_", " ") for role in DEFAULT_COMPONENTS if role not in found]
    if missing:
        raise DiffusersFormatError(
            f"{shown}/{MODEL_INDEX} names no {', '.join(missing)} (an LDM folder has a UNet2DModel, a VQModel and a scheduler)"
        )
    return found


# ------------------------------------------------------------------------------------------------ Stable Diffusion
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_IGNORED = ("safety_checker", "feature_extractor", "image_encoder")  # not part of the denoiser; never read
TEXT_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
MAX_TOKENIZER_BYTES = 64 << 20  # CLIP's vocab.json + merges.txt + tokenizer.json are ~5 MB
_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "CLIPTokenizerFast", "T5EncoderModel")


def is_sd_folder(path: str | os.PathLike) -> bool:
    """Whether a diffusers folder is text-to-image (a text encoder or tokenizer in ``model_index.json``, or without
    one a ``text_encoder/`` sub-folder); unreadable JSON answers False (the LDM reader then names the problem)."""
    root = Path(path)
    index = root / MODEL_INDEX
    if not index.is_file():
        return (root / "text_encoder").is_dir()
    try:
        data = read_json(index, MODEL_INDEX)
    except DiffusersFormatError:
        return False
    if str(data.get("_class_name", "")).startswith("StableDiffusion"):
        return True
    return any(isinstance(v, list) and len(v) == 2 and v[1] in _TEXT_CLASSES for v in data.values())


def open_sd_folder(path: str | os.PathLike, supported: str) -> LDMFolder:
    """Read the configs of a Stable Diffusion folder; weights are not read yet.  Refuses a path that is not a folder
    (:func:`sd_to_checkpoint` is public), a missing part, unreadable JSON, a tokenizer without its files (or over
    :data:`MAX_TOKENIZER_BYTES`) or a component SD v1 lacks; ``supported`` ends the message refusing other pipelines."""
    root, shown = Path(path), format_path(path)
    if not root.is_dir():
        raise DiffusersFormatError(f"{shown} is not a folder")
    classes: dict[str, str | None] = {name: None for name in SD_PARTS}
    read: list[Path] = []
    if (root / MODEL_INDEX).is_file():
        read.append(root / MODEL_INDEX)
        index = read_json(root / MODEL_INDEX, f"{shown}/{MODEL_INDEX}")
        for name, entry in index.items():
            if name.startswith("_") or isinstance(entry, bool) or entry is None:
                continue  # metadata, requires_safety_checker
            if not (isinstance(entry, list) and len(entry) == 2):
                raise DiffusersFormatError(f"{shown}/{MODEL_INDEX}: entry {name!r} must be [library, class], got {entry!r}")
            if entry[-1] is None or name in SD_IGNORED:
                continue
            if name not in SD_PARTS:
                raise DiffusersFormatError(
                    f"{shown}/{MODEL_INDEX}: component {name!r} ({entry[1]}) is not part of a "
                    f"Stable Diffusion v1 pipeline; {supported}"
                )
            classes[name] = str(entry[1])
    weight_names = {"unet": WEIGHT_NAMES, "vae": WEIGHT_NAMES, "text_encoder": TEXT_WEIGHT_NAMES, "scheduler": None}
    parts = {name: _read_component(root, shown, name, classes[name], names, read) for name, names in weight_names.items()}
    tokenizer = root / "tokenizer"
    files = [tokenizer / n for n in TOKENIZER_FILES if (tokenizer / n).is_file()]
    names = {f.name for f in files}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise DiffusersFormatError(
            f"{shown}/tokenizer/ holds no CLIP tokenizer (vocab.json and merges.txt, or "
            "tokenizer.json); save it with CLIPTokenizer.save_pretrained"
        )
    size = sum(f.stat().st_size for f in files)
    if size > MAX_TOKENIZER_BYTES:
        raise DiffusersFormatError(
            f"{shown}/tokenizer/ holds {size} bytes; a CLIP tokenizer is at most {MAX_TOKENIZER_BYTES} bytes"
        )
    read += files
    return LDMFolder(root, parts["unet"], parts["vae"], parts["scheduler"], read, parts["text_encoder"])
