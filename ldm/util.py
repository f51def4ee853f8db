"""Small shared helpers: configuration-driven construction and a few utilities.

`instantiate_from_config` follows latent-diffusion: a config is a mapping with a dotted import path under
``target`` and constructor keyword arguments under ``params``.  Two sentinels are strings instead of mappings:
``"__is_first_stage__"`` (use the first stage as conditioning encoder) and ``"__is_unconditional__"``
(no conditioning); they are interpreted by :class:`~ldm.models.diffusion.ddpm.LatentDiffusion`, never here.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FIRST_STAGE_SENTINEL = "__is_first_stage__"
UNCONDITIONAL_SENTINEL = "__is_unconditional__"
_SENTINELS = (FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL)
# keys a {target, params} node may carry; base_learning_rate sits beside target in latent-diffusion's model configs
CONFIG_KEYS = {"target", "params", "base_learning_rate"}

# Import prefixes that a config stored inside a checkpoint may name without an explicit trust flag.
TRUSTED_TARGET_PREFIXES: tuple[str, ...] = ("ldm.", "taming.modules.", "torch.nn.Identity")


class ConfigError(ValueError):
    """A configuration names something that does not exist or is not allowed."""


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``.

    Raises :class:`ConfigError` naming the module or attribute that could not be found.
    """
    if not isinstance(string, str) or "." not in string:
        raise ConfigError(f"target={string!r} is not a dotted import path like 'ldm.models.autoencoder.VQModel'")
    module_name, cls_name = string.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"target={string!r}: module {module_name!r} cannot be imported ({exc})") from exc
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, cls_name)
    except AttributeError as exc:
        public = sorted(n for n in dir(module) if not n.startswith("_"))
        raise ConfigError(
            f"target={string!r}: module {module_name!r} has no attribute {cls_name!r}; it defines {public[:20]}"
        ) from exc


def check_target_allowed(target: str, allowed_prefixes: Iterable[str] = TRUSTED_TARGET_PREFIXES) -> None:
    """Refuse a ``target`` outside ``allowed_prefixes`` (used for configs that come from checkpoints)."""
    prefixes = tuple(allowed_prefixes)
    if not any(target == p or target.startswith(p) for p in prefixes):
        raise ConfigError(
            f"target={target!r} is not in the allow-list {list(prefixes)}; a config stored in a checkpoint may only "
            "build classes of this project. If you trust the file, pass the explicit trust flag (--trust-config / "
            "trust_config=True)."
        )


def iter_targets(config: Any) -> Iterable[str]:
    """Yield every ``target`` string found anywhere in a nested config (dicts / lists / OmegaConf nodes)."""
    if isinstance(config, Mapping) or hasattr(config, "items"):
        for key, value in config.items():
            if key == "target" and isinstance(value, str):
                yield value
            else:
                yield from iter_targets(value)
    elif isinstance(config, (list, tuple)) or type(config).__name__ == "ListConfig":
        for value in config:
            yield from iter_targets(value)


def instantiate_from_config(
    config: Mapping[str, Any] | Any,
    allowed_prefixes: Iterable[str] | None = None,
    **overrides: Any,
) -> Any:
    """Build ``target(**params, **overrides)`` from a config mapping.

    Args:
        config: mapping (dict or OmegaConf) with ``target`` and optional ``params``.
        allowed_prefixes: if given, every ``target`` in the config (nested ones included) must start with one
            of these prefixes; used when the config was read from an untrusted checkpoint.
        overrides: keyword arguments that take precedence over ``params``.
    """
    if isinstance(config, str) and config in _SENTINELS:
        raise ConfigError(
            f"{config!r} is a sentinel for LatentDiffusion's cond_stage_config, not something to instantiate"
        )
    if not (isinstance(config, Mapping) or hasattr(config, "keys")) or "target" not in config:
        keys = list(config.keys()) if hasattr(config, "keys") else type(config).__name__
        raise ConfigError(f"config has no 'target' key (found {keys}); expected {{target: pkg.Class, params: {{...}}}}")
    if allowed_prefixes is not None:
        for target in iter_targets(config):
            check_target_allowed(target, allowed_prefixes)
    unknown = set(config.keys()) - CONFIG_KEYS
    if unknown:
        raise ConfigError(
            f"config for {config['target']!r} has unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}"
        )
    cls = get_obj_from_str(config["target"])
    params = dict(config.get("params", None) or {})
    params.update(overrides)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"cannot build {config['target']!r} with params {sorted(params)}: {exc}") from exc


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    """Number of parameters of ``model``; logs it in millions when ``verbose``."""
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total * 1.0e-6)
    return total


def default(val: Any, d: Any | Callable[[], Any]) -> Any:
    """``val`` unless it is None, else ``d`` (called when callable)."""
    if val is not None:
        return val
    return d() if callable(d) else d


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: ``[B, ...] -> [B]``."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, write: bytes | Callable[[Any], None]) -> None:
    """Write a file atomically: ``write`` (bytes, or a function ``write(fileobj)``) goes to a temp file in the same
    folder, which then replaces ``path`` with ``os.replace``.

    A reader never sees a half-written file; on any error the temp file is removed and the error re-raised.
    """
    if isinstance(write, (bytes, bytearray, memoryview)):
        payload = bytes(write)

        def write(fh: Any) -> None:
            fh.write(payload)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions of a new file
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_rank_zero() -> bool:
    """True on the global rank-0 process (or when not distributed); used to show progress bars once."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "0") != "0":
            return False
    return True
