"""scripts/evaluate.py: end to end in a subprocess, local degradations in region and crop modes, synthetic images,
no-reference mode; and its bad inputs: an unusable outdir, sizes, paths, numbers and weights are each one line and the
right exit code before any checkpoint is opened or the sweep runs; Ctrl+C is one line, exit 130; a pixel-space
checkpoint with a VQ degradation is refused naming the degradation.

``main`` runs in process (fast) except where a case runs as a user would, in a subprocess; Ctrl+C is a
KeyboardInterrupt raised where the work would be.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import ckpt_args, interrupt, run, script
from test_sweep import DDIM_STEPS, _read_csv, _write_pngs

from warm_python import run_python

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
        (["--seeds", "0", str(2**32)], f"--seeds: seed={2**32} must be an integer in [0, {2**32 - 1}]"),
        (["--n-images", "100000000"], "--n-images 100000000: at most 4096 held-out crops"),
        (["--size", "4096"], "--size: size=4096 px is above 2048 px"),
        (
            ["--degradations", "jpeg", "colour_blotches:n_blobs=1000000"],
            "--degradations 'colour_blotches:n_blobs=1000000': n_blobs must be an integer in [1, 256]",
        ),
        (["--degradations", "local_vq:box_size=3"], "--degradations 'local_vq:box_size=3': box_size must be in (0, 1]"),
        # flags that had no effect (silently ignored), refused whatever their value, a default one too
        (
            ["--images", "{tmp}/imgs", "--n-images", "3"],
            "--n-images only applies to the held-out crops (or --synthetic images), not to the images of --images, "
            "which are evaluated as they are; leave out --n-images",
        ),
        (["--images", "{tmp}/imgs", "--size", "64"], "--size only applies to the held-out crops"),
        (["--images", "{tmp}/imgs", "--crop-seed", "0"], "--crop-seed only applies to the held-out crops"),
        (["--no-reference", "{tmp}/imgs", "--n-images", "8"], "not to the images of --no-reference"),
        (
            ["--no-reference", "{tmp}/imgs", "--degradations", "jpeg"],
            "--degradations does not apply to --no-reference images (degraded already, no clean version); leave it out",
        ),
        (["--no-reference", "{tmp}/imgs", "--inception-weights", "{tmp}/imgs/artifact_0.png"], "FID/KID need clean"),
        # a realism folder of another size: found before loading where the evaluated size is known then
        (["--images", "{tmp}/imgs", "--realism-images", "{tmp}/big"], "got sizes (H, W) [(32, 32)] against [(24, 24)]"),
        (["--size", "24", "--realism-images", "{tmp}/big"], "got sizes (H, W) [(32, 32)] against [(24, 24)]"),
        (["--images", "{tmp}/big", "--outdir", "{tmp}/big"], "--images: {tmp}/big is also --outdir: the report's figures"),
    ],
)
def test_evaluate_refuses_bad_paths_and_numbers_before_loading(
    scripts, expert_checkpoints, tmp_path, capsys, monkeypatch, args, expected
):
    """Each is one line, exit 2, before any checkpoint is opened: not after both models have loaded (a missing or
    empty --realism-images with exit 1), nor in the sweep."""
    (tmp_path / "empty").mkdir()
    _write_pngs(tmp_path / "imgs")  # 24 px
    _write_pngs(tmp_path / "big", size=32)
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setattr("ldm.refine.Refiner.from_checkpoints", interrupt)  # loading would exit 130
    outdir = [] if "--outdir" in args else ["--outdir", str(tmp_path / "o")]
    argv = [*ckpt_args(expert_checkpoints), *[a.format(tmp=tmp_path) for a in args], *outdir]
    code, lines = run(scripts["evaluate"], argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evaluate.py: error: ")
    assert expected.format(tmp=tmp_path) in lines[0], lines[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_evaluate_lpips_weights_of_wrong_shapes_nan_or_junk_are_one_line_before_loading(
    scripts, expert_checkpoints, tmp_path, capsys, monkeypatch
):
    """Right keys and wrong shapes were a RuntimeError traceback, a NaN gave nan in every LPIPS cell with exit 0, and a
    junk file was reported only after both models had loaded."""
    import torch
    import torchvision

    state = torchvision.models.alexnet(weights=None).state_dict()
    shapes, nan = dict(state), dict(state)
    shapes["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    nan["features.0.weight"] = state["features.0.weight"].clone()
    nan["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(shapes, tmp_path / "shapes.pth")
    torch.save(nan, tmp_path / "nan.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    monkeypatch.setattr("ldm.refine.Refiner.from_checkpoints", interrupt)  # loading would exit 130
    for name, expected in (
        ("shapes.pth", "features.0.weight has shape (64, 3, 5, 5), LPIPS needs (64, 3, 11, 11)"),
        ("nan.pth", "1 tensors hold NaN or inf (first: ['features.0.weight']), so every LPIPS distance would be nan"),
        ("junk.pth", "cannot be read (truncated or corrupt)"),
    ):
        argv = [*ckpt_args(expert_checkpoints), "--lpips-net", "alex", "--lpips-weights", str(tmp_path / name)]
        code, lines = run(scripts["evaluate"], [*argv, "--outdir", str(tmp_path / "o")], capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("evaluate.py: error: "), (name, lines)
        assert expected in lines[0] and name in lines[0], lines[0]
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
        proc = run_python(
            [REPO / "scripts" / "evaluate.py", *args, "--outdir", tmp_path / "o"],
            cwd=REPO,
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


# ---------------------------------------------------------------------------------------------------------------------
# the sweep through the command line


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_python(
        [REPO / "scripts" / "evaluate.py", *args],
        cwd=REPO,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def evaluate_main():
    """scripts/evaluate.py's main(), imported in-process (faster than a subprocess for the many small cases)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_end_to_end_in_a_subprocess(expert_checkpoints, tmp_path):
    out = tmp_path / "eval"
    ckpts = [arg for path in expert_checkpoints for arg in ("--ckpt", str(path))]
    proc = _run_cli(
        *ckpts,
        "--compare-ckpt",
        str(expert_checkpoints[0]),
        "--compare-ckpt",
        str(expert_checkpoints[1]),
        "--compare-name",
        "again",
        "--n-images",
        "2",
        "--degradations",
        "jpeg:quality=10",
        "--start-t",
        "100",
        "300",
        "--ddim-steps",
        str(DDIM_STEPS),
        "--filter",
        "bilateral",
        "--outdir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "degradation: jpeg:quality=10" in proc.stdout and "again" in proc.stdout
    assert "note: skipped: LPIPS" in proc.stdout or "LPIPS->clean" in proc.stdout
    rows = _read_csv(out / "sweep.csv")
    assert len(rows) == 2 * (3 + 2 + 2)
    # the same experts under two names give the same numbers
    for t in ("100", "300"):
        a = sorted(r["psnr_clean"] for r in rows if r["method"] == "experts" and r["start_t"] == t)
        b = sorted(r["psnr_clean"] for r in rows if r["method"] == "again" and r["start_t"] == t)
        assert a == b
    for name in ("curves.png", "realism.png", "examples.png"):  # realism: against other held-out crops by default
        with Image.open(out / name) as im:
            assert im.format == "PNG"


def test_cli_local_degradation_runs_region_and_crop_modes(evaluate_main, expert_checkpoints, tmp_path, capsys):
    ckpts = [arg for path in expert_checkpoints for arg in ("--ckpt", str(path))]
    common = [
        *ckpts,
        "--n-images",
        "1",
        "--degradations",
        "local_blotch",
        "--start-t",
        "300",
        "--ddim-steps",
        str(DDIM_STEPS),
        "--filter",
        "none",
        "--no-autoencoder",
    ]
    code = evaluate_main([*common, "--region-modes", "region", "crop", "--outdir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    rows = _read_csv(tmp_path / "out" / "sweep.csv")
    assert [r["method"] for r in rows] == ["identity", "experts", "experts (region)", "experts (crop)"]
    assert all(float(r["psnr_input_out"]) == math.inf for r in rows if "(" in r["method"])
    assert any(r.get("swd") for r in _read_csv(tmp_path / "out" / "summary.csv"))
    code = evaluate_main([*common, "--region-modes", "--outdir", str(tmp_path / "whole")])
    assert code == 0 and [r["method"] for r in _read_csv(tmp_path / "whole" / "sweep.csv")] == ["identity", "experts"]
    _write_pngs(tmp_path / "small")  # other sizes than the 32 px crops: refused in one line
    code = evaluate_main([*common, "--realism-images", str(tmp_path / "small"), "--outdir", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "one size" in err and len(err.splitlines()) == 1


def test_cli_synthetic_images_region_only(evaluate_main, expert_checkpoints, tmp_path, capsys):
    ckpts = [arg for path in expert_checkpoints for arg in ("--ckpt", str(path))]
    code = evaluate_main(
        [
            *ckpts,
            "--synthetic",
            "--n-images",
            "2",
            "--size",
            "32",
            "--degradations",
            "local_noise:box_at=edges",
            "--start-t",
            "100",
            "--ddim-steps",
            str(DDIM_STEPS),
            "--filter",
            "none",
            "--region-only",
            "--outdir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "2 held-out 32x32 images of the synthetic family (seed 0)" in capsys.readouterr().out
    rows = _read_csv(tmp_path / "out" / "sweep.csv")
    assert [r["method"] for r in rows] == ["identity"] * 2 + ["autoencoder"] * 2 + ["experts (region)"] * 2
    assert {r["image"] for r in rows} == {"synthetic_0_0000", "synthetic_0_0001"}
    assert all(r["psnr_rt_in"] for r in rows)  # against the round trip of the clean image
    summary = _read_csv(tmp_path / "out" / "summary.csv")
    region = next(r for r in summary if r["method"] == "experts (region)")
    assert float(region["psnr_clean_in_lo"]) <= float(region["psnr_clean_in"]) <= float(region["psnr_clean_in_hi"])
    assert region["gain_psnr_clean_in"] and region["gain_psnr_rt_in"] and region["gain_swd"]
    code, err = _one_line_run(
        evaluate_main, capsys, [*ckpts, "--region-only", "--degradations", "jpeg", "--outdir", str(tmp_path / "o")]
    )
    assert code == 2 and "--region-only refines only inside the boxes of local degradations" in err
    code, err = _one_line_run(evaluate_main, capsys, [*ckpts, "--synthetic", "--images", str(tmp_path)])
    assert code == 2 and "not allowed with argument" in err


def test_cli_no_reference(evaluate_main, expert_checkpoints, tmp_path, capsys):
    _write_pngs(tmp_path / "real")
    ckpts = [arg for path in expert_checkpoints for arg in ("--ckpt", str(path))]
    code = evaluate_main(
        [
            *ckpts,
            "--no-reference",
            str(tmp_path / "real"),
            "--start-t",
            "200",
            "--ddim-steps",
            str(DDIM_STEPS),
            "--filter",
            "none",
            "--outdir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "artifact images in" in capsys.readouterr().out
    rows = _read_csv(tmp_path / "out" / "sweep.csv")
    assert {r["degradation"] for r in rows} == {"none"} and "psnr_clean" not in rows[0]
    assert {r["method"] for r in rows} == {"identity", "autoencoder", "experts"}
    assert (tmp_path / "out" / "examples.png").is_file()
    from ldm.eval.sweep import DEFAULT_DEGRADATIONS  # --degradations is refused here; sweep.json records it as before

    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["parameters"]["degradations"] == list(DEFAULT_DEGRADATIONS)


def test_cli_leaves_out_an_outdir_inside_the_images_and_skips_lpips_on_small_images(
    evaluate_main, expert_checkpoints, tmp_path, capsys
):
    """Run twice, ``--images imgs --outdir imgs/ev`` evaluated its own figures the second time (n 2 -> 4); LPIPS on
    images under its backbone's minimum (alex: 31 px) was a RuntimeError traceback after the models loaded."""
    import torch
    import torchvision

    _write_pngs(tmp_path / "imgs")  # 24 px
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "alex.pth")
    argv = [
        *ckpt_args(expert_checkpoints),
        *("--images", str(tmp_path / "imgs"), "--degradations", "jpeg", "--start-t", "300"),
        *("--ddim-steps", str(DDIM_STEPS), "--filter", "none", "--no-autoencoder", "--examples", "1"),
        *("--lpips-net", "alex", "--lpips-weights", str(tmp_path / "alex.pth"), "--outdir", str(tmp_path / "imgs" / "ev")),
    ]
    for run_number in (1, 2):
        code = evaluate_main(argv)
        out, err = capsys.readouterr()
        assert code == 0, err
        rows = _read_csv(tmp_path / "imgs" / "ev" / "sweep.csv")
        assert sorted({r["image"] for r in rows}) == ["artifact_0.png", "artifact_1.png"] and len(rows) == 4, run_number
        assert ("note: --images: left out 2 image(s) under the output folder" in out) == (run_number == 2), out
        assert all(r["lpips_clean"] == r["lpips_input"] == "skipped" for r in rows)
        small = "skipped: LPIPS: images (24, 24) are smaller than the 31 px its alex backbone needs"
        report = json.loads((tmp_path / "imgs" / "ev" / "sweep.json").read_text())
        assert f"note: {small}" in out and small in report["notes"]
        parameters = report["parameters"]  # recorded as before the defaults became None
        assert (parameters["n_images"], parameters["crop_seed"], parameters["size"]) == (8, 0, None)
    code, err = _one_line_run(evaluate_main, capsys, [*argv[:-1], str(tmp_path / "imgs")])
    assert code == 2 and "is also --outdir" in err


def _one_line_run(evaluate_main, capsys, argv: list[str]) -> tuple[int, str]:
    """Run evaluate.py in-process; returns ``(exit code, stderr)`` after asserting stderr is one line."""
    try:
        code = evaluate_main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return code, err


def test_cli_errors_are_one_line(evaluate_main, expert_checkpoints, tmp_path, capsys):
    ckpts = [arg for path in expert_checkpoints for arg in ("--ckpt", str(path))]

    def run(*args: str) -> tuple[int, str]:
        return _one_line_run(evaluate_main, capsys, [*args, "--outdir", str(tmp_path / "o")])

    code, err = run(*ckpts, "--degradations", "jpg")
    assert code == 2 and "unknown degradation 'jpg'" in err
    code, err = run("--ckpt", str(tmp_path / "nope.ckpt"))
    assert code == 2 and "does not exist" in err
    code, err = run("--ckpt", str(tmp_path / "nope.ckpt"), "--images", str(tmp_path / "none"))  # before the checkpoint
    assert code == 2 and "--images: image folder" in err and "does not exist" in err
    code, err = run(*ckpts, "--start-t", "x")
    assert code == 2 and "not an integer" in err
    code, err = run(*ckpts, "--start-t", "700", "800", "--n-images", "1", "--degradations", "jpeg")
    assert code == 2 and "cannot run any of start_t" in err
    for flag, values in (("--seeds", ["0", "1", "0"]), ("--degradations", ["jpeg", "jpeg"]), ("--start-t", ["50", "50"])):
        code, err = run(*ckpts, flag, *values)  # counted twice: n=4 from 2 images, intervals too narrow
        assert code == 2 and f"{flag}: {values[0]} is given more than once; give each value once" in err, err
    code, err = run(*ckpts, "--eta", "nan")
    assert code == 2 and "must be a number in [0, 1]" in err
    code, err = run(*ckpts, "--ddim-steps", "5000", "--n-images", "1", "--degradations", "jpeg")
    assert code == 2 and "ddim_steps=5000 must be an integer in [1, 1000]" in err
    assert not (tmp_path / "o").exists()


def test_cli_realism_and_region_mode_mistakes_are_one_line(evaluate_main, expert_checkpoints, tmp_path, capsys):
    ckpts = [arg for path in expert_checkpoints for arg in ("--ckpt", str(path))]
    fast = [
        *ckpts,
        "--n-images",
        "1",
        "--start-t",
        "300",
        "--ddim-steps",
        str(DDIM_STEPS),
        "--filter",
        "none",
        "--no-autoencoder",
    ]
    _write_pngs(tmp_path / "small")  # 24 px
    (tmp_path / "mixed").mkdir()
    for name, (w, h) in {"a.png": (32, 32), "b.png": (24, 40)}.items():
        Image.new("RGB", (w, h)).save(tmp_path / "mixed" / name)
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.png").write_bytes(b"\x89PNG not really")

    def run(*args: str) -> tuple[int, str]:
        return _one_line_run(evaluate_main, capsys, [*args, "--outdir", str(tmp_path / "o")])

    missing = ["--ckpt", str(tmp_path / "nope.ckpt")]  # these are found before any checkpoint is opened
    code, err = run(*missing, "--degradations", "jpeg", "--region-modes", "crop")
    assert code == 2 and "--region-modes crop only applies to local degradations" in err
    code, err = run(*missing, "--no-reference", str(tmp_path / "small"), "--region-modes", "region")
    assert code == 2 and "--no-reference images have no masks" in err
    code, err = run(*missing, "--region-modes", "zoom")
    assert code == 2 and "invalid choice: 'zoom'" in err
    code, err = run(*missing, "--name", "identity")
    assert code == 2 and "method names ['identity'] are used twice" in err
    for label in ("", " ", "a|b", "a\nb"):  # an empty name wrote a report with unnamed rows; '|' broke its tables
        code, err = run(*missing, "--name", label)
        assert code == 2 and f"--name {label!r}: a method name needs a visible character" in err, (label, err)
    code, err = run(
        *missing,
        "--compare-ckpt",
        "c.ckpt",
        "--name",
        "a (crop)",
        "--compare-name",
        "a",
        "--degradations",
        "local_warp",
        "--region-modes",
        "crop",
    )
    assert code == 2 and "method names ['a (crop)'] are used twice" in err
    for folder, expected_code, message in [  # a missing or empty folder: exit 2 before any checkpoint is opened
        ("empty", 2, "--realism-images: " + str(tmp_path / "empty") + ": folder holds no images"),
        ("small/artifact_0.png", 2, "--realism-images: image folder"),
        ("missing", 2, "does not exist or is not a folder"),
    ]:
        code, err = run(*missing, "--degradations", "jpeg", "--realism-images", str(tmp_path / folder))
        assert code == expected_code and message in err, (folder, err)
    # an unreadable image is found before any checkpoint is opened (it was found after both models had loaded)
    code, err = run(*missing, "--degradations", "jpeg", "--realism-images", str(tmp_path / "corrupt"))
    assert code == 1 and "--realism-images: cannot load image" in err, err
    code, err = run(*missing, "--degradations", "jpeg", "--images", str(tmp_path / "corrupt"))
    assert code == 1 and err.startswith("evaluate.py: error: cannot load image"), err
    for folder, expected_code, message in [
        ("corrupt", 1, "--realism-images: cannot load image"),
        ("mixed", 2, "must all have the evaluated images' size, got sizes (H, W) [(32, 32), (40, 24)]"),
        ("small", 2, "got sizes (H, W) [(24, 24)] against [(32, 32)]"),
    ]:
        code, err = run(*fast, "--degradations", "jpeg", "--realism-images", str(tmp_path / folder))
        assert code == expected_code and message in err, (folder, err)
    # crops too small for SWD's patches: no SWD by default (a note), refused for a given reference
    (tmp_path / "tiny").mkdir()
    Image.new("RGB", (6, 6)).save(tmp_path / "tiny" / "t.png")
    code, err = run(*fast, "--degradations", "jpeg", "--size", "6", "--realism-images", str(tmp_path / "tiny"))
    assert code == 2 and "SWD needs images of at least 7x7 px" in err
    code = evaluate_main([*fast, "--degradations", "jpeg", "--size", "6", "--outdir", str(tmp_path / "six")])
    assert code == 0 and "note: no SWD realism" in capsys.readouterr().out
    # a degradation that cannot run on an image says which one and on which image
    code, err = run(*fast, "--degradations", "local_shuffle", "--size", "4")
    assert code == 2 and "degradation 'local_shuffle:" in err and "on image 'heldout_000_" in err and "(4, 4)" in err
    assert not (tmp_path / "o").exists()


def test_cli_local_degradations_on_odd_sizes_with_a_compared_refiner(evaluate_main, expert_checkpoints, tmp_path, capsys):
    (tmp_path / "odd").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(tmp_path / "odd" / f"{i}.png")
    ckpts = [arg for path in expert_checkpoints for arg in ("--ckpt", str(path))]
    code = evaluate_main(
        [
            *ckpts,
            "--compare-ckpt",
            str(expert_checkpoints[0]),
            "--compare-ckpt",
            str(expert_checkpoints[1]),
            "--images",
            str(tmp_path / "odd"),
            "--realism-images",
            str(tmp_path / "odd"),
            "--degradations",
            "local_vq",
            "--start-t",
            "300",
            "--ddim-steps",
            str(DDIM_STEPS),
            "--filter",
            "none",
            "--no-autoencoder",
            "--region-modes",
            "crop",
            "region",
            "crop",
            "--outdir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = _read_csv(tmp_path / "out" / "sweep.csv")
    methods = ["experts", "experts (crop)", "experts (region)", "compare", "compare (crop)", "compare (region)"]
    assert list(dict.fromkeys(r["method"] for r in rows)) == ["identity", *methods]
    assert all(float(r["psnr_input_out"]) == math.inf for r in rows if "(" in r["method"])
    assert all(r.get("swd") for r in _read_csv(tmp_path / "out" / "summary.csv"))
