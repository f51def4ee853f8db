#!/usr/bin/env python
"""The method's compute claim on the synthetic family, at equal training compute: the 500-750 -> 750-1000 chain vs one
500-1000 model vs a full-range model, on in-box quality at the best start_t, and the steps windowed training needs to
reach the full-range model's loss on the window.

    python benchmarks/synthetic_windows.py --vq outputs/quickstart_synthetic/checkpoints/vq_f4.ckpt    # ~35 min, 2 cores
    python benchmarks/synthetic_windows.py --vq <vq.ckpt> --steps-a 1200 --steps-b 800 --n-images 128 --threads 2

Training (``main.py``, the configs of ``configs/synthetic/``, same batch size, seed and UNet, on the first stage
``--vq``; each run is skipped when its checkpoint exists under ``--outdir``):

* chain: ``latesteps_500_750`` for ``--steps-a`` steps, then ``latesteps_750_1000`` initialised from it for
  ``--steps-b`` (the quick start's recipe);
* ``latesteps_500_1000``: one model on t in [0, 500) for ``steps-a + steps-b`` steps;
* ``full_range``: t in [0, 1000) for ``steps-a + steps-b`` steps.

Every optimizer step is one forward and backward pass of the same UNet on a batch of the same size, so equal steps
are equal training compute (the frozen first stage's encoding costs the same for all).

Measured:

1. window loss: the EMA models' eps-MSE on t in [0, 500) (held-out validation images, timesteps stratified over the
   window and noise from fixed seeds; the chain routes each timestep to its expert), at every saved checkpoint; the
   steps the 500-1000 model needs to reach the full-range model's final loss on that window;
2. in-box quality: each model refines the quick start's synthetic artifacts (``ldm.eval.sources.SYNTHETIC_ARTIFACTS``)
   inside the box on ``--n-images`` held-out images at each start_t; per artifact, the cross-fitted best start_t's
   PSNR gain over the artifact (``ldm.eval.summary.best_start``) with a 95 % bootstrap interval, and the paired
   difference between the chain and each alternative.

Output: tables on stdout, ``benchmarks/results/synthetic_windows-<time>.json`` and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402 (after the path setup)
    REPO,
    THREADS_HELP,
    machine_info,
    print_table,
    set_threads,
    shown,
    train_saving,
    write_results,
)

CONFIGS = REPO / "configs" / "synthetic"
WINDOW = (0, 500)
VAL_IMAGES = 256
VAL_DRAWS = 4


def train_all(args: argparse.Namespace, outdir: Path) -> dict[str, list[tuple[int, Path]]]:
    """Train the four runs (skipping those done); returns ``{run: [(step, checkpoint), ...]}`` of the saved steps."""
    total = args.steps_a + args.steps_b
    first_stage = f"model.params.first_stage_config.params.ckpt_path={Path(args.vq).resolve()}"
    runs = {
        "chain_a": (CONFIGS / "latesteps_500_750.yaml", args.steps_a, []),
        "chain_b": (
            CONFIGS / "latesteps_750_1000.yaml",
            args.steps_b,
            [f"model.params.ckpt_path={outdir / 'checkpoints' / 'chain_a.ckpt'}"],
        ),
        "single": (CONFIGS / "latesteps_500_1000.yaml", total, []),
        "full": (CONFIGS / "full_range.yaml", total, []),
    }
    return {
        name: train_saving(
            name,
            config,
            steps,
            [first_stage, *extra],
            outdir=outdir,
            save_every=args.save_every,
            seed=args.seed,
            threads=args.threads,
            smoke=args.smoke,
        )
        for name, (config, steps, extra) in runs.items()
    }


def window_losses(saved: dict[str, list[tuple[int, Path]]], steps_a: int, n_images: int = VAL_IMAGES) -> list[dict[str, Any]]:
    """EMA eps-MSE on t in WINDOW at every saved step (the chain from ``steps_a`` on: expert A then B's steps)."""
    import torch

    from ldm.data.synthetic import SyntheticShapes
    from ldm.models.diffusion.latesteps import stratified_window_timesteps
    from ldm.refine.loading import load_expert

    data = SyntheticShapes(size=32, split="validation", n_samples=n_images)
    x = torch.stack([torch.from_numpy(data[i]["image"]) for i in range(n_images)]).permute(0, 3, 1, 2)

    def loss(models: list[Any]) -> float:
        first = models[0]
        with torch.no_grad():
            z = first.get_first_stage_encoding(first.encode_first_stage(x))
            total, count = 0.0, 0
            for draw in range(VAL_DRAWS):
                gen = torch.Generator().manual_seed(1_000_003 * (draw + 1))
                t, _ = stratified_window_timesteps(z.shape[0], *WINDOW, 8, gen)
                noise = torch.randn(z.shape, generator=gen)
                for model in models:
                    lo, hi = model.window()
                    sel = (t >= lo) & (t < hi)
                    if sel.any():
                        with model.ema_scope():
                            total += float(model.per_sample_loss(z[sel], t[sel], noise[sel]).sum())
                        count += int(sel.sum())
        return total / count

    def model(path: Path) -> Any:
        return load_expert(path)[0].model.eval()

    rows = []
    for name in ("single", "full"):
        for step, path in saved[name]:
            rows.append({"run": name, "step": step, "window_loss": loss([model(path)])})
    final_a = model(saved["chain_a"][-1][1])
    for step, path in saved["chain_b"]:
        rows.append({"run": "chain", "step": steps_a + step, "window_loss": loss([final_a, model(path)])})
    return rows


def quality(args: argparse.Namespace, saved: dict[str, list[tuple[int, Path]]]) -> tuple[list[dict[str, Any]], str]:
    """The sweep of the three refiners on the synthetic artifacts; rows of the table and its Markdown."""
    from ldm.eval.baselines import identity_baseline
    from ldm.eval.sources import SYNTHETIC_ARTIFACTS, SYNTHETIC_START_TS, synthetic_images
    from ldm.eval.summary import best_start, compare_best
    from ldm.eval.sweep import build_sweep_degradation, run_sweep
    from ldm.refine import Refiner

    def refiner(*names: str) -> Refiner:
        return Refiner.from_checkpoints([saved[n][-1][1] for n in names], device="cpu", batch_invariant=False)

    refiners = [("chain", refiner("chain_a", "chain_b")), ("500-1000", refiner("single")), ("full-range", refiner("full"))]
    first_stage = refiners[0][1].model.first_stage_model
    degradations = [build_sweep_degradation(spec, first_stage) for spec in SYNTHETIC_ARTIFACTS[1:]]  # no control
    result = run_sweep(
        refiners,
        synthetic_images(args.n_images, 32, seed=0),
        degradations,
        SYNTHETIC_START_TS[:2] if args.smoke else SYNTHETIC_START_TS,
        baselines=[identity_baseline()],
        ddim_steps=50,
        batch_size=32,
        whole_image=False,
        n_examples=0,
    )
    rows = []
    lines = [
        "| artifact | chain 500-750 → 750-1000 | one 500-1000 model | full-range model | chain − 500-1000 | "
        "chain − full-range |",
        "|---|---|---|---|---|---|",
    ]
    for degradation in result.degradations:
        best = {name: best_start(result, f"{name} (region)", degradation) for name, _ in refiners}
        if any(b is None for b in best.values()):
            continue
        cells = {
            name: f"{b.gain.format('{:+.2f}')} ({'/'.join(dict.fromkeys(map(str, b.start_ts)))})" for name, b in best.items()
        }
        vs_single = compare_best(best["chain"], best["500-1000"])
        vs_full = compare_best(best["chain"], best["full-range"])
        rows.append(
            {
                "artifact": degradation.split(":")[0],
                **cells,
                "chain-500-1000": vs_single.format("{:+.2f}"),
                "chain-full": vs_full.format("{:+.2f}"),
                "n": best["chain"].gain.n,
            }
        )
        lines.append(
            f"| {degradation.split(':')[0]} | {cells['chain']} | {cells['500-1000']} | {cells['full-range']} | "
            f"{vs_single.format('{:+.2f}')} | {vs_full.format('{:+.2f}')} |"
        )
    return rows, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ldm.cli import EXIT_USAGE, OneLineParser, check_outdir
    from ldm.train.cli import MAX_SEED

    p = OneLineParser(prog="synthetic_windows.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--vq", required=True, help="the synthetic VQ-f4 checkpoint (the synthetic quick start's checkpoints/vq_f4.ckpt)"
    )
    p.add_argument("--outdir", default="outputs/synthetic_windows", help="checkpoints and logs (reused when present)")
    p.add_argument("--steps-a", type=int, default=1000, help="steps of the 500-750 expert (the quick start's)")
    p.add_argument("--steps-b", type=int, default=700, help="steps of the 750-1000 expert (the quick start's)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint cadence for the loss curves")
    p.add_argument("--n-images", type=int, default=128, help="held-out images per artifact")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--threads", type=int, default=2, help=THREADS_HELP)
    p.add_argument("--smoke", action="store_true", help="3 steps per run, 2 images, 2 start_ts (for the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_images = 2
    if min(args.steps_a, args.steps_b, args.save_every, args.n_images, args.threads) < 1 or args.n_images > 4096:
        p.error("--steps-a, --steps-b, --save-every and --threads must be positive, --n-images in [1, 4096]")
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed {args.seed} is outside main.py's seed range [0, {MAX_SEED}]")
    if not Path(args.vq).is_file():
        p.error(
            f"--vq {args.vq} is not a file; train the synthetic quick start first (scripts/quickstart.py --domain "
            "synthetic) or pass a VQ trained with configs/synthetic/vq_f4.yaml"
        )
    problem = check_outdir(args.outdir)
    if problem:
        p.error(problem)
    set_threads(args.threads)
    started = time.perf_counter()
    outdir = Path(args.outdir)
    from ldm.train.stages import StageError

    try:
        saved = train_all(args, outdir)
    except StageError as exc:
        print(f"synthetic_windows.py: error: {exc} (is --vq a checkpoint of configs/synthetic/vq_f4.yaml?)", file=sys.stderr)
        return EXIT_USAGE
    curves = window_losses(saved, args.steps_a, 8 if args.smoke else VAL_IMAGES)
    final_full = max((r for r in curves if r["run"] == "full"), key=lambda r: r["step"])["window_loss"]
    single = [r for r in curves if r["run"] == "single"]
    reach = next((r["step"] for r in single if r["window_loss"] <= final_full), None)
    print_table(curves, ["run", "step", "window_loss"], title=f"EMA eps-MSE on t in {list(WINDOW)} vs training steps")
    total = args.steps_a + args.steps_b
    print(
        f"the full-range model's window loss after {total} steps: {final_full:.5f}; the 500-1000 model reaches it after "
        f"{reach} steps" + (f" ({total / reach:.2f}x fewer)" if reach else " (not within the run)")
    )
    rows, markdown = quality(args, saved)
    print_table(rows, list(rows[0]) if rows else ["artifact"], title="in-box PSNR gain at the cross-fitted best start_t")
    print(markdown)
    path = write_results(
        "synthetic_windows",
        {
            "machine": machine_info("cpu"),
            "args": vars(args),
            "window_loss": curves,
            "full_final_window_loss": final_full,
            "single_steps_to_full_loss": reach,
            "quality": rows,
            "wall_s": time.perf_counter() - started,
        },
    )
    path.with_suffix(".md").write_text(markdown)
    print(f"table: {shown(path.with_suffix('.md'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
