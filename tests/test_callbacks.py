"""ldm.train.callbacks: SetupCallback removes the temp files of a killed run's atomic writes before training resumes,
and keeps the complete files."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ldm.checkpoint import load_checkpoint, save_checkpoint
from ldm.train.callbacks import SetupCallback


def test_setup_callback_removes_temps_of_a_killed_run_before_training(tmp_path):
    run = tmp_path / "run"
    for folder in ("checkpoints", "configs", "images/train", "images/val"):
        (run / folder).mkdir(parents=True)
    save_checkpoint({"state_dict": {"w": torch.ones(1)}}, run / "checkpoints" / "last.ckpt")
    temps = [
        run / "checkpoints" / ".last.ckpt.abcdefgh.tmp",
        run / "configs" / ".x-project.yaml.abcdefgh.tmp",
        run / "images" / "train" / ".inputs_gs-000002.png.abcdefgh.tmp",
    ]
    for path in temps:
        path.write_bytes(b"partial")
    callback = SetupCallback(
        resume=True,
        now="T",
        logdir=str(run),
        ckptdir=str(run / "checkpoints"),
        cfgdir=str(run / "configs"),
        config={"model": {}},
        lightning_config={},
    )
    callback.setup(SimpleNamespace(is_global_zero=True), None, "fit")
    assert not any(path.exists() for path in temps)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]["w"].item() == 1.0
    # a resume saves its configs once the checkpoint is restored and accepted (training starts), not at setup
    assert sorted(p.name for p in (run / "configs").iterdir()) == []
    callback.on_train_start(SimpleNamespace(is_global_zero=True), None)
    assert sorted(p.name for p in (run / "configs").iterdir()) == ["T-lightning.yaml", "T-project.yaml"]
