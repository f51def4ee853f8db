#!/usr/bin/env python
"""Quickstart: train tiny late-steps experts and watch them remove local artifacts (CPU, no download).

    python scripts/quickstart.py                      # photographs shipped with scikit-image; outputs/quickstart/
    python scripts/quickstart.py --domain synthetic   # the synthetic method check; outputs/quickstart_synthetic/
    python scripts/quickstart.py --weights demo       # no training: the shipped demo experts; outputs/quickstart_demo/

Domains (--domain):
  photos     the photographs bundled with scikit-image; chelsea and coffee are held out whole for the evaluation
             (configs/quickstart/).
  synthetic  soft-edged flat shapes of a known generative process (ldm.data.synthetic), a family tiny models learn in
             minutes, so the method itself can be judged at this scale: a near-lossless first stage, then the experts;
             evaluated on 128 held-out images per artifact, each figure with a 95 % bootstrap interval
             (configs/synthetic/).

Stages (each skipped when its checkpoint exists; --force redoes it and everything after it):

1. a small VQ-f4 first stage            main.py -b configs/<domain>/vq_f4.yaml -t
2. late steps 500-750 (t in [250, 500))  main.py -b configs/<domain>/latesteps_500_750.yaml -t, on the VQ of stage 1
3. late steps 750-1000 (t in [0, 250))   main.py -b configs/<domain>/latesteps_750_1000.yaml -t, finetuned from stage 2
4. refinement: held-out images (never seen in training) get a local artifact of --degradations inside a random box,
   are refined by the two chained experts (ldm.refine.Refiner) at several start_t, over the whole image and only
   inside the box (the region refinement), and are compared with the artifact itself, a classical filter and the
   first-stage round trip (ldm.eval.sweep): faithfulness (PSNR/SSIM to the input, inside and outside the box),
   distance to the clean image and to the first stage's round trip of it, and realism (SWD to other clean images,
   ldm.eval.swd), each with a 95 % bootstrap interval over images (ldm.eval.summary).

Writes <outdir>/before_after.png (clean | artifact | mask | refined whole | refined region, each artifact at its best
start_t for the region refinement), table.md (the headline table), metrics.csv (one row per image x degradation x
method x start_t), <outdir>/sweep/{sweep.csv, summary.csv, curves.png, realism.png, examples.png, sweep.json}, and the
checkpoints under <outdir>/checkpoints/ (with quickstart.json, the stamp that marks them as the quick start's; training
logs go to new run folders under <outdir>/logs/).  Other files in --outdir are never touched.  An existing --outdir
without the stamp (or a stage checkpoint) is refused, before any work, when one of these files is already there: the
quick start replaces only what it wrote itself.  --smoke runs every stage for a handful of steps (the test suite uses
it; its images are noise).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.cli import EXIT_INTERRUPTED, EXIT_USAGE, OneLineParser, check_outdir, int_arg, one_line_error, path_arg, run_script

REPO = Path(__file__).resolve().parents[1]
EXPERTS_T_END = 500  # the two experts' windows together: t in [0, 500) (steps 500-1000)
ROUND_TRIP_IMAGES = 32  # held-out images on which the first stage's round trip is measured
MAX_IMAGES = 4096  # held-out images per artifact: every case is kept in memory with its outputs
# Intra-op threads per stage (Stage.threads) unless OMP_NUM_THREADS says otherwise: two for the VQ, one for the small
# late-steps UNets, which two threads made slower (README, Quick start, gives the timings).  Spinning OpenMP threads that
# wait for a busy core are much slower, so a machine doing something else should set OMP_NUM_THREADS=1.
THREADS = "1"
SMOKE_DDIM_STEPS = 10  # the sweep's DDIM grid with --smoke


@dataclass(frozen=True)
class Domain:
    """What the quick start trains on and evaluates with (``--domain``)."""

    name: str
    configs: Path  # vq_f4.yaml, latesteps_500_750.yaml, latesteps_750_1000.yaml
    what: str  # the held-out images, for the printed lines
    # the artifacts refined: local and structural, each inside a random box (ldm.eval.local_degrade), the kind
    # late-steps refinement exists for
    degradations: tuple[str, ...]
    start_ts: tuple[int, ...]
    start_t: int | None  # the start_t before_after.png shows (None: each artifact's best for the region refinement)
    n_images: int  # held-out images per artifact
    size: int  # their side in pixels
    expert_threads: str = THREADS
    whole_image: bool = True  # also refine the whole image (else only inside the boxes)
    # the classical baseline (ldm.eval.baselines.FILTERS) or None; on the synthetic images nl_means estimates the noise
    # over the whole, mostly flat, image as 0 and leaves every image as it is
    classical_filter: str | None = "nl_means"

    def images(self, n: int, size: int, seed: int) -> list[Any]:
        """``n`` held-out images (:class:`ldm.eval.sources.SweepImage`) of ``size`` px from stream ``seed``."""
        from ldm.eval.sources import heldout_images, synthetic_images

        return (synthetic_images if self.name == "synthetic" else heldout_images)(n, size, seed=seed)


DOMAIN_NAMES: tuple[str, ...] = ("photos", "synthetic")
WEIGHTS: tuple[str, ...] = ("train", "demo")  # --weights: train the stages, or use the shipped demo experts
# --weights demo sweeps two starts instead of four, to finish in under a minute: 50, where every subtle artifact did
# best, and 200, where the saturated disc did (benchmarks/photo_curve.py on these experts; README, Demo weights)
DEMO_START_TS: tuple[int, ...] = (50, 200)
STAGE_NAMES: tuple[str, ...] = ("vq_f4", "latesteps_500_750", "latesteps_750_1000")
# local_vq: the trained VQ, 1/8 codes; local_paint: a saturated blotch over most of the box, the strong colour artifact
PHOTO_DEGRADATIONS = ("local_warp", "local_blotch", "local_shuffle", "local_vq", "local_paint")


@functools.cache
def domains() -> dict[str, Domain]:
    """The domains by name (built on first use: the synthetic one's artifacts come from ldm.eval, which imports torch,
    and torch must not be imported before OMP_NUM_THREADS is set)."""
    from ldm.eval.sources import SYNTHETIC_ARTIFACTS, SYNTHETIC_START_TS

    return {
        "photos": Domain(
            "photos",
            REPO / "configs" / "quickstart",
            "crops of chelsea, coffee",
            PHOTO_DEGRADATIONS,
            (50, 150, 300, 450),  # 450: where benchmarks/photo_curve.py found the saturated blotch gains most
            None,
            32,
            64,
        ),
        "synthetic": Domain(
            "synthetic",
            REPO / "configs" / "synthetic",
            "images of the synthetic family",
            SYNTHETIC_ARTIFACTS,
            SYNTHETIC_START_TS,
            None,
            128,
            32,
            expert_threads="2",
            whole_image=False,
            classical_filter=None,
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line of the quick start."""
    p = OneLineParser(
        prog="quickstart.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    p.add_argument(
        "--domain",
        choices=DOMAIN_NAMES,
        default="photos",
        help="what to train on and evaluate with (see above) (default: %(default)s)",
    )
    p.add_argument(
        "--outdir",
        type=path_arg,
        help="where everything goes (default: outputs/quickstart for photos, "
        "outputs/quickstart_synthetic for synthetic; with --smoke ..._smoke, so smoke "
        "checkpoints are never taken for real ones)",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="train",
        help="train: train the three stages, the quick start's main job; demo: train nothing and refine and "
        "evaluate with the photo experts shipped in weights/demo/ (--domain photos; README, Demo "
        "weights) (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="redo every stage even when its checkpoint exists")
    p.add_argument("--smoke", action="store_true", help="a handful of steps per stage, 2 images (for tests)")
    p.add_argument(
        "--start-t",
        type=int_arg,
        help="start timestep shown in before_after.png, added to the sweep's (default: each artifact's "
        "best start_t for the region refinement)",
    )
    p.add_argument(
        "--degradations",
        nargs="+",
        metavar="SPEC",
        help="artifacts to remove, ldm.eval.degrade specs (default: photos "
        f"{' '.join(PHOTO_DEGRADATIONS)}; synthetic ldm.eval.sources.SYNTHETIC_ARTIFACTS)",
    )
    p.add_argument(
        "--n-images", type=int_arg, help="held-out images per degradation (default: photos 32, synthetic 128; --smoke uses 2)"
    )
    p.add_argument(
        "--size",
        type=int_arg,
        help="side of the held-out images in pixels, a multiple of 8 (the models train on 32 px images and, "
        "convolutional, refine any size) (default: photos 64, synthetic 32)",
    )
    p.add_argument(
        "--examples",
        type=int_arg,
        default=3,
        help="held-out images per artifact shown in before_after.png (default: %(default)s)",
    )
    p.add_argument("--ddim-steps", type=int_arg, default=50, help="DDIM grid of the refinement (default: %(default)s)")
    p.add_argument("--seed", type=int_arg, default=23, help="training seed (main.py -s) (default: %(default)s)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="refinement device; training follows the configs (CPU) (default: %(default)s)",
    )
    return p


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask or cgroup-limited set where the OS tells, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def stages(checkpoints: Path, domain: Domain | None = None) -> list[Any]:
    """The three training runs of ``domain`` (:class:`ldm.train.stages.Stage`), checkpoints under ``checkpoints``."""
    from ldm.train.stages import Stage

    domain = domain or domains()["photos"]

    vq = str(checkpoints / "vq_f4.ckpt")
    first_stage = f"model.params.first_stage_config.params.ckpt_path={vq}"
    configs, threads = domain.configs, min(int(domain.expert_threads), usable_cpus())
    return [
        Stage("vq_f4", "train the VQ-f4 first stage", configs / "vq_f4.yaml", threads=str(min(2, usable_cpus()))),
        Stage(
            "latesteps_500_750",
            "train late steps 500-750 (t in [250, 500))",
            configs / "latesteps_500_750.yaml",
            [first_stage],
            str(threads),
        ),
        Stage(
            "latesteps_750_1000",
            "finetune late steps 750-1000 (t in [0, 250)) from 500-750",
            configs / "latesteps_750_1000.yaml",
            [first_stage, f"model.params.ckpt_path={checkpoints / 'latesteps_500_750.ckpt'}"],
            str(threads),
        ),
    ]


def run_stage(stage: Any, logs: Path, target: Path, seed: int, smoke: bool, threads: str | None = None) -> None:
    """:func:`ldm.train.stages.run_stage` with the quick start's run name (and the smoke overrides with ``--smoke``)."""
    from ldm.train.stages import SMOKE_OVERRIDES, StageError
    from ldm.train.stages import run_stage as train

    extra = list(SMOKE_OVERRIDES) if smoke else []
    try:
        train(stage, logs, target, seed, extra, threads, f"quickstart_{stage.name}", lambda line: print(line, flush=True))
    except StageError as exc:
        raise SystemExit(f"quickstart: {exc}") from None


def evaluate(args: argparse.Namespace, domain: Domain, experts: list[Path], outdir: Path) -> tuple[str, list[str], str]:
    """Stage 4: the sweep on held-out images with the chained ``experts``; writes the report files, returns the table,
    the headline lines (the first stage's round trip, then one line per degradation) and the headline table in
    Markdown."""
    from ldm.eval.baselines import autoencoder_baseline, default_baselines
    from ldm.eval.metrics import load_lpips
    from ldm.eval.report import before_after_grid, format_table, save_png, write_report, write_rows_csv
    from ldm.eval.summary import best_start, summarize
    from ldm.eval.sweep import build_sweep_degradation, run_sweep
    from ldm.refine import Refiner
    from ldm.train.quickstart_report import first_stage_round_trip, headline_line, markdown_table

    refiner = Refiner.from_checkpoints(
        experts,
        device=args.device,
        batch_invariant=False,  # batches of the sweep are fixed, so its results are reproducible all the same
    )
    print(refiner.describe(), flush=True)
    model = refiner.model
    size = args.size
    n_images = 2 if args.smoke else args.n_images
    images = domain.images(n_images, size, seed=0)
    # other held-out images: realism is measured against clean images that are not the cases' own
    realism_reference = domain.images(n_images, size, seed=1)
    degradations = [build_sweep_degradation(spec, model.first_stage_model) for spec in args.degradations]
    sweep_starts = DEMO_START_TS if args.weights == "demo" else domain.start_ts
    start_ts = sorted({*sweep_starts, *([args.start_t] if args.start_t else [])})
    round_trip = autoencoder_baseline(model)
    result = run_sweep(
        [("experts", refiner)],
        images,
        degradations,
        start_ts,
        seeds=[0],
        # --weights demo leaves out what the headline table does not show (the classical filter, whole-image
        # refinement) to finish in under a minute
        baselines=default_baselines(model, None if args.weights == "demo" else domain.classical_filter),
        ddim_steps=SMOKE_DDIM_STEPS if args.smoke else args.ddim_steps,
        batch_size=32,
        lpips=load_lpips(),
        realism_reference=realism_reference,
        whole_image=domain.whole_image and args.weights == "train",
        n_examples=min(n_images, args.examples),
        example_start_ts=start_ts,
        round_trip=round_trip,
    )
    write_report(result, outdir / "sweep", vars(args), title=f"quickstart ({domain.name}): chained late-steps experts")
    write_rows_csv(result, outdir / "metrics.csv")
    summary = summarize(result)
    region = "experts (region)"
    best = {d: best_start(result, region, d) for d in result.degradations}
    # what the diffusion steps add: against the round trip of the clean image, at the same start_ts
    over_trip = {
        d: best_start(result, region, d, "psnr_rt_in", "autoencoder", picks=b.start_ts) if b else None for d, b in best.items()
    }
    shown: dict[str, int] = {}
    for degradation in result.degradations:
        pick = best.get(degradation)
        shown[degradation] = args.start_t or domain.start_t or (pick.start_ts[0] if pick else start_ts[0])
    save_png(before_after_grid(result, "experts", shown), outdir / "before_after.png")
    headline = [first_stage_round_trip(model, domain, size, 4 if args.smoke else ROUND_TRIP_IMAGES)]
    headline += [headline_line(summary, result, d, best.get(d), over_trip.get(d), shown[d]) for d in result.degradations]
    return format_table(summary), headline, markdown_table(summary, result, best, over_trip)


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (before any training), or None."""
    from types import SimpleNamespace

    import torch

    from ldm.data.embedded import MAX_SIZE as PHOTO_MAX_SIZE
    from ldm.data.synthetic import MAX_SIZE as SYNTHETIC_MAX_SIZE
    from ldm.eval.degrade import VQRoundTrip
    from ldm.eval.sweep import build_sweep_degradation
    from ldm.sampling.schedule import grid_tail
    from ldm.train.cli import MAX_SEED
    from ldm.util import ConfigError

    domain = domains()[args.domain]
    if args.weights == "demo" and (domain.name != "photos" or args.force):
        return "--weights demo refines with the shipped photo experts: it takes --domain photos and trains nothing (no --force)"
    if args.start_t is not None and not 1 <= args.start_t <= 999:
        return "--start-t must be in [1, 999]"
    if not 1 <= args.n_images <= MAX_IMAGES or args.examples < 0 or not 1 <= args.ddim_steps <= 1000:
        return f"--n-images must be in [1, {MAX_IMAGES}], --examples >= 0 and --ddim-steps in [1, 1000]"
    if args.start_t is not None:
        timesteps = grid_tail(args.start_t, SMOKE_DDIM_STEPS if args.smoke else args.ddim_steps, 1000)[0]
        if not timesteps or timesteps[0] >= EXPERTS_T_END:  # before_after.png shows --start-t: it must run
            first = f"starts at t={timesteps[0]}" if timesteps else "holds no step"
            return (
                f"--start-t {args.start_t} {first} on the DDIM grid, outside the experts' windows "
                f"(t < {EXPERTS_T_END}); choose a --start-t below {EXPERTS_T_END}, e.g. one of {list(domain.start_ts)}"
            )
    if not 0 <= args.seed <= MAX_SEED:  # main.py's -s range
        return f"--seed {args.seed} is outside the seed range [0, {MAX_SEED}]"
    max_size = SYNTHETIC_MAX_SIZE if domain.name == "synthetic" else PHOTO_MAX_SIZE
    if not 16 <= args.size <= max_size or args.size % 8:
        return f"--size {args.size}: the images' side must be a multiple of 8 in [16, {max_size}] (e.g. {domain.size})"
    if not domain.whole_image and any(not spec.startswith("local_") for spec in args.degradations):
        return (
            f"--domain {domain.name} refines only inside the artifacts' boxes: give local degradations "
            f"(local_noise, local_warp, ...), got {' '.join(args.degradations)}"
        )
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


# in <outdir>/checkpoints: which quick start (domain, smoke) trained them; in <outdir> itself with --weights demo
STAMP = "quickstart.json"


def _stamp(args: argparse.Namespace) -> dict[str, Any]:
    return {"domain": args.domain, "smoke": bool(args.smoke)}


def check_checkpoints(args: argparse.Namespace, outdir: Path) -> str | None:
    """Why the checkpoints already in ``outdir`` cannot serve this run (another domain, or smoke ones for a real run
    and back), or None.  Checkpoints without a stamp come from an earlier version's photo quick start."""
    checkpoints = outdir / "checkpoints"
    if args.weights == "demo" or args.force or not any((checkpoints / f"{name}.ckpt").is_file() for name in STAGE_NAMES):
        return None
    try:
        found = json.loads((checkpoints / STAMP).read_text())
    except FileNotFoundError:
        found = {"domain": "photos", "smoke": bool(args.smoke)}
    except (OSError, ValueError) as exc:
        return f"{checkpoints / STAMP} is unreadable ({one_line_error(exc)}); pass --force to retrain every stage"
    if found != _stamp(args):
        what = f"the {found.get('domain')} quick start{' (--smoke)' if found.get('smoke') else ''}"
        return (
            f"--outdir {outdir} holds checkpoints of {what}; pass another --outdir, or --force to retrain them for "
            f"--domain {args.domain}{' --smoke' if args.smoke else ''}"
        )
    return None


SWEEP_FILES: tuple[str, ...] = ("sweep.csv", "summary.csv", "curves.png", "realism.png", "examples.png", "sweep.json")
OUTPUTS: tuple[str, ...] = (  # every file the quick start writes into --outdir (logs/ holds new run folders only)
    *(f"checkpoints/{name}.ckpt" for name in STAGE_NAMES),
    f"checkpoints/{STAMP}",
    STAMP,  # --weights demo
    "before_after.png",
    "table.md",
    "metrics.csv",
    *(f"sweep/{name}" for name in SWEEP_FILES),
)


def check_outputs(outdir: Path) -> str | None:
    """Why the quick start would replace a file in ``outdir`` that it did not write, or find a file where it makes a
    folder (one line), or None.  A folder holding the stamp or a stage checkpoint (an earlier version's quick start)
    is the quick start's own: its outputs are replaced as before.  Files of other names are never touched."""
    from ldm.imageio import format_path

    for folder in ("checkpoints", "logs", "sweep"):
        if os.path.lexists(outdir / folder) and not (outdir / folder).is_dir():
            return (
                f"--outdir {format_path(outdir)}: {folder} is a file, where the quick start makes its {folder} "
                "folder; move it away or choose another --outdir"
            )
    checkpoints = outdir / "checkpoints"
    if (
        os.path.lexists(checkpoints / STAMP)
        or _demo_stamped(outdir)
        or any((checkpoints / f"{n}.ckpt").is_file() for n in STAGE_NAMES)
    ):
        return None
    found = [name for name in OUTPUTS if os.path.lexists(outdir / name)]
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        return (
            f"--outdir {format_path(outdir)} holds {', '.join(found[:3])}{more}, which the quick start would "
            f"overwrite but did not write (there is no checkpoints/{STAMP}); choose another --outdir, or move "
            "them away"
        )
    return None


def _demo_stamped(outdir: Path) -> bool:
    """Whether ``outdir`` holds the stamp of a ``--weights demo`` run (its contents, not only its name: a user's own
    quickstart.json does not make the folder the quick start's)."""
    try:
        found = json.loads((outdir / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and found.get("weights") == "demo" and set(found) == {"domain", "smoke", "weights"}


def make_outdir(outdir: Path) -> str | None:
    """Create ``outdir`` (and its parents); why that failed (one line), or None.  :func:`ldm.cli.check_outdir` predicts
    most failures, but not all (``/proc/x``: a folder ``os.access`` calls writable that takes no new entries)."""
    from ldm.imageio import format_path

    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create the output folder {format_path(outdir)}: {one_line_error(exc)}; choose another --outdir"
    return None


def apply_domain_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset with ``--domain``'s defaults (in place; returns ``args``)."""
    domain = domains()[args.domain]
    if args.degradations is None:
        args.degradations = list(domain.degradations)
    if args.n_images is None:
        args.n_images = domain.n_images
    if args.size is None:
        args.size = domain.size
    if args.outdir is None:
        name = "quickstart" if domain.name == "photos" else f"quickstart_{domain.name}"
        name += "_demo" if args.weights == "demo" else ""
        args.outdir = f"outputs/{name}_smoke" if args.smoke else f"outputs/{name}"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the quick start; returns the exit code."""
    args = build_parser().parse_args(argv)
    args.threads = os.environ.get("OMP_NUM_THREADS")  # the user's choice wins over each stage's
    os.environ.setdefault("OMP_NUM_THREADS", THREADS)  # before torch is imported
    apply_domain_defaults(args)
    problem = check_arguments(args) or check_outdir(args.outdir)  # before resolve(), which raises on a link loop
    outdir = Path(args.outdir).resolve() if problem is None else Path(os.path.abspath(args.outdir))
    problem = (
        problem or check_outputs(outdir) or check_checkpoints(args, outdir) or make_outdir(outdir)
    )  # the last: nothing is created when anything else is wrong
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
    from ldm.train.stages import relative
    from ldm.util import atomic_write_bytes

    checkpoints, logs = outdir / "checkpoints", outdir / "logs"
    timings: list[tuple[str, str, float]] = []
    started = time.perf_counter()
    redo = args.force
    domain = domains()[args.domain]
    all_stages = [] if args.weights == "demo" else stages(checkpoints, domain)
    experts = [checkpoints / f"{stage.name}.ckpt" for stage in all_stages[1:]]
    if args.weights == "demo":
        from ldm.checkpoint import CheckpointError
        from ldm.refine.shipped import shipped_files

        try:
            experts = shipped_files("demo")
        except CheckpointError as exc:
            print(f"quickstart.py: error: {one_line_error(exc)}", file=sys.stderr)
            return EXIT_USAGE
        atomic_write_bytes(outdir / STAMP, json.dumps({**_stamp(args), "weights": "demo"}).encode())
        print("using the shipped demo experts: " + ", ".join(relative(p) for p in experts), flush=True)
    for i, stage in enumerate(all_stages, 1):
        target = checkpoints / f"{stage.name}.ckpt"
        print(f"\n== [{i}/{len(all_stages) + 1}] {stage.title} ==", flush=True)
        if target.is_file() and not redo:
            print(f"skipped: {relative(target)} exists (--force redoes it)", flush=True)
            timings.append((stage.name, "skipped", 0.0))
            continue
        # the later stages build on this one: their old checkpoints go first, so an interrupted run never leaves
        # experts of an earlier first stage for the next run to skip to
        for later in all_stages[i - 1 :]:
            (checkpoints / f"{later.name}.ckpt").unlink(missing_ok=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(checkpoints / STAMP, json.dumps(_stamp(args)).encode())
        t0 = time.perf_counter()
        run_stage(stage, logs, target, args.seed, args.smoke, args.threads)
        redo = True  # later stages build on this one
        timings.append((stage.name, "trained", time.perf_counter() - t0))
        print(f"{stage.name}: {relative(target)} ({timings[-1][2]:.0f} s)", flush=True)

    print(f"\n== [{len(all_stages) + 1}/{len(all_stages) + 1}] refine degraded held-out images ==", flush=True)
    t0 = time.perf_counter()
    if args.threads is None:  # the evaluation runs in this process: on two cores unless OMP_NUM_THREADS says otherwise
        import torch

        torch.set_num_threads(min(2, usable_cpus()))
    try:
        table, headline, markdown = evaluate(args, domain, experts, outdir)
        atomic_write_bytes(outdir / "table.md", markdown.encode())
    except (ValueError, OSError) as exc:  # a stage checkpoint that is corrupt (CheckpointError), a disk error
        hint = (
            "restore the shipped files with: git checkout -- weights/demo"
            if args.weights == "demo"
            else "--force retrains every stage"
        )
        print(f"quickstart.py: error: {one_line_error(exc)}; {hint}", file=sys.stderr)
        return 1
    timings.append(("refine + evaluate", "ran", time.perf_counter() - t0))

    print(f"\n{table}\n")
    for line in headline:
        print(line)
    print("\ntime per stage:")
    for name, status, seconds in timings:
        print(f"  {name:<20} {status:<8} {seconds:7.1f} s")
    print(f"  {'total':<29} {time.perf_counter() - started:7.1f} s")
    print(f"\n{markdown}")
    written = ", ".join(relative(outdir / name) for name in ("before_after.png", "table.md", "metrics.csv"))
    print(f"wrote {written}, {relative(outdir / 'sweep')}/{{summary.csv, curves.png, realism.png, examples.png}}")
    return 0


if __name__ == "__main__":
    run_script(main, "quickstart.py")
