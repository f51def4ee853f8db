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
:mod:`ldm.convert.schedule`.  Nothing here imports diffusers or downloads anything.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ldm.checkpoint import load_weights
from ldm.convert.common import DiffusersFormatError, ParamMap, check_complete
from ldm.convert.folder import Component, LDMFolder, is_diffusers_folder, open_ldm_folder
from ldm.convert.schedule import ScheduleSpec, schedule_from_config, scheduler_config_from_model
from ldm.convert.unet_map import UNET_TARGET, WINDOW_KEY, UNetLayout, unet_layout_from_config, unet_layout_from_model
from ldm.convert.vq_map import VQ_TARGET, VQLayout, vq_layout_from_config, vq_layout_from_model
from ldm.imageio import format_path
from ldm.models.diffusion.base import SCHEDULE_BUFFERS
from ldm.models.diffusion.experts import Expert
from ldm.models.diffusion.latesteps import validate_window
from ldm.modules.diffusionmodules.util import make_schedule_buffers
from ldm.util import UNCONDITIONAL_SENTINEL, atomic_write_bytes, instantiate_from_config

if TYPE_CHECKING:  # ldm.refine.loading imports this module's entry point lazily; a top-level import would be a cycle
    from ldm.refine.loading import CheckpointInfo

__all__ = [
    "checkpoint_to_diffusers",
    "diffusers_to_checkpoint",
    "export_diffusers",
    "is_diffusers_folder",
    "load_diffusers_expert",
]

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


# ------------------------------------------------------------------------------------------------------------ import
def diffusers_to_checkpoint(
    folder: str | os.PathLike, scale_factor: float | None = None, unsafe_load: bool = False
) -> dict[str, Any]:
    """Convert a diffusers LDM folder into a checkpoint dict (see the module docstring), all in memory.

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
    from ldm.refine.loading import CheckpointInfo

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
    from ldm.refine.loading import load_expert

    if Path(out_dir).exists():
        raise FileExistsError(f"{format_path(out_dir)} already exists; choose a new folder name (nothing was written)")
    expert, info = load_expert(path, config, ema=ema, trust_config=trust_config, unsafe_load=unsafe_load)
    return export_diffusers(expert.model, out_dir, window=expert.window), info
