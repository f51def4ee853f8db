"""The benchmarks still run: each script at its smallest CPU setting, results read back from its JSON.

Benchmarks print figures and are not tests; these only check their plumbing (every configuration measured without an
error, the JSON complete, the figures finite) and the few numbers that do not depend on timing (FLOP counts).  Nothing
here asserts on wall-clock time.  ``benchmarks/gpu.sh --dry-run flops`` runs the GPU script's CPU path end to end.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from warm_python import run_python

pytestmark = pytest.mark.slow  # benchmark subprocesses, about a minute in all (still run in CI)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TIMEOUT = 600


def _run(cmd: list[str], results: Path) -> subprocess.CompletedProcess:
    # one thread; a script's own --threads 1 sets OMP/MKL threads for the stages it starts
    env = {**os.environ, "LATESTEPS_BENCH_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    if cmd[0] == sys.executable:
        result = run_python(cmd[1:], cwd=REPO, env=env, timeout=TIMEOUT)
    else:  # gpu.sh finds its Python through $PYTHON
        env.update(PYTHON=sys.executable, MKL_NUM_THREADS="1")
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


def _bench(script: str, args: list[str], results: Path) -> list[dict]:
    """Run ``benchmarks/<script>.py args`` (1 thread); return the rows of the one JSON file it wrote."""
    _run([sys.executable, str(BENCH / f"{script}.py"), "--threads", "1", *args], results)
    (path,) = results.glob(f"{script}-*.json")
    payload = json.loads(path.read_text())
    assert payload["machine"] and payload["args"]["threads"] == 1
    rows = payload["rows"]
    assert rows and all(not row.get("error") for row in rows), rows
    return rows


def _finite_positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_bench_refine_measures_every_configuration(tmp_path):
    rows = _bench(
        "bench_refine",
        [
            "--models",
            "tiny",
            "--sizes",
            "64",
            "--precisions",
            "fp32",
            "bf16",
            "--batch",
            "2",
            "--tail-steps",
            "2",
            "--repeats",
            "1",
        ],
        tmp_path,
    )
    assert sorted((r["precision"], r["batch"]) for r in rows) == [("bf16", 2), ("fp32", 2)]
    for row in rows:
        assert row["steps"] == 2 and row["size"] == 64 and "[250, 500) = steps 500-750" in row["refiner"]
        assert _finite_positive(row["wall_s"], row["sample_s"], row["bare_s"], row["overhead"], row["img_s"])
        assert row["wall_s"] >= row["sample_s"]


def test_bench_memory_reports_peaks(tmp_path):
    rows = _bench("bench_memory", ["--unet", "tiny", "--sizes", "64", "--tilings", "off"], tmp_path)
    (row,) = rows
    assert _finite_positive(row["peak_mib"], row["model_mib"], row["wall_s"])
    assert row["peak_mib"] >= row["model_mib"]


def test_bench_memory_sd_v1_refines_with_a_guided_prompt(tmp_path):
    """--unet sd-v1-tiny (SD v1's structure at test sizes, a config-only CLIP folder): guidance 7.5 runs both branches
    in one batch-2 UNet call per step, guidance 1 the conditional branch alone."""
    pytest.importorskip("transformers")
    rows = _bench(
        "bench_memory",
        ["--unet", "sd-v1-tiny", "--sizes", "64", "--tilings", "off", "--guidance", "1", "7.5", "--batch-invariant", "off"],
        tmp_path,
    )
    by_scale = {row["guidance"]: row for row in rows}
    assert sorted(by_scale) == [1.0, 7.5]
    for scale, row in by_scale.items():
        assert row["text_encoder"] == "clip" and row["batching"] == "batched" and row["steps"] == 2
        assert (row["unet_calls"], row["unet_batch"]) == (2, 2 if scale == 7.5 else 1)
        assert "1 expert(s)" in row["refiner"] and "[0, 1000)" in row["refiner"], row["refiner"]
        assert _finite_positive(row["peak_mib"], row["model_mib"], row["s_step"], row["last_step_s"])


def test_bench_train_runs_steps(tmp_path):
    rows = _bench(
        "bench_train",
        [
            "--configs",
            "tiny",
            "--precisions",
            "32-true",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--data",
            "random",
        ],
        tmp_path,
    )
    images, latents = rows
    for row in rows:
        assert row["batch"] == 2 and row["steps"] == 1 and _finite_positive(row["s_per_step"], row["steps_s"])
    assert (images["inputs"], latents["inputs"]) == ("images", "latents")
    assert latents["vs_images"] == round(latents["steps_s"] / images["steps_s"], 3)


def test_gpu_script_dry_run_counts_unet_flops(tmp_path):
    """gpu.sh's CPU path (Python selection, log, bench_flops); FLOP counts are exact: linear in the batch, and a
    training step (forward + backward) counts three forwards."""
    result = _run(["bash", str(BENCH / "gpu.sh"), "--dry-run", "flops"], tmp_path)
    assert "gpu.sh: done" in result.stdout
    (log,) = tmp_path.glob("gpu-*-dry.log")
    assert "UNet FLOP/s on cpu" in log.read_text()
    (path,) = tmp_path.glob("bench_flops-*.json")
    rows = {(r["kind"], r["batch"]): r for r in json.loads(path.read_text())["rows"]}
    assert sorted(rows) == [("forward", 1), ("forward", 2), ("train_step", 1), ("train_step", 2)]
    assert all(not r.get("error") and _finite_positive(r["gflop"], r["tflop_s"]) for r in rows.values())
    forward = rows["forward", 1]["gflop"]
    assert rows["forward", 2]["gflop"] == pytest.approx(2 * forward, rel=1e-6)
    assert rows["train_step", 1]["gflop"] == pytest.approx(3 * forward, rel=0.02)


def test_gpu_script_rejects_unknown_arguments_and_prints_help(tmp_path):
    bad = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--dryrun"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument '--dryrun'" in bad.stderr
    usage = _run(["bash", str(BENCH / "gpu.sh"), "--help"], tmp_path)
    assert "bash benchmarks/gpu.sh --dry-run" in usage.stdout and "set -euo" not in usage.stdout


def test_synthetic_windows_trains_three_ways_and_compares_them(tmp_path):
    """The compute comparison on the synthetic family, in --smoke mode: a 3-step VQ, then the chain, the 500-1000 model
    and the full-range model through main.py, the window-loss curves and the in-box comparison."""
    from ldm.train.stages import SMOKE_OVERRIDES, Stage, run_stage

    vq = tmp_path / "vq.ckpt"
    run_stage(
        Stage("vq", "vq", REPO / "configs" / "synthetic" / "vq_f4.yaml", list(SMOKE_OVERRIDES)),
        tmp_path / "vq_logs",
        vq,
        seed=0,
    )
    results = tmp_path / "results"
    out = _run(
        [
            sys.executable,
            str(BENCH / "synthetic_windows.py"),
            "--vq",
            str(vq),
            "--outdir",
            str(tmp_path / "runs"),
            "--threads",
            "1",
            "--smoke",
        ],
        results,
    )
    (path,) = results.glob("synthetic_windows-*.json")
    payload = json.loads(path.read_text())
    assert {r["run"] for r in payload["window_loss"]} == {"single", "full", "chain"}
    assert all(_finite_positive(r["window_loss"]) for r in payload["window_loss"])
    assert {r["artifact"] for r in payload["quality"]} <= {
        "local_noise",
        "local_block",
        "local_smear",
        "local_warp",
        "local_paint",
    }
    assert path.with_suffix(".md").read_text().startswith("| artifact | chain 500-750 → 750-1000 |")
    assert "the full-range model's window loss" in out.stdout
    assert sorted(p.name for p in (tmp_path / "runs" / "checkpoints").iterdir()) == [
        "chain_a.ckpt",
        "chain_b.ckpt",
        "full.ckpt",
        "single.ckpt",
    ]
    code = run_python([BENCH / "synthetic_windows.py", "--vq", tmp_path / "none.ckpt"], cwd=REPO, timeout=TIMEOUT)
    assert code.returncode == 2 and "is not a file" in code.stderr


def test_photo_curve_trains_and_measures_each_saved_step(tmp_path):
    """The photo quality-against-compute curve in --smoke mode: a 3-step VQ and experts of one width through main.py,
    every saved step measured (round trip, eps-MSE, SWD against the round trip, the blotch's in-box gain)."""
    results = tmp_path / "results"
    out = _run(
        [
            sys.executable,
            str(BENCH / "photo_curve.py"),
            "--outdir",
            str(tmp_path / "runs"),
            "--widths",
            "32",
            "--threads",
            "1",
            "--smoke",
        ],
        results,
    )
    (path,) = results.glob("photo_curve-*.json")
    payload = json.loads(path.read_text())
    assert [r["step"] for r in payload["vq"]] == [1, 2, 3]
    assert all(_finite_positive(r["64px"]) and r["64px_lo"] <= r["64px"] <= r["64px_hi"] for r in payload["vq"])
    runs = [(r["run"], r["step"]) for r in payload["experts"]]
    assert runs == [("500-750", s) for s in (1, 2, 3)] + [("750-1000", s) for s in (1, 2, 3)]
    for row in payload["experts"]:
        keys = ("eps_t300",) if row["run"] == "500-750" else ("eps_t50", "eps_t100", "dswd", "paint_gain")
        assert all(row[f"{k}_lo"] <= row[k] <= row[f"{k}_hi"] for k in keys), row
    assert path.with_suffix(".md").read_text().startswith("| VQ steps |") and "table:" in out.stdout
    bad = run_python([BENCH / "photo_curve.py", "--widths", "40"], cwd=REPO, timeout=TIMEOUT)
    assert bad.returncode == 2 and "multiple of 16" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
