"""scripts/evaluate.py's bad inputs: an unusable outdir, sizes, paths, numbers and weights are each one line and the
right exit code before any checkpoint is opened or the sweep runs; Ctrl+C is one line, exit 130; a pixel-space
checkpoint with a VQ degradation is refused naming the degradation.

``main`` runs in process (fast) except where a case runs as a user would, in a subprocess; Ctrl+C is a
KeyboardInterrupt raised where the work would be.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ckpt_args, interrupt, run, script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scripts():
    return {"evaluate": script("evaluate")}


def test_evaluate_refuses_an_unusable_outdir_and_a_huge_size_before_the_sweep(
    scripts, expert_checkpoints, tmp_path, capsys, monkeypatch
):
    evaluate = scripts["evaluate"]
    monkeypatch.setattr("ldm.refine.Refiner.from_checkpoints", interrupt)  # proves the outdir check comes first
    (tmp_path / "a_file").write_text("x")
    code, lines = run(evaluate, [*ckpt_args(expert_checkpoints), "--outdir", str(tmp_path / "a_file" / "o")], capsys)
    assert code == 2 and len(lines) == 1 and "a file is in the way" in lines[0]
    monkeypatch.undo()
    argv = [*ckpt_args(expert_checkpoints), "--size", "4096", "--n-images", "1", "--outdir", str(tmp_path / "o")]
    code, lines = run(evaluate, argv, capsys)  # 100000 asked for 30 GB per crop
    assert code == 2 and len(lines) == 1 and "--size: size=4096 px is above 2048 px" in lines[0]
    assert not (tmp_path / "o").exists()


def test_evaluate_bad_lpips_weights_and_ctrl_c_are_one_line(scripts, expert_checkpoints, tmp_path, capsys, monkeypatch):
    evaluate = scripts["evaluate"]
    garbage = tmp_path / "vgg.pth"
    garbage.write_bytes(b"garbage" * 10)
    base = [
        *ckpt_args(expert_checkpoints),
        "--n-images",
        "1",
        "--degradations",
        "jpeg",
        "--start-t",
        "100",
        "--ddim-steps",
        "4",
        "--outdir",
        str(tmp_path / "o"),
    ]
    code, lines = run(evaluate, [*base, "--lpips-weights", str(garbage)], capsys)
    assert code == 2 and len(lines) == 1 and "cannot be read (truncated or corrupt)" in lines[0] and "vgg.pth" in lines[0]
    monkeypatch.setattr("ldm.eval.sweep.run_sweep", interrupt)
    assert run(evaluate, base, capsys) == (130, ["evaluate.py: interrupted"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--realism-images", "{tmp}/empty"], "--realism-images: {tmp}/empty: folder holds no images"),
        (["--realism-images", "{tmp}/missing"], "--realism-images: image folder {tmp}/missing does not exist or is not"),
        (["--images", "{tmp}/empty"], "--images: {tmp}/empty: folder holds no images"),
        (["--no-reference", "{tmp}/missing"], "--no-reference: image folder {tmp}/missing does not exist"),
        (["--lpips-weights", "{tmp}/vgg.pth"], "--lpips-weights {tmp}/vgg.pth does not exist; pass the path of the file"),
        (["--inception-weights", "{tmp}/empty"], "--inception-weights {tmp}/empty is a folder"),
        (["--config", "{tmp}/model.yaml"], "--config {tmp}/model.yaml does not exist"),
        (["--start-t", "100", "5000"], "--start-t: start_t=5000 must be an integer in [1, 999]"),
        (["--ddim-steps", "1001"], "--ddim-steps: ddim_steps=1001 must be an integer in [1, 1000]"),
        (["--seeds", "0", str(2**63)], f"--seeds: seed={2**63} must be an integer in [0, {2**63 - 1}]"),
        (["--n-images", "100000000"], "--n-images 100000000: at most 4096 held-out crops"),
        (["--size", "4096"], "--size: size=4096 px is above 2048 px"),
        (
            ["--degradations", "jpeg", "colour_blotches:n_blobs=1000000"],
            "--degradations 'colour_blotches:n_blobs=1000000': n_blobs must be an integer in [1, 256]",
        ),
        (["--degradations", "local_vq:box_size=3"], "--degradations 'local_vq:box_size=3': box_size must be in (0, 1]"),
    ],
)
def test_evaluate_refuses_bad_paths_and_numbers_before_loading(
    scripts, expert_checkpoints, tmp_path, capsys, monkeypatch, args, expected
):
    """Each is one line, exit 2, before any checkpoint is opened: not after both models have loaded (a missing or
    empty --realism-images with exit 1), nor in the sweep."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr("ldm.refine.Refiner.from_checkpoints", interrupt)  # loading would exit 130
    argv = [*ckpt_args(expert_checkpoints), *[a.format(tmp=tmp_path) for a in args], "--outdir", str(tmp_path / "o")]
    code, lines = run(scripts["evaluate"], argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evaluate.py: error: ")
    assert expected.format(tmp=tmp_path) in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def pixel_space_checkpoint(path: Path) -> Path:
    """A tiny late-steps expert on IdentityFirstStage (a pixel-space model), as test_latesteps.py builds one."""
    import torch

    from ldm.checkpoint import save_checkpoint
    from ldm.util import instantiate_from_config

    from conftest import LATESTEPS_TARGET, tiny_ldm_params

    params = tiny_ldm_params(
        t_min=0,
        t_max=500,
        image_size=16,
        scale_factor=1.0,
        first_stage_config={"target": "ldm.models.autoencoder.IdentityFirstStage"},
    )
    params["unet_config"] = {**params["unet_config"], "params": {**params["unet_config"]["params"], "image_size": 16}}
    config = {"model": {"target": LATESTEPS_TARGET, "params": params}}
    torch.manual_seed(0)
    model = instantiate_from_config(config["model"])
    save_checkpoint({"state_dict": model.state_dict(), "config": config, "window": [0, 500], "global_step": 0}, path)
    return path


def test_evaluate_cli_empty_realism_folder_and_a_pixel_space_model_with_a_vq_degradation(expert_checkpoints, tmp_path):
    """In subprocesses, as a user runs it: an empty --realism-images folder (exit 1 after both models loaded), and
    local_vq / the default vq_roundtrip on a pixel-space checkpoint (a message about a missing quantize.embedding)."""
    (tmp_path / "empty").mkdir()
    pixel = pixel_space_checkpoint(tmp_path / "pixel.ckpt")

    def evaluate(*args: str) -> tuple[int, list[str]]:
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "evaluate.py"), *args, "--outdir", str(tmp_path / "o")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]

    code, lines = evaluate("--ckpt", str(tmp_path / "missing.ckpt"), "--realism-images", str(tmp_path / "empty"))
    assert code == 2 and len(lines) == 1 and f"--realism-images: {tmp_path / 'empty'}: folder holds no images" in lines[0]
    code, lines = evaluate("--ckpt", str(pixel), "--degradations", "jpeg", "local_vq:codebook_fraction=0.5")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (
        "evaluate.py: error: --degradations 'local_vq:codebook_fraction=0.5' round-trips through the refiner's own VQ "
        f"first stage, but {pixel} is a pixel-space model (its first stage is IdentityFirstStage, no VQ); pass "
        "--degradations without vq_roundtrip and local_vq, or give them a VQ with first_stage=<VQ config.yaml>"
    )
    code, lines = evaluate("--ckpt", str(pixel))  # the default degradations hold vq_roundtrip
    assert code == 2 and len(lines) == 1 and "(one of the default --degradations)" in lines[0]
    assert "is a pixel-space model" in lines[0]
    assert not (tmp_path / "o").exists()
