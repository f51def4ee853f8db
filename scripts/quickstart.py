#!/usr/bin/env python
"""Quickstart: train tiny late-steps experts on the embedded photographs and watch them remove artifacts (CPU, no download).

    python scripts/quickstart.py                 # about 14 minutes on a 2-core CPU machine; outputs/quickstart/

Stages (each skipped when its checkpoint exists; --force redoes it and everything after it):

1. a small VQ-f4 first stage            main.py -b configs/quickstart/vq_f4.yaml -t
2. late steps 500-750 (t in [250, 500))  main.py -b configs/quickstart/latesteps_500_750.yaml -t, on the VQ of stage 1
3. late steps 750-1000 (t in [0, 250))   main.py -b configs/quickstart/latesteps_750_1000.yaml -t, finetuned from stage 2
4. refinement: crops of the held-out photographs (chelsea and coffee, never seen in training) get a local artifact of
   --degradations (a warp, a colour blotch, a duplicated patch, a coarse-VQ look, each inside a random box), are
   refined by the two chained experts (ldm.refine.Refiner) at several start_t, over the whole image and only inside
   the box (the region refinement), and are compared with the artifact itself, a classical filter and the first-stage
   round trip (ldm.eval.sweep): faithfulness (PSNR/SSIM to the input, inside and outside the box), distance to the
   clean image, and realism (SWD to other clean crops, ldm.eval.swd).

Writes <outdir>/before_after.png (clean | artifact | mask | refined whole | refined region), metrics.csv (one row per
image x degradation x method x start_t), <outdir>/sweep/{summary.csv, curves.png, realism.png, examples.png}, and the
checkpoints under <outdir>/checkpoints/ (training logs under <outdir>/logs/).  --smoke runs every stage for a handful
of steps (the test suite uses it; its images are noise).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.cli import EXIT_INTERRUPTED, EXIT_USAGE, OneLineParser, check_outdir, one_line_error

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "main.py"
CONFIGS = REPO / "configs" / "quickstart"

# The artifacts the quickstart refines: local and structural, each inside a random box (ldm.eval.local_degrade), the
# kind late-steps refinement exists for; local_vq uses the trained first stage with an eighth of its codebook.
DEGRADATIONS = ("local_warp", "local_blotch", "local_shuffle", "local_vq")
START_TS = (50, 150, 300, 500)
EXPERTS_T_END = 500  # the two experts' windows together: t in [0, 500) (steps 500-1000)
ROUND_TRIP_IMAGES = 32  # held-out crops on which the first stage's round trip is measured
# Intra-op threads per stage (Stage.threads) unless OMP_NUM_THREADS says otherwise.  On this project's 2-core machine,
# idle, two OpenMP threads (the default, active wait policy) trained the VQ 1.4x faster than one (passive wait: 1.2x)
# and the late-steps models 1.1x slower; two DDP processes (gloo) with half a batch each trained the VQ 1.2x faster and
# the late-steps models 1.2x slower.  Spinning OpenMP threads waiting for a busy core were up to 30x slower, so a
# machine doing something else should set OMP_NUM_THREADS=1.
THREADS = "1"
SMOKE_DDIM_STEPS = 10  # the sweep's DDIM grid with --smoke
SMOKE_OVERRIDES = (
    "lightning.trainer.max_steps=3",
    "lightning.trainer.num_sanity_val_steps=0",
    "lightning.modelcheckpoint.params.every_n_train_steps=1",
    "lightning.callbacks.image_logger.params.disabled=true",
    "data.params.batch_size=4",
    "data.params.train.params.n_samples=16",
    "data.params.validation.params.n_samples=8",
)


@dataclass
class Stage:
    """One main.py training run and the checkpoint it leaves in <outdir>/checkpoints/<name>.ckpt."""

    name: str
    title: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    threads: str = THREADS


def build_parser() -> argparse.ArgumentParser:
    """The command line of the quick start."""
    p = OneLineParser(prog="quickstart.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--outdir", help="where everything goes (default: outputs/quickstart; with --smoke "
                                    "outputs/quickstart_smoke, so smoke checkpoints are never taken for real ones)")
    p.add_argument("--force", action="store_true", help="redo every stage even when its checkpoint exists")
    p.add_argument("--smoke", action="store_true", help="a handful of steps per stage, 2 images (for tests)")
    p.add_argument("--start-t", type=int, default=300,
                   help="start timestep shown in before_after.png, one of the sweep's (default: %(default)s)")
    p.add_argument("--degradations", nargs="+", default=list(DEGRADATIONS), metavar="SPEC",
                   help="artifacts to remove, ldm.eval.degrade specs (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=6, help="held-out crops per degradation (default: %(default)s)")
    p.add_argument("--size", type=int, default=64,
                   help="side of the held-out crops in pixels, a multiple of 8 (the models train on 32 px crops and, "
                        "convolutional, refine any size) (default: %(default)s)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM grid of the refinement (default: %(default)s)")
    p.add_argument("--seed", type=int, default=23, help="training seed (main.py -s) (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="refinement device; training follows the configs (CPU) (default: %(default)s)")
    return p


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask or cgroup-limited set where the OS tells, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def stages(checkpoints: Path) -> list[Stage]:
    vq = str(checkpoints / "vq_f4.ckpt")
    first_stage = f"model.params.first_stage_config.params.ckpt_path={vq}"
    return [
        Stage("vq_f4", "train the VQ-f4 first stage", CONFIGS / "vq_f4.yaml", threads=str(min(2, usable_cpus()))),
        Stage("latesteps_500_750", "train late steps 500-750 (t in [250, 500))", CONFIGS / "latesteps_500_750.yaml",
              [first_stage]),
        Stage("latesteps_750_1000", "finetune late steps 750-1000 (t in [0, 250)) from 500-750",
              CONFIGS / "latesteps_750_1000.yaml",
              [first_stage, f"model.params.ckpt_path={checkpoints / 'latesteps_500_750.ckpt'}"]),
    ]


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_stage(stage: Stage, logs: Path, target: Path, seed: int, smoke: bool, threads: str | None = None) -> None:
    """Train with main.py in a subprocess (its progress bars on this terminal) and copy its last.ckpt to ``target``;
    ``threads`` (the user's OMP_NUM_THREADS) overrides the stage's own number of threads."""
    logs.mkdir(parents=True, exist_ok=True)
    before = {p for p in logs.iterdir() if p.is_dir()}
    cmd = [sys.executable, str(MAIN), "-b", str(stage.config), "-t", "--no-test", "-l", str(logs),
           "-n", f"quickstart_{stage.name}", "-s", str(seed), *stage.overrides]
    if smoke:
        cmd += [*SMOKE_OVERRIDES, "lightning.trainer.enable_progress_bar=false"]
    print("$ " + " ".join(_rel(Path(c)) if c.startswith(str(REPO)) else c for c in cmd[1:]), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "LATESTEPS_LOGDIR"}
    env["OMP_NUM_THREADS"] = threads or stage.threads
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"quickstart: stage {stage.name} failed (main.py exit code {proc.returncode}); see above")
    runs = [p for p in logs.iterdir() if p.is_dir() and p not in before]
    if len(runs) != 1 or not (runs[0] / "checkpoints" / "last.ckpt").is_file():
        raise SystemExit(f"quickstart: stage {stage.name}: no new run with checkpoints/last.ckpt under {logs}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(runs[0] / "checkpoints" / "last.ckpt", tmp)
    os.replace(tmp, target)


def first_stage_round_trip(model: Any, size: int, n: int) -> str:
    """The first stage's round trip (encode, quantize, decode) on ``n`` held-out crops of ``size`` px, as a line."""
    import torch

    from ldm.data.embedded import HELDOUT_PHOTOS
    from ldm.eval.baselines import autoencoder_baseline
    from ldm.eval.metrics import psnr
    from ldm.eval.sweep import heldout_images

    clean = torch.cat([im.image for im in heldout_images(n, size, seed=0)])
    round_trip = autoencoder_baseline(model)
    decoded = torch.cat([round_trip(clean[i : i + 16]) for i in range(0, n, 16)])
    return (
        f"first stage round trip on {n} held-out {size}x{size} crops of {', '.join(HELDOUT_PHOTOS)} (never trained on): "
        f"PSNR {float(psnr(decoded, clean).mean()):.2f} dB"
    )


def evaluate(args: argparse.Namespace, checkpoints: Path, outdir: Path) -> tuple[str, list[str]]:
    """Stage 4: the sweep on held-out crops; writes the report files, returns the table and the headline lines (the
    first stage's round trip, then one line per degradation)."""
    from ldm.eval.baselines import default_baselines
    from ldm.eval.metrics import load_lpips
    from ldm.eval.report import before_after_grid, format_table, save_png, write_report, write_rows_csv
    from ldm.eval.sweep import build_sweep_degradation, heldout_images, run_sweep, summarize
    from ldm.refine import Refiner

    refiner = Refiner.from_checkpoints(
        [checkpoints / "latesteps_500_750.ckpt", checkpoints / "latesteps_750_1000.ckpt"], device=args.device
    )
    print(refiner.describe(), flush=True)
    model = refiner.model
    size = args.size
    n_images = 2 if args.smoke else args.n_images
    images = heldout_images(n_images, size, seed=0)
    # other crops of the held-out photographs: realism is measured against clean images that are not the cases' own
    realism_reference = heldout_images(n_images, size, seed=1)
    degradations = [build_sweep_degradation(spec, model.first_stage_model) for spec in args.degradations]
    start_ts = sorted({*START_TS, args.start_t})
    result = run_sweep(
        [("experts", refiner)], images, degradations, start_ts, seeds=[0],
        baselines=default_baselines(model, "nl_means"), ddim_steps=SMOKE_DDIM_STEPS if args.smoke else args.ddim_steps,
        lpips=load_lpips(), realism_reference=realism_reference, n_examples=n_images, example_start_ts=[args.start_t],
    )
    write_report(result, outdir / "sweep", vars(args), title="quickstart: chained late-steps experts on held-out crops")
    write_rows_csv(result, outdir / "metrics.csv")
    save_png(before_after_grid(result, "experts", args.start_t), outdir / "before_after.png")
    summary = summarize(result)
    headline = [first_stage_round_trip(model, size, 4 if args.smoke else ROUND_TRIP_IMAGES)]
    for degradation in result.degradations:
        headline.append(_headline(summary, degradation, args.start_t))
    return format_table(summary), headline


def _headline(summary: list[dict[str, Any]], degradation: str, start_t: int) -> str:
    """One line: PSNR to clean (inside the box for a local artifact), SWD x 10^3 and what changed outside the box, for
    the artifact, the whole-image refinement and the region refinement at ``start_t``."""
    entries = {(s["method"], s["start_t"]): s for s in summary if s["degradation"] == degradation}
    picks = [("artifact", entries.get(("identity", None))), ("whole", entries.get(("experts", start_t))),
             ("region", entries.get(("experts (region)", start_t)))]
    picks = [(name, e) for name, e in picks if e is not None]
    local = "psnr_clean_in" in picks[0][1]
    key = "psnr_clean_in" if local else "psnr_clean"

    def numbers(metric: str, fmt: str) -> str:
        values = [e.get(metric) for _, e in picks]
        return " -> ".join(fmt.format(v) if isinstance(v, float) else "n/a" for v in values)

    names = " -> ".join(name for name, _ in picks)
    line = f"{degradation} ({names}, start_t={start_t}): PSNR to clean{' inside the box' if local else ''} "
    line += f"{numbers(key, '{:.2f}')} dB; SWD x1e3 {numbers('swd', '{:.2f}')}"
    if local:
        line += f"; PSNR to input outside the box {numbers('psnr_input_out', '{:.1f}')} dB"
    return line


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (before any training), or None."""
    from types import SimpleNamespace

    import torch

    from ldm.data.embedded import MAX_SIZE
    from ldm.eval.degrade import VQRoundTrip
    from ldm.eval.sweep import build_sweep_degradation
    from ldm.sampling.schedule import grid_tail
    from ldm.train.cli import MAX_SEED
    from ldm.util import ConfigError

    if not 1 <= args.start_t <= 999 or args.n_images < 1 or not 1 <= args.ddim_steps <= 1000:
        return "--start-t must be in [1, 999], --n-images >= 1 and --ddim-steps in [1, 1000]"
    timesteps = grid_tail(args.start_t, SMOKE_DDIM_STEPS if args.smoke else args.ddim_steps, 1000)[0]
    if not timesteps or timesteps[0] >= EXPERTS_T_END:  # before_after.png shows --start-t: it must run
        first = f"starts at t={timesteps[0]}" if timesteps else "holds no step"
        return (f"--start-t {args.start_t} {first} on the DDIM grid, outside the experts' windows (t < {EXPERTS_T_END}); "
                f"choose a --start-t below {EXPERTS_T_END}, e.g. one of {list(START_TS[:-1])}")
    if not 0 <= args.seed <= MAX_SEED:  # main.py's -s range
        return f"--seed {args.seed} is outside the seed range [0, {MAX_SEED}]"
    if not 16 <= args.size <= MAX_SIZE or args.size % 8:
        return f"--size {args.size}: the crops' side must be a multiple of 8 in [16, {MAX_SIZE}] (e.g. 64)"
    # vq_roundtrip / local_vq are built on the trained first stage after training; their parameters are checked now on
    # a stand-in with what VQRoundTrip looks for, and every other degradation runs once on a blank crop of --size
    stand_in = SimpleNamespace(encode=None, decode=None, quantize=SimpleNamespace(embedding=None))
    blank = torch.zeros(1, 3, args.size, args.size)
    for spec in args.degradations:
        try:
            degradation = build_sweep_degradation(spec, stand_in).degradation
            if not isinstance(getattr(degradation, "inner", degradation), VQRoundTrip):
                degradation(blank, 0)  # e.g. patches that do not fit into crops of --size
        except (KeyError, TypeError, ValueError, OSError, ConfigError) as exc:
            return f"--degradations {spec!r}: {one_line_error(exc)}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the quick start; returns the exit code."""
    args = build_parser().parse_args(argv)
    args.threads = os.environ.get("OMP_NUM_THREADS")  # the user's choice wins over each stage's
    os.environ.setdefault("OMP_NUM_THREADS", THREADS)  # before torch is imported
    outdir = Path(args.outdir or ("outputs/quickstart_smoke" if args.smoke else "outputs/quickstart")).resolve()
    problem = check_arguments(args) or check_outdir(outdir)
    if problem:
        print(f"quickstart.py: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(args, outdir)
    except KeyboardInterrupt:
        print("quickstart.py: interrupted; finished stages keep their checkpoints (run again to continue)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, outdir: Path) -> int:
    """The stages and the evaluation (after the arguments are checked)."""
    checkpoints, logs = outdir / "checkpoints", outdir / "logs"
    timings: list[tuple[str, str, float]] = []
    started = time.perf_counter()
    redo = args.force
    all_stages = stages(checkpoints)
    for i, stage in enumerate(all_stages, 1):
        target = checkpoints / f"{stage.name}.ckpt"
        print(f"\n== [{i}/{len(all_stages) + 1}] {stage.title} ==", flush=True)
        if target.is_file() and not redo:
            print(f"skipped: {_rel(target)} exists (--force redoes it)", flush=True)
            timings.append((stage.name, "skipped", 0.0))
            continue
        t0 = time.perf_counter()
        run_stage(stage, logs, target, args.seed, args.smoke, args.threads)
        redo = True  # later stages build on this one
        timings.append((stage.name, "trained", time.perf_counter() - t0))
        print(f"{stage.name}: {_rel(target)} ({timings[-1][2]:.0f} s)", flush=True)

    print(f"\n== [{len(all_stages) + 1}/{len(all_stages) + 1}] refine degraded held-out crops ==", flush=True)
    t0 = time.perf_counter()
    try:
        table, headline = evaluate(args, checkpoints, outdir)
    except (ValueError, OSError) as exc:  # a stage checkpoint that is corrupt (CheckpointError), a disk error
        print(f"quickstart.py: error: {one_line_error(exc)}; --force retrains every stage", file=sys.stderr)
        return 1
    timings.append(("refine + evaluate", "ran", time.perf_counter() - t0))

    print(f"\n{table}\n")
    for line in headline:
        print(line)
    print("\ntime per stage:")
    for name, status, seconds in timings:
        print(f"  {name:<20} {status:<8} {seconds:7.1f} s")
    print(f"  {'total':<29} {time.perf_counter() - started:7.1f} s")
    print(f"\nwrote {_rel(outdir / 'before_after.png')}, {_rel(outdir / 'metrics.csv')}, {_rel(outdir / 'sweep')}/"
          "{summary.csv, curves.png, realism.png, examples.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
