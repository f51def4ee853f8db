"""Shared helpers: latent-diffusion's ``instantiate_from_config`` (``{target: pkg.Class, params: {...}}``), atomic
writes and a few utilities."""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import re
import tempfile
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FIRST_STAGE_SENTINEL = "__is_first_stage__"
UNCONDITIONAL_SENTINEL = "__is_unconditional__"
# keys a {target, params} node may carry; base_learning_rate sits beside target in latent-diffusion's model configs
CONFIG_KEYS = {"target", "params", "base_learning_rate"}

# What a config stored inside a checkpoint may name without an explicit trust flag: entries ending with "." are package
# prefixes, the others exact class names.
TRUSTED_TARGET_PREFIXES: tuple[str, ...] = ("ldm.", "taming.modules.", "torch.nn.Identity")
# Parts of the allowed packages that an untrusted config still may not build, with the reason.
UNTRUSTED_DENIED_PREFIXES: dict[str, str] = {
    "taming.modules.losses.": "taming's LPIPS downloads VGG weights from the internet when it is built "
    "(this project's offline loss is ldm.modules.losses.VQLPIPSWithDiscriminator)",
}
TRUST_HINT = "If you trust the file, pass the explicit trust flag (--trust-config / trust_config=True)."
_DOTTED_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# Temp files of atomic_write_bytes: "." + destination name + "." + 8 characters of tempfile's alphabet + ".tmp".
TEMP_FILE_PATTERN = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.tmp$")
# The longest destination name (bytes) whose temp name fits in NAME_MAX (255 on Linux and macOS file systems).
LONGEST_ATOMIC_NAME = 255 - len("..12345678.tmp")


class ConfigError(ValueError):
    """A configuration names something that does not exist or is not allowed."""


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``"package.module.Name"`` and return ``Name`` (:class:`ConfigError` naming what could not be found)."""
    if not isinstance(string, str) or not _DOTTED_PATH.match(string):
        raise ConfigError(f"target={string!r} is not a dotted import path like 'ldm.models.autoencoder.VQModel'")
    module_name, cls_name = string.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"target={string!r}: module {module_name!r} cannot be imported ({exc})") from exc
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, cls_name)
    except AttributeError as exc:
        public = {n: v for n, v in vars(module).items() if not n.startswith("_")}
        # names defined in the module itself (a package's __init__ only re-exports: then every public callable)
        own = sorted(n for n, v in public.items() if getattr(v, "__module__", None) == module_name) or sorted(
            n for n, v in public.items() if callable(v)
        )
        raise ConfigError(
            f"target={string!r}: module {module_name!r} has no attribute {cls_name!r}{closest_hint(cls_name, own)}; "
            f"it defines {own[:20]}"
        ) from exc


def check_target_allowed(target: str, allowed_prefixes: Iterable[str] = TRUSTED_TARGET_PREFIXES) -> None:
    """Refuse a ``target`` outside ``allowed_prefixes`` (``"."``-ended: packages, else exact names) or under
    :data:`UNTRUSTED_DENIED_PREFIXES` (configs from checkpoints); nothing is imported."""
    prefixes = tuple(allowed_prefixes)
    if not any(target.startswith(p) if p.endswith(".") else target == p for p in prefixes):
        raise ConfigError(
            f"target={target!r} is not in the allow-list {list(prefixes)}; a config stored in a checkpoint may only "
            f"build classes of this project. {TRUST_HINT}"
        )
    for denied, reason in UNTRUSTED_DENIED_PREFIXES.items():
        if target.startswith(denied):
            raise ConfigError(f"target={target!r} is refused in a config stored in a checkpoint: {reason}. {TRUST_HINT}")


def resolve_untrusted_target(target: str, allowed_prefixes: Iterable[str] = TRUSTED_TARGET_PREFIXES) -> type:
    """The class an untrusted config names, after :func:`check_target_allowed`: a class (a function such as a file
    writer is never a model part) defined in an allowed package (``ldm.util.Path`` is only imported there), unless the
    allow-list names it exactly (``torch.nn.Identity``)."""
    prefixes = tuple(allowed_prefixes)
    check_target_allowed(target, prefixes)
    obj = get_obj_from_str(target)
    if not inspect.isclass(obj):
        raise ConfigError(
            f"target={target!r} is a {type(obj).__name__}, not a class; a config stored in a checkpoint may only build "
            f"classes of the allow-list {list(prefixes)}. {TRUST_HINT}"
        )
    defined = f"{obj.__module__}.{obj.__qualname__}"
    if defined != target and target not in prefixes:  # exact entries (torch.nn.Identity) are allowed by name
        try:
            check_target_allowed(defined, prefixes)
        except ConfigError as exc:
            raise ConfigError(
                f"target={target!r} is {defined}, which is defined outside the allow-list {list(prefixes)} "
                f"(only imported there). {TRUST_HINT}"
            ) from exc
    return obj


def iter_targets(config: Any) -> Iterable[str]:
    """Yield every ``target`` string found anywhere in a nested config (dicts / lists / OmegaConf nodes)."""
    if hasattr(config, "items"):  # dicts and OmegaConf DictConfigs
        for key, value in config.items():
            if key == "target" and isinstance(value, str):
                yield value
            else:
                yield from iter_targets(value)
    elif isinstance(config, (list, tuple)) or type(config).__name__ == "ListConfig":
        for value in config:
            yield from iter_targets(value)


def one_line(text: Any) -> str:
    """``str(text)`` with every whitespace run (newlines included) collapsed into one space: a message for one line."""
    return " ".join(str(text).split())


def closest_hint(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a misspelled ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Packages whose classes take **kwargs that this walk cannot list (nn.Module subclasses forward them to torch)
_OPEN_PACKAGES = ("torch", "pytorch_lightning", "lightning", "builtins")


@dataclass(frozen=True)
class Keywords:
    """``params``: name -> (type hint or ``Any``, default or ``inspect.Parameter.empty``); ``required``: the names
    ``obj``'s own signature needs; ``open``: it also takes keywords the walk could not list (``**kwargs``)."""

    params: dict[str, tuple[Any, Any]]
    required: tuple[str, ...]
    open: bool


def accepted_keywords(obj: Callable[..., Any]) -> Keywords:
    """The keyword arguments a class or function accepts.  A class whose ``__init__`` forwards ``**kwargs`` is
    followed up its MRO: ``LateStepsLatentDiffusion(t_min, t_max, **kwargs)`` accepts ``LatentDiffusion``'s too."""
    owners = [k for k in obj.__mro__ if "__init__" in vars(k)] if inspect.isclass(obj) else [None]
    params: dict[str, tuple[Any, Any]] = {}
    required: tuple[str, ...] | None = None
    for klass in owners:
        init = obj if klass is None else vars(klass)["__init__"]
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not evaluate here (any error it raises): no type check
            hints = {}
        named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
        for p in named:
            params.setdefault(p.name, (hints.get(p.name, Any), p.default))
        if required is None:
            required = tuple(p.name for p in named if p.default is p.empty)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return Keywords(params, required, open=False)
        if klass is None or klass.__module__.split(".")[0] in _OPEN_PACKAGES:
            break
    return Keywords(params, required or (), open=True)


def unknown_argument(name: str, key: str, accepted: Iterable[str]) -> str:
    """The message for an argument ``key`` that ``name`` does not take."""
    accepted = list(accepted)
    return f"{name} takes no argument {key!r}{closest_hint(key, accepted)}; it accepts: {', '.join(accepted)}"


def check_arguments(obj: Callable[..., Any], given: Iterable[str], name: str) -> Keywords:
    """Refuse keyword arguments that ``obj`` does not take (naming the closest one it does) and missing required ones,
    before it is called; returns what ``obj`` accepts.  ``name`` is how messages name ``obj`` (its config target)."""
    keywords, given = accepted_keywords(obj), set(given)
    for key in sorted(given, key=str):
        if not keywords.open and key not in keywords.params:
            raise ConfigError(unknown_argument(name, str(key), keywords.params))
    missing = [key for key in keywords.required if key not in given]
    if missing:
        raise ConfigError(f"{name} needs the argument(s) {', '.join(map(repr, missing))}, which have no default; add them")
    return keywords


def instantiate_from_config(config: Mapping[str, Any] | Any, **overrides: Any) -> Any:
    """Build ``target(**params, **overrides)`` from a mapping (dict or OmegaConf) with ``target`` and optional
    ``params``, after :func:`check_arguments`; None for the two ``cond_stage_config`` sentinels.  A config read from a
    checkpoint is checked by :mod:`ldm.untrusted` before it gets here."""
    if isinstance(config, str) and config in (FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL):
        return None  # as latent-diffusion: LatentDiffusion resolves these cond_stage_config markers itself
    if not hasattr(config, "keys") or "target" not in config:
        keys = list(config.keys()) if hasattr(config, "keys") else type(config).__name__
        raise ConfigError(f"config has no 'target' key (found {keys}); expected {{target: pkg.Class, params: {{...}}}}")
    unknown = set(config.keys()) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"config for {config['target']!r} has unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    cls = get_obj_from_str(config["target"])
    params = config.get("params") or {}
    if not hasattr(params, "keys"):
        raise ConfigError(
            f"params of {config['target']!r} must be a mapping of constructor arguments, got {type(params).__name__} {params!r}"
        )
    params = {**params, **overrides}
    check_arguments(cls, params, str(config["target"]))
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"cannot build {config['target']!r} with params {sorted(params)}: {exc}") from exc


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total * 1.0e-6)
    return total


def atomic_write_bytes(path: str | os.PathLike, write: bytes | Callable[[Any], None]) -> None:
    """Write ``write`` (bytes, or a function ``write(fileobj)``) to a temp file ``.<name>.<8 characters>.tmp`` beside
    ``path``, fsync it and ``os.replace`` it onto ``path``: a reader never sees a half-written file.  On an error the
    temp file is removed (an OS error then names ``path``); a killed process leaves it to :func:`remove_stale_temp_files`."""
    if isinstance(write, (bytes, bytearray, memoryview)):
        payload = bytes(write)

        def write(fh: Any) -> None:
            fh.write(payload)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions of a new file
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except OSError as exc:
        if exc.errno is None or type(exc).__module__ != "builtins":
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); skipped where folders cannot be opened or synced."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:  # some file systems (e.g. some network mounts) refuse fsync on a folder
        logger.debug("cannot fsync folder %s: %s", folder, exc)


def remove_stale_temp_files(
    folder: str | os.PathLike, names: Iterable[str] | None = None, keep: Collection[str] = ()
) -> list[Path]:
    """Delete the temp files that :func:`atomic_write_bytes` left in ``folder`` (not recursive) when its process was
    killed; returns what was removed.  ``names``: only the temps of these destination names (safe while other processes
    write other files into ``folder``), None: every temp; ``keep``: real paths never removed (the files the caller
    reads)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if names is None else set(names)
    real_folder = os.path.realpath(folder)  # once: an entry that is no link has the real path real_folder/<name>
    removed = []
    for entry in sorted(folder.iterdir()):
        match = TEMP_FILE_PATTERN.match(entry.name)
        if not match or (wanted is not None and match.group(1) not in wanted):
            continue
        if os.path.join(real_folder, entry.name) in keep:
            logger.info("kept %s: named like a partial write, but it is a file this run reads", entry)
            continue
        if entry.is_file() and not entry.is_symlink():
            entry.unlink()
            removed.append(entry)
            logger.info("removed %s, a partial write of a killed process", entry)
    return removed


def is_rank_zero() -> bool:
    """True on the global rank-0 process (or when not distributed)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))
