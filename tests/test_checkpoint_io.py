"""Checkpoint writes of real ``main.py`` training runs (:class:`ldm.train.trainer.SafeAtomicCheckpointIO`) under faults.

* disk full while writing ``last.ckpt``: one line naming it, the previous checkpoint kept;
* SIGKILL in the middle of checkpoint writes at several points, then ``-r``: the half-written file is a hidden temp that
  the resume removes, and the resumed run equals one that was never killed (test_main.py kills between two steps);
* a truncated ``last.ckpt`` given to ``-r``: one line, the file kept.

Subprocesses run with one OpenMP thread (``test_main._env``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_main import MAIN, QUICKSTART, TEST_OVERLAY, _env, train_losses

from ldm.checkpoint import load_checkpoint, save_checkpoint
from ldm.train.cli import merge_configs

from warm_python import run_python

RUN_TIMEOUT = 600

# Installed as sitecustomize.py in a subprocess: a fault at the N-th fsync of an atomic-write temp file whose
# destination name starts with $FAULT_NAME (ldm.util.atomic_write_bytes fsyncs each temp file before renaming it).
FAULT_SITECUSTOMIZE = '''
"""Test harness (tests/test_checkpoint_io.py): inject one fault into atomic writes."""
import errno
import os
import signal

_real_fsync = os.fsync
_count = 0


def _fsync(fd):
    global _count
    try:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        name = ""
    if name.startswith("." + os.environ["FAULT_NAME"]) and name.endswith(".tmp"):
        _count += 1
        if _count >= int(os.environ["FAULT_AT"]):
            if os.environ["FAULT_KIND"] == "kill":  # SIGKILL in mid-write: half the bytes reached the disk
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _real_fsync(fd)


os.fsync = _fsync
'''
needs_proc_fd = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="the fault harness reads /proc/self/fd")


def overlay(folder: Path) -> Path:
    path = folder / "tiny_overlay.yaml"
    path.write_text(TEST_OVERLAY)
    return path


def one_error_line(text: str, prefix: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# faults during training: disk full, SIGKILL in mid-write, truncated last.ckpt


def run_main_with_fault(args: list[str], cwd: Path, fault: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = _env()
    if fault:
        site = cwd / "fault_site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(FAULT_SITECUSTOMIZE)
        env.update(PYTHONPATH=str(site), **fault)
    return run_python([MAIN, *args], cwd=cwd, env=env, timeout=RUN_TIMEOUT)


def main_args(folder: Path, name: str, max_steps: int = 6) -> list[str]:
    return [
        "-b",
        str(QUICKSTART),
        str(overlay(folder)),
        "-l",
        str(folder / "logs"),
        "-t",
        "-n",
        name,
        f"lightning.trainer.max_steps={max_steps}",
    ]


def only_run(folder: Path, name: str) -> Path:
    (run,) = (folder / "logs").glob(f"*_{name}")
    return run


def hidden_temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@needs_proc_fd
def test_disk_full_while_writing_a_checkpoint_keeps_the_last_complete_one(tmp_path):
    result = run_main_with_fault(
        main_args(tmp_path, "full"), tmp_path, {"FAULT_KIND": "enospc", "FAULT_NAME": "last.ckpt", "FAULT_AT": "3"}
    )
    assert result.returncode == 1, result.stderr[-3000:]
    run = only_run(tmp_path, "full")
    line = one_error_line(result.stderr, "main.py: error:")
    assert f"No space left on device: '{run / 'checkpoints' / 'last.ckpt'}'" in line and f"-r {run}" in line
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2  # the third write failed
    assert hidden_temps(run / "checkpoints") == []


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = run_main_with_fault(main_args(folder, "ref"), folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run(folder, "ref")


@pytest.mark.slow
@needs_proc_fd
@pytest.mark.parametrize(
    "fault_name, fault_at",
    [("last.ckpt", "2"), ("epoch=", "1")],
    ids=["writing-last.ckpt-of-step-2", "writing-the-first-top-k-checkpoint"],
)
def test_sigkill_in_mid_write_then_resume_equals_the_uninterrupted_run(uninterrupted_run, fault_name, fault_at, tmp_path):
    killed = run_main_with_fault(
        main_args(tmp_path, "killed"), tmp_path, {"FAULT_KIND": "kill", "FAULT_NAME": fault_name, "FAULT_AT": fault_at}
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = only_run(tmp_path, "killed")
    ckpts = run / "checkpoints"
    (temp,) = hidden_temps(ckpts)  # the half-written file is a hidden temp, never a .ckpt
    assert temp.startswith("." + fault_name) and temp.endswith(".tmp")
    steps = {p.name: load_checkpoint(p)["global_step"] for p in ckpts.glob("*.ckpt")}
    assert 1 <= steps["last.ckpt"] < 6, steps

    resumed = run_main_with_fault(["-t", "-r", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert hidden_temps(ckpts) == []
    a = load_checkpoint(uninterrupted_run / "checkpoints" / "last.ckpt")
    b = load_checkpoint(ckpts / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert train_losses(uninterrupted_run) == train_losses(run)
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer_states"][0]["state"][0]["exp_avg"].equal(b["optimizer_states"][0]["state"][0]["exp_avg"])


def test_resume_from_a_truncated_last_ckpt_fails_in_one_line_and_keeps_the_file(tmp_path):
    run = tmp_path / "logs" / "2024-01-01T00-00-00_broken"
    (run / "configs").mkdir(parents=True)
    merged = merge_configs([QUICKSTART, overlay(tmp_path)], [])
    OmegaConf.save(merged, run / "configs" / "2024-01-01T00-00-00-project.yaml")
    (run / "checkpoints").mkdir()
    save_checkpoint({"state_dict": {"w": torch.zeros(4096)}, "global_step": 3}, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (run / "checkpoints" / "last.ckpt").write_bytes(data[: len(data) // 2])
    result = run_main_with_fault(["-t", "-r", str(run)], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_error_line(result.stderr, "main.py: error:")
    assert f"checkpoint '{run / 'checkpoints' / 'last.ckpt'}' cannot be read (truncated or corrupt)" in line
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == data[: len(data) // 2]
