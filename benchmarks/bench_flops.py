#!/usr/bin/env python
"""Achieved FLOP/s of the UNet: one denoising step (forward) and one training step (forward + backward), against the
device's peak.

    python benchmarks/bench_flops.py --device cuda --model real --batch 1 8 48       # what gpu.sh runs
    python benchmarks/bench_flops.py --model tiny --image-size 256                    # CPU (no peak known: FLOP/s only)

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; convolutions, matmuls and
attention) on the UNet of ``configs/latesteps_500_750.yaml`` ("real", random weights) or the quickstart one ("tiny"),
at the latent of an ``--image-size`` image (f4: ``image-size / 4``).  Time per call is the median over ``--iters``
timed calls after ``--warmup`` calls, the device synchronised around each.  ``mfu`` = achieved / peak, where the peak
is the dense bf16 (or fp16/tf32/fp32) tensor throughput of the GPU from :data:`PEAK_TFLOPS` (pass ``--peak-tflops`` for
a card not listed; none is assumed on CPU).
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
    model_config,
    report,
    run_child,
    run_script,
    set_threads,
    timed,
)

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by name fragment (first match wins).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),  # SXM5 (HBM3)
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),  # fp32 via TF32
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 181.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
]
COLUMNS = ["model", "latent", "batch", "precision", "kind", "gflop", "ms", "tflop_s", "peak_tflop_s", "mfu", "error"]


def peak_tflops(device: Any, precision: str, override: float | None) -> float | None:
    """The device's dense peak for ``precision`` (``--peak-tflops`` wins; None when unknown or on CPU)."""
    import torch

    if override is not None:
        return override
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peaks[precision] for fragment, peaks in PEAK_TFLOPS if fragment in name), None)


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """FLOPs and time of one UNet step and one training step (runs in a child process)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.util import instantiate_from_config

    set_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    unet = instantiate_from_config(model_config(cfg["model"])["params"]["unet_config"]).to(device)
    if cfg["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    if cfg["compile"]:
        unet.compile()
    side = cfg["image_size"] // 4
    x = torch.randn(cfg["batch"], unet.in_channels, side, side, device=device)
    t = torch.randint(0, 1000, (cfg["batch"],), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg["precision"]]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)

    def forward() -> None:
        with torch.inference_mode(), autocast():
            unet(x, t)

    def train_step() -> None:
        with autocast():
            loss = (unet(x, t).float() - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak = peak_tflops(device, cfg["precision"], cfg["peak_tflops"])
    rows = []
    for kind, fn in (("forward", forward), ("train_step", train_step)):
        counter = FlopCounterMode(display=False)
        with counter:
            if kind == "forward":
                with torch.no_grad(), autocast():
                    unet(x, t)
            else:
                with autocast():
                    loss = (unet(x, t).float() - x).square().mean()
                loss.backward()
        optimizer.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        for _ in range(cfg["warmup"]):
            fn()
        seconds = statistics.median(timed(fn, device)[0] for _ in range(cfg["iters"]))
        achieved = flops / seconds / 1e12
        rows.append(
            {
                "kind": kind,
                "gflop": flops / 1e9,
                "ms": seconds * 1e3,
                "tflop_s": achieved,
                "peak_tflop_s": peak,
                "mfu": achieved / peak if peak else None,
            }
        )
    return {"rows": rows, "latent": side, "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "real"), default="real")
    p.add_argument("--image-size", type=int, default=256, help="image side in px (the UNet sees image-size / 4)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--precisions", nargs="+", choices=("bf16", "fp16", "fp32"), default=["bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile time excluded: warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for the precision, TFLOP/s")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    args = p.parse_args(argv)
    set_threads(args.threads)
    rows = []
    for batch, precision in itertools.product(args.batch, args.precisions):
        cfg = dict(
            model=args.model,
            image_size=args.image_size,
            batch=batch,
            precision=precision,
            channels_last=args.channels_last,
            compile=args.compile,
            warmup=args.warmup,
            iters=args.iters,
            peak_tflops=args.peak_tflops,
            threads=args.threads,
            device=args.device,
        )
        print(f"running {cfg}", flush=True)
        result = run_child(Path(__file__), cfg, timeout=args.timeout)
        for row in result.pop("rows", [{}]):
            rows.append({**cfg, **result, **row})
    return report("bench_flops", rows, COLUMNS, f"UNet FLOP/s on {args.device}", args)


if __name__ == "__main__":
    run_script(measure, main)
