"""Hugging Face diffusers LDM folders <-> this project's checkpoints and experts.

A diffusers LDM folder (``LDMPipeline`` layout, e.g. ``CompVis/ldm-celebahq-256``) holds ``unet/`` (``UNet2DModel``),
``vqvae/`` (``VQModel``), ``scheduler/`` (``DDIMScheduler`` or ``DDPMScheduler`` config) and ``model_index.json``.

* :func:`diffusers_to_checkpoint` converts one into ``{"state_dict", "config": {"model": ...}}`` as ``main.py`` writes
  it: ``model.diffusion_model.*``, ``first_stage_model.*`` and the schedule buffers, with an embedded
  ``ldm.models.diffusion.ddpm.LatentDiffusion`` config (window ``[0, T)``), or a ``LateStepsLatentDiffusion`` one
  (plus ``checkpoint["window"]``) when the UNet config records a window.  It loads as a full-range expert
  (:func:`ldm.refine.loading.load_expert`) and as the init of a window model (``model.params.ckpt_path=``).
* :func:`load_diffusers_expert` does that in memory and builds the expert (``Refiner.from_checkpoints`` and
  ``scripts/refine.py --ckpt <folder>`` come here through ``load_expert``).
* :func:`export_diffusers` / :func:`checkpoint_to_diffusers` write a model (a window expert) as such a folder, which
  ``UNet2DModel`` / ``VQModel`` / ``DDIMScheduler.from_pretrained`` and ``LDMPipeline`` load.  The window is recorded
  in ``unet/config.json`` as ``"_latesteps_window": [t_min, t_max]`` (diffusers keeps ``_`` keys as metadata and
  passes nothing to the constructor); the scheduler config reproduces this project's DDIM.

``scale_factor`` <-> the VQModel's ``scaling_factor``: exported folders always write it.  An imported folder without
the key gets 1.0, the value of CompVis' VQ LDMs (diffusers' default 0.18215 belongs to Stable Diffusion's KL VAE; a
wrong value is what makes ``LDMPipeline`` output garbage with ``ldm-celebahq-256``, diffusers issue 6725), unless
``scale_factor`` is given.  Config options and key maps: :mod:`ldm.convert.unet_map`, :mod:`ldm.convert.vq_map`,
:mod:`ldm.convert.schedule`.  Nothing here imports diffusers or downloads anything.  The reading half
(:func:`diffusers_to_checkpoint`, :func:`load_diffusers_expert`) lives in :mod:`ldm.convert.from_diffusers`, which
``load_expert`` imports; this module re-exports it and adds the writing half, which loads with ``load_expert``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.convert.common import DiffusersFormatError, ParamMap, check_complete
from ldm.convert.folder import is_diffusers_folder
from ldm.convert.from_diffusers import (  # the reading half, re-exported here
    DIFFUSERS_VERSION,
    FIRST_STAGE_PREFIX,  # noqa: F401
    LATESTEPS_TARGET,  # noqa: F401
    LDM_TARGET,  # noqa: F401
    UNET_PREFIX,  # noqa: F401
    WEIGHTS_NAME,
    diffusers_to_checkpoint,
    load_diffusers_expert,
    model_config,  # noqa: F401
)
from ldm.convert.schedule import scheduler_config_from_model
from ldm.convert.unet_map import WINDOW_KEY, unet_layout_from_model
from ldm.convert.vq_map import vq_layout_from_model
from ldm.imageio import format_path
from ldm.models.diffusion.experts import CheckpointInfo
from ldm.models.diffusion.latesteps import validate_window
from ldm.util import atomic_write_bytes

__all__ = [
    "checkpoint_to_diffusers",
    "diffusers_to_checkpoint",
    "export_diffusers",
    "is_diffusers_folder",
    "load_diffusers_expert",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------ export
def export_diffusers(model: Any, out_dir: str | os.PathLike, window: tuple[int, int] | None = None) -> Path:
    """Write an unconditional LDM (its weights as they are now) as a diffusers LDM folder, atomically.

    Args:
        model: a ``LatentDiffusion`` / ``LateStepsLatentDiffusion`` with a CompVis ``UNetModel`` and a VQ first stage.
        out_dir: the folder to create (must not exist); it appears complete or not at all.
        window: ``[t_min, t_max)`` to record (default ``model.window()``); a full-range window is not recorded.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DiffusersFormatError: a model diffusers' ``UNet2DModel`` / ``VQModel`` / ``DDIMScheduler`` cannot hold.
        FileExistsError: ``out_dir`` exists.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{format_path(out)} already exists; choose a new folder name (nothing was written)")
    if getattr(model.model, "conditioning_key", None) is not None:
        raise DiffusersFormatError(
            f"the model is conditional (conditioning_key={model.model.conditioning_key!r}); diffusers' LDMPipeline "
            "layout holds unconditional LDMs only"
        )
    unet = unet_layout_from_model(model.model.diffusion_model)
    vq = vq_layout_from_model(model.first_stage_model)
    num_timesteps = int(model.num_timesteps)
    window = validate_window(*[int(v) for v in (window if window is not None else model.window())], num_timesteps)
    unet_config = unet.diffusers_config()
    if window != (0, num_timesteps):
        unet_config[WINDOW_KEY] = list(window)
    files: dict[str, bytes] = {
        "model_index.json": _json({
            "_class_name": "LDMPipeline",
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
            "vqvae": ["diffusers", "VQModel"],
        }),
        "scheduler/scheduler_config.json": _json(scheduler_config_from_model(model)),
        "unet/config.json": _json(unet_config),
        f"unet/{WEIGHTS_NAME}": _export_weights(model.model.diffusion_model, unet.param_maps(), "UNet"),
        "vqvae/config.json": _json(vq.diffusers_config(float(model.scale_factor))),
        f"vqvae/{WEIGHTS_NAME}": _export_weights(model.first_stage_model, vq.param_maps(), "first-stage"),
    }
    _write_folder(out, files)
    logger.info("wrote diffusers folder %s (window %s of T=%d)", format_path(out), list(window), num_timesteps)
    return out


def _export_weights(module: torch.nn.Module, maps: list[ParamMap], what: str) -> bytes:
    from safetensors.torch import save

    own = {k: v for k, v in module.state_dict().items() if not k.startswith("loss.")}
    check_complete(maps, own, what)
    tensors = {}
    for m in maps:
        tensors.update(zip(m.diffusers, m.to_diffusers(own[m.ldm].to("cpu", torch.float32))))
    return save(tensors, metadata={"format": "pt"})


def _json(data: Mapping[str, Any]) -> bytes:
    return (json.dumps({**data, "_diffusers_version": DIFFUSERS_VERSION}, indent=2, sort_keys=True) + "\n").encode()


def _write_folder(out: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (relative path -> bytes) into a hidden temp folder beside ``out``, then rename it to ``out``:
    a reader sees no folder or the complete one; on an error the temp folder is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for rel, payload in files.items():
            atomic_write_bytes(tmp / rel, payload)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_to_diffusers(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Any = None,
    ema: bool = True,
    trust_config: bool = False,
    unsafe_load: bool = False,
) -> tuple[Path, CheckpointInfo]:
    """Load an expert checkpoint with :func:`ldm.refine.loading.load_expert` (EMA weights by default) and write it
    with :func:`export_diffusers`, recording its window.  Returns ``(out_dir, CheckpointInfo)``.

    Raises:
        CheckpointError / ConfigError: the checkpoint cannot be loaded; DiffusersFormatError: it cannot be exported;
        FileExistsError: ``out_dir`` exists.
    """
    from ldm.refine.loading import load_expert  # lazy: importing ldm.refine loads the Refiner

    if Path(out_dir).exists():
        raise FileExistsError(f"{format_path(out_dir)} already exists; choose a new folder name (nothing was written)")
    expert, info = load_expert(path, config, ema=ema, trust_config=trust_config, unsafe_load=unsafe_load)
    return export_diffusers(expert.model, out_dir, window=expert.window), info
