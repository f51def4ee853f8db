"""Command line of ``main.py``: latent-diffusion's flags, YAML merging (:mod:`ldm.train.config_merge`) and dotlist
overrides, each checked before anything is built: an override key must name a key of the merged config, an argument of
the ``target`` whose ``params`` it lands in, or a Lightning 2 ``Trainer`` argument (one line with the closest valid name).
"""

from __future__ import annotations

import argparse
import difflib
import glob
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.cli import decimal_int
from ldm.train.config_merge import DELETE_PREFIX, delete_key, drop_replaced_params, is_deletion, merge_layers
from ldm.util import ConfigError, accepted_keywords, closest_hint, get_obj_from_str, one_line, unknown_argument

logger = logging.getLogger(__name__)

DEFAULT_SEED = 23  # latent-diffusion's main.py default
MAX_SEED = 2**32 - 1  # numpy's seeding (and Lightning's seed_everything) take [0, 2**32 - 1]
PROJECT_KEYS = ("model", "data", "lightning")
LIGHTNING_KEYS = ("trainer", "callbacks", "modelcheckpoint", "logger")
# Trainer arguments main.py fills itself; setting them in lightning.trainer would silently lose main.py's own.
RESERVED_TRAINER_KEYS = {
    "callbacks": "put callbacks under lightning.callbacks.<name>: {target, params}",
    "logger": "configure the logger under lightning.logger: {target, params}",
    "plugins": "main.py installs its own checkpoint I/O plugin",
    "default_root_dir": "the run's log dir is set with -l/--logdir, -n/--name and -p/--postfix",
    "use_distributed_sampler": "main.py shards the training data per rank itself (deterministic and resumable)",
}
# Lightning 1.x Trainer arguments that latent-diffusion configs used, with their Lightning 2 spelling.
LIGHTNING1_HINTS = {
    "gpus": "use lightning.trainer.accelerator=gpu lightning.trainer.devices=N",
    "tpu_cores": "use lightning.trainer.accelerator=tpu lightning.trainer.devices=N",
    "num_processes": "use lightning.trainer.devices=N",
    "auto_select_gpus": "use lightning.trainer.devices=N (or 'auto')",
    "resume_from_checkpoint": "resume with main.py -r <logdir or checkpoint>",
    "replace_sampler_ddp": "main.py shards the training data itself; drop the key",
    "checkpoint_callback": "use lightning.trainer.enable_checkpointing",
    "terminate_on_nan": "use lightning.trainer.detect_anomaly",
    "progress_bar_refresh_rate": "use lightning.trainer.enable_progress_bar",
    "weights_summary": "use lightning.trainer.enable_model_summary",
    "flush_logs_every_n_steps": "set it on the logger: lightning.logger.params.flush_logs_every_n_steps",
    "amp_backend": "use lightning.trainer.precision (e.g. 16-mixed, bf16-mixed)",
    "amp_level": "use lightning.trainer.precision (e.g. 16-mixed, bf16-mixed)",
    "track_grad_norm": "log gradient norms from the LightningModule instead",
    "reload_dataloaders_every_epoch": "use lightning.trainer.reload_dataloaders_every_n_epochs",
    "move_metrics_to_cpu": "removed in Lightning 2; drop the key",
    "stochastic_weight_avg": "add pytorch_lightning.callbacks.StochasticWeightAveraging under lightning.callbacks",
}
# latent-diffusion configs name callbacks of its main.py; they live in ldm.train.callbacks here.
LEGACY_CALLBACK_TARGETS = {"main.ImageLogger": "ldm.train.callbacks.ImageLogger"}
LEGACY_DATA_TARGETS = {"main.DataModuleFromConfig": "ldm.data.datamodule.DataModuleFromConfig"}


class CLIError(ConfigError):
    """The command line itself is wrong (unknown flag, malformed override, conflicting options)."""


def str2bool(value: str) -> bool:
    """``true/yes/1/y`` or ``false/no/0/n`` (any case) as a bool, for flags like ``--scale_lr False``."""
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def seed_value(text: str) -> int:
    """An argparse ``type`` for ``-s``: a decimal integer in ``[0, MAX_SEED]``."""
    try:
        value = decimal_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is outside the seed range [0, {MAX_SEED}]")
    return value


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises :class:`CLIError` (one line, exit status 2 in ``main.py``) instead of printing the usage
    block and calling ``sys.exit`` (``-l`` without its value, ``-s abc``, ...)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see python main.py --help)")


def build_parser() -> argparse.ArgumentParser:
    """latent-diffusion's ``main.py`` flags (``-p`` is the log-dir postfix here, ``--unsafe-load`` is new)."""
    parser = _RaisingParser(
        prog="main.py",
        allow_abbrev=False,
        description="Train latent-diffusion style models from YAML configs on Lightning 2. Arguments of the form "
        "key=value override config entries (OmegaConf dotlist), e.g. lightning.trainer.max_steps=100; ~key deletes "
        "one, e.g. '~data.params.validation'. A later config or override that gives a {target, params} node another "
        "target replaces that node's params instead of merging them.",
    )
    parser.add_argument("-n", "--name", type=str, default="", help="run name (log dir suffix); default: config name")
    parser.add_argument("-r", "--resume", type=str, default="", help="resume from a log dir or a checkpoint inside one")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[], help="configs, merged left to right")
    parser.add_argument("-t", "--train", action="store_true", help="train (otherwise only test)")
    parser.add_argument("--no-test", action="store_true", help="skip trainer.test after training")
    parser.add_argument("-p", "--postfix", type=str, default="", help="appended to the log dir name")
    parser.add_argument(
        "-s",
        "--seed",
        type=seed_value,
        default=None,
        help=f"global seed (per-rank streams derive from it); default {DEFAULT_SEED}, or on -r the seed stored in the "
        "resumed checkpoint",
    )
    parser.add_argument("-l", "--logdir", type=str, default=None, help="folder holding the run folders (default: logs)")
    parser.add_argument(
        "--scale_lr",
        type=str2bool,
        nargs="?",
        const=True,
        default=True,
        help="lr = accumulate_grad_batches * devices * num_nodes * batch_size * base_learning_rate (default true)",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow full pickle loading of checkpoints (resume and init); only for files you trust",
    )
    return parser


def split_dotlist(entries: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(files, overrides)`` of a list of config arguments: ``key=value`` and ``~key`` tokens that are not existing
    files are overrides (argparse puts them into a ``nargs`` list of configs: ``-b a.yaml k=v``)."""
    files, overrides = [], []
    for entry in entries:
        is_override = ("=" in entry or is_deletion(entry)) and not os.path.isfile(entry)
        (overrides if is_override else files).append(entry)
    return files, overrides


def check_dotlist_tokens(tokens: Sequence[str], flags: Sequence[str], configs_flag: str = "-b/--base") -> None:
    """Raise :class:`CLIError` for a token of ``tokens`` that is neither ``key=value`` nor ``~key``: an unknown flag
    (with the closest of ``flags``) or a stray word."""
    for token in tokens:
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            close = difflib.get_close_matches(name, list(flags), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CLIError(f"unrecognized option {name!r}{hint}; valid options: {', '.join(flags)}")
        if is_deletion(token):
            key = token[len(DELETE_PREFIX) :]
            if "=" in key:
                raise CLIError(f"{token!r}: a deletion is ~key alone (no '='); to set a key write key=value")
            if not key or any(not part for part in key.split(".")):
                raise CLIError(f"{token!r}: a deletion names a key, e.g. ~data.params.validation")
            continue
        if "=" not in token or token.startswith("="):  # no key=value
            raise CLIError(
                f"unexpected argument {token!r}: configs go after {configs_flag}, overrides are key=value "
                "(e.g. lightning.trainer.max_steps=100) or ~key to delete a key"
            )


def parse_cli(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse flags; return ``(options, dotlist)``: the ``key=value`` and ``~key`` tokens, also those argparse put
    into ``--base`` (``-b a.yaml k=v``).  Any other token that is not a flag is a :class:`CLIError`."""
    parser = build_parser()
    opt, unknown = parser.parse_known_args(list(argv))
    opt.base, moved = split_dotlist(opt.base)
    dotlist = moved + list(unknown)
    check_dotlist_tokens(dotlist, [s for action in parser._actions for s in action.option_strings])
    names = (("-n/--name", opt.name), ("-p/--postfix", opt.postfix))
    for flag, value in names:
        if any(sep in value for sep in (os.sep, os.altsep, "\0") if sep) or value in (".", ".."):
            raise CLIError(
                f"{flag} {value!r} must be a plain file name (no '/'): it becomes part of the run folder's "
                "name; choose the folder holding the runs with -l/--logdir"
            )
    given = [flag for flag, value in (*names, ("-l/--logdir", opt.logdir)) if value]
    if given and opt.resume:
        raise CLIError(
            f"{' and '.join(given)} cannot be given with -r/--resume: a resumed run keeps its log dir and its name; "
            "drop them, or start a new run with them"
        )
    if opt.logdir == "":
        raise CLIError("-l/--logdir is empty: name the folder holding the run folders (default: logs)")
    if opt.logdir is None:
        opt.logdir = "logs"
    return opt, dotlist


# ---------------------------------------------------------------------------------------------------------------------
# configs


def load_yaml_config(path: str | os.PathLike) -> DictConfig:
    """One YAML config as a DictConfig, with a one-line error for missing or malformed files."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"config {str(path)!r} {what}; pass YAML files to -b/--base (see configs/)")
    try:
        # the root's kind first: OmegaConf raises OSError for a number and reads a lone string as a key
        root = yaml.compose(path.read_text(encoding="utf-8"))
        if isinstance(root, yaml.ScalarNode) and root.tag != "tag:yaml.org,2002:null":
            raise ConfigError(f"config {str(path)!r} must be a mapping with keys {list(PROJECT_KEYS)}, not a single value")
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {first}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror or exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {str(path)!r} must be a mapping with keys {list(PROJECT_KEYS)}, not a list")
    return cfg


def apply_override(config: DictConfig, entry: str) -> None:
    """Apply one dotlist entry to ``config``: ``~key`` deletes the key; ``key=value`` sets it (list entries by index,
    a mapping merged into a mapping), a value giving a node another ``target`` replacing that node's ``params``."""
    if is_deletion(entry):  # its form was checked with the command line (check_dotlist_tokens)
        delete_key(config, entry[len(DELETE_PREFIX) :].split("."), source=entry)
        return
    key, _, raw = entry.partition("=")
    try:  # the value parsed as YAML like OmegaConf's dotlist (${...} kept as is)
        parsed = OmegaConf.from_dotlist([f"value={raw}"])
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse the override {entry!r}: {str(exc).strip().splitlines()[0]}") from exc
    value = OmegaConf.to_container(parsed, resolve=False)["value"]
    try:
        *where, last = key.split(".")
        drop_replaced_params(config, {last: value}, where)  # the target rule, before the value is merged
        OmegaConf.update(config, key, value, merge=True)
    except OmegaConfBaseException as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"cannot apply the override {entry!r}: {first}") from exc


def apply_overrides(config: DictConfig, dotlist: Sequence[str]) -> None:
    for entry in dotlist:
        apply_override(config, entry)


def check_trainer_key(key: str) -> None:
    """Refuse a ``lightning.trainer`` key that Lightning 2's Trainer does not take, or that main.py owns."""
    import pytorch_lightning as pl

    valid = list(accepted_keywords(pl.Trainer).params)
    if key in RESERVED_TRAINER_KEYS:
        raise ConfigError(f"lightning.trainer.{key} is set by main.py: {RESERVED_TRAINER_KEYS[key]}")
    if key in valid:
        return
    if key in LIGHTNING1_HINTS:
        raise ConfigError(f"lightning.trainer.{key} is a Lightning 1.x Trainer argument: {LIGHTNING1_HINTS[key]}")
    allowed = [k for k in valid if k not in RESERVED_TRAINER_KEYS]
    raise ConfigError(
        f"unknown Trainer argument lightning.trainer.{key}{closest_hint(key, allowed)}; "
        f"Lightning 2 accepts: {', '.join(allowed)}"
    )


def check_config_structure(config: DictConfig) -> None:
    """Top-level keys, ``lightning.*`` keys and every ``lightning.trainer`` argument are known."""
    for key in config:
        if key not in PROJECT_KEYS:
            raise ConfigError(
                f"unknown top-level config key {key!r}{closest_hint(str(key), PROJECT_KEYS)}; valid: {', '.join(PROJECT_KEYS)}"
            )
    if "model" not in config:
        raise ConfigError("the merged config has no 'model' section; pass a model config with -b/--base")
    for key in ("model", "data"):
        node = config.get(key)
        if (node is not None or key == "model") and (not isinstance(node, DictConfig) or "target" not in node):
            shown = OmegaConf.to_yaml(node).strip() if isinstance(node, (DictConfig, ListConfig)) else repr(node)
            raise ConfigError(f"'{key}' must be a mapping {{target: pkg.Class, params: {{...}}}}, got {shown[:80]}")
    lightning = config.get("lightning")
    if lightning is None:
        return
    if not isinstance(lightning, DictConfig):
        raise ConfigError(f"'lightning' must be a mapping with keys {list(LIGHTNING_KEYS)}")
    for key in lightning:
        if key not in LIGHTNING_KEYS:
            raise ConfigError(
                f"unknown config key lightning.{key}{closest_hint(str(key), LIGHTNING_KEYS)}; "
                f"valid: {', '.join(LIGHTNING_KEYS)}"
            )
    trainer = lightning.get("trainer")
    if trainer is not None:
        if not isinstance(trainer, DictConfig):
            raise ConfigError("lightning.trainer must be a mapping of Lightning 2 Trainer arguments")
        for key in trainer:
            check_trainer_key(str(key))


def _child(node: Any, segment: str) -> tuple[bool, Any]:
    if isinstance(node, (DictConfig, Mapping)):
        return (True, node[segment]) if segment in node else (False, None)
    if isinstance(node, (ListConfig, list)) and segment.lstrip("-").isdigit() and -len(node) <= int(segment) < len(node):
        return True, node[int(segment)]
    return False, None


def check_override_key(config: DictConfig, key: str) -> None:
    """Raise :class:`ConfigError` unless the dotlist ``key`` names something that exists (see module doc)."""
    segments = key.split(".")
    if any(not s for s in segments):
        raise ConfigError(f"override key {key!r} is malformed (empty segment); write e.g. model.params.t_min=0")
    if segments[0] not in PROJECT_KEYS:
        raise ConfigError(f"unknown override key {key!r}: top-level keys are {', '.join(PROJECT_KEYS)}")
    nodes: list[Any] = [config]  # nodes[i]: the node at segments[:i]
    for i, seg in enumerate(segments):
        node = nodes[i]
        parent_path = ".".join(segments[:i])
        found, child = _child(node, seg)
        if found:
            nodes.append(child)
            continue
        if parent_path == "lightning.trainer":
            check_trainer_key(seg)
            return
        if parent_path == "lightning.callbacks" or (parent_path == "lightning" and seg in LIGHTNING_KEYS):
            return  # a new callback's target/params are checked when it is built
        target, params_missing = None, False
        if isinstance(node, (DictConfig, Mapping)) and "target" in node and seg == "params":
            target, params_missing = node["target"], True
        grand = nodes[i - 1] if i >= 1 and segments[i - 1] == "params" else None
        if isinstance(grand, (DictConfig, Mapping)) and "target" in grand:
            target = grand["target"]
        if target is not None:
            if params_missing:
                if i + 1 == len(segments):
                    return
                seg = segments[i + 1]
            keywords = accepted_keywords(get_obj_from_str(str(target)))
            if keywords.open or seg in keywords.params:
                return
            raise ConfigError(f"unknown override key {key!r}: {unknown_argument(str(target), seg, keywords.params)}")
        keys = list(node.keys()) if isinstance(node, (DictConfig, Mapping)) else []
        where = parent_path or "the config"
        raise ConfigError(
            f"unknown override key {key!r}: {where} has no key {seg!r}{closest_hint(seg, [str(k) for k in keys])}; "
            f"it has: {', '.join(str(k) for k in keys) or '(nothing)'}"
        )


def _rename_target(node: Any, renames: Mapping[str, str]) -> None:
    """Rename a legacy ``target`` of a config node, read unresolved (an override's ``${...}`` is checked later)."""
    if isinstance(node, DictConfig) and "target" in node:
        target = node._get_node("target")._value()
        if isinstance(target, str) and target in renames:
            node.target = renames[target]


def _modernize_callbacks(config: DictConfig) -> DictConfig:
    """latent-diffusion's ``target: main.ImageLogger`` and ``main.DataModuleFromConfig`` read as this project's classes
    (:data:`LEGACY_CALLBACK_TARGETS`, :data:`LEGACY_DATA_TARGETS`; in place)."""
    _rename_target(config._get_node("data") if "data" in config else None, LEGACY_DATA_TARGETS)
    lightning = config._get_node("lightning") if "lightning" in config else None
    callbacks = lightning._get_node("callbacks") if isinstance(lightning, DictConfig) and "callbacks" in lightning else None
    if isinstance(callbacks, DictConfig):
        for name in callbacks:
            _rename_target(callbacks._get_node(name), LEGACY_CALLBACK_TARGETS)
    return config


def merge_configs(
    base_paths: Sequence[str | os.PathLike], dotlist: Sequence[str], defaults: DictConfig | None = None
) -> DictConfig:
    """``defaults`` <- each base YAML in order (:func:`~ldm.train.config_merge.merge_layers`) <- the dotlist, each
    override checked against the config the entries before it left; then the structure is checked and every
    ``${...}`` must resolve."""
    layers = [(str(p), _modernize_callbacks(load_yaml_config(p))) for p in base_paths]
    try:
        merged = merge_layers(layers, start=defaults)
    except (OmegaConfBaseException, TypeError) as exc:  # e.g. a list layered over a mapping
        first = one_line(exc)[:300]
        raise ConfigError(f"cannot layer {' over '.join(str(p) for p in reversed(base_paths))}: {first}") from exc
    for entry in dotlist:
        try:
            if not is_deletion(entry):
                check_override_key(merged, entry.split("=", 1)[0])
            apply_override(merged, entry)
        except OmegaConfBaseException as exc:  # e.g. an earlier override's ${...} that cannot resolve, met on the way
            first = one_line(exc)[:300]
            raise ConfigError(
                f"override {entry!r}: {first}; check the ${{...}} interpolations of the overrides before it"
            ) from exc
    _modernize_callbacks(merged)
    check_config_structure(merged)
    try:
        OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        first = str(exc).strip().splitlines()[0]
        where = getattr(exc, "full_key", None)
        raise ConfigError(f"cannot resolve the config{f' at {where}' if where else ''}: {first}") from exc
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# resume


def resolve_resume(resume: str) -> tuple[Path, Path]:
    """``-r`` argument -> ``(logdir, checkpoint)``: a log dir's (or its ``checkpoints/`` folder's) ``last.ckpt``, or a
    checkpoint in ``<logdir>/checkpoints/``."""
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"cannot resume: {resume!r} does not exist; pass a log dir (logs/<run>) or a checkpoint in it")
    if path.is_file():
        if path.parent.name != "checkpoints":
            raise ConfigError(
                f"cannot resume from {resume!r}: a resumable checkpoint lives in <logdir>/checkpoints/ next to the "
                "run's configs/; to start a new run from these weights use -b <config> model.params.ckpt_path=<file>"
            )
        return path.parent.parent, path
    logdir = path.parent if path.name == "checkpoints" and (path / "last.ckpt").is_file() else path  # <logdir>/checkpoints
    ckpt = logdir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise ConfigError(
            f"cannot resume {resume!r}: {str(ckpt)!r} does not exist (the run never saved a checkpoint); "
            "start a new run instead"
        )
    return logdir, ckpt


def saved_run_configs(logdir: Path) -> list[str]:
    """The YAML files a resumed run starts from: the newest ``<ts>-project.yaml`` and ``<ts>-lightning.yaml`` under
    ``<logdir>/configs`` (each holds the whole merged config, so a key an earlier resume deleted stays deleted, which
    merging every saved file would bring back); every YAML there, oldest first, in a folder without that pair."""
    found = sorted(glob.glob(os.path.join(str(logdir), "configs", "*.yaml")))
    if not found:
        raise ConfigError(f"cannot resume: {str(logdir / 'configs')!r} holds no saved configs; is it a main.py log dir?")
    newest = [[f for f in found if f.endswith(suffix)][-1:] for suffix in ("-project.yaml", "-lightning.yaml")]
    if not all(newest):
        return found
    others = [os.path.basename(f) for f in found if not f.endswith(("-project.yaml", "-lightning.yaml"))]
    if others:
        logger.warning("resuming from %s and %s; not merged: %s (pass extra configs with -b)",
                       *(os.path.basename(n[0]) for n in newest), ", ".join(others))  # fmt: skip
    return newest[0] + newest[1]


# values a resume cannot change: Lightning restores them from the checkpoint over the config's (which would then describe
# the run wrongly), or the restored data position depends on them
RESUME_FIXED = {
    "model.base_learning_rate": "Lightning restores the optimizer's learning rate from the checkpoint, so training "
    "would go on at the old rate while the run's configs name the new one",
    "model.params.ema_decay": "the checkpoint restores the EMA's decay, so the EMA would go on with the old one while "
    "the run's configs name the new one",
    "data.params.batch_size": "the data position is stored in batches, so another batch size would repeat or skip "
    "samples of the epoch",
}


def check_resume_overrides(saved: DictConfig, config: DictConfig) -> None:
    """ConfigError naming the first :data:`RESUME_FIXED` value that ``config`` (the run's configs plus this command's
    overrides) changes from ``saved`` (the run's configs alone)."""
    for key, why in RESUME_FIXED.items():
        before, after = OmegaConf.select(saved, key), OmegaConf.select(config, key)
        if before != after:
            raise ConfigError(
                f"cannot resume with {key} changed ({before!r} -> {after!r}): {why}; resume without that override, "
                "or start a new run from the checkpoint's weights (-b <config> model.params.ckpt_path=<file>)"
            )


def resume_seed(ckpt: Path, given: int | None, unsafe_load: bool = False) -> tuple[int, str]:
    """The seed a resumed run uses and a line saying where it came from: the one :class:`~ldm.train.callbacks.StepSeeding`
    stored, so that the run continues like an uninterrupted one, unless ``-s`` differs (it wins, with a warning);
    ``-s`` or :data:`DEFAULT_SEED` where the checkpoint stores none or an invalid one.  Tensors are loaded on meta."""
    from ldm.checkpoint import load_checkpoint
    from ldm.train.callbacks import StepSeeding

    callbacks = load_checkpoint(ckpt, map_location="meta", unsafe=unsafe_load).get("callbacks")
    state = callbacks.get(StepSeeding.STATE_KEY) if isinstance(callbacks, Mapping) else None
    stored = state.get("seed") if isinstance(state, Mapping) else None
    invalid = stored is not None and (isinstance(stored, bool) or not isinstance(stored, int) or not 0 <= stored <= MAX_SEED)
    if stored is None or invalid:
        seed, origin = (DEFAULT_SEED, "the default") if given is None else (given, "-s")
        if invalid:
            return seed, (
                f"warning: resuming with seed {seed} ({origin}): {ckpt} stores an invalid seed {str(stored)[:40]!r} "
                f"(not an integer in [0, {MAX_SEED}]); pass the run's -s if you know it"
            )
        return seed, f"resuming with seed {seed} ({origin}): {ckpt} stores no seed; pass the run's -s if it differed"
    if given is None or given == stored:
        return int(stored), f"resuming with seed {stored}, stored in {ckpt}"
    return given, (
        f"warning: resuming with -s {given}, but {ckpt} was trained with seed {stored}: the continuation draws "
        f"different noise than the uninterrupted run would; drop -s to continue with seed {stored}"
    )
