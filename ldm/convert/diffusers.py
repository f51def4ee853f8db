"""Hugging Face diffusers folders (unconditional ``LDMPipeline`` and Stable Diffusion v1) <-> this project's
checkpoints and experts; the reading half is :mod:`ldm.convert.from_diffusers`.
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
from ldm.convert.folder import WEIGHT_NAMES, is_diffusers_folder
from ldm.convert.from_diffusers import diffusers_to_checkpoint, load_diffusers_expert
from ldm.convert.schedule import scheduler_config_from_model
from ldm.convert.sd_map import KLLayout, cond_unet_layout_from_model, kl_layout_from_model, text_param_maps
from ldm.convert.unet_map import WINDOW_KEY, UNetLayout, unet_layout_from_model
from ldm.convert.vq_map import VQLayout, vq_layout_from_model
from ldm.imageio import format_path
from ldm.models.diffusion.experts import CheckpointInfo
from ldm.util import atomic_write_bytes

__all__ = [
    "checkpoint_to_diffusers",
    "diffusers_to_checkpoint",
    "export_diffusers",
    "is_diffusers_folder",
    "load_diffusers_expert",
]

logger = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these maps were written and tested against
WEIGHTS_NAME = WEIGHT_NAMES[0]  # diffusion_pytorch_model.safetensors


# ------------------------------------------------------------------------------------------------------------ export
def export_diffusers(model: Any, out_dir: str | os.PathLike) -> Path:
    """Write a ``LatentDiffusion`` / ``LateStepsLatentDiffusion`` as the new diffusers folder ``out_dir`` (complete or
    absent; ``FileExistsError`` if it exists): an unconditional VQ LDM as ``LDMPipeline``, an SD v1-shaped one
    (``FrozenCLIPEmbedder``) as ``StableDiffusionPipeline`` (no safety checker); ``DiffusersFormatError`` for others."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{format_path(out)} already exists; choose a new folder name (nothing was written)")
    conditioning_key = getattr(model.model, "conditioning_key", None)
    if conditioning_key == "crossattn" and isinstance(getattr(model, "cond_stage_model", None), FrozenCLIPEmbedder):
        return _export_sd(model, out)
    if conditioning_key is not None:
        raise DiffusersFormatError(
            f"the model is conditional (conditioning_key={conditioning_key!r}); diffusers' LDMPipeline "
            "layout holds unconditional LDMs only"
        )
    unet = unet_layout_from_model(model.model.diffusion_model)
    vq = vq_layout_from_model(model.first_stage_model)
    index = {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "VQModel"]}
    return _export(model, out, unet, ("vqvae", vq), index)


def _export_sd(model: Any, out: Path) -> Path:
    cond = model.cond_stage_model
    if cond.layer != "last":
        raise DiffusersFormatError(
            f"the text encoder is read at layer={cond.layer!r}; diffusers' Stable Diffusion "
            "pipeline uses the last hidden state (layer='last')"
        )
    unet = cond_unet_layout_from_model(model.model.diffusion_model)
    kl = kl_layout_from_model(model.first_stage_model)
    # the text model's options; "_name_or_path" (where it was loaded from) and the transformers version are not
    text_config = {
        k: v for k, v in cond.transformer.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
    }
    text_config["architectures"] = ["CLIPTextModel"]
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", type(cond.tokenizer).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    text_files = {
        "text_encoder/config.json": (json.dumps(text_config, indent=2, sort_keys=True) + "\n").encode(),
        "text_encoder/model.safetensors": _export_weights(cond, text_param_maps(list(cond.state_dict())), "text-encoder"),
    }
    return _export(model, out, unet, ("vae", kl), index, text_files, cond.tokenizer)


def _export(
    model: Any,
    out: Path,
    unet: UNetLayout,
    first_stage: tuple[str, VQLayout | KLLayout],
    index: dict[str, Any],
    text_files: Mapping[str, bytes] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write the folder (the UNet config with the model's window unless full-range) into a hidden temp folder beside
    ``out``, renamed to ``out`` at the end (a reader sees no folder or the complete one)."""
    num_timesteps = int(model.num_timesteps)
    window = tuple(int(v) for v in model.window())
    unet_config = unet.diffusers_config()
    if window != (0, num_timesteps):
        unet_config[WINDOW_KEY] = list(window)
    name, layout = first_stage
    files = {
        "model_index.json": _json({**index, "scheduler": ["diffusers", "DDIMScheduler"]}),
        "scheduler/scheduler_config.json": _json(scheduler_config_from_model(model)),
        "unet/config.json": _json(unet_config),
        f"unet/{WEIGHTS_NAME}": _export_weights(model.model.diffusion_model, unet.param_maps(), "UNet"),
        f"{name}/config.json": _json(layout.diffusers_config(float(model.scale_factor))),
        f"{name}/{WEIGHTS_NAME}": _export_weights(model.first_stage_model, layout.param_maps(), "first-stage"),
        **(text_files or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for rel, payload in files.items():
            atomic_write_bytes(tmp / rel, payload)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if os.path.lexists(out):  # made while this one was written: os.rename would replace an empty folder silently
            raise FileExistsError(f"{format_path(out)} already exists; choose a new folder name (nothing was written)")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    what = "diffusers folder" if tokenizer is None else "diffusers Stable Diffusion folder"
    logger.info("wrote %s %s (window %s of T=%d)", what, format_path(out), list(window), num_timesteps)
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


def checkpoint_to_diffusers(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Any = None,
    ema: bool = True,
    trust_config: bool = False,
    unsafe_load: bool = False,
) -> tuple[Path, CheckpointInfo]:
    """Load an expert checkpoint with :func:`ldm.refine.loading.load_expert` (EMA weights by default) and write it
    with :func:`export_diffusers`; returns ``(out_dir, CheckpointInfo)``.  Raises ``CheckpointError`` / ``ConfigError``
    (cannot be loaded), ``DiffusersFormatError`` (cannot be exported), ``FileExistsError`` (``out_dir`` exists)."""
    from ldm.refine.loading import load_expert  # lazy: importing ldm.refine loads the Refiner

    if Path(out_dir).exists():  # before the expert is loaded
        raise FileExistsError(f"{format_path(out_dir)} already exists; choose a new folder name (nothing was written)")
    expert, info = load_expert(path, config, ema=ema, trust_config=trust_config, unsafe_load=unsafe_load)
    return export_diffusers(expert.model, out_dir), info
