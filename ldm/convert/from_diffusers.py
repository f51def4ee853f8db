"""Hugging Face diffusers folder -> this project's checkpoint dict and expert, in memory: the reading half of
:mod:`ldm.convert.diffusers`, apart so that imports stay one-way (``load_expert`` reads folders; the writing half
loads experts).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

import torch

from ldm.checkpoint import load_weights
from ldm.convert.common import DiffusersFormatError, ParamMap, check_complete
from ldm.convert.folder import Component, LDMFolder, WeightFile, is_sd_folder, open_ldm_folder, open_sd_folder
from ldm.convert.schedule import SD_SCHEDULER_CLASSES, ScheduleSpec, schedule_from_config
from ldm.convert.sd_map import (
    CLIP_TARGET,
    KL_DEFAULTS,
    KL_TARGET,
    SUPPORTED,
    check_text_config,
    cond_unet_layout_from_config,
    kl_layout_from_config,
    text_file_name,
    text_param_maps,
)
from ldm.convert.unet_map import UNET_TARGET, WINDOW_KEY, unet_layout_from_config
from ldm.convert.vq_map import VQ_TARGET, vq_layout_from_config
from ldm.imageio import format_path
from ldm.models.diffusion.base import SCHEDULE_BUFFERS
from ldm.models.diffusion.experts import CheckpointInfo, Expert
from ldm.models.diffusion.latesteps import validate_window
from ldm.modules.diffusionmodules.util import make_schedule_buffers
from ldm.util import UNCONDITIONAL_SENTINEL, instantiate_from_config, one_line

logger = logging.getLogger(__name__)

SD_MAX_LENGTH = 77  # SD v1's prompt length in tokens (FrozenCLIPEmbedder's default)
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
LATESTEPS_TARGET = "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion"
UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
# transformers < 4.31 stored CLIP's position ids (an integer buffer, recomputed by the model): dropped unread
POSITION_IDS = ("text_model.embeddings.position_ids",)

# attention parameter names of diffusers before 0.15 (hub folders converted back then still use them)
_DEPRECATED_ATTENTION = re.compile(r"^(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def checked_window(window: tuple[int, int] | None, timesteps: int, source: str) -> tuple[int, int] | None:
    """The window a UNet config records (None: full range), checked against the schedule's ``timesteps``."""
    try:
        return None if window is None else validate_window(window[0], window[1], timesteps)
    except ValueError as exc:
        raise DiffusersFormatError(f"{source}: {WINDOW_KEY}: {exc}") from exc


def converted_checkpoint(
    folder: LDMFolder,
    params: dict[str, Any],
    schedule: ScheduleSpec,
    window: tuple[int, int] | None,
    maps: tuple[list[ParamMap], list[ParamMap]],
    unsafe: bool,
) -> dict[str, Any]:
    """The checkpoint dict of a converted folder: a ``LatentDiffusion`` (``LateStepsLatentDiffusion`` with a
    ``window``) config of ``schedule`` and ``params``, and a float32 state dict (schedule buffers, the UNet's and first
    stage's weights through ``maps``, an SD folder's text encoder's)."""
    params = {**schedule.ldm_params(), **params}
    if window is None:
        cfg = {"target": LDM_TARGET, "params": params}
    else:
        cfg = {"target": LATESTEPS_TARGET, "params": {"t_min": window[0], "t_max": window[1], **params}}
    expected = expected_shapes(cfg, folder.shown)
    try:  # the persistent schedule buffers, as DDPM.register_schedule computes them (float64, stored float32)
        buffers = make_schedule_buffers(schedule.betas(), 0.0, schedule.parameterization)
    except ValueError as exc:
        raise DiffusersFormatError(f"the scheduler's betas cannot be used: {exc}") from exc
    state_dict = {name: buffers[name].to(torch.float32) for name in SCHEDULE_BUFFERS}
    state_dict.update(import_weights(folder, folder.unet, maps[0], expected, UNET_PREFIX, unsafe))
    state_dict.update(import_weights(folder, folder.first_stage, maps[1], expected, FIRST_STAGE_PREFIX, unsafe))
    if folder.text_encoder is not None:
        text_maps = text_param_maps([k[len(COND_STAGE_PREFIX) :] for k in expected if k.startswith(COND_STAGE_PREFIX)])
        text = import_weights(
            folder, folder.text_encoder, text_maps, expected, COND_STAGE_PREFIX, unsafe, text_file_name, POSITION_IDS
        )
        state_dict.update(text)
    ckpt: dict[str, Any] = {
        "state_dict": state_dict,
        "config": {"model": cfg},
        "converted_from": {"format": "diffusers", "folder": folder.shown, "sha256": folder.digest()},
    }
    if window is not None:
        ckpt["window"] = list(window)
    return ckpt


def expected_shapes(cfg: Mapping[str, Any], shown: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict key's shape of the model ``cfg`` describes, built on the meta device (nothing allocated)."""
    build = copy.deepcopy({**cfg, "params": {**cfg["params"], "use_ema": False}})
    try:
        with torch.device("meta"):
            model = instantiate_from_config(build)
    except (ValueError, OSError) as exc:  # OSError: a CLIP folder without its tokenizer or config
        raise DiffusersFormatError(f"{shown}: the converted config does not build: {one_line(exc)}") from exc
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def current_name(key: str) -> str:
    """Today's diffusers name of a parameter (``attentions.0.query.weight`` -> ``attentions.0.to_q.weight``)."""
    match = _DEPRECATED_ATTENTION.match(key)
    if match is None:
        return key
    return f"{match.group(1)}.{_NEW_ATTENTION_NAME[match.group(2)]}.{match.group(3)}"


def import_weights(
    folder: LDMFolder,
    component: Component,
    maps: list[ParamMap],
    expected: Mapping[str, tuple[int, ...]],
    prefix: str,
    unsafe: bool,
    rename: Callable[[str], str] = current_name,
    ignore: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """The component's tensors as LDM tensors under ``prefix``, shapes checked against ``expected`` first.  ``rename``
    maps a file's key to the maps' key; file keys in ``ignore`` (after renaming) are dropped unread.  Every other file
    tensor must be used, and every mapped tensor present, or the folder is refused."""
    ldm_shapes = {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}
    check_complete(maps, ldm_shapes, component.name)
    want: dict[str, tuple[int, ...]] = {}
    for m in maps:
        want.update(zip(m.diffusers, m.diffusers_shapes(ldm_shapes[m.ldm])))
    shown = f"{folder.shown}/{component.name}/{component.weights_file.name}"
    weights = WeightFile(component.weights_file, shown, unsafe, skip=lambda key: rename(key) in ignore)
    names = {k: rename(k) for k in weights.shapes}
    have = {names[k]: shape for k, shape in weights.shapes.items()}
    if len(have) != len(names):
        raise DiffusersFormatError(
            f"{shown} holds the same tensor under two names (e.g. both the old and the new "
            "attention names); the file is ambiguous"
        )
    bad = [(k, have[k], want[k]) for k in want if k in have and have[k] != want[k]]
    if bad:
        first = "; ".join(f"{k}: file {list(a)} vs config {list(b)}" for k, a, b in bad[:3])
        raise DiffusersFormatError(
            f"{shown}: {len(bad)} tensors differ in shape from what {component.source()} implies ({first}); the "
            "weights and the config describe different networks"
        )
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    if missing or unexpected:
        raise DiffusersFormatError(
            f"{shown} does not match {component.source()}: {len(missing)} tensors missing (first: {missing[:3]}), "
            f"{len(unexpected)} not in the network (first: {unexpected[:3]}); the weights are of another model"
        )
    tensors = weights.tensors(names)
    return {prefix + m.ldm: m.to_ldm([tensors[k] for k in m.diffusers], ldm_shapes[m.ldm]) for m in maps}


def diffusers_to_checkpoint(
    folder: str | os.PathLike,
    scale_factor: float | None = None,
    unsafe_load: bool = False,
    clip_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Convert a diffusers LDM or Stable Diffusion v1 folder into the checkpoint dict ``main.py`` writes:
    ``{"state_dict": {...} (float32), "config": {"model": {target, params}}, "converted_from": {"format", "folder",
    "sha256"}}``, plus ``"window": [t_min, t_max]`` for a window expert (``LateStepsLatentDiffusion``).

    Args:
        scale_factor: the latent scale (> 0; the CLI checks it), overriding the first stage's ``scaling_factor``
            (default: the folder's, else 1.0 for an LDM, 0.18215 for SD v1).
        unsafe_load: unpickle arbitrary objects in ``.bin`` weight files (only for folders you trust).
        clip_dir: SD folders only: the local folder the text encoder reads its tokenizer and config from
            (``cond_stage_config.params.version``, absolute; default: ``folder``, which must then stay where it is).

    Raises:
        DiffusersFormatError (a ``CheckpointError``, one line): a folder this project cannot represent, bad JSON, or
            weights that do not match the configs.
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
    if scale_factor is None and "scaling_factor" not in ldm.first_stage.config:
        logger.info(
            "%s has no scaling_factor: using 1.0, the latent scale of CompVis' VQ LDMs (diffusers' default 0.18215 is "
            "Stable Diffusion's; diffusers issue 6725). Pass scale_factor (--scale-factor) if the model used another",
            f"{ldm.shown}/{ldm.first_stage.source()}",
        )
    params = {
        "first_stage_key": "image",
        "image_size": unet.image_size,
        "channels": unet.in_channels,
        "scale_factor": _scale_factor(ldm, scale_factor, 1.0),
        "unet_config": {"target": UNET_TARGET, "params": unet.ldm_params()},
        "first_stage_config": {"target": VQ_TARGET, "params": vq.ldm_params()},
        "cond_stage_config": UNCONDITIONAL_SENTINEL,
    }
    return converted_checkpoint(ldm, params, schedule, window, (unet.param_maps(), vq.param_maps()), unsafe_load)


def sd_to_checkpoint(
    folder: str | os.PathLike,
    scale_factor: float | None = None,
    unsafe_load: bool = False,
    clip_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """:func:`diffusers_to_checkpoint` of an SD v1 folder: v1-inference.yaml's classes with the folder's sizes, this
    project's dataset keys, frozen VAE and text encoder."""
    sd = open_sd_folder(folder, SUPPORTED)
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
    factor = _scale_factor(sd, scale_factor, KL_DEFAULTS["scaling_factor"])
    positions = sd.text_encoder.config.get("max_position_embeddings") or SD_MAX_LENGTH
    max_length = min(SD_MAX_LENGTH, int(positions))
    clip_params: dict[str, Any] = {"version": os.path.abspath(clip_dir if clip_dir is not None else sd.root)}
    if max_length != SD_MAX_LENGTH:
        clip_params["max_length"] = max_length
    params = {
        "first_stage_key": "image",
        "cond_stage_key": "caption",
        "image_size": unet.image_size,
        "channels": unet.in_channels,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "scale_factor": factor,
        "unet_config": {"target": UNET_TARGET, "params": unet.ldm_params()},
        "first_stage_config": {"target": KL_TARGET, "params": kl.ldm_params()},
        "cond_stage_config": {"target": CLIP_TARGET, "params": clip_params},
    }
    return converted_checkpoint(sd, params, schedule, window, (unet.param_maps(), kl.param_maps()), unsafe_load)


def _scale_factor(folder: LDMFolder, override: float | None, default: float) -> float:
    if override is not None:
        return float(override)
    value = folder.first_stage.config.get("scaling_factor", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DiffusersFormatError(
            f"{folder.shown}/{folder.first_stage.source()}: scaling_factor={value!r} must be a finite number > 0"
        )
    return float(value)


def load_diffusers_expert(
    folder: str | os.PathLike, ema: bool = True, unsafe_load: bool = False
) -> tuple[Expert, CheckpointInfo]:
    """A refinement expert converted in memory from a diffusers folder, and its ``CheckpointInfo`` (contract of
    :func:`ldm.refine.loading.load_expert`: on CPU, eval mode, no gradients); raises as :func:`diffusers_to_checkpoint`.
    ``ema`` is accepted for that contract; a folder's one set of weights is used either way.  The window is ``[0, T)``
    or the one in ``unet/config.json``; the sha256 is :meth:`ldm.convert.folder.LDMFolder.digest`.
    """
    shown = format_path(folder)
    ckpt = diffusers_to_checkpoint(folder, unsafe_load=unsafe_load)
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
