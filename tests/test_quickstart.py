"""scripts/quickstart.py end to end in --smoke mode: every stage through main.py, checkpoints, skipping, outputs."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import interrupt, run, script

from ldm.checkpoint import load_checkpoint

from warm_python import run_python

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "quickstart.py"
STAGES = ("vq_f4", "latesteps_500_750", "latesteps_750_1000")


def run_quickstart(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LATESTEPS_LOGDIR"}
    env["OMP_NUM_THREADS"] = "1"  # tiny ops: idle OpenMP threads only slow a busy 2-core machine down
    return run_python([SCRIPT, "--smoke", *args], cwd=REPO, env=env, timeout=900)


@pytest.mark.slow
def test_quickstart_smoke_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    first = run_quickstart("--outdir", str(out))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    checkpoints = {name: out / "checkpoints" / f"{name}.ckpt" for name in STAGES}
    assert all(path.is_file() for path in checkpoints.values())
    windows = {name: load_checkpoint(checkpoints[name]).get("window") for name in STAGES[1:]}
    assert windows == {"latesteps_500_750": [250, 500], "latesteps_750_1000": [0, 250]}
    runs = sorted(p.name for p in (out / "logs").iterdir())
    assert len(runs) == 3 and all(any(r.endswith(f"quickstart_{s}") for r in runs) for s in STAGES)

    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # 5 local degradations x 2 images; baselines identity, nl_means, autoencoder once; experts at 50..450, over the
    # whole image and inside the box
    assert len(rows) == 5 * 2 * (3 + 2 * 4)
    assert {r["method"] for r in rows} == {"identity", "nl_means", "autoencoder", "experts", "experts (region)"}
    assert sorted({int(r["start_t"]) for r in rows if r["method"] == "experts"}) == [50, 150, 300, 450]
    assert sorted(r["degradation"].partition(":")[0] for r in rows if r["method"] == "identity") == [
        "local_blotch",
        "local_blotch",
        "local_paint",
        "local_paint",
        "local_shuffle",
        "local_shuffle",
        "local_vq",
        "local_vq",
        "local_warp",
        "local_warp",
    ]
    assert all(float(r["psnr_input_out"]) == float("inf") for r in rows if r["method"] == "experts (region)")

    with Image.open(out / "before_after.png") as im:
        im.load()
        assert im.format == "PNG"
        # 5 columns (clean | artifact | mask | refined whole | refined region) of 64 px crops upscaled to 128 px
        assert im.width == 6 + 5 * (128 + 6)
        assert np.asarray(im.convert("L")).std() > 5
    for name in ("summary.csv", "curves.png", "realism.png", "examples.png", "sweep.json"):
        assert (out / "sweep" / name).is_file()
    assert "time per stage" in first.stdout and "PSNR to clean" in first.stdout
    assert "first stage round trip on 4 held-out 64x64 crops of chelsea, coffee (never trained on): PSNR" in first.stdout
    assert "(n=2, region refinement at its best start_t" in first.stdout and "PSNR to clean inside the box" in first.stdout
    assert "PSNR to input outside the box" in first.stdout and "SWD x1e3" in first.stdout

    # a missing checkpoint redoes its stage (and the later ones); existing ones are skipped
    checkpoints["latesteps_750_1000"].unlink()
    mtimes = {name: checkpoints[name].stat().st_mtime_ns for name in STAGES[:2]}
    second = run_quickstart("--outdir", str(out), "--start-t", "250", "--degradations", "vq_roundtrip:codebook_fraction=0.5")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("skipped: ") == 2
    assert {name: checkpoints[name].stat().st_mtime_ns for name in STAGES[:2]} == mtimes
    assert checkpoints["latesteps_750_1000"].is_file()
    assert len(list((out / "logs").iterdir())) == 4
    assert "vq_roundtrip:first_stage=model,codebook_fraction=0.5 (artifact -> whole, start_t=250, n=2): PSNR to clean" in (
        second.stdout
    )
    with open(out / "metrics.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 1 * 2 * (3 + 5)  # 250 joins the sweep's start_ts; no box, no region


@pytest.mark.slow
def test_quickstart_synthetic_smoke_end_to_end(tmp_path):
    out = tmp_path / "synthetic"
    proc = run_quickstart("--domain", "synthetic", "--outdir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(p.name for p in (out / "logs").iterdir())
    assert len(runs) == 3
    for stage in STAGES:  # trained with the synthetic configs
        config = next((out / "logs").glob(f"*quickstart_{stage}/configs/*-project.yaml")).read_text()
        assert "ldm.data.synthetic.SyntheticShapes" in config
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # 6 artifacts (the control included) x 2 images: identity, autoencoder, region refinement at 5 start_ts
    assert len(rows) == 6 * 2 * (2 + 5)
    assert {r["method"] for r in rows} == {"identity", "autoencoder", "experts (region)"}
    assert all(r["psnr_rt_in"] for r in rows)  # every output against the round trip of its clean image
    with open(out / "sweep" / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert {"n", "psnr_clean_in_lo", "psnr_clean_in_hi", "gain_psnr_clean_in", "gain_psnr_rt_in", "swd_lo"} <= set(summary[0])
    table = (out / "table.md").read_text()
    assert table.startswith("| artifact | n | PSNR in box: artifact |") and len(table.strip().splitlines()) == 2 + 6
    assert "local_none (control: nothing wrong)" in table
    assert "held-out 32x32 images of the synthetic family (never trained on): PSNR" in proc.stdout
    assert "local_none:box_size=0.5,box_at=edges (control, nothing wrong in the box, n=2)" in proc.stdout
    with Image.open(out / "before_after.png") as im:
        assert im.width == 6 + 4 * (128 + 6)  # clean | artifact | mask | refined in the box, 32 px shown at 128 px


@pytest.mark.parametrize(
    "args, message",
    [
        (["--start-t", "1000"], "--start-t must be in [1, 999]"),
        (["--degradations", "jpg"], "unknown degradation 'jpg'"),
        (["--degradations", "jpeg:qualty=5"], "unknown parameters ['qualty']"),
        (["--size", "60"], "--size 60: the images' side must be a multiple of 8"),
        (["--domain", "synthetic", "--degradations", "jpeg:quality=10"], "--domain synthetic refines only inside"),
        (["--domain", "drawings"], "argument --domain: invalid choice: 'drawings'"),
        (["--weights", "demo", "--domain", "synthetic"], "--weights demo refines with the shipped photo experts"),
        (["--weights", "demo", "--force"], "trains nothing (no --force)"),
        (["--weights", "mine"], "argument --weights: invalid choice: 'mine'"),
        (["--n-images", "\uff11"], "argument --n-images: '\uff11' is not an integer"),  # a full-width 1
    ],
)
def test_bad_arguments_exit_2_before_any_training(args, message, tmp_path):
    proc = run_quickstart("--outdir", str(tmp_path), *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()


def test_an_outdir_it_cannot_create_or_holding_files_it_did_not_write_exits_2_before_training(tmp_path):
    """``--outdir /proc/qs`` (a mkdir that os.access does not predict) must not end in a traceback, and a user's
    ``table.md`` in --outdir must not be replaced."""
    proc = run_quickstart("--outdir", "/proc/qs")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("quickstart.py: error: ") and "/proc/qs" in proc.stderr
    assert "Traceback" not in proc.stderr  # as root: "cannot create the output folder"; else check_outdir refuses it
    (tmp_path / "table.md").write_text("my notes")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "summary.csv").write_text("a,b")
    proc = run_quickstart("--outdir", str(tmp_path))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (
        f"--outdir {tmp_path} holds table.md, sweep/summary.csv, which the quick start would overwrite but did not "
        "write (there is no checkpoints/quickstart.json); choose another --outdir, or move them away"
    ) in proc.stderr
    assert (tmp_path / "table.md").read_text() == "my notes" and (tmp_path / "sweep" / "summary.csv").read_text() == "a,b"
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()


@pytest.fixture(scope="module")
def quickstart_module():
    """scripts/quickstart.py in-process (a subprocess per case would cost seconds of imports)."""
    spec = importlib.util.spec_from_file_location("quickstart_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check_arguments(quickstart_module):
    """scripts/quickstart.py's argument check."""
    module = quickstart_module

    def check(*args: str) -> str | None:
        return module.check_arguments(module.apply_domain_defaults(module.build_parser().parse_args(["--smoke", *args])))

    return check


@pytest.mark.parametrize("user, expected", [(None, ["2", "1", "1"]), ("1", ["1", "1", "1"]), ("3", ["3", "3", "3"])])
def test_stages_run_with_their_own_threads_unless_the_user_set_omp_num_threads(
    quickstart_module, monkeypatch, tmp_path, user, expected
):
    seen = []

    def fake_run(cmd, cwd, env):
        assert env["MKL_NUM_THREADS"] == env["OMP_NUM_THREADS"]  # a parent's MKL threads never leak into a stage
        seen.append(env["OMP_NUM_THREADS"])
        return subprocess.CompletedProcess(cmd, 1)

    import ldm.train.stages

    monkeypatch.setattr(ldm.train.stages.subprocess, "run", fake_run)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    monkeypatch.setattr(quickstart_module, "usable_cpus", lambda: 4)
    for stage in quickstart_module.stages(tmp_path / "checkpoints"):
        with pytest.raises(SystemExit, match="failed"):
            quickstart_module.run_stage(stage, tmp_path / "logs", tmp_path / "x.ckpt", 23, False, user)
    assert seen == expected  # the VQ trains faster on two threads, the late-steps models on one
    monkeypatch.setattr(quickstart_module, "usable_cpus", lambda: 1)  # never more threads than CPUs to run them
    assert quickstart_module.stages(tmp_path)[0].threads == "1"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--start-t", "700"], "--start-t 700 starts at t=601 on the DDIM grid, outside the experts' windows (t < 500)"),
        (["--size", "100000"], "--size 100000: the images' side must be a multiple of 8 in [16, 2048]"),
        (["--domain", "synthetic", "--size", "2048"], "--size 2048: the images' side must be a multiple of 8 in [16, 1024]"),
        (["--domain", "synthetic", "--n-images", "100000000"], "--n-images must be in [1, 4096]"),
        (["--domain", "synthetic", "--degradations", "local_block:block=100000"], "block must be an integer in [2, 1024]"),
        (["--ddim-steps", "5000"], "--ddim-steps in [1, 1000]"),
        (["--degradations", "local_blotch:n_blobs=1000000"], "n_blobs must be an integer in [1, 256]"),  # was 18 GB
        (["--degradations", "local_vq:codebook_fraction=2"], "codebook_fraction must be in (0, 1], got 2.0"),
        (["--degradations", "vq_roundtrip:codebook_fraction=0"], "codebook_fraction must be a finite number > 0"),
        (["--degradations", "local_vq:nope=1"], "unknown parameters ['nope']"),
        (["--degradations", "local_vq:box_size=big"], "local_vq takes numbers"),
        (["--degradations", "local_vq:first_stage=missing.yaml"], "first_stage='missing.yaml' is not a file"),
        (["--degradations", "local_warp:box_size=0"], "box_size must be a finite number > 0, got 0"),
        (["--degradations", "local_warp:nope=1"], "unknown parameters ['nope']"),
        (["--size", "16", "--degradations", "local_shuffle:box_size=0.2"], "does not leave room for two disjoint patches"),
    ],
)
def test_bad_arguments_are_found_by_the_check_before_training(check_arguments, args, message):
    """What main() refuses with exit 2 before the first stage (as the subprocess cases above show for some)."""
    problem = check_arguments(*args)
    assert problem is not None and message in problem and "\n" not in problem


def test_checkpoints_of_another_domain_or_of_a_smoke_run_are_not_reused(quickstart_module, tmp_path):
    module = quickstart_module

    def args(*argv: str):
        return module.apply_domain_defaults(module.build_parser().parse_args([*argv, "--outdir", str(tmp_path)]))

    assert module.check_checkpoints(args("--domain", "synthetic"), tmp_path) is None  # nothing there yet
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vq_f4.ckpt").write_bytes(b"x")
    assert module.check_checkpoints(args(), tmp_path) is None  # unstamped: an earlier version's photo quick start
    problem = module.check_checkpoints(args("--domain", "synthetic"), tmp_path)
    assert "holds checkpoints of the photos quick start; pass another --outdir, or --force" in problem
    (tmp_path / "checkpoints" / module.STAMP).write_text('{"domain": "synthetic", "smoke": true}')
    assert "of the synthetic quick start (--smoke)" in module.check_checkpoints(args("--domain", "synthetic"), tmp_path)
    assert module.check_checkpoints(args("--domain", "synthetic", "--smoke"), tmp_path) is None
    assert module.check_checkpoints(args("--domain", "photos", "--force"), tmp_path) is None


def test_outputs_are_reused_only_in_a_quick_start_s_own_folder(quickstart_module, tmp_path, monkeypatch):
    module = quickstart_module
    assert module.check_outputs(tmp_path / "new") is None and module.check_outputs(tmp_path) is None
    (tmp_path / "notes.txt").write_text("x")  # a name the quick start never writes: never touched, no refusal
    assert module.check_outputs(tmp_path) is None
    (tmp_path / "metrics.csv").write_text("mine")
    assert "holds metrics.csv, which the quick start would overwrite" in module.check_outputs(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / module.STAMP).write_text('{"domain": "photos", "smoke": true}')
    assert module.check_outputs(tmp_path) is None  # stamped: its own outputs, replaced as before
    (tmp_path / "checkpoints" / module.STAMP).unlink()
    (tmp_path / "checkpoints" / "vq_f4.ckpt").write_bytes(b"x")
    assert module.check_outputs(tmp_path) is None  # an earlier version's quick start (unstamped checkpoints)
    (tmp_path / "logs").write_text("a file")
    assert "logs is a file, where the quick start makes its logs folder" in module.check_outputs(tmp_path)
    assert set(module.OUTPUTS) >= {"table.md", "before_after.png", "sweep/sweep.json", "checkpoints/quickstart.json"}
    user = tmp_path / "user"  # hostile pass: a user's own quickstart.json must not make the folder the quick start's
    user.mkdir()
    (user / "quickstart.json").write_text("{}")
    (user / "table.md").write_text("mine")
    assert "holds quickstart.json, table.md, which the quick start would overwrite" in module.check_outputs(user)
    (user / "quickstart.json").write_text('{"domain": "photos", "smoke": false, "weights": "demo"}')
    assert module.check_outputs(user) is None

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)  # a failure check_outdir's os.access did not predict
    problem = module.make_outdir(tmp_path / "q")
    assert problem == (
        f"cannot create the output folder {tmp_path / 'q'}: [Errno 13] Permission denied: "
        f"'{tmp_path / 'q'}'; choose another --outdir"
    )


def test_good_degradation_specs_pass_the_check(check_arguments):
    assert (
        check_arguments(
            "--degradations",
            "local_vq:codebook_fraction=0.5,box_size=0.3",
            "vq_roundtrip",
            "local_warp",
            "local_shuffle:box_size=0.2",
            "--size",
            "32",
        )
        is None
    )
    assert check_arguments("--start-t", "500") is None  # t=401 on the 10-step smoke grid: inside [250, 500)


def test_demo_weights_refine_and_evaluate_without_training(tmp_path):
    """``--weights demo``: the shipped experts (weights/demo/), no training stage, the same report files."""
    out = tmp_path / "demo"
    proc = run_quickstart("--weights", "demo", "--outdir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "using the shipped demo experts: weights/demo/latesteps_500_750.safetensors" in proc.stdout
    assert "== [1/1] refine degraded held-out images ==" in proc.stdout and "train the VQ-f4" not in proc.stdout
    assert not (out / "checkpoints").exists() and not (out / "logs").exists()
    assert json.loads((out / "quickstart.json").read_text()) == {"domain": "photos", "smoke": True, "weights": "demo"}
    for name in ("table.md", "metrics.csv", "before_after.png", "sweep/summary.csv"):
        assert (out / name).is_file()
    again = run_quickstart("--weights", "demo", "--outdir", str(out), "--degradations", "local_paint")
    assert again.returncode == 0, again.stderr[-3000:]  # its own folder: the outputs are replaced


# ---------------------------------------------------------------------------------------------------------------------
# bad seeds, outdirs and stage checkpoints before training, and Ctrl+C


@pytest.fixture(scope="module")
def scripts():
    return {"quickstart": script("quickstart")}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--seed", "-1"], "--seed -1 is outside the seed range [0, 4294967295]"),
        (["--seed", "4294967296"], "--seed 4294967296 is outside the seed range"),
        (["--outdir", "{tmp}/a_file/out"], "a file is in the way"),
    ],
)
def test_quickstart_refuses_bad_seeds_and_outdirs_before_training(scripts, tmp_path, capsys, args, expected):
    (tmp_path / "a_file").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    code, lines = run(scripts["quickstart"], ["--smoke", "--outdir", str(tmp_path / "q"), *args], capsys)
    assert code == 2 and len(lines) == 1 and expected in lines[0]
    assert not (tmp_path / "q").exists()


def test_quickstart_with_corrupt_stage_checkpoints_and_ctrl_c(scripts, tmp_path, capsys, monkeypatch):
    quickstart = scripts["quickstart"]
    out = tmp_path / "q"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("vq_f4", "latesteps_500_750", "latesteps_750_1000"):  # every stage is skipped: its file exists
        (out / "checkpoints" / f"{name}.ckpt").write_bytes(b"\x80\x02 not a checkpoint")
    code, lines = run(quickstart, ["--smoke", "--outdir", str(out)], capsys)
    assert code == 1 and len(lines) == 1 and "cannot be read" in lines[0] and "--force retrains every stage" in lines[0]
    monkeypatch.setattr(quickstart, "run_stage", interrupt)
    code, lines = run(quickstart, ["--smoke", "--outdir", str(out), "--force"], capsys)
    assert code == 130 and len(lines) == 1 and lines[0].startswith("quickstart.py: interrupted")
