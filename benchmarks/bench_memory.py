#!/usr/bin/env python
"""Peak memory of a large-image refinement: encode -> 2 tail steps -> decode, tiled vs untiled first stage.

    python benchmarks/bench_memory.py                                  # 512 and 1024 px, untiled and auto-tiled
    python benchmarks/bench_memory.py --sizes 1024 --tilings auto --unet tiny
    python benchmarks/bench_memory.py --sizes 2048 --tilings auto 512:128

Every configuration runs in a fresh process, whose peak resident memory (``ru_maxrss``) is the figure; the process
holds the two experts of the real late-steps config (two 274M-parameter UNets, or ``--unet tiny``) sharing one VQ-f4
first stage of the real size (``ch=128, ch_mult=[1, 2, 4]``), all with random weights.  ``model_mib`` is the resident
memory once the models are built, so ``peak_mib - model_mib`` is what the refinement itself needs.  Target: 1024 px
within 6 GB on CPU.

Tilings: ``off``, ``auto`` (the refiner's default) or ``TILE:OVERLAP[:PASSES]`` in px (tiling images above TILE); a
tiling that would not tile an image of that size is skipped.  Where the untiled run of a size finished, every tiled
output of that size is compared with it: ``max_err`` / ``mean_err`` (in [-1, 1] units) and ``psnr_db``.  Random weights
make this a harsh test (trained first stages have smoother statistics).

``--attention math`` reproduces the state before the attention fix (SDPA on transposed ``q, k, v`` fell back to the
math kernel, which keeps the N x N scores; here forced with ``torch.nn.attention.sdpa_kernel``): 2 x 1 GiB for the
first stage's mid block at 512 px, 2 x 16 GiB at 1024 px.  Each child is capped at ``--max-memory-gib`` of address
space so that an oversized configuration fails with an out-of-memory error instead of waking the machine's OOM killer.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402 (after the path setup)
    THREADS_HELP,
    build_experts,
    current_rss_mib,
    peak_rss_mib,
    photo_batch,
    report,
    run_child,
    run_script,
    set_threads,
)

START_T, DDIM_STEPS = 499, 4  # grid 1, 251, 501, 751: the tail is t=251 (expert [250, 500)) then t=1 (expert [0, 250))
COLUMNS = [
    "size", "tiling", "attention", "unet", "precision", "model_mib", "peak_mib", "refine_mib", "wall_s", "encode_s", "sample_s",
    "decode_s", "max_err", "mean_err", "psnr_db", "error",
]


def parse_tiling(text: str) -> Any:
    """``off`` -> None, ``auto`` -> "auto", ``TILE:OVERLAP[:PASSES]`` -> the automatic tiling with that geometry (and
    number of statistics passes), tiling images above TILE."""
    import dataclasses

    from ldm.refine.speed import AUTO_TILING

    if text in ("off", "auto"):
        return None if text == "off" else "auto"
    parts = [int(p) for p in text.split(":")]
    if len(parts) not in (2, 3):
        raise ValueError(f"tiling {text!r} must be off, auto or TILE:OVERLAP[:PASSES]")
    passes = {"stat_passes": parts[2]} if len(parts) == 3 else {}
    return dataclasses.replace(AUTO_TILING, min_side=parts[0], tile=parts[0], overlap=parts[1], **passes)


def applies(tiling: str, size: int) -> bool:
    """Whether ``tiling`` tiles a ``size`` x ``size`` image (``off`` always runs: it is the reference)."""
    from ldm.refine.speed import AUTO_TILING

    config = AUTO_TILING if tiling == "auto" else parse_tiling(tiling)
    return config is None or config.applies_to(size, size)


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration (runs in a child process); saves the refined image to ``cfg["output"]``."""
    import resource

    import numpy as np
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm.refine import Refiner

    limit = int(cfg["max_memory_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    set_threads(cfg["threads"])
    refiner = Refiner(
        build_experts(cfg["unet"], first_stage="real"),
        device=cfg["device"],
        precision=cfg["precision"],
        tiling=parse_tiling(cfg["tiling"]),
    )
    x = photo_batch(1, cfg["size"]).to(refiner.device)
    model_mib = current_rss_mib()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # "math": the state before the attention fix (strided q, k, v made SDPA fall back to its math kernel)
    with sdpa_kernel([SDPBackend.MATH]) if cfg["attention"] == "math" else contextlib.nullcontext():
        out = refiner.refine_tensors(x, START_T, seeds=0, ddim_steps=DDIM_STEPS, timings=timings)
    wall = time.perf_counter() - start
    peak = peak_rss_mib()
    np.save(cfg["output"], out.cpu().numpy())
    result = {
        "model_mib": round(model_mib),
        "peak_mib": round(peak),
        "refine_mib": round(peak - model_mib),
        "wall_s": wall,
        "encode_s": timings["encode"],
        "sample_s": timings["sample"],
        "decode_s": timings["decode"],
        "refiner": refiner.describe(),
    }
    if refiner.device.type == "cuda":
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(refiner.device) / 2**20)
    return result


def compare(rows: list[dict[str, Any]], outputs: dict[int, Path]) -> None:
    """Add the difference of every output to the untiled flash-attention output of the same size (where it exists)."""
    import numpy as np

    for row in rows:
        ref = next(
            (
                r for r in rows
                if r["size"] == row["size"] and r["tiling"] == "off" and r["attention"] == "flash" and "error" not in r
            ),
            None,
        )
        if ref is None or row is ref or "error" in row:
            continue
        a, b = np.load(outputs[id(row)]), np.load(outputs[id(ref)])
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        mse = float((diff**2).mean())
        row["max_err"] = float(diff.max())
        row["mean_err"] = float(diff.mean())
        row["psnr_db"] = 10 * math.log10(4.0 / mse) if mse > 0 else math.inf  # peak-to-peak range 2 in [-1, 1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="image sides in px")
    p.add_argument("--tilings", nargs="+", default=["off", "auto", "512:128", "256:64"],
                   help="off, auto or TILE:OVERLAP[:PASSES]")
    p.add_argument("--attention", nargs="+", choices=("flash", "math"), default=["flash"],
                   help="math: force the N x N math kernel, as before the attention fix (see above)")
    p.add_argument("--max-memory-gib", type=float, default=16.0, help="address-space cap of each child")
    p.add_argument("--unet", choices=("real", "tiny"), default="real", help="UNet size of the two experts")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (peak RSS is host memory; CUDA peak reported too)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    args = p.parse_args(argv)
    for text in args.tilings:
        parse_tiling(text)
    set_threads(args.threads)
    rows: list[dict[str, Any]] = []
    outputs: dict[int, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size, attention, tiling in itertools.product(args.sizes, args.attention, args.tilings):
            if applies(tiling, size):
                output = Path(tmp) / f"{size}-{attention}-{tiling.replace(':', '_')}.npy"
                cfg = dict(
                    size=size, tiling=tiling, attention=attention, unet=args.unet, precision=args.precision,
                    threads=args.threads, device=args.device, output=str(output), max_memory_gib=args.max_memory_gib,
                )
                print(f"running {cfg}", flush=True)
                row = {**cfg, **run_child(Path(__file__), cfg, timeout=args.timeout)}
                row.pop("output")
                rows.append(row)
                outputs[id(row)] = output
        compare(rows, outputs)
    title = f"encode -> 2 tail steps -> decode on {args.device}, {args.threads} threads"
    return report("bench_memory", rows, COLUMNS, title, args)


if __name__ == "__main__":
    run_script(measure, main)
