"""Building refinement experts from checkpoint files, safely (:func:`load_expert`: a config read from the checkpoint is
checked by :mod:`ldm.untrusted` unless ``trust_config``), and their devices and precisions."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ldm.checkpoint import (
    EMA_SCALAR_KEYS,
    CheckpointError,
    check_state_dict,
    has_ema_weights,
    load_checkpoint,
    load_weights,
    require_weights,
    sha256_file,
)
from ldm.convert.folder import is_diffusers_folder
from ldm.convert.from_diffusers import load_diffusers_expert
from ldm.imageio import format_path
from ldm.models.diffusion.experts import CheckpointInfo, Expert
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.untrusted import OPTIONAL_WEIGHTS, check_config_structure, check_untrusted_model
from ldm.util import (
    TRUSTED_TARGET_PREFIXES,
    ConfigError,
    check_target_allowed,
    get_obj_from_str,
    instantiate_from_config,
    iter_targets,
    one_line,
)

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ConfigSource = str | os.PathLike | Mapping[str, Any] | None


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` / ``"cuda:N"``, or a ``torch.device``."""
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device={device!r} must be one of {DEVICES} (or 'cuda:N')")
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available here; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return dev
    raise ValueError(f"device={device!r} is not one of {DEVICES} (or 'cuda:N')")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None for fp32); refuses combinations that cannot run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {sorted(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' needs a CUDA device (got {device}); on CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32")
    return PRECISIONS[precision]


def check_checkpoint_paths(paths: list[str | os.PathLike]) -> None:
    """Cheap existence check of every path before any (slow) loading."""
    if not paths:
        raise CheckpointError("no checkpoint given; pass one --ckpt per expert (Python: a list of paths)")
    for path in paths:
        shown = format_path(path)
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint {shown} does not exist; check the path (or train one with main.py)")
        if os.path.isdir(path):
            if is_diffusers_folder(path):  # a diffusers LDM folder: load_expert converts it (ldm.convert.diffusers)
                continue
            raise CheckpointError(
                f"checkpoint {shown} is a directory; pass the .ckpt/.safetensors file inside it, a diffusers LDM "
                "folder (model_index.json, unet/, vqvae/, scheduler/) or a diffusers Stable Diffusion v1 folder "
                "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )


def load_yaml_model_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The model section (``{target, params}``) of a project YAML file or mapping (``model:`` or bare)."""
    if isinstance(config, Mapping):
        data: Any = copy.deepcopy(dict(config))
        shown = "config"
    else:
        from omegaconf import OmegaConf

        shown = format_path(config)
        if not os.path.isfile(config):
            raise ConfigError(f"config {shown} does not exist or is not a file")
        try:
            data = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        except Exception as exc:  # YAML syntax and interpolation errors come as several types
            raise ConfigError(f"config {shown} cannot be read as YAML: {one_line(exc)}") from exc
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping) or not isinstance(data.get("target"), str):
        raise ConfigError(f"config {shown} has no model section: expected 'model: {{target: ..., params: ...}}'")
    return dict(data)


def _embedded_model_config(ckpt: Mapping[str, Any], shown: str) -> dict[str, Any] | None:
    embedded = ckpt.get("config")
    if not isinstance(embedded, Mapping):
        return None
    check_config_structure(embedded, f"checkpoint {shown}")
    model = embedded.get("model", embedded)
    if not isinstance(model, Mapping) or "target" not in model:
        return None
    if not isinstance(model.get("target"), str):
        raise ConfigError(
            f"checkpoint {shown}: its config's model.target must be a class path string, got "
            f"{type(model.get('target')).__name__}"
        )
    params = model.get("params")
    first = params.get("first_stage_config") if isinstance(params, Mapping) else None
    first_params = first.get("params") if isinstance(first, Mapping) else None
    for where, value in (("model.params", params), ("model.params.first_stage_config.params", first_params)):
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(
                f"checkpoint {shown}: its config's {where} must be a mapping of arguments, got {type(value).__name__}"
            )
    return copy.deepcopy(dict(model))


def _inference_config(model_cfg: Mapping[str, Any], use_ema: bool) -> dict[str, Any]:
    """The model config rebuilt for inference: no ``ckpt_path``, losses replaced by ``torch.nn.Identity``, EMA built
    only when used."""
    cfg = copy.deepcopy(dict(model_cfg))
    params = cfg["params"] = dict(cfg.get("params") or {})
    params.pop("ckpt_path", None)
    params["use_ema"] = use_ema
    first = params.get("first_stage_config")
    if isinstance(first, Mapping):
        first = params["first_stage_config"] = dict(first)
        first_params = first["params"] = dict(first.get("params") or {})
        first_params.pop("ckpt_path", None)
        if "lossconfig" in first_params:
            first_params["lossconfig"] = {"target": "torch.nn.Identity"}
    cond = params.get("cond_stage_config")
    if isinstance(cond, Mapping) and isinstance(cond.get("params"), Mapping) and "lossconfig" in cond["params"]:
        params["cond_stage_config"] = {**cond, "params": {**cond["params"], "lossconfig": {"target": "torch.nn.Identity"}}}
    return cfg


def _model_class(cfg: Mapping[str, Any], shown: str, allowed: tuple[str, ...] | None) -> type:
    """Import the config's class after the allow-list check (of every nested target); it must be a LatentDiffusion."""
    try:
        if allowed is not None:
            for target in iter_targets(cfg):
                check_target_allowed(target, allowed)
        cls = get_obj_from_str(cfg["target"])
    except ConfigError as exc:
        raise ConfigError(f"checkpoint {shown}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, LatentDiffusion)):
        raise CheckpointError(
            f"checkpoint {shown} is the wrong kind: its model {cfg['target']!r} is not a latent diffusion model. "
            "Refinement needs LatentDiffusion / LateStepsLatentDiffusion checkpoints (not a first-stage VQ checkpoint)"
        )
    return cls


def load_expert(
    path: str | os.PathLike,
    config: ConfigSource = None,
    ema: bool = True,
    trust_config: bool = False,
    unsafe_load: bool = False,
) -> tuple[Expert, CheckpointInfo]:
    """Build one refinement expert (on CPU, eval mode, no gradients) from ``path``: a ``main.py`` checkpoint
    (``{"state_dict", "config", "window", ...}``), a CompVis release or ``.safetensors`` file (with ``config``: a YAML
    path or mapping, used when the checkpoint carries no model config) or a diffusers LDM folder.  ``ema``: use the EMA
    weights when there are some (a warning otherwise); ``trust_config``: allow a checkpoint's config to name classes
    outside the allow-list; ``unsafe_load``: unpickle arbitrary objects (only for files you trust).

    Raises:
        CheckpointError: missing, truncated, unsafe, wrong-kind checkpoint, or weights that do not fit the config
            ("config and checkpoint disagree" with the first mismatching keys).
        ConfigError: no usable config, a forbidden or unknown target, a class of the wrong kind for its slot, bad
            parameters (see :mod:`ldm.untrusted` for what a config stored in a checkpoint may hold).
    """
    if is_diffusers_folder(path):  # a diffusers LDM folder, converted in memory (its JSON configs replace `config`)
        return load_diffusers_expert(path, ema=ema, unsafe_load=unsafe_load)
    shown = format_path(path)
    ckpt = load_checkpoint(path, map_location="cpu", unsafe=unsafe_load)
    state_dict = ckpt.get("state_dict")
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(
            f"checkpoint {shown} is the wrong kind: it holds no 'state_dict' (top-level keys: {sorted(map(str, ckpt))[:8]})"
        )
    check_state_dict(state_dict, shown)
    model_cfg = _embedded_model_config(ckpt, shown)
    if model_cfg is not None:
        source = "checkpoint"
        if config is not None:
            logger.info("%s: using the model config saved in the checkpoint (config= is for checkpoints without one)", shown)
    elif config is not None:
        model_cfg = load_yaml_model_config(config)
        source = format_path(config) if not isinstance(config, Mapping) else "config mapping"
    else:
        raise ConfigError(
            f"checkpoint {shown} holds no model config (not written by this project's main.py, e.g. a CompVis "
            "release); pass the matching YAML with --config (Python: config=...), "
            "e.g. configs/latent-diffusion/celebahq-ldm-vq-4.yaml"
        )
    # EMA-only releases (Stable Diffusion v1) keep LitEma's two scalars without any EMA weights: not an EMA
    has_ema = has_ema_weights(state_dict)
    if not has_ema:
        state_dict = {k: v for k, v in state_dict.items() if k not in EMA_SCALAR_KEYS}
    folded = ckpt.get("ema_folded") is True and not has_ema  # an export whose model weights are the EMA ones
    use_ema = bool(ema and has_ema)
    cfg = _inference_config(model_cfg, use_ema)
    allowed = None if (trust_config or source != "checkpoint") else TRUSTED_TARGET_PREFIXES
    _model_class(cfg, shown, allowed)
    if allowed is not None:  # kinds, values and every size checked before anything real is allocated
        check_untrusted_model(cfg, state_dict, f"checkpoint {shown}", allowed)
    try:
        model = instantiate_from_config(cfg)
    except (ValueError, ImportError) as exc:  # ConfigError, the models' own argument checks, a missing optional package
        raise ConfigError(f"checkpoint {shown}: cannot build {cfg['target']!r} from its config: {exc}") from exc
    model.check_schedule_matches(state_dict, source=f"checkpoint {shown}")
    try:
        missing, _ = load_weights(model, state_dict, strict=False, source=f"checkpoint {shown}")
    except CheckpointError as exc:
        raise CheckpointError(f"config and checkpoint disagree: {exc}") from exc
    require_weights(missing, f"checkpoint {shown}", optional_prefixes=OPTIONAL_WEIGHTS)
    if use_ema:
        model.model_ema.copy_to(model.model)
        del model.model_ema
        model.use_ema = False
    elif folded and not ema:
        logger.warning("%s: the checkpoint holds only its EMA weights (exported with them in place); using those", shown)
    elif ema and not folded:
        logger.warning("%s: no EMA weights in the checkpoint; using the training weights", shown)
    model.eval().requires_grad_(False)
    window = _window(ckpt, model, shown)
    step = ckpt.get("global_step")
    info = CheckpointInfo(
        path=shown,
        sha256=sha256_file(path),
        window=window,
        target=str(cfg["target"]),
        global_step=int(step) if isinstance(step, int) else None,
        ema=use_ema or folded,
        config_source=source,
    )
    return Expert(model, window, os.path.basename(shown)), info


def _window(ckpt: Mapping[str, Any], model: Any, shown: str) -> tuple[int, int]:
    """The model's window, after checking that the checkpoint's ``window`` record (if any) agrees with it."""
    own = tuple(int(t) for t in model.window())
    saved = ckpt.get("window")
    if saved is None:
        return own
    try:
        recorded = tuple(int(t) for t in saved)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {shown}: invalid 'window' entry {repr(saved)[:80]}: {exc}") from exc
    if recorded != own:
        raise CheckpointError(
            f"checkpoint {shown} is inconsistent: its 'window' record {list(recorded)} differs from the window of its "
            f"model config {list(own)} (t_min/t_max); fix the config or re-save the checkpoint with main.py"
        )
    return own
