"""Training runs as steps of a pipeline: ``main.py`` in a subprocess (exactly what a user's ``main.py -b <config> -t
...`` trains), its ``last.ckpt`` copied to a fixed path."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "main.py"

# a handful of steps per stage and tiny data: what the quick start and the benchmarks do with --smoke (the test suite)
SMOKE_OVERRIDES: tuple[str, ...] = (
    "lightning.trainer.max_steps=3",
    "lightning.trainer.num_sanity_val_steps=0",
    "lightning.modelcheckpoint.params.every_n_train_steps=1",
    "lightning.callbacks.image_logger.params.disabled=true",
    "lightning.trainer.enable_progress_bar=false",
    "data.params.batch_size=4",
    "data.params.train.params.n_samples=16",
    "data.params.validation.params.n_samples=8",
)


class StageError(RuntimeError):
    """A training run failed or left no checkpoint."""


@dataclass
class Stage:
    """One ``main.py`` training run (``config`` with ``overrides``) on ``threads`` OpenMP threads."""

    name: str
    title: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    threads: str = "1"


def relative(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it, else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_stage(
    stage: Stage,
    logs: Path,
    target: Path,
    seed: int,
    extra: Sequence[str] = (),
    threads: str | None = None,
    run_name: str | None = None,
    echo: Callable[[str], None] = logger.info,
) -> Path:
    """Train ``stage`` with ``main.py`` in a subprocess and copy its ``last.ckpt`` to ``target`` (atomically); returns
    the run folder.  ``extra`` overrides follow the stage's own; ``threads`` replaces the stage's; ``echo`` receives
    the command line first.  :class:`StageError` when ``main.py`` fails or leaves no new run with a ``last.ckpt``."""
    logs.mkdir(parents=True, exist_ok=True)
    before = {p for p in logs.iterdir() if p.is_dir()}
    cmd = [sys.executable, str(MAIN), "-b", str(stage.config), "-t", "--no-test", "-l", str(logs)]
    cmd += ["-n", run_name or stage.name, "-s", str(seed), *stage.overrides, *extra]
    echo("$ " + " ".join(relative(Path(c)) if c.startswith(str(REPO)) else c for c in cmd[1:]))
    env = {k: v for k, v in os.environ.items() if k != "LATESTEPS_LOGDIR"}
    # MKL follows OpenMP: a parent's MKL_NUM_THREADS (benchmarks/common.set_threads) kept a second thread spinning
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads or stage.threads
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise StageError(f"stage {stage.name} failed (main.py exit code {proc.returncode}); see above")
    runs = [p for p in logs.iterdir() if p.is_dir() and p not in before]
    if len(runs) != 1 or not (runs[0] / "checkpoints" / "last.ckpt").is_file():
        raise StageError(f"stage {stage.name}: no new run with checkpoints/last.ckpt under {logs}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(runs[0] / "checkpoints" / "last.ckpt", tmp)
    os.replace(tmp, target)
    return runs[0]
