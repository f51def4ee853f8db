#!/usr/bin/env python
"""Solver accuracy per network call: DDIM vs DPM-Solver++(2M) against a near-exact reference, with trained experts.

    python benchmarks/solver_error.py                                   # the quickstart's experts (run it first)
    python benchmarks/solver_error.py --ckpt A.ckpt --ckpt B.ckpt --start-t 500 300 --images 8 --size 64

The experts refine the same latents (photographs, encoded with their first stage) with the same noise.  The reference
is DDIM with one step per timestep from ``start_t`` (``--tail-steps start_t``: the ODE solved to first order with the
finest steps the schedule has).  Then for each sampler and K in ``--ks`` (exact tails, uniform in log-SNR), and for
the grid tail of ``--ddim-steps`` (today's default: 25 steps from start 500), it reports the final-latent RMSE and the
decoded PSNR against the reference, and the wall time.  The summary says how many network calls each sampler needs to
match the error of the default grid tail.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import REPO, THREADS_HELP, photo_batch, report, set_threads  # noqa: E402 (after the path setup)

DEFAULT_CKPTS = [
    REPO / "outputs" / "quickstart" / "checkpoints" / "latesteps_500_750.ckpt",
    REPO / "outputs" / "quickstart" / "checkpoints" / "latesteps_750_1000.ckpt",
]
COLUMNS = ["start_t", "sampler", "mode", "calls", "latent_rmse", "psnr_db", "seconds"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", type=Path, help="expert checkpoints (default: the quickstart's)")
    p.add_argument("--start-t", type=int, nargs="+", default=[500], help="start timesteps (default: 500)")
    p.add_argument("--ks", type=int, nargs="+", default=[3, 5, 8, 10, 15, 25], help="exact step counts")
    p.add_argument("--ddim-steps", type=int, default=50, help="the DDIM grid of the baseline tail (default: 50)")
    p.add_argument("--images", type=int, default=6, help="photographs refined together (default: 6)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    import torch

    from ldm.refine import Refiner
    from ldm.sampling import randn, run_tail

    ckpts = args.ckpt or DEFAULT_CKPTS
    missing = [str(p) for p in ckpts if not p.exists()]
    if missing:
        print(f"solver_error.py: error: missing checkpoints {missing}; run scripts/quickstart.py or pass --ckpt",
              file=sys.stderr)  # fmt: skip
        return 2
    refiner = Refiner.from_checkpoints(ckpts, device=args.device, allow_outside_window=True)
    x = photo_batch(args.images, args.size, seed=3).to(refiner.device)
    with torch.inference_mode():
        z0 = refiner.first_stage.encode(x)
        noise = randn(tuple(z0.shape), z0, torch.Generator().manual_seed(0))

    def refine(start: int, **kw: Any) -> tuple[Any, float, int]:
        plan = refiner.plan(start, **kw)
        started = time.perf_counter()
        with torch.inference_mode():
            z, _ = run_tail(plan, z0, noise)
        return z, time.perf_counter() - started, len(plan.timesteps)

    rows: list[dict[str, Any]] = []
    for start in args.start_t:
        reference, _, _ = refine(start, tail_steps=start)
        with torch.inference_mode():
            ref_image = refiner.first_stage.decode(reference)
        runs = [("ddim", f"grid {args.ddim_steps}", refine(start, ddim_steps=args.ddim_steps))]
        runs += [(sampler, "exact", refine(start, tail_steps=k, sampler=sampler))
                 for sampler in ("ddim", "dpmpp_2m") for k in args.ks if k <= start]  # fmt: skip
        for sampler, mode, (z, seconds, calls) in runs:
            with torch.inference_mode():
                mse = float(((refiner.first_stage.decode(z) - ref_image) / 2).pow(2).mean())
            rows.append({"start_t": start, "sampler": sampler, "mode": mode, "calls": calls,
                         "latent_rmse": float((z - reference).pow(2).mean().sqrt()),
                         "psnr_db": 10 * math.log10(1 / mse) if mse > 0 else math.inf, "seconds": seconds})  # fmt: skip
    code = report("solver_error", rows, COLUMNS, "final-latent error and decoded PSNR against the reference", args)
    for start in args.start_t:
        baseline = next(r for r in rows if r["start_t"] == start and r["mode"].startswith("grid"))
        for sampler in ("ddim", "dpmpp_2m"):
            good = [r["calls"] for r in rows if r["start_t"] == start and r["sampler"] == sampler
                    and r["mode"] == "exact" and r["latent_rmse"] <= baseline["latent_rmse"]]  # fmt: skip
            needed = min(good) if good else f"> {max(args.ks)}"
            print(f"start_t={start}: {sampler} matches the {baseline['calls']}-call grid tail's error "
                  f"({baseline['latent_rmse']:.4g}) with {needed} calls")  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
