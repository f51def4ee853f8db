"""Train latent-diffusion style models from YAML configs, on Lightning 2 (latent-diffusion's ``main.py`` habits).

Examples::

    python main.py -b configs/latesteps_500_750.yaml -t
    python main.py -b configs/quickstart/latesteps_500_750.yaml -t lightning.trainer.max_steps=200 model.params.t_min=0
    python main.py -t -r logs/2024-01-01T00-00-00_latesteps_500_750     # resume from its checkpoints/last.ckpt
    python main.py -t -r logs/<run>/checkpoints/epoch=000003-step=000002000.ckpt
    python main.py -b cfg.yaml -t lightning.trainer.strategy=ddp lightning.trainer.devices=2 lightning.trainer.accelerator=cpu

Configs merge left to right, then the ``key=value`` overrides and ``~key`` deletions (:mod:`ldm.train.config_merge`).

``-r`` restores the run's saved configs (later ``-b`` files and ``key=value`` overrides still apply), global step,
optimizer, LR scheduler, EMA and position in the epoch; as in latent-diffusion, ``-t`` is needed to train.

Log dir: ``<logdir>/<timestamp>_<name><postfix>/{checkpoints/last.ckpt, configs/<ts>-project.yaml,
configs/<ts>-lightning.yaml, images/{train,val}/, csv/}``.  Every checkpoint embeds the merged project config as
``checkpoint["config"]``; checkpoints are written atomically and read back through the safe loader (``--unsafe-load`` to
accept other pickles from files you trust).

Interrupts: SIGTERM writes ``last.ckpt`` at the next batch boundary and exits 0; SIGUSR1 writes it and training goes on;
Ctrl+C writes it and exits 1 (Lightning's convention); before or after training, Ctrl+C exits 130 in one line.  SIGKILL
loses at most the steps since the last checkpoint; the resumed run then continues exactly like an uninterrupted one
(per-step seeding, resumable data order).

Exit status: 0 done (or SIGTERM), 1 bad checkpoint / disk error, 2 bad command line or config (one line on stderr),
130 Ctrl+C outside training.  A run folder this process created is removed again when it exits before writing into it.

One process at a time per run folder: rank 0 holds an exclusive lock on ``<run>/.lock`` (see
:mod:`ldm.train.runlock`) for the whole run, so a second ``main.py -r <run>`` started meanwhile exits 2 in one line.

Multi-process runs: Lightning re-launches this script once per extra local rank; the ranks agree on the log dir through
the ``LATESTEPS_LOGDIR`` environment variable that rank 0 sets.  For multi-node jobs, export ``LATESTEPS_LOGDIR`` (the same
path on every node) before launching, or resume with ``-r``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

LOGDIR_ENV = "LATESTEPS_LOGDIR"


def _configure_logging() -> None:
    """Show the project's INFO messages (restored weights, interrupt saves, ...) on rank 0, warnings elsewhere."""
    from pytorch_lightning.utilities import rank_zero_only

    is_rank_zero = rank_zero_only.rank == 0
    project = logging.getLogger("ldm")
    if not project.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        project.addHandler(handler)
        project.propagate = False
    project.setLevel(logging.INFO if is_rank_zero else logging.WARNING)


def _run_name(opt: Any, now: str) -> str:
    name = opt.name or (Path(opt.base[0]).stem if opt.base else "")
    return now + ("_" + name if name else "") + opt.postfix


def _claim_new_logdir(root: str, nowname: str) -> Path:
    """Create ``root/nowname`` (``_2``, ``_3``, ... appended if a run started in the same second with that name)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = Path(root) / (nowname if attempt == 1 else f"{nowname}_{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a fresh log dir {nowname!r} under {root!r}")


def _release_unused_logdir(path: Path | None) -> None:
    """Remove ``path`` (a run folder this process claimed) if nothing but its lock file was written into it: a config
    error found while building the Trainer leaves no empty run folder behind."""
    from ldm.train.runlock import LOCK_NAME

    if path is None or not path.is_dir():
        return
    if {p.name for p in path.iterdir()} <= {LOCK_NAME}:
        (path / LOCK_NAME).unlink(missing_ok=True)
        path.rmdir()


def _entries(cfg: Any, where: str) -> Iterator[tuple[Any, Any, Any, str]]:
    """``(container, key, value, dotted path)`` of every entry of nested dicts and lists, depth first, in order."""
    items = list(cfg.items()) if isinstance(cfg, dict) else list(enumerate(cfg)) if isinstance(cfg, list) else []
    for key, value in items:
        yield cfg, key, value, f"{where}.{key}"
        yield from _entries(value, f"{where}.{key}")


def _set_unsafe_load(cfg: Any) -> None:
    """``params.unsafe_load = True`` on every ``{target, params}`` node whose target takes it (``--unsafe-load``)."""
    from ldm.util import accepted_keywords, get_obj_from_str

    for node, key, value, _ in _entries(cfg, ""):
        if key == "target" and isinstance(value, str) and "unsafe_load" in accepted_keywords(get_obj_from_str(value)).params:
            node["params"] = dict(node.get("params") or {}, unsafe_load=True)


def _drop_init_checkpoints(cfg: Any, where: str) -> list[str]:
    """Set every ``ckpt_path`` of the model config to None (resuming restores all weights); returns what was dropped."""
    dropped = []
    for node, key, value, path in _entries(cfg, where):
        if key == "ckpt_path" and value is not None:
            dropped.append(f"{path}={value}")
            node[key] = None
    return dropped


def _check_init_checkpoints(cfg: Any, where: str) -> None:
    """Every non-null ``ckpt_path`` in the model config names an existing file (else one clear line, before building)."""
    from ldm.convert.folder import is_diffusers_folder
    from ldm.models.autoencoder_training import missing_first_stage_hint
    from ldm.util import ConfigError

    for node, key, value, path in _entries(cfg, where):
        if key != "ckpt_path" or value is None or Path(str(value)).is_file():
            continue
        if path.endswith("first_stage_config.params.ckpt_path"):  # the hint names the config that trains it
            hint = "the first stage must be a trained autoencoder: " + missing_first_stage_hint(str(value), node, key=path)
        else:
            hint = (
                "it initialises this model from a trained checkpoint: point it at one (e.g. the previous "
                f"stage's logs/<run>/checkpoints/last.ckpt) or set {path}=null to start from scratch"
            )
        what = "is a directory, not a checkpoint file" if Path(str(value)).is_dir() else "does not exist"
        if is_diffusers_folder(str(value)):
            what = "is a diffusers folder, not a checkpoint file"
            hint = f"convert it first: python scripts/convert_diffusers.py --from-diffusers {value} --out model.ckpt"
        raise ConfigError(f"{path}={value!r} {what}; {hint}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``main.py``; returns the process exit status (2: bad command line / config, 1: bad checkpoint or data)."""
    from ldm.checkpoint import CheckpointError
    from ldm.train.runlock import RunFolderLockError
    from ldm.util import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    inherited_env = os.environ.get(LOGDIR_ENV)
    try:
        # the run folder's lock and the removal of a run folder this process created but never wrote into, on any exit
        with contextlib.ExitStack() as held:
            return _main(argv, held)
    except (ConfigError, CheckpointError, RunFolderLockError) as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:  # before or after trainer.fit (inside it, Lightning saves and exits 1)
        print("main.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if inherited_env is None:
            os.environ.pop(LOGDIR_ENV, None)
        else:
            os.environ[LOGDIR_ENV] = inherited_env


def _main(argv: list[str], held: contextlib.ExitStack) -> int:
    """``main`` without the error reporting; the run folder's lock (rank 0) and the removal of a new run folder left
    empty are entered into ``held``."""
    import pytorch_lightning as pl
    from omegaconf import DictConfig, OmegaConf
    from pytorch_lightning.utilities import rank_zero_only
    from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
    from pytorch_lightning.utilities.model_helpers import is_overridden

    from ldm.checkpoint import CheckpointError
    from ldm.data.image_folder import UnreadableDatasetError
    from ldm.train.callbacks import SetupCallback
    from ldm.train.cli import (
        DEFAULT_SEED,
        check_resume_overrides,
        load_yaml_config,
        merge_configs,
        parse_cli,
        resolve_resume,
        resume_seed,
        saved_run_configs,
    )
    from ldm.train.data import check_cached_first_stage, check_first_items, install_data_hooks
    from ldm.train.runlock import hold_run_folder
    from ldm.train.trainer import build_trainer, default_lightning_config
    from ldm.util import ConfigError, instantiate_from_config, one_line

    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    opt, dotlist = parse_cli(argv)
    is_rank_zero = rank_zero_only.rank == 0
    say = print if is_rank_zero else (lambda *a, **k: None)

    resume_ckpt = None
    if opt.resume:
        logdir, resume_ckpt = resolve_resume(opt.resume)
        if is_rank_zero:  # the other ranks are this run's own processes (Lightning re-launches the command per rank)
            held.enter_context(hold_run_folder(logdir))
        bases = saved_run_configs(logdir) + list(opt.base)
        opt.seed, seed_note = resume_seed(resume_ckpt, opt.seed, unsafe_load=opt.unsafe_load)
        if is_rank_zero:  # a warning (an explicit -s that differs from the stored seed) goes to stderr
            print(seed_note, file=sys.stderr if seed_note.startswith("warning:") else sys.stdout)
    else:
        if not opt.base:
            raise ConfigError("no config given: pass -b/--base <config.yaml> (or -r <logdir> to resume)")
        bases = list(opt.base)
        logdir = None
        opt.seed = DEFAULT_SEED if opt.seed is None else opt.seed
    # a lightning.yaml this project saved already holds the defaults, less what the run deleted ('~lightning....');
    # latent-diffusion's hold only what its configs set (a modelcheckpoint without a target), so they get the defaults
    saved = [load_yaml_config(b) for b in bases if str(b).endswith("-lightning.yaml")] if opt.resume else []
    ours = any(OmegaConf.select(c, "lightning.modelcheckpoint.target") is not None for c in saved)
    config = merge_configs(bases, dotlist, defaults=None if ours else default_lightning_config())
    if opt.resume:
        check_resume_overrides(merge_configs(saved_run_configs(logdir), []), config)
    lightning_config = config.pop("lightning", None) or OmegaConf.create()  # '~lightning' or lightning: null
    if "data" in config and config.data is None:  # data=null drops a base config's data section
        config.pop("data")
    if opt.train and "data" not in config:
        raise ConfigError("training needs a 'data' section (target ldm.data.datamodule.DataModuleFromConfig)")
    data_cfg = config.get("data")
    ours = isinstance(data_cfg, DictConfig) and data_cfg.get("target") == "ldm.data.datamodule.DataModuleFromConfig"
    if opt.train and ours and not (data_cfg.get("params") or {}).get("train"):  # Lightning's exception came mid-fit
        raise ConfigError("training (-t) needs data.params.train, a dataset config {target: ..., params: {...}}")

    pl.seed_everything(opt.seed, workers=True, verbose=False)
    model_cfg = OmegaConf.to_container(config.model, resolve=True)
    base_lr = model_cfg.pop("base_learning_rate", None)
    if opt.train and base_lr is None:
        raise ConfigError("model.base_learning_rate is missing (latent-diffusion configs set e.g. 2.0e-06)")
    if base_lr is not None and (
        isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) or base_lr < 0
    ):
        raise ConfigError(
            f"model.base_learning_rate={base_lr!r} must be a finite number >= 0 (latent-diffusion configs set e.g. 2.0e-06)"
        )
    if resume_ckpt is not None:
        for where in _drop_init_checkpoints(model_cfg, "model"):
            say(f"resuming: {where} is not loaded; all weights come from {resume_ckpt}")
    _check_init_checkpoints(model_cfg, "model")
    if opt.unsafe_load:
        _set_unsafe_load(model_cfg)
    building = "model"
    try:
        model = instantiate_from_config(model_cfg)
        if not isinstance(model, pl.LightningModule):  # Lightning refused it mid-fit, after the run folder was made
            raise ConfigError(f"model: target {model_cfg['target']!r} built a {type(model).__name__}, not a LightningModule")
        building = "data"
        data = instantiate_from_config(OmegaConf.to_container(config.data, resolve=True)) if "data" in config else None
        if data is not None and not isinstance(data, pl.LightningDataModule):
            raise ConfigError(
                f"data: target {config.data.target!r} built a {type(data).__name__}, not a LightningDataModule "
                "(ldm.data.datamodule.DataModuleFromConfig wraps datasets)"
            )
        if data is not None:
            data.prepare_data()
            data.setup("fit" if opt.train else "test")
            check_first_items(data)
            if resume_ckpt is None:  # resuming, the first stage's weights come from the checkpoint, at fit
                check_cached_first_stage(data, model)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, UnreadableDatasetError) as exc:
        if isinstance(exc, (ConfigError, CheckpointError)):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ConfigError(message) from exc
    except (RuntimeError, ArithmeticError) as exc:  # torch refusing a shape the config asks for, 0 attention heads
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot build the {building} of this config: {first}") from exc

    if logdir is None:
        inherited = os.environ.get(LOGDIR_ENV)
        try:
            if inherited:
                logdir = Path(inherited)
                if is_rank_zero:
                    logdir.mkdir(parents=True, exist_ok=True)
            else:
                logdir = _claim_new_logdir(opt.logdir, _run_name(opt, now))
                held.callback(_release_unused_logdir, logdir)  # runs after the lock below is released
        except OSError as exc:
            raise ConfigError(f"cannot create the run folder under {opt.logdir!r}: {exc}; choose another -l/--logdir") from exc
        if is_rank_zero:
            held.enter_context(hold_run_folder(logdir))
    os.environ[LOGDIR_ENV] = str(logdir)
    ckptdir, cfgdir = logdir / "checkpoints", logdir / "configs"

    has_validation = data is not None and is_overridden("val_dataloader", data)
    setup_callback = SetupCallback(
        resume=resume_ckpt is not None,
        now=now,
        logdir=str(logdir),
        ckptdir=str(ckptdir),
        cfgdir=str(cfgdir),
        config=OmegaConf.to_container(config, resolve=True),
        lightning_config=OmegaConf.to_container(lightning_config, resolve=True),
    )
    try:
        trainer, interrupt = build_trainer(
            lightning_config,
            model=model,
            logdir=str(logdir),
            ckptdir=str(ckptdir),
            setup_callback=setup_callback,
            seed=opt.seed,
            has_validation=has_validation,
            unsafe_load=opt.unsafe_load,
        )
    except (ValueError, TypeError, ImportError, MisconfigurationException) as exc:
        if isinstance(exc, ConfigError):
            raise
        where = "lightning" if isinstance(exc, ImportError) else "lightning.trainer"  # e.g. a logger's missing package
        raise ConfigError(f"{where}: {str(exc).strip().splitlines()[0]}") from exc
    if data is not None:
        install_data_hooks(data, trainer, opt.seed)

    if base_lr is not None:
        bs = int(config.data.params.batch_size) if "data" in config and "batch_size" in config.data.get("params", {}) else 1
        accumulate, ngpu, nodes = trainer.accumulate_grad_batches, trainer.num_devices, trainer.num_nodes
        if opt.scale_lr:
            model.learning_rate = accumulate * ngpu * nodes * bs * base_lr
            say(
                f"Setting learning rate to {model.learning_rate:.2e} = {accumulate} (accumulate_grad_batches) * "
                f"{ngpu} (devices) * {nodes} (nodes) * {bs} (batchsize) * {base_lr:.2e} (base_lr)"
            )
        else:
            model.learning_rate = base_lr
            say(f"Not scaling the learning rate; learning rate {model.learning_rate:.2e}")
    say(f"log dir: {logdir}")

    if opt.train:
        try:
            trainer.fit(model, datamodule=data, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
        except SIGTERMException:
            say(f"SIGTERM: wrote {interrupt.ckpt_path} at global step {interrupt.saved_step}; exiting 0")
            return 0
        except OSError as exc:  # disk full, permissions, a vanished folder: the message names the path
            print(
                f"main.py: error: {exc}; {logdir} keeps its last complete checkpoint: fix this and resume with -r {logdir}",
                file=sys.stderr,
            )
            return 1
        except (ValueError, MisconfigurationException, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as exc:
            if isinstance(exc, (ConfigError, CheckpointError)):
                raise
            frames = traceback.extract_tb(exc.__traceback__)
            first = one_line(exc) or type(exc).__name__
            restoring = resume_ckpt and any(Path(f.filename).name == "checkpoint_connector.py" for f in frames)
            if restoring and "in loading state_dict" in first:  # the checkpoint is fine; the configs build another net
                raise ConfigError(
                    f"cannot resume from {resume_ckpt}: its weights do not fit the model the configs build now "
                    f"({first[:200]}); an override or a -b config changed the network since the run started: resume "
                    "without it, or start a new run from the weights that fit (model.params.ckpt_path=<file>)"
                ) from exc
            if restoring:
                # Lightning restoring a damaged checkpoint (garbage loops, optimizer or callback states): its traceback
                raise CheckpointError(
                    f"cannot resume from {resume_ckpt}: Lightning cannot restore the training state it holds "
                    f"({type(exc).__name__}: {first[:200]}); it is damaged or was not written by main.py: resume from "
                    "another checkpoint of the run (-r <run>/checkpoints/<file>), or start a new run from its weights "
                    "with model.params.ckpt_path=<file>"
                ) from exc
            if not isinstance(exc, (ValueError, MisconfigurationException, RuntimeError)):
                raise
            # a value training cannot use, met only when it runs: an image size the UNet cannot halve (or too small for
            # its kernels), ddim_steps=0 for the image logger, a val_check_interval above the epoch's batches; where it
            # was raised, for a bug
            frame = frames[-1]
            print(
                f"main.py: error: training stopped: {first} (raised at {Path(frame.filename).name}:{frame.lineno}); "
                f"{logdir} keeps its last complete checkpoint, if any: fix the config and resume with -r {logdir}",
                file=sys.stderr,
            )
            return 1
    if not opt.no_test and not trainer.interrupted and data is not None:
        if is_overridden("test_dataloader", data) and is_overridden("test_step", model):
            trainer.test(model, datamodule=data)
        else:
            say("no test data or no test_step: skipping trainer.test (use --no-test to silence this)")
    return 0


def _import_lightning_deferring_ctrl_c() -> bool:
    """:func:`_configure_logging` (which imports Lightning, torch, numpy: seconds) with Ctrl+C held back until the
    imports are done; returns whether Ctrl+C was pressed meanwhile.  A KeyboardInterrupt raised inside those imports is
    sometimes swallowed by a library, leaving a half-imported module that fails later with an unrelated traceback."""
    import signal

    pressed: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not when SIGINT is ignored (a background job) or handled elsewhere
        signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        _configure_logging()
    finally:
        signal.signal(signal.SIGINT, previous)
    return bool(pressed)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # config targets may name modules of the working directory (latent-diffusion habit)
    if _import_lightning_deferring_ctrl_c():
        print("main.py: interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        status = main()
    except KeyboardInterrupt:  # in main's own imports, before it handles Ctrl+C itself
        print("main.py: interrupted", file=sys.stderr)
        status = 130
    sys.exit(status)
