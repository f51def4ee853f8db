"""A diffusers Stable Diffusion v1 folder (``StableDiffusionPipeline``: ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, any ``scheduler/`` that defines the betas) -> the checkpoint dict ``main.py`` writes for
``configs/stable-diffusion/v1-inference.yaml``'s classes, in memory.  Key maps and refusals: :mod:`ldm.convert.sd_map`.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

from ldm.convert.common import DiffusersFormatError
from ldm.convert.folder import SDFolder, open_sd_folder
from ldm.convert.importing import checked_window, converted_checkpoint, target_config
from ldm.convert.schedule import SD_SCHEDULER_CLASSES, ScheduleSpec, schedule_from_config
from ldm.convert.sd_map import (
    CLIP_TARGET,
    KL_DEFAULTS,
    KL_TARGET,
    SUPPORTED,
    CrossAttnUNetLayout,
    KLLayout,
    check_text_config,
    cond_unet_layout_from_config,
    kl_layout_from_config,
)
from ldm.convert.unet_map import UNET_TARGET

__all__ = ["sd_model_config", "sd_to_checkpoint"]

SD_MAX_LENGTH = 77  # SD v1's prompt length in tokens (FrozenCLIPEmbedder's default)


def sd_to_checkpoint(
    folder: str | os.PathLike,
    scale_factor: float | None = None,
    unsafe_load: bool = False,
    clip_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Convert a diffusers Stable Diffusion v1 folder into a checkpoint dict, all in memory.

    Args:
        folder: the pipeline folder.
        scale_factor: the latent scale (overrides ``vae/config.json``'s ``scaling_factor``; default: that, else
            0.18215, diffusers' and SD v1's).
        unsafe_load: unpickle arbitrary objects in ``.bin`` weight files (only for folders you trust).
        clip_dir: the local folder the config's text encoder reads its tokenizer and config from (its
            ``cond_stage_config.params.version``, an absolute path; default: ``folder``, which must then stay where it
            is).  The text weights come from the checkpoint.

    Returns:
        ``{"state_dict", "config": {"model": ...}, "converted_from": {"format", "folder", "sha256"}}`` (+ ``"window"``).

    Raises:
        DiffusersFormatError: a folder that is not an SD v1 pipeline this project can represent (SD 2.x, SDXL,
            v-prediction, inpainting, ...), bad JSON, or weights that do not match the configs; one line.
    """
    sd = open_sd_folder(folder, SUPPORTED)
    assert sd.text_encoder is not None
    where = {c.name: f"{sd.shown}/{c.source()}" for c in (sd.unet, sd.first_stage, sd.scheduler, sd.text_encoder)}
    unet, window = cond_unet_layout_from_config(sd.unet.config, where["unet"])
    kl = kl_layout_from_config(sd.first_stage.config, where["vae"])
    schedule = schedule_from_config(sd.scheduler.config, where["scheduler"], SD_SCHEDULER_CLASSES)
    check_text_config(sd.text_encoder.config, where["text_encoder"])
    if unet.image_size == 0:  # sample_size: null
        unet = replace(unet, image_size=max(1, kl.resolution // 2 ** (len(kl.ch_mult) - 1)))
    if unet.in_channels != kl.z_channels:
        raise DiffusersFormatError(
            f"{where['unet']}: in_channels={unet.in_channels} but the VAE's latent has {kl.z_channels} channels; the "
            f"UNet and the VAE do not belong together (inpainting / depth UNets are not supported); {SUPPORTED}"
        )
    width = sd.text_encoder.config.get("hidden_size") or 512
    if width != unet.context_dim:
        raise DiffusersFormatError(
            f"{where['unet']}: cross_attention_dim={unet.context_dim} but the text encoder's "
            f"hidden_size is {width}; the UNet and the text encoder do not belong together"
        )
    window = checked_window(window, schedule.timesteps, where["unet"])
    factor = _scale_factor(sd, scale_factor)
    positions = sd.text_encoder.config.get("max_position_embeddings") or SD_MAX_LENGTH
    version = os.path.abspath(clip_dir if clip_dir is not None else sd.root)
    cfg = sd_model_config(unet, kl, schedule, factor, window, version, min(SD_MAX_LENGTH, int(positions)))
    maps = (unet.param_maps(), kl.param_maps())
    return converted_checkpoint(sd, cfg, schedule, window, maps, unsafe_load, text_encoder=sd.text_encoder)


def sd_model_config(
    unet: CrossAttnUNetLayout,
    kl: KLLayout,
    schedule: ScheduleSpec,
    scale_factor: float,
    window: tuple[int, int] | None,
    clip_version: str,
    max_length: int = SD_MAX_LENGTH,
) -> dict[str, Any]:
    """The embedded model config (``{target, params}``): v1-inference.yaml's classes with the folder's sizes, keys of
    this project's datasets (``image``, ``caption``), frozen VAE and text encoder."""
    clip_params: dict[str, Any] = {"version": clip_version}
    if max_length != SD_MAX_LENGTH:
        clip_params["max_length"] = max_length
    params: dict[str, Any] = {
        **schedule.ldm_params(),
        "first_stage_key": "image",
        "cond_stage_key": "caption",
        "image_size": unet.image_size,
        "channels": unet.in_channels,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "scale_factor": scale_factor,
        "unet_config": {"target": UNET_TARGET, "params": unet.ldm_params()},
        "first_stage_config": {"target": KL_TARGET, "params": kl.ldm_params()},
        "cond_stage_config": {"target": CLIP_TARGET, "params": clip_params},
    }
    return target_config(params, window)


def _scale_factor(sd: SDFolder, override: float | None) -> float:
    source = f"{sd.shown}/{sd.first_stage.source()}"
    if override is not None:
        value, what = override, "scale_factor"
    else:
        value = sd.first_stage.config.get("scaling_factor", KL_DEFAULTS["scaling_factor"])
        what = f"{source}: scaling_factor"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DiffusersFormatError(f"{what}={value!r} must be a finite number > 0")
    return float(value)
