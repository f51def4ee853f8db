"""The steps every diffusers import (:mod:`ldm.convert.from_diffusers`) shares: the window and the checkpoint (model
config, schedule buffers and each component's weights, checked against the shapes the converted config implies).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from ldm.convert.common import DiffusersFormatError, ParamMap, check_complete
from ldm.convert.folder import Component, LDMFolder, WeightFile
from ldm.convert.schedule import ScheduleSpec
from ldm.convert.sd_map import text_file_name, text_param_maps
from ldm.convert.unet_map import WINDOW_KEY
from ldm.models.diffusion.base import SCHEDULE_BUFFERS
from ldm.models.diffusion.latesteps import validate_window
from ldm.modules.diffusionmodules.util import make_schedule_buffers
from ldm.util import instantiate_from_config

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
    """The window a UNet config records (None: a full-range model), checked against the schedule's ``timesteps``."""
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
    """The checkpoint dict of a converted folder: its model config (a ``LatentDiffusion`` of ``schedule`` and
    ``params``, or a ``LateStepsLatentDiffusion`` trained on ``window``) and float32 state dict (the schedule buffers,
    then the UNet's and the first stage's weights through ``maps``, then an SD folder's text encoder's)."""
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
    """Every state-dict key's shape of the model ``cfg`` describes, built on the meta device (nothing allocated; a
    text encoder reads only its tokenizer and config.json)."""
    build = copy.deepcopy(dict(cfg))
    build["params"] = {**build["params"], "use_ema": False}
    try:
        with torch.device("meta"):
            model = instantiate_from_config(build)
    except (ValueError, OSError) as exc:  # OSError: a CLIP folder without its tokenizer or config
        raise DiffusersFormatError(f"{shown}: the converted config does not build: {' '.join(str(exc).split())}") from exc
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
    """The component's tensors as LDM tensors under ``prefix``; shapes are checked against ``expected`` first.

    ``rename`` maps a file's key to the key the maps use; file keys in ``ignore`` (after renaming) are dropped unread.
    Every other file tensor must be used, and every mapped tensor present, or the folder is refused.
    """
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
