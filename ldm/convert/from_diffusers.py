"""Hugging Face diffusers LDM folder -> this project's checkpoint dict and expert, in memory (the reading half of
:mod:`ldm.convert.diffusers`, which re-exports it and describes the format).

:func:`ldm.refine.loading.load_expert` reads diffusers folders through :func:`load_diffusers_expert`; the writing half
(:func:`ldm.convert.diffusers.checkpoint_to_diffusers`) loads experts with ``load_expert``.  Keeping the two halves in
two modules keeps the imports one-way: ``ldm.convert.diffusers -> ldm.refine.loading -> ldm.convert.from_diffusers``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ldm.checkpoint import load_weights
from ldm.convert.common import DiffusersFormatError, ParamMap, check_complete
from ldm.convert.folder import Component, LDMFolder, open_ldm_folder
from ldm.convert.schedule import ScheduleSpec, schedule_from_config
from ldm.convert.unet_map import UNET_TARGET, WINDOW_KEY, UNetLayout, unet_layout_from_config
from ldm.convert.vq_map import VQ_TARGET, VQLayout, vq_layout_from_config
from ldm.imageio import format_path
from ldm.models.diffusion.base import SCHEDULE_BUFFERS
from ldm.models.diffusion.experts import CheckpointInfo, Expert
from ldm.models.diffusion.latesteps import validate_window
from ldm.modules.diffusionmodules.util import make_schedule_buffers
from ldm.util import UNCONDITIONAL_SENTINEL, instantiate_from_config

__all__ = ["diffusers_to_checkpoint", "load_diffusers_expert", "model_config"]

logger = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these maps were written and tested against
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
LATESTEPS_TARGET = "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion"
UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# attention parameter names of diffusers before 0.15 (hub folders converted back then still use them)
_DEPRECATED_ATTENTION = re.compile(r"^(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_to_checkpoint(
    folder: str | os.PathLike, scale_factor: float | None = None, unsafe_load: bool = False
) -> dict[str, Any]:
    """Convert a diffusers LDM folder into a checkpoint dict (see :mod:`ldm.convert.diffusers`), all in memory.

    Args:
        folder: the pipeline folder (``model_index.json``, ``unet/``, ``vqvae/``, ``scheduler/``).
        scale_factor: the latent scale (overrides the VQModel's ``scaling_factor``; default: the folder's, else 1.0).
        unsafe_load: unpickle arbitrary objects in ``.bin`` weight files (only for folders you trust).

    Returns:
        ``{"state_dict": {...} (float32), "config": {"model": {target, params}}, "converted_from": {"format",
        "folder", "sha256"}}``, plus ``"window": [t_min, t_max]`` for a window expert.

    Raises:
        DiffusersFormatError (a ``CheckpointError``): a folder that is not an unconditional LDM this project can
            represent, bad JSON, or weights that do not match the configs; one line naming the first offending
            option or tensors.
    """
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
    if window is not None:
        try:
            window = validate_window(window[0], window[1], schedule.timesteps)
        except ValueError as exc:
            raise DiffusersFormatError(f"{ldm.shown}/{ldm.unet.source()}: {WINDOW_KEY}: {exc}") from exc
    factor = _scale_factor(ldm, scale_factor)
    cfg = model_config(unet, vq, schedule, factor, window)
    expected = _expected_shapes(cfg, ldm.shown)
    state_dict = {name: value.to(torch.float32) for name, value in _schedule_buffers(schedule).items()}
    state_dict.update(_import_weights(ldm, ldm.unet, unet.param_maps(), expected, UNET_PREFIX, unsafe_load))
    state_dict.update(_import_weights(ldm, ldm.first_stage, vq.param_maps(), expected, FIRST_STAGE_PREFIX, unsafe_load))
    ckpt: dict[str, Any] = {
        "state_dict": state_dict,
        "config": {"model": cfg},
        "converted_from": {"format": "diffusers", "folder": ldm.shown, "sha256": ldm.digest()},
    }
    if window is not None:
        ckpt["window"] = list(window)
    return ckpt


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
    if window is None:
        return {"target": LDM_TARGET, "params": params}
    return {"target": LATESTEPS_TARGET, "params": {"t_min": window[0], "t_max": window[1], **params}}


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


def _schedule_buffers(schedule: ScheduleSpec) -> dict[str, torch.Tensor]:
    """The persistent schedule buffers, computed as ``DDPM.register_schedule`` does (float64, stored float32)."""
    try:
        buffers = make_schedule_buffers(schedule.betas(), 0.0, schedule.parameterization)
    except ValueError as exc:
        raise DiffusersFormatError(f"the scheduler's betas cannot be used: {exc}") from exc
    return {name: buffers[name] for name in SCHEDULE_BUFFERS}


def _expected_shapes(cfg: Mapping[str, Any], shown: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict key's shape of the model ``cfg`` describes, built on the meta device (nothing allocated)."""
    build = copy.deepcopy(dict(cfg))
    build["params"] = {**build["params"], "use_ema": False}
    try:
        with torch.device("meta"):
            model = instantiate_from_config(build)
    except ValueError as exc:
        raise DiffusersFormatError(f"{shown}: the converted config does not build: {exc}") from exc
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _import_weights(
    ldm: LDMFolder,
    component: Component,
    maps: list[ParamMap],
    expected: Mapping[str, tuple[int, ...]],
    prefix: str,
    unsafe: bool,
) -> dict[str, torch.Tensor]:
    """The component's tensors as LDM tensors under ``prefix``; shapes are checked against ``expected`` first."""
    ldm_shapes = {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}
    check_complete(maps, ldm_shapes, component.name)
    want: dict[str, tuple[int, ...]] = {}
    for m in maps:
        want.update(zip(m.diffusers, m.diffusers_shapes(ldm_shapes[m.ldm])))
    weights = ldm.weights(component, unsafe)
    rename = {k: _current_name(k) for k in weights.shapes()}
    have = {rename[k]: shape for k, shape in weights.shapes().items()}
    shown = weights.shown
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
    tensors = weights.tensors(rename)
    return {prefix + m.ldm: m.to_ldm([tensors[k] for k in m.diffusers], ldm_shapes[m.ldm]) for m in maps}


def _current_name(key: str) -> str:
    """Today's diffusers name of a parameter (``attentions.0.query.weight`` -> ``attentions.0.to_q.weight``)."""
    match = _DEPRECATED_ATTENTION.match(key)
    if match is None:
        return key
    return f"{match.group(1)}.{_NEW_ATTENTION_NAME[match.group(2)]}.{match.group(3)}"


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
