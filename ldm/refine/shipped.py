"""Weights shipped with the repository by short name (``--ckpt demo``: the two photo experts in ``weights/demo/``, each
file checked against its sha256 before it is read), and the export that writes such files (:func:`export_expert`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from ldm.convert.from_diffusers import UNET_PREFIX  # the parameters an export may store in a smaller dtype
from ldm.imageio import format_path
from ldm.refine.loading import _embedded_model_config, _inference_config, load_expert

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
EXPORT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ShippedWeights:
    """Experts shipped under :data:`WEIGHTS_DIR`: ``files`` are ``(path relative to WEIGHTS_DIR, sha256)`` in the
    order a refiner takes them."""

    name: str
    files: tuple[tuple[str, str], ...]
    what: str


SHIPPED: dict[str, ShippedWeights] = {
    "demo": ShippedWeights(
        "demo",
        (
            ("demo/latesteps_500_750.safetensors", "72a806bc3c92ca4458c1f70c9ac282f5c5d2ae3d11d645f2a95cb63659db0aef"),
            ("demo/latesteps_750_1000.safetensors", "41bf8d1fd2a3c87650eb1e5492836f160786acbfc6ffc866a3b475ef1a793c05"),
        ),
        "photo experts of configs/quickstart/ at UNet width 64 (README: Demo weights)",
    ),
}


def shipped_files(name: str, root: Path | None = None) -> list[Path]:
    """The files of the shipped weights ``name``, each checked against its sha256.  CheckpointError for an unknown
    name, a missing file (an installation without the repository's ``weights/``) or a damaged one."""
    if name not in SHIPPED:
        raise CheckpointError(f"no shipped weights are called {name!r}; known: {', '.join(sorted(SHIPPED))}")
    root = WEIGHTS_DIR if root is None else root
    paths = []
    for relative, digest in SHIPPED[name].files:
        path = root / relative
        if not path.is_file():
            raise CheckpointError(
                f"the {name!r} weights are not in this installation: {format_path(path)} is missing. They ship in the "
                "repository's weights/ folder: run from a clone (pip install -e .), or pass the files with --ckpt"
            )
        found = sha256_file(path)
        if found != digest:
            raise CheckpointError(
                f"{format_path(path)} is damaged: its sha256 is {found[:16]}..., the {name!r} weights have "
                f"{digest[:16]}...; restore it with: git checkout -- {format_path(path)}"
            )
        paths.append(path)
    return paths


def expand_names(paths: Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """``paths`` with each short name of :data:`SHIPPED` (e.g. ``"demo"``) replaced by its checked files.  A path that
    exists wins over a name (with a warning): ``./demo`` always means the file or folder."""
    expanded: list[str | os.PathLike] = []
    for path in paths:
        if isinstance(path, str) and path in SHIPPED:
            if os.path.exists(path):
                logger.warning(
                    "%r is both a path here and the name of shipped weights; using the path (the shipped weights are %s)",
                    path,
                    format_path(WEIGHTS_DIR / path),
                )
            else:
                expanded.extend(shipped_files(path))
                continue
        expanded.append(path)
    return expanded


def export_expert(
    source: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp16", trust_config: bool = False
) -> dict[str, object]:
    """Write the inference half of the ``main.py`` checkpoint ``source`` to ``out`` (``.safetensors``, atomically), which
    :func:`load_expert` reads like its source: the EMA weights (when there are some) in place of the training weights,
    no optimizer state, the config rebuilt for inference with the window and training step in the header, the UNet's
    parameters stored as ``dtype`` (a key of :data:`EXPORT_DTYPES`; loading casts them back).  Returns ``{"out",
    "window", "global_step", "ema", "parameters", "bytes", "sha256"}``.  ``trust_config``: let the checkpoint's config
    build classes outside the allow-list (loading the export then needs it too).

    Raises:
        CheckpointError / ConfigError: ``source`` is not a loadable expert (see :func:`load_expert`).
    """
    ckpt = load_checkpoint(source)  # first: without an embedded config, load_expert's advice (--config) is not ours
    model_cfg = _embedded_model_config(ckpt, format_path(source))
    if model_cfg is None:
        raise CheckpointError(
            f"checkpoint {format_path(source)} holds no model config; only checkpoints written by "
            "main.py (or exports of them) can be exported"
        )
    expert, info = load_expert(source, ema=True, trust_config=trust_config)
    state = expert.model.state_dict()
    parameters = {name for name, _ in expert.model.named_parameters()}
    cast = EXPORT_DTYPES[dtype]
    # only the UNet's: the first stage stays as trained, so an export still chains with the checkpoints (and exports)
    # of its siblings, which must share one first stage bit for bit
    state = {
        k: v.to(cast) if k in parameters and k.startswith(UNET_PREFIX) and v.is_floating_point() else v
        for k, v in state.items()
    }
    save_checkpoint(
        {
            "state_dict": state,
            "config": {"model": _inference_config(model_cfg, use_ema=False)},
            "window": list(info.window),
            "global_step": info.global_step,
            "ema_folded": info.ema,
            "metadata": {"format": "latesteps expert export", "source_sha256": info.sha256, "dtype": dtype},
        },
        out,
    )
    return {
        "out": format_path(out),
        "window": list(info.window),
        "global_step": info.global_step,
        "ema": info.ema,
        "parameters": sum(v.numel() for k, v in state.items() if k in parameters),
        "bytes": os.path.getsize(out),
        "sha256": sha256_file(out),
    }
