"""Hugging Face diffusers LDM folder -> this project's checkpoint dict and expert, in memory: the reading half of
:mod:`ldm.convert.diffusers`, in its own module so that imports stay one-way (``ldm.convert.diffusers ->
ldm.refine.loading -> ldm.convert.from_diffusers``: ``load_expert`` reads folders, the writing half loads experts).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from typing import Any

from ldm.checkpoint import load_weights
from ldm.convert.common import DiffusersFormatError
from ldm.convert.folder import LDMFolder, is_sd_folder, open_ldm_folder
from ldm.convert.from_sd import sd_to_checkpoint
from ldm.convert.importing import checked_window, converted_checkpoint, target_config
from ldm.convert.schedule import ScheduleSpec, schedule_from_config
from ldm.convert.unet_map import UNET_TARGET, UNetLayout, unet_layout_from_config
from ldm.convert.vq_map import VQ_TARGET, VQLayout, vq_layout_from_config
from ldm.imageio import format_path
from ldm.models.diffusion.experts import CheckpointInfo, Expert
from ldm.util import UNCONDITIONAL_SENTINEL, instantiate_from_config

__all__ = ["diffusers_to_checkpoint", "load_diffusers_expert", "model_config"]

logger = logging.getLogger(__name__)


def diffusers_to_checkpoint(
    folder: str | os.PathLike,
    scale_factor: float | None = None,
    unsafe_load: bool = False,
    clip_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Convert a diffusers LDM folder into the checkpoint dict ``main.py`` writes (a ``LatentDiffusion``, or a
    ``LateStepsLatentDiffusion`` when the UNet config records a window), all in memory; a Stable Diffusion v1 folder
    goes to :func:`ldm.convert.from_sd.sd_to_checkpoint`.

    Args:
        folder: the pipeline folder (``model_index.json``, ``unet/``, ``vqvae/``, ``scheduler/``).
        scale_factor: the latent scale (overrides the VQModel's ``scaling_factor``; default: the folder's, else 1.0).
        unsafe_load: unpickle arbitrary objects in ``.bin`` weight files (only for folders you trust).
        clip_dir: Stable Diffusion folders only: the local CLIP folder (tokenizer + text config) the converted
            config names (default: the diffusers folder itself; see :mod:`ldm.convert.from_sd`).

    Returns:
        ``{"state_dict": {...} (float32), "config": {"model": {target, params}}, "converted_from": {"format",
        "folder", "sha256"}}``, plus ``"window": [t_min, t_max]`` for a window expert.

    Raises:
        DiffusersFormatError (a ``CheckpointError``): a folder that is not an unconditional LDM this project can
            represent, bad JSON, or weights that do not match the configs; one line naming the first offending
            option or tensors.
    """
    if is_sd_folder(folder):  # a text-to-image pipeline (text_encoder/, tokenizer/): Stable Diffusion v1
        return sd_to_checkpoint(folder, scale_factor=scale_factor, unsafe_load=unsafe_load, clip_dir=clip_dir)
    if clip_dir is not None:
        raise DiffusersFormatError(
            f"{format_path(folder)} is an unconditional LDM folder (no text encoder); clip_dir "
            "(--clip-dir) applies to Stable Diffusion folders only"
        )
    ldm = open_ldm_folder(folder)
    unet, window = unet_layout_from_config(ldm.unet.config, f"{ldm.shown}/{ldm.unet.source()}")
    vq = vq_layout_from_config(ldm.first_stage.config, f"{ldm.shown}/{ldm.first_stage.source()}")
    schedule = schedule_from_config(ldm.scheduler.config, f"{ldm.shown}/{ldm.scheduler.source()}")
    if unet.image_size == 0:  # sample_size: null
        unet = replace(unet, image_size=max(1, vq.resolution // 2 ** (len(vq.ch_mult) - 1)))
    if unet.in_channels != vq.embed_dim:
        raise DiffusersFormatError(
            f"{ldm.shown}/{ldm.unet.source()}: in_channels={unet.in_channels} but the first stage's latent has "
            f"{vq.embed_dim} channels (vq_embed_dim / latent_channels); the UNet and the VQModel do not belong together"
        )
    window = checked_window(window, schedule.timesteps, f"{ldm.shown}/{ldm.unet.source()}")
    cfg = model_config(unet, vq, schedule, _scale_factor(ldm, scale_factor), window)
    return converted_checkpoint(ldm, cfg, schedule, window, (unet.param_maps(), vq.param_maps()), unsafe_load)


def model_config(
    unet: UNetLayout, vq: VQLayout, schedule: ScheduleSpec, scale_factor: float, window: tuple[int, int] | None
) -> dict[str, Any]:
    """The embedded model config (``{target, params}``) of the converted LDM: unconditional, frozen VQ first stage."""
    params: dict[str, Any] = {
        **schedule.ldm_params(),
        "first_stage_key": "image",
        "image_size": unet.image_size,
        "channels": unet.in_channels,
        "scale_factor": scale_factor,
        "unet_config": {"target": UNET_TARGET, "params": unet.ldm_params()},
        "first_stage_config": {"target": VQ_TARGET, "params": vq.ldm_params()},
        "cond_stage_config": UNCONDITIONAL_SENTINEL,
    }
    return target_config(params, window)


def _scale_factor(ldm: LDMFolder, override: float | None) -> float:
    source = f"{ldm.shown}/{ldm.first_stage.source()}"
    if override is not None:
        value, what = override, "scale_factor"
    elif "scaling_factor" in ldm.first_stage.config:
        value, what = ldm.first_stage.config["scaling_factor"], f"{source}: scaling_factor"
    else:
        logger.info(
            "%s has no scaling_factor: using 1.0, the latent scale of CompVis' VQ LDMs (diffusers' default 0.18215 is "
            "Stable Diffusion's; diffusers issue 6725). Pass scale_factor (--scale-factor) if the model used another",
            source,
        )
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DiffusersFormatError(f"{what}={value!r} must be a finite number > 0")
    return float(value)


def load_diffusers_expert(
    folder: str | os.PathLike,
    ema: bool = True,
    scale_factor: float | None = None,
    unsafe_load: bool = False,
) -> tuple[Expert, CheckpointInfo]:
    """Build a refinement expert from a diffusers LDM folder, converted in memory (contract of
    :func:`ldm.refine.loading.load_expert`: on CPU, eval mode, no gradients).

    Args:
        folder: the pipeline folder.  ema: accepted for the ``load_expert`` contract; a diffusers folder holds one set
            of weights (a release's are usually its EMA weights), which is used either way.
        scale_factor, unsafe_load: as in :func:`diffusers_to_checkpoint`.

    Returns:
        ``(Expert, CheckpointInfo)``: the window is ``[0, T)``, or the one recorded in ``unet/config.json``; the
        sha256 is the folder digest (:meth:`ldm.convert.folder.LDMFolder.digest`).

    Raises:
        DiffusersFormatError / CheckpointError: as :func:`diffusers_to_checkpoint`.
    """
    shown = format_path(folder)
    ckpt = diffusers_to_checkpoint(folder, scale_factor=scale_factor, unsafe_load=unsafe_load)
    cfg = ckpt["config"]["model"]
    build = {**cfg, "params": {**cfg["params"], "use_ema": False}}
    model = instantiate_from_config(build)
    load_weights(model, ckpt["state_dict"], strict=True, source=f"diffusers folder {shown}")
    model.eval().requires_grad_(False)
    if ema:
        logger.info("%s: a diffusers folder holds one set of weights (no separate EMA copy); using them", shown)
    window = tuple(ckpt.get("window") or model.window())
    info = CheckpointInfo(
        path=shown,
        sha256=ckpt["converted_from"]["sha256"],
        window=window,
        target=str(cfg["target"]),
        global_step=None,
        ema=False,
        config_source="diffusers folder",
    )
    return Expert(model, window, os.path.basename(os.path.normpath(shown))), info
