"""scripts/refine.py under torchrun (2 CPU processes, gloo): the inputs split between ranks, each output written once,
the same outputs as one process, one summary, and the exit code reflects every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.imageio import read_png_metadata
from ldm.refine.distributed import Ranks, ranks_from_env, slurm_rendezvous

from conftest import load_photos

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refine(expert_checkpoints, inputs: Path, out: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), str(REPO / "scripts" / "refine.py"), "--input", str(inputs),
               "--outdir", str(out), "--ckpt", str(expert_checkpoints[0]), "--ckpt", str(expert_checkpoints[1]),
               "--device", "cpu", "--start-t", "400", "--ddim-steps", "10", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)


def same_output(a: Path, b: Path) -> bool:
    """Same pixels and the same metadata but for the command line (which names the output folder)."""
    meta_a, meta_b = read_png_metadata(a), read_png_metadata(b)
    meta_a.pop("parameters"), meta_b.pop("parameters")
    return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) and meta_a == meta_b


@pytest.mark.slow
def test_torchrun_splits_the_inputs_and_writes_what_one_process_writes(expert_checkpoints, tmp_path):
    astro, coffee, chelsea = load_photos()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, photo in enumerate((astro, coffee, chelsea, astro[::-1], coffee[:, ::-1])):
        Image.fromarray(np.ascontiguousarray(photo[::12, ::12][:32, :40])).save(inputs / f"img{i}.png")
    (inputs / "img5_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    single = refine(expert_checkpoints, inputs, tmp_path / "single")
    double = refine(expert_checkpoints, inputs, tmp_path / "double", nproc=2)
    assert single.returncode == 1 and double.returncode != 0, (single.stderr, double.stderr)  # the corrupt input
    summary = [line for line in double.stdout.splitlines() if "images done" in line]
    assert len(summary) == 1 and "5 of 6 images done" in summary[0] and "by 2 processes" in summary[0], double.stdout
    assert "5 refined files written" in summary[0]  # written once each: two writers of one file would count it twice
    failures = [line for line in double.stderr.splitlines() if "img5_corrupt.png" in line]
    assert len(failures) == 2 and "1 image(s) failed" in failures[1], double.stderr  # the failure, then one summary
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "double").iterdir()) and len(names) == 5
    for name in names:
        assert same_output(tmp_path / "single" / name, tmp_path / "double" / name), name

    # --skip-existing under torchrun: the same refine_files path with a share (tested in-process in test_refine_cli)


def test_ranks_come_from_torchrun_or_slurm(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert ranks_from_env() == Ranks(0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert ranks_from_env() == Ranks(3, 4, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = ranks_from_env()
    assert ranks == Ranks(1, 2, 1) and ranks.share(5) == [1, 3] and not ranks.is_main
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="need 0 <= rank < world size"):
        ranks_from_env()


def test_slurm_tasks_agree_on_a_rendezvous_srun_does_not_set(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        monkeypatch.setenv(var, "recorded")  # so that undo removes what slurm_rendezvous sets (a later DDP test in
        monkeypatch.delenv(var)  # this worker met MASTER_ADDR=gpu017); delenv of an unset variable records nothing
    monkeypatch.setenv("SLURM_NODELIST", "gpu[017-020],cpu3")
    monkeypatch.setenv("SLURM_JOB_ID", "4812345")
    slurm_rendezvous()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu017", "17345")
    monkeypatch.setenv("MASTER_ADDR", "head")  # what the user set wins
    monkeypatch.setenv("MASTER_PORT", "29500")
    slurm_rendezvous()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head", "29500")


GATHER_UNDER_SRUN = """
import sys
from ldm.refine.distributed import close, gather, ranks_from_env
ranks = ranks_from_env()
print(gather(ranks.rank * 10, ranks))
close(ranks)
"""


def test_gather_under_srun_without_master_addr(tmp_path):
    """srun sets SLURM_* but no MASTER_ADDR: the tasks still meet (they crashed in init_process_group)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "SLURM_", "RANK", "WORLD_SIZE"))}
    base.update(SLURM_NTASKS="2", SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GATHER_UNDER_SRUN],
            env={**base, "SLURM_PROCID": str(rank)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["[0, 10]", "[0, 10]"]
