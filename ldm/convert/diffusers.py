"""Hugging Face diffusers folders <-> this project's checkpoints and experts.

Reads and writes unconditional LDM folders (``LDMPipeline``: ``unet/`` ``UNet2DModel``, ``vqvae/`` ``VQModel``,
``scheduler/``) and Stable Diffusion v1 folders (``StableDiffusionPipeline``); an expert's window is recorded in
``unet/config.json`` as ``"_latesteps_window": [t_min, t_max]`` (diffusers passes ``_`` keys to no constructor).  The
reading half lives in :mod:`ldm.convert.from_diffusers` (which ``load_expert`` imports) and is re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.convert.common import DiffusersFormatError, ParamMap, check_complete
from ldm.convert.folder import WEIGHT_NAMES, is_diffusers_folder
from ldm.convert.from_diffusers import diffusers_to_checkpoint, load_diffusers_expert
from ldm.convert.schedule import scheduler_config_from_model
from ldm.convert.sd_map import CLIP_PREFIX, cond_unet_layout_from_model, kl_layout_from_model, text_param_maps
from ldm.convert.unet_map import WINDOW_KEY, UNetLayout, unet_layout_from_model
from ldm.convert.vq_map import vq_layout_from_model
from ldm.imageio import format_path
from ldm.models.diffusion.experts import CheckpointInfo
from ldm.models.diffusion.latesteps import validate_window
from ldm.util import atomic_write_bytes

__all__ = [
    "checkpoint_to_diffusers",
    "diffusers_to_checkpoint",
    "export_diffusers",
    "export_sd_diffusers",
    "is_diffusers_folder",
    "load_diffusers_expert",
]

logger = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these maps were written and tested against
WEIGHTS_NAME = WEIGHT_NAMES[0]  # diffusion_pytorch_model.safetensors


# ------------------------------------------------------------------------------------------------------------ export
def export_diffusers(model: Any, out_dir: str | os.PathLike, window: tuple[int, int] | None = None) -> Path:
    """Write an unconditional LDM (its weights as they are now) as a diffusers LDM folder, atomically; an SD v1-shaped
    model (cross-attention on a ``FrozenCLIPEmbedder``) goes to :func:`export_sd_diffusers`.

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
    out = _new_folder(out_dir)
    if _is_sd_shaped(model):
        return export_sd_diffusers(model, out, window)
    if getattr(model.model, "conditioning_key", None) is not None:
        raise DiffusersFormatError(
            f"the model is conditional (conditioning_key={model.model.conditioning_key!r}); diffusers' LDMPipeline "
            "layout holds unconditional LDMs only"
        )
    unet = unet_layout_from_model(model.model.diffusion_model)
    vq = vq_layout_from_model(model.first_stage_model)
    window, denoiser = _denoiser_files(model, unet, window)
    files: dict[str, bytes] = {
        "model_index.json": _json(
            {
                "_class_name": "LDMPipeline",
                "scheduler": ["diffusers", "DDIMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
                "vqvae": ["diffusers", "VQModel"],
            }
        ),
        **denoiser,
        "vqvae/config.json": _json(vq.diffusers_config(float(model.scale_factor))),
        f"vqvae/{WEIGHTS_NAME}": _export_weights(model.first_stage_model, vq.param_maps(), "first-stage"),
    }
    _write_folder(out, files)
    logger.info("wrote diffusers folder %s (window %s of T=%d)", format_path(out), list(window), int(model.num_timesteps))
    return out


def _new_folder(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{format_path(out)} already exists; choose a new folder name (nothing was written)")
    return out


def _denoiser_files(model: Any, unet: UNetLayout, window: tuple[int, int] | None) -> tuple[tuple[int, int], dict[str, bytes]]:
    """The checked window (default ``model.window()``) and the scheduler and UNet files; a full-range window is not
    recorded."""
    num_timesteps = int(model.num_timesteps)
    window = validate_window(*[int(v) for v in (window if window is not None else model.window())], num_timesteps)
    unet_config = unet.diffusers_config()
    if window != (0, num_timesteps):
        unet_config[WINDOW_KEY] = list(window)
    return window, {
        "scheduler/scheduler_config.json": _json(scheduler_config_from_model(model)),
        "unet/config.json": _json(unet_config),
        f"unet/{WEIGHTS_NAME}": _export_weights(model.model.diffusion_model, unet.param_maps(), "UNet"),
    }


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


def _write_folder(out: Path, files: Mapping[str, bytes], fill: Callable[[Path], None] | None = None) -> None:
    """Write ``files`` (relative path -> bytes) into a hidden temp folder beside ``out`` (and let ``fill(tmp)`` write
    more), then rename it to ``out``: a reader sees no folder or the complete one; on an error the temp folder is
    removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for rel, payload in files.items():
            atomic_write_bytes(tmp / rel, payload)
        if fill is not None:
            fill(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_sd_shaped(model: Any) -> bool:
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    cond = getattr(model, "cond_stage_model", None)
    return getattr(model.model, "conditioning_key", None) == "crossattn" and isinstance(cond, FrozenCLIPEmbedder)


def export_sd_diffusers(model: Any, out_dir: str | os.PathLike, window: tuple[int, int] | None = None) -> Path:
    """Write an SD v1-shaped ``LatentDiffusion`` (cross-attention UNet, ``AutoencoderKL``, ``FrozenCLIPEmbedder``) as
    a diffusers ``StableDiffusionPipeline`` folder (no safety checker), atomically; arguments as
    :func:`export_diffusers`.

    Raises:
        DiffusersFormatError: a model diffusers' SD pipeline cannot hold (see :mod:`ldm.convert.sd_map`), or a text
            encoder read at another layer than the last (``layer`` != ``"last"``, as SD 2's penultimate layer).
        FileExistsError: ``out_dir`` exists.
    """
    out = _new_folder(out_dir)
    cond = model.cond_stage_model
    if cond.layer != "last":
        raise DiffusersFormatError(
            f"the text encoder is read at layer={cond.layer!r}; diffusers' Stable Diffusion "
            "pipeline uses the last hidden state (layer='last')"
        )
    unet = cond_unet_layout_from_model(model.model.diffusion_model)
    kl = kl_layout_from_model(model.first_stage_model)
    window, denoiser = _denoiser_files(model, unet, window)
    # the text model's options; "_name_or_path" (where it was loaded from) and the transformers version are not
    text_config = {
        k: v for k, v in cond.transformer.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
    }
    text_config["architectures"] = ["CLIPTextModel"]
    text_keys = [k for k in cond.state_dict() if k.startswith(CLIP_PREFIX)]
    tokenizer = cond.tokenizer
    files: dict[str, bytes] = {
        "model_index.json": _json(
            {
                "_class_name": "StableDiffusionPipeline",
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", type(tokenizer).__name__],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        ),
        **denoiser,
        "vae/config.json": _json(kl.diffusers_config(float(model.scale_factor))),
        f"vae/{WEIGHTS_NAME}": _export_weights(model.first_stage_model, kl.param_maps(), "first-stage"),
        "text_encoder/config.json": (json.dumps(text_config, indent=2, sort_keys=True) + "\n").encode(),
        "text_encoder/model.safetensors": _export_weights(cond, text_param_maps(text_keys), "text-encoder"),
    }
    _write_folder(out, files, fill=lambda tmp: tokenizer.save_pretrained(str(tmp / "tokenizer")))
    shown, steps = format_path(out), int(model.num_timesteps)
    logger.info("wrote diffusers Stable Diffusion folder %s (window %s of T=%d)", shown, list(window), steps)
    return out


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
