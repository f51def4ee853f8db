"""Configs stored in checkpoints are untrusted (building one runs constructors with its author's arguments): what each
slot may build, what its values may be, and a dry run on the meta device (README, Security).
"""

from __future__ import annotations

import logging
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.modules import module as torch_module

from ldm.checkpoint import CheckpointError, check_weights_fit, is_int, require_weights
from ldm.util import (
    FIRST_STAGE_SENTINEL,
    TRUST_HINT,
    TRUSTED_TARGET_PREFIXES,
    UNCONDITIONAL_SENTINEL,
    ConfigError,
    accepted_keywords,
    check_arguments,
    get_obj_from_str,
    instantiate_from_config,
    iter_targets,
    one_line,
    resolve_untrusted_target,
)

logger = logging.getLogger(__name__)

# Largest integer a size-giving slot of an untrusted config may hold (channels, blocks, codebook entries, timesteps):
# far above any real model's, far below what overflows a tensor's size.
MAX_CONFIG_INT = 2**24
# The dry run stops once the model registers this many tensors more than the checkpoint holds (a loop of a million
# blocks is refused after a few thousand), or MODULES_PER_TENSOR times as many modules (SiLU, Sequential, ... hold none).
TENSOR_SLACK = 1024
MODULES_PER_TENSOR = 4
# How deep a config read from a checkpoint may nest, and how many entries it may hold (a shared entry counts each time
# it is reached): real configs nest 6 levels and hold a few hundred; a pickle can hold a nest deeper than Python's
# recursion limit, a cycle, or a list holding itself twice at each of 60 levels (2**60 entries to walk).
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_ENTRIES = 100_000
# Numbers a model may hold beyond its checkpoint's, in non-persistent buffers (e.g. ``logvar``, ``lvlb_weights``).
EXTRA_NUMEL = 2**22
OPTIONAL_WEIGHTS = ("model_ema.",)  # an EMA is built only when the checkpoint has one
# Longest noise schedule a config may ask for: the constructor computes it on the CPU before any shape is compared.
MAX_SCHEDULE_STEPS = 100_000
# What constructors raise for arguments they cannot build from (a dry run turns them into one line); ImportError: an
# optional package (transformers) that a text encoder needs.
_BUILD_ERRORS = (ArithmeticError, AssertionError, AttributeError, ImportError, LookupError, RuntimeError, TypeError, ValueError)
# cond_stage_forward names a method of the cond stage that conditioning calls with the prompts: only these
COND_STAGE_FORWARDS = (None, "encode", "forward", "tokenize")


class RegistrationLimitError(CheckpointError):
    """A dry run stopped: the config's model registers far more tensors or modules than its checkpoint holds."""


@dataclass(frozen=True)
class ConfigRole:
    """What one slot of an untrusted config may build: ``accepts``, the kinds in words (for messages); ``kinds``,
    ``(base, package)`` pairs: a subclass of ``base`` (dotted) defined in ``package`` where it is given; ``slots``,
    parameter -> role of the sub-config it holds; ``sentinels``, strings the slot takes instead of a config;
    ``kwargs_of``, parameter -> classes that receive its entries as keyword arguments (whose type hints check them);
    ``files``, parameters naming files the class reads when it is built; ``sizes``, whether the slot's integers size
    tensors (bounded by :data:`MAX_CONFIG_INT`; a learning-rate schedule's step counts do not)."""

    accepts: str
    kinds: tuple[tuple[str, str | None], ...]
    slots: Mapping[str, str] = field(default_factory=dict)
    sentinels: tuple[str, ...] = ()
    kwargs_of: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    sizes: bool = True

    def admits(self, cls: type) -> bool:
        # a package is written with a trailing ".": the module must be it or lie inside it
        return any(
            issubclass(cls, get_obj_from_str(base)) and (package is None or f"{cls.__module__}.".startswith(package))
            for base, package in self.kinds
        )


_VQ = "ldm.models.autoencoder.VQModel"
_IDENTITY = "ldm.models.autoencoder.IdentityFirstStage"
_KL = "ldm.models.autoencoder.AutoencoderKL"
_VQ_SLOTS = {"lossconfig": "lossconfig"}
_DDCONFIG = {"ddconfig": ("ldm.modules.diffusionmodules.model.Encoder", "ldm.modules.diffusionmodules.model.Decoder")}
_VQ_FILES = ("remap",)  # taming's VectorQuantizer2 np.load()s it in its constructor

CONFIG_ROLES: dict[str, ConfigRole] = {
    "model": ConfigRole(
        "a latent diffusion model (ldm.models.diffusion.latent.LatentDiffusion or a subclass)",
        (("ldm.models.diffusion.latent.LatentDiffusion", None),),
        slots={
            "unet_config": "unet_config",
            "first_stage_config": "first_stage_config",
            "cond_stage_config": "cond_stage_config",
            "scheduler_config": "scheduler_config",
        },
    ),
    "unet_config": ConfigRole(
        "the project's UNet (ldm.modules.diffusionmodules.openaimodel.UNetModel or a subclass)",
        (("ldm.modules.diffusionmodules.openaimodel.UNetModel", None),),
    ),
    "first_stage_config": ConfigRole(
        f"a VQ or KL first stage ({_VQ}, {_KL} or a subclass) or {_IDENTITY} (pixel space)",
        ((_VQ, None), (_KL, None), (_IDENTITY, None)),
        _VQ_SLOTS,
        kwargs_of=_DDCONFIG,
        files=_VQ_FILES,
    ),
    "cond_stage_config": ConfigRole(
        f"a conditioning encoder (a torch.nn.Module of ldm.modules.encoders), a VQ first stage ({_VQ} or a subclass), "
        f"torch.nn.Identity, {FIRST_STAGE_SENTINEL!r} or {UNCONDITIONAL_SENTINEL!r}",
        (("torch.nn.Module", "ldm.modules.encoders."), (_VQ, None), ("torch.nn.Identity", None)),
        _VQ_SLOTS,
        sentinels=(FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL),
        kwargs_of=_DDCONFIG,
        files=_VQ_FILES,
    ),
    "lossconfig": ConfigRole(
        "torch.nn.Identity (a model rebuilt for inference needs no training loss)", (("torch.nn.Identity", None),)
    ),
    "scheduler_config": ConfigRole(
        "a learning-rate schedule of ldm.lr_scheduler", (("builtins.object", "ldm.lr_scheduler."),), sizes=False
    ),
}


def check_untrusted_model(
    cfg: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    allowed_prefixes: Sequence[str] = TRUSTED_TARGET_PREFIXES,
) -> None:
    """Check a model config against its checkpoint's weights (only shapes and ``betas`` are read) before anything is
    built for real: :func:`check_untrusted_config`, the schedule length, a meta-device dry run under registration
    limits, every shape, missing weights and the total size; ``source`` names the checkpoint.  Raises ``ConfigError``
    (a target of the wrong kind or outside the allow-list, a bad value, a config that cannot be built) or
    ``CheckpointError`` ("config and checkpoint disagree: ..." for shapes, schedule length, sizes; missing weights)."""
    try:
        check_untrusted_config(cfg, "model", allowed_prefixes)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    _check_schedule_length(cfg, state_dict, source)
    model = _build_on_meta(cfg, state_dict, source)
    model.check_schedule_matches(state_dict, source=source)
    try:
        missing, _ = check_weights_fit(model, state_dict, source)
    except CheckpointError as exc:
        raise CheckpointError(f"config and checkpoint disagree: {exc}") from exc
    require_weights(missing, source, optional_prefixes=OPTIONAL_WEIGHTS)
    _check_total_size(model, state_dict, source)


def check_config_structure(config: Any, source: str) -> None:
    """Refuse a config read from a checkpoint that nests deeper than :data:`MAX_CONFIG_DEPTH` or holds more than
    :data:`MAX_CONFIG_ENTRIES` entries, before anything walks it recursively (``copy.deepcopy``, the target scans)."""
    stack, entries = [(config, 1)], 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            bad = next((k for k in node if not isinstance(k, str)), None)
            if bad is not None:
                raise ConfigError(
                    f"{source}: its stored config has a key {clipped_repr(bad)} of type {type(bad).__name__}; config keys are "
                    "strings (argument names): the file is corrupt or crafted"
                )
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = list(node)
        else:
            continue
        entries += len(children)
        if depth > MAX_CONFIG_DEPTH or entries > MAX_CONFIG_ENTRIES:
            raise ConfigError(
                f"{source}: its stored config nests deeper than {MAX_CONFIG_DEPTH} levels or holds more than "
                f"{MAX_CONFIG_ENTRIES:,} entries (a shared entry counted each time it is reached); a model config is "
                "far smaller: the file is corrupt or crafted"
            )
        stack.extend((child, depth + 1) for child in children)


def check_untrusted_config(
    config: Any, role: str = "model", allowed_prefixes: Sequence[str] = TRUSTED_TARGET_PREFIXES, where: str = "model"
) -> None:
    """Refuse a ``config`` for the slot ``role`` (a key of :data:`CONFIG_ROLES`), or a sub-config, that names a class
    of another kind, a file its class reads or ``unsafe_load: true``, or whose values do not fit the constructors' type
    hints; ``where``: the slot's path in messages.  Modules that targets name are imported, nothing is built."""
    spec = CONFIG_ROLES[role]
    if isinstance(config, str) and config in spec.sentinels:
        return
    if not isinstance(config, Mapping) or not isinstance(config.get("target"), str):
        raise ConfigError(
            f"{where}={clipped_repr(config)} is not a config {{target: ..., params: ...}}; {where} accepts {spec.accepts}"
        )
    target = config["target"]
    try:
        cls = resolve_untrusted_target(target, allowed_prefixes)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if not spec.admits(cls):
        raise ConfigError(f"{where} accepts {spec.accepts}; target={target!r} is {_kind(cls)}. {TRUST_HINT}")
    params = config.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params must be a mapping of constructor arguments, got {type(params).__name__}")
    try:
        hints = check_arguments(cls, params, target).params
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    for name, value in params.items():
        here = f"{where}.params.{name}"
        if name == "cond_stage_forward" and value not in COND_STAGE_FORWARDS:
            raise ConfigError(
                f"{here}={clipped_repr(value)}: a config stored in a checkpoint may name only the cond stage methods "
                f"{list(COND_STAGE_FORWARDS)}. {TRUST_HINT}"
            )
        if name == "unsafe_load" and value is True:
            raise ConfigError(
                f"{here}=True for {params.get('ckpt_path')!r}: a config stored in a checkpoint asks to load it with full "
                "pickle (unsafe_load); refused. Only the checkpoints you name yourself can be loaded with --unsafe-load; "
                "pass --trust-config (trust_config=True) only if you trust the config's author"
            )
        if name in spec.slots:
            if value is not None:
                check_untrusted_config(value, spec.slots[name], allowed_prefixes, here)
            continue
        if name in spec.files and value is not None:
            raise ConfigError(
                f"{here}={clipped_repr(value)} names a file that {cls.__name__} reads when it is built; a config stored in a "
                f"checkpoint may not (the checkpoint holds the weights). {TRUST_HINT}"
            )
        inner = next(iter(iter_targets(value)), None)
        if inner is not None:
            raise ConfigError(
                f"{here} holds a config (target={inner!r}), but {name!r} is no slot of {cls.__name__}: a config stored "
                f"in a checkpoint builds classes only in the slots {sorted(spec.slots)}. {TRUST_HINT}"
            )
        _check_value(value, here, spec.sizes, *hints.get(name, (Any, None)))
        if name in spec.kwargs_of and isinstance(value, Mapping):
            receivers: dict[str, tuple[Any, Any]] = {}
            for dotted in reversed(spec.kwargs_of[name]):
                receivers.update(accepted_keywords(get_obj_from_str(dotted)).params)
            for key, item in value.items():
                _check_value(item, f"{here}.{key}", spec.sizes, *receivers.get(key, (Any, None)))


# -------------------------------------------------------------------------------------------------------------- values
def _check_value(value: Any, where: str, sizes: bool, hint: Any, default: Any) -> None:
    """Refuse ``value`` unless it fits the type ``hint`` of the argument (with ``default``) that receives it."""
    # -1 is CompVis' "unset" for num_heads / num_head_channels: allowed where it is the default
    low = -1 if is_int(default) and default == -1 else 0
    problem = _mismatch(value, hint, sizes, low)
    if problem is not None:
        raise ConfigError(
            f"{where}={clipped_repr(value)}: {problem} (a config stored in a checkpoint is checked against the "
            "types of the constructor that receives it)"
        )


def _mismatch(value: Any, hint: Any, sizes: bool, low: int) -> str | None:
    """Why ``value`` does not fit ``hint`` (None: it fits); integers out of range count when ``sizes``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return _huge_int(value) if sizes else None
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        problems = [_mismatch(value, member, sizes, low) for member in members]
        if any(p is None for p in problems):
            return None
        return next(p for member, p in zip(members, problems) if member is not type(None))
    if hint is type(None):
        return None if value is None else f"expected None, got {_type(value)}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {_type(value)}"
    if hint is int:
        if not is_int(value):
            return f"expected an integer, got {_type(value)}"
        if sizes and not low <= value <= MAX_CONFIG_INT:
            return f"out of range: an integer here must lie in [{low}, {MAX_CONFIG_INT}]"
        return None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {_type(value)}"
        return None if math.isfinite(value) else "expected a finite number"
    if hint is str:
        return None if isinstance(value, str) else f"expected a string, got {_type(value)}"
    if origin in (Sequence, list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {_type(value)}"
        item_hint = next((a for a in typing.get_args(hint) if a is not Ellipsis), Any)
        for i, item in enumerate(value):
            problem = _mismatch(item, item_hint, sizes, 0)
            if problem is not None:
                return f"item {i} ({clipped_repr(item)}): {problem}"
        return None
    if origin in (Mapping, dict) or hint is dict:
        if not isinstance(value, Mapping):
            return f"expected a mapping, got {_type(value)}"
        args = typing.get_args(hint)
        value_hint = args[1] if len(args) == 2 else Any
        for key, item in value.items():
            problem = _mismatch(item, value_hint, sizes, 0)
            if problem is not None:
                return f"entry {key!r} ({clipped_repr(item)}): {problem}"
        return None
    if isinstance(hint, type) and not isinstance(value, hint):
        return f"expected {hint.__name__}, got {_type(value)}"
    return None


def _huge_int(value: Any) -> str | None:
    """For values without a usable type hint: no integer anywhere in them beyond +-MAX_CONFIG_INT."""
    if is_int(value):
        return None if abs(value) <= MAX_CONFIG_INT else f"out of range: integers here must lie within +-{MAX_CONFIG_INT}"
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    return next((p for p in map(_huge_int, items) if p is not None), None)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def clipped_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(cls: type) -> str:
    """What ``cls`` is, in words, for "slot X accepts ...; target Y is <this>"."""
    import pytorch_lightning as pl
    from torch.utils.data import Dataset

    kinds = (
        (Dataset, "a dataset"),
        (pl.LightningDataModule, "a data module"),
        (pl.Callback, "a Lightning callback"),
        (pl.LightningModule, "another kind of model"),
        (torch.nn.Module, "another kind of network module"),
    )
    return next((words for base, words in kinds if issubclass(cls, base)), "a class of another kind")


# --------------------------------------------------------------------------------------------------------------- sizes
def _check_schedule_length(cfg: Mapping[str, Any], state_dict: Mapping[str, Any], source: str) -> None:
    """``timesteps`` (or ``len(given_betas)``) must equal the checkpoint's: the constructor computes that many values
    on the CPU before any shape could be compared."""
    betas = state_dict.get("betas")
    if not isinstance(betas, torch.Tensor) or betas.ndim != 1 or _stored_numel(betas) < betas.numel():
        raise CheckpointError(
            f"{source} lacks the weights the model needs, starting with its noise schedule ('betas', a 1-D tensor): it "
            "is the wrong kind (e.g. a first-stage-only checkpoint) or the config describes another model"
        )
    params = cfg.get("params") or {}
    given = params.get("given_betas")
    if given is not None:
        steps = len(given)
    else:
        default = accepted_keywords(get_obj_from_str(cfg["target"])).params.get("timesteps", (int, 1000))[1]
        steps = params.get("timesteps", default)
    if steps != betas.shape[0]:
        raise CheckpointError(
            f"config and checkpoint disagree: {source} holds a noise schedule of {betas.shape[0]} timesteps (betas), its "
            f"config asks for {clipped_repr(steps)}; refused before computing it"
        )
    if steps > MAX_SCHEDULE_STEPS:
        raise ConfigError(
            f"{source}: its config asks for a noise schedule of {steps} timesteps; at most {MAX_SCHEDULE_STEPS:,} "
            "(CompVis' models have 1000)"
        )


def _build_on_meta(cfg: Mapping[str, Any], state_dict: Mapping[str, Any], source: str) -> torch.nn.Module:
    """The model of ``cfg`` on the meta device (the CPU random state kept), stopped once it registers
    :data:`TENSOR_SLACK` more tensors than the checkpoint holds or :data:`MODULES_PER_TENSOR` times as many modules."""
    limits = {"tensors": len(state_dict) + TENSOR_SLACK}
    limits["modules"] = MODULES_PER_TENSOR * limits["tensors"]
    counts = dict.fromkeys(limits, 0)

    def count(what: str, module: torch.nn.Module, name: str) -> None:
        counts[what] += 1
        if counts[what] > limits[what]:
            raise RegistrationLimitError(
                f"config and checkpoint disagree: {source} holds {len(state_dict)} tensors, its config's model registers "
                f"more than {limits[what]} {what} (stopped at {type(module).__name__}.{name}); refused before building further"
            )

    handles = [
        torch_module.register_module_parameter_registration_hook(lambda m, n, t: count("tensors", m, n)),
        torch_module.register_module_buffer_registration_hook(lambda m, n, t: count("tensors", m, n)),
        torch_module.register_module_module_registration_hook(lambda m, n, s: count("modules", m, n)),
    ]
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return instantiate_from_config(cfg)
    except RegistrationLimitError:
        raise
    except _BUILD_ERRORS as exc:  # also a CheckpointError of a sub-model's own ckpt_path, named as load_expert names it
        reason = one_line(exc)
        if not isinstance(exc, ValueError):
            reason = f"{type(exc).__name__}: {reason}"
        raise ConfigError(f"{source}: cannot build {cfg['target']!r} from its config: {reason}") from exc
    finally:
        for handle in handles:
            handle.remove()


def _stored_numel(tensor: torch.Tensor) -> int:
    """How many numbers of ``tensor``'s dtype its storage holds (fewer than ``numel()`` for an expanded tensor)."""
    if tensor.layout is not torch.strided:
        return 0
    return tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)


def _check_total_size(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """The model may hold only :data:`EXTRA_NUMEL` (or a quarter) more numbers than the checkpoint."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    numel = sum(t.numel() for t in tensors.values())
    # numbers the file really stores: an expanded (stride-0) tensor or keys sharing one storage hold fewer than they show
    storages: dict[int, int] = {}
    for value in state_dict.values():
        if isinstance(value, torch.Tensor):
            ptr = value.untyped_storage().data_ptr() or id(value)  # 0: no memory (meta or empty), nothing shared
            storages[ptr] = max(storages.get(ptr, 0), _stored_numel(value))
    held = sum(storages.values())
    if numel > held + max(EXTRA_NUMEL, held // 4):
        raise CheckpointError(
            f"config and checkpoint disagree: its config's model would hold {numel:,} numbers, {source} only {held:,}; "
            "refused before allocating them"
        )
    logger.debug("%s: the config's model fits the checkpoint (%d numbers, checkpoint %d)", source, numel, held)
