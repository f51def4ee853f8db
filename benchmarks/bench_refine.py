#!/usr/bin/env python
"""Refinement speed: wall time of a refine vs the bare UNet forwards it contains (sampler overhead), images/s, peak RSS.

    python benchmarks/bench_refine.py                                   # tiny + real models, 256/512/1024, fp32 + bf16
    python benchmarks/bench_refine.py --models real --sizes 256 --precisions fp32 bf16 --tail-steps 2
    python benchmarks/bench_refine.py --models tiny --sizes 256 --batch 4 --batch-invariant on off
    python benchmarks/bench_refine.py --models tiny --sizes 256 --batch 4 --inputs distinct same   # 4 samples of 1 image
    python benchmarks/bench_refine.py --device cuda --precisions bf16 --sizes 256 1024     # what gpu.sh runs

Each configuration runs in a fresh process (honest peak RSS): two window experts (``[250, 500)`` and ``[0, 250)``,
random weights, sizes from ``configs/quickstart`` ("tiny") or ``configs/latesteps_500_750.yaml`` ("real")) refine a
batch of photographs from ``start_t = 499`` with a DDIM grid chosen so that the tail has ``--tail-steps`` steps split
between the two experts.  After ``--warmup`` untimed calls, ``--repeats`` timed refines alternate with timed runs of
the same number of bare UNet forwards on the same latent shape (same experts, precision and chunking, no sampler).

Columns: ``sample_s`` the DDIM tail, ``bare_s`` the bare forwards, ``overhead = sample_s / bare_s`` (target <= 1.05),
``wall_s`` the whole refine (encode + tail + decode, medians), ``img_s`` images per second, ``first_s`` the first call
(includes compilation with ``--compile``), ``rss_mib`` the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402 (after the path setup)
    THREADS_HELP,
    build_experts,
    peak_rss_mib,
    photo_batch,
    report,
    run_child,
    run_script,
    set_threads,
    timed,
)

START_T = 499
COLUMNS = [
    "model",
    "size",
    "precision",
    "layout",
    "compile",
    "batch",
    "inputs",
    "invariant",
    "steps",
    "wall_s",
    "encode_s",
    "sample_s",
    "decode_s",
    "bare_s",
    "overhead",
    "img_s",
    "first_s",
    "rss_mib",
    "error",
]


def bare_forwards(refiner: Any, z: Any, timesteps: list[int]) -> None:
    """The UNet forwards of a tail, without the sampler: per step the serving expert's UNet on ``z``, with the
    refiner's precision and per-sample chunking."""
    import torch

    unets = [refiner.experts[i].model.model.diffusion_model for i in refiner.router.assign(timesteps)]
    chunks = z.split(1) if refiner.batch_invariant else (z,)
    with torch.inference_mode(), refiner.autocast():
        for t, unet in zip(timesteps, unets):
            for chunk in chunks:
                unet(chunk, torch.full((chunk.shape[0],), t, device=z.device, dtype=torch.long))


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration (runs in a child process)."""
    import torch

    from ldm.refine import Refiner

    set_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    invariant = {"auto": None, "on": True, "off": False}[cfg["invariant"]]
    refiner = Refiner(
        build_experts(cfg["model"]),
        device=device,
        precision=cfg["precision"],
        batch_invariant=invariant,
        channels_last=cfg["layout"] == "channels_last",
        compile=cfg["compile"] == "on",
    )
    steps = cfg["steps"]
    ddim_steps = 2 * steps  # grid 1, 1 + 1000/(2 steps), ...: exactly `steps` entries <= 499, across both experts
    x = photo_batch(cfg["batch"], cfg["size"]).to(device)
    if cfg["inputs"] == "same":  # several samples of one image (what --n-samples makes): encoded once
        x = x[:1].expand_as(x).contiguous()
    seeds = list(range(cfg["batch"]))
    plan = refiner.plan(START_T, ddim_steps)
    run = lambda timings=None: refiner.refine_tensors(x, START_T, seeds, ddim_steps, timings=timings)  # noqa: E731
    first_s, _ = timed(run, device)
    for _ in range(cfg["warmup"] - 1):
        run()
    z = torch.randn(cfg["batch"], 3, cfg["size"] // 4, cfg["size"] // 4, device=device)
    bare_forwards(refiner, z, list(plan.timesteps))  # warm the bare path too
    walls, phases, bares = [], [], []
    for _ in range(cfg["repeats"]):
        timings: dict[str, float] = {}
        wall, _ = timed(lambda timings=timings: run(timings), device)
        walls.append(wall)
        phases.append(timings)
        bare, _ = timed(lambda: bare_forwards(refiner, z, list(plan.timesteps)), device)
        bares.append(bare)
    med = statistics.median
    sample_s, bare_s = med(p["sample"] for p in phases), med(bares)
    result = {
        **{k: cfg[k] for k in ("model", "size", "precision", "layout", "compile", "batch", "inputs")},
        "invariant": "on" if refiner.batch_invariant else "off",
        "steps": len(plan.timesteps),
        "wall_s": med(walls),
        "encode_s": med(p["encode"] for p in phases),
        "sample_s": sample_s,
        "decode_s": med(p["decode"] for p in phases),
        "bare_s": bare_s,
        "overhead": sample_s / bare_s,
        "img_s": cfg["batch"] / med(walls),
        "first_s": first_s,
        "rss_mib": round(peak_rss_mib()),
        "all_wall_s": walls,
        "all_sample_s": [p["sample"] for p in phases],
        "all_bare_s": bares,
        "refiner": refiner.describe(),
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("tiny", "real"), default=["tiny", "real"])
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 1024], help="image sides in px (multiples of 32)")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16"])
    p.add_argument("--layouts", nargs="+", choices=("nchw", "channels_last"), default=["nchw"])
    p.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"], dest="compile_modes")
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="images per refine call")
    p.add_argument("--batch-invariant", nargs="+", choices=("auto", "on", "off"), default=["auto"], dest="invariant")
    p.add_argument(
        "--inputs",
        nargs="+",
        choices=("distinct", "same"),
        default=["distinct"],
        help="a batch of different photographs, or samples of one (encoded once)",
    )
    p.add_argument(
        "--tail-steps",
        type=int,
        default=None,
        help="DDIM steps in the tail (default: 25; 2 for the real model on CPU, where a 1024 px forward takes minutes)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (>= 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed refines (medians are reported)")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be >= 1")
    if any(s % 32 for s in args.sizes):
        p.error("--sizes must be multiples of 32 (the real model's padding multiple), so that no padding is timed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    rows = []
    grid = itertools.product(
        args.models, args.sizes, args.precisions, args.layouts, args.compile_modes, args.batch, args.invariant, args.inputs
    )
    for model, size, precision, layout, compile_mode, batch, invariant, inputs in grid:
        steps = args.tail_steps or (2 if model == "real" and args.device == "cpu" else 25)
        cfg = dict(
            model=model,
            size=size,
            precision=precision,
            layout=layout,
            compile=compile_mode,
            batch=batch,
            invariant=invariant,
            inputs=inputs,
            steps=steps,
            warmup=args.warmup,
            repeats=args.repeats,
            threads=args.threads,
            device=args.device,
        )
        print(f"running {cfg}", flush=True)
        result = run_child(Path(__file__), cfg, timeout=args.timeout)
        rows.append({**cfg, **result})
    return report("bench_refine", rows, COLUMNS, f"refine on {args.device}, {args.threads} threads, start_t={START_T}", args)


if __name__ == "__main__":
    run_script(measure, main)
