"""The resumable, sharded data order (ldm/data/resumable.py): each process's share of an epoch, reshuffled per epoch;
a loader restored mid-epoch continues exactly; the seeds derived per rank, step and phase."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.data.resumable import ResumableDataLoader, ShardedEpochSampler, derive_seed, make_resumable
from ldm.util import ConfigError


def test_sharded_sampler_partitions_each_epoch_and_reshuffles_per_epoch():
    samplers = [ShardedEpochSampler(10, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    orders = {}
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        shards = [list(s) for s in samplers]
        assert [len(x) for x in shards] == [4, 4, 4] == [len(s) for s in samplers]
        flat = sorted(i for shard in shards for i in shard)
        assert set(flat) == set(range(10)) and len(flat) == 12  # padded by repeating two indices
        orders[epoch] = shards
    assert orders[0] != orders[1]
    again = ShardedEpochSampler(10, shuffle=True, seed=3, rank=1, world_size=3)
    again.set_epoch(1)
    assert list(again) == orders[1][1]
    again.skip_next(2)
    assert list(again) == orders[1][1][2:]
    assert list(again) == orders[1][1]  # the skip applies once
    plain = ShardedEpochSampler(5, shuffle=False, seed=0, rank=0, world_size=2, drop_last=True)
    assert list(plain) == [0, 2] and len(plain) == 2


def test_resumable_loader_continues_mid_epoch_exactly():
    dataset = TensorDataset(torch.arange(20.0))
    original = DataLoader(dataset, batch_size=3, shuffle=True, drop_last=True)

    def fresh() -> ResumableDataLoader:
        loader = make_resumable(original, seed=5, rank=0, world_size=1)
        loader.sampler.set_epoch(2)
        return loader

    reference = [batch[0].tolist() for batch in fresh()]
    assert len(reference) == 6 and sorted(sum(reference, [])) != list(range(18))  # shuffled
    interrupted = fresh()
    iterator = iter(interrupted)
    seen = [next(iterator)[0].tolist() for _ in range(4)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 4}
    resumed = fresh()
    resumed.load_state_dict(state)
    rest = [batch[0].tolist() for batch in resumed]
    assert seen + rest == reference
    assert resumed.state_dict() == {"epoch": 2, "batches": 6}
    next_epoch = fresh()
    next_epoch.load_state_dict(state)
    next_epoch.sampler.set_epoch(3)  # the saved position belongs to epoch 2: ignored in epoch 3
    assert len(list(next_epoch)) == 6


def test_custom_sampler_cannot_be_sharded_across_processes():
    dataset = TensorDataset(torch.arange(8.0))
    custom = DataLoader(dataset, batch_size=2, sampler=list(range(8)))
    assert make_resumable(custom, seed=0, rank=0, world_size=1) is custom
    with pytest.raises(ConfigError, match="cannot be sharded across 2 processes: it uses a custom sampler"):
        make_resumable(custom, seed=0, rank=0, world_size=2)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(23, 0, 5, 0, 1) == derive_seed(23, 0, 5, 0, 1)
    seeds = {derive_seed(23, rank, step, 0, phase) for rank in range(2) for step in range(50) for phase in (0, 1)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)
