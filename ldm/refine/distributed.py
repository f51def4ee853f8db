"""Refining one batch of files with several processes (``torchrun``, SLURM): process ``rank`` refines the inputs whose
index is ``rank (mod world size)`` (output names are decided over the whole list, so the files equal a single-process
run's), then the processes exchange their reports over a CPU (gloo) group so that every one exits with the same code."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import SLURMEnvironment

# Ranks wait at most this long for each other at the end (the slowest rank's share of the batch).
GATHER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes refining one batch."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """The indices of ``count`` inputs this process refines (every ``world``-th, from ``rank``)."""
        return list(range(self.rank, count, self.world))


def ranks_from_env() -> Ranks:
    """From torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (or SLURM's ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
    ``SLURM_LOCALID``); one process when neither is set.  Raises ValueError for values that do not fit together."""
    env = os.environ
    if "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_NTASKS" in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return Ranks()
    try:
        rank, world, local = (int(env.get(name, "0")) for name in names)
    except ValueError as exc:
        raise ValueError(f"{'/'.join(names)} must be integers ({exc})") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"{names[0]}={rank}, {names[1]}={world}: need 0 <= rank < world size")
    return Ranks(rank, world, local)


def rank_device(device: str, ranks: Ranks) -> str:
    """``device`` for this process: ``cuda:<LOCAL_RANK>`` for ``auto``/``cuda`` when several processes share a node's
    GPUs, else unchanged."""
    if ranks.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """``value`` of every rank, in rank order (a CPU process group is set up on the first call; one process: no
    communication)."""
    if ranks.world == 1:
        return [value]
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            slurm_rendezvous()
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world, timeout=GATHER_TIMEOUT)
    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def slurm_rendezvous() -> None:
    """Set ``MASTER_ADDR`` / ``MASTER_PORT`` where they are missing, as Lightning does under SLURM: ``srun`` sets neither
    (torchrun does), and every task must derive the same ones: the first host of ``SLURM_NODELIST`` and 15000 + the
    last four digits of ``SLURM_JOB_ID`` (12910 without a job id)."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = SLURMEnvironment.resolve_root_node_address(env.get("SLURM_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" not in env:
        job = env.get("SLURM_JOB_ID", "")
        env["MASTER_PORT"] = str(15000 + int(job[-4:]) if job.isdigit() else 12910)


def close(ranks: Ranks) -> None:
    """Tear the process group down (where :func:`gather` set one up)."""
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
