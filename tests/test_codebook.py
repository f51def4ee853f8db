"""Dead-code restarts: the pure function, VQModel's schedule, checkpoints, and codebooks kept equal under DDP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_autoencoder import cpu_trainer, gan_lossconfig, image_loader, tiny_vq

from ldm.modules.codebook import restart_dead_codes
from ldm.util import ConfigError

from conftest import photo_crops

REPO = Path(__file__).resolve().parents[1]


def test_only_unused_codes_move_and_each_lands_on_a_candidate():
    codebook = torch.arange(18, dtype=torch.float32).view(6, 3)
    before = codebook.clone()
    usage = torch.tensor([3, 0, 1, 0, 0, 2])
    candidates = torch.randn(5, 3, dtype=torch.float64) * 10
    restarted = restart_dead_codes(codebook, usage, candidates, torch.Generator().manual_seed(0), noise=0.0)
    assert restarted.tolist() == [1, 3, 4]
    assert torch.equal(codebook[[0, 2, 5]], before[[0, 2, 5]])
    for i in (1, 3, 4):  # exactly one of the candidate rows (in the codebook's dtype)
        assert (candidates.float() == codebook[i]).all(dim=1).any()


def test_restarts_are_reproducible_from_the_generator_and_the_noise_is_small():
    usage = torch.tensor([0, 0, 0, 5])
    candidates = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        codebook = torch.zeros(4, 4)
        restart_dead_codes(codebook, usage, candidates, torch.Generator().manual_seed(7))
        runs.append(codebook)
    assert torch.equal(runs[0], runs[1])
    nearest = torch.cdist(runs[0][:3], candidates).min(dim=1).values
    assert float(nearest.max()) < 0.1 * float(candidates.std(dim=0).norm())  # 1 % of the spread per dimension
    assert float(nearest.min()) > 0  # noise breaks ties between codes restarted at the same row


def test_nothing_dead_or_no_candidates_changes_nothing():
    codebook = torch.randn(4, 2)
    before = codebook.clone()
    assert restart_dead_codes(codebook, torch.ones(4), torch.randn(3, 2)).numel() == 0
    assert restart_dead_codes(codebook, torch.zeros(4), torch.randn(0, 2)).numel() == 0
    assert torch.equal(codebook, before)


@pytest.mark.parametrize("every", [-1, 1.5, True, "10"])
def test_vqmodel_refuses_a_bad_restart_period(every):
    with pytest.raises(ConfigError, match="dead_code_restart_every"):
        tiny_vq(dead_code_restart_every=every)


def test_vqmodel_refuses_restarts_with_remap(tmp_path):
    with pytest.raises(ConfigError, match="remap"):
        tiny_vq(dead_code_restart_every=4, remap=str(tmp_path / "used.npy"))


def collapsed_codebook_usage(every: int) -> tuple[int, list[int]]:
    """Train a tiny VQ whose codebook starts far from every encoder output (so that one code wins everywhere);
    return the number of distinct codes it then uses on the training crops and the restarts logged per step."""
    pl.seed_everything(0)
    crops = photo_crops(8, 32)
    model = tiny_vq(gan_lossconfig(disc_start=10**6), n_embed=64, dead_code_restart_every=every)
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(100 + torch.arange(64.0)[:, None].expand(64, 3))
    model.learning_rate = 1e-3
    logged: list[int] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(int(trainer.callback_metrics.get("train/codes_restarted_step", torch.tensor(-1))))

    cpu_trainer(max_steps=4, callbacks=[Record()]).fit(model, image_loader(crops, 2))
    with torch.no_grad():
        _, _, indices = model(crops, return_pred_indices=True)
    return int(indices.unique().numel()), logged


def test_restarts_revive_a_collapsed_codebook_at_the_end_of_each_window():
    used_without, logged_without = collapsed_codebook_usage(every=0)
    used_with, logged_with = collapsed_codebook_usage(every=2)
    assert used_without == 1 and logged_without == [-1] * 4  # nothing logged when off
    assert logged_with[0] == 0 and logged_with[1] == 63  # all but the winning code, after the 2nd batch
    assert logged_with[2] == 0
    assert used_with > 16


def test_the_window_in_progress_goes_into_checkpoints_and_comes_back():
    model = tiny_vq(gan_lossconfig(), n_embed=64, dead_code_restart_every=5)
    model.code_usage[[1, 7]] = torch.tensor([4, 9])
    model.code_window_batches = 3
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    restored = tiny_vq(gan_lossconfig(), n_embed=64, dead_code_restart_every=5)
    restored.on_load_checkpoint(checkpoint)
    assert torch.equal(restored.code_usage, model.code_usage) and restored.code_window_batches == 3
    assert "code_usage" not in restored.state_dict()  # CompVis' state-dict keys are unchanged
    # no window saved (restarts just enabled) or one of another codebook size: a full window starts
    for other in ({"generator_steps": 4}, {"code_usage": torch.ones(32, dtype=torch.long), "code_window_batches": 2}):
        restored.on_load_checkpoint(other)
        assert int(restored.code_usage.sum()) == 0 and restored.code_window_batches == 0
    off: dict = {}
    tiny_vq(gan_lossconfig(), n_embed=64).on_save_checkpoint(off)
    assert "code_usage" not in off


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import pytorch_lightning as pl
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import photo_crops
    from test_autoencoder import cpu_trainer, gan_lossconfig, image_loader, tiny_vq

    pl.seed_everything(0)
    model = tiny_vq(gan_lossconfig(disc_start=10**6), n_embed=64, dead_code_restart_every=2)
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(100 + torch.arange(64.0)[:, None].expand(64, 3))
    model.learning_rate = 1e-3
    trainer = cpu_trainer(max_steps=3, strategy="ddp_find_unused_parameters_true", devices=2)
    trainer.fit(model, image_loader(photo_crops(8, 32), 2))  # the distributed sampler: other crops on each rank
    torch.save(model.quantize.embedding.weight.detach().clone(), {out!r} + f"/rank{{trainer.global_rank}}.pt")
    """
)


@pytest.mark.slow
def test_ddp_ranks_keep_one_codebook_after_restarts(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0, rank1)
    assert float(rank0.min()) < 50  # the restarts happened (the initial codes all sit at 100 or more)
