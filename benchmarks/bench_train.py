#!/usr/bin/env python
"""Training speed of the late-steps model: optimizer steps/s for the tiny and the real config, fp32 vs bf16-mixed.

    python benchmarks/bench_train.py                                   # tiny + real, 32-true + bf16-mixed, CPU
    python benchmarks/bench_train.py --configs real --batch-size 2 --steps 3
    python benchmarks/bench_train.py --device cuda --configs real --precisions bf16-mixed     # what gpu.sh runs
    python benchmarks/bench_train.py --configs real --precisions 32-true --inputs images latents --steps 2

Each configuration runs in a fresh process: the model of ``configs/quickstart/latesteps_500_750.yaml`` ("tiny") or
``configs/latesteps_500_750.yaml`` ("real", 274M-parameter UNet, 256 px images) with random weights is trained by a
Lightning 2 ``Trainer`` exactly as ``main.py`` trains it (``training_step``: frozen VQ-f4 encode, window timesteps, UNet
loss, AdamW step, EMA update) on crops of the embedded photographs (``--data photos``) or on random images
(``--data random``, no data-loading cost).  After ``--warmup`` steps, ``--steps`` steps are timed (the device is
synchronised at both ends).  The batch size defaults to the config's on CUDA and to a CPU-sized one on CPU (reported).
``--inputs latents`` trains from cached latents instead (the same images encoded once beforehand, untimed, as
``scripts/cache_latents.py`` stores them; the model skips its encoder); its rows report ``vs_images``, its steps/s over
the images row of the same config and precision.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402 (after the path setup)
    MODEL_CONFIGS,
    THREADS_HELP,
    model_config,
    peak_rss_mib,
    report,
    run_child,
    run_script,
    set_threads,
    sync,
)

COLUMNS = [
    "config",
    "precision",
    "inputs",
    "batch",
    "data",
    "steps",
    "s_per_step",
    "steps_s",
    "vs_images",
    "img_s",
    "rss_mib",
    "error",
]
CPU_BATCH = {"tiny": 8, "real": 2}
CPU_STEPS = {"tiny": 20, "real": 3}


def _dataset(cfg: dict[str, Any], size: int) -> Any:
    import numpy as np
    import torch

    from ldm.data.embedded import EmbeddedPhotos

    n = cfg["batch"] * (cfg["warmup"] + cfg["steps"])
    if cfg["data"] == "photos":
        return EmbeddedPhotos(size=size, split="train", n_samples=n)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    return torch.utils.data.StackDataset(image=torch.from_numpy(images))


def _cached(dataset: Any, model: Any, device: Any, batch: int) -> Any:
    """The dataset's images encoded once by ``model``'s first stage: a dataset of cached-latent items."""
    import torch

    from ldm.data.latent_format import CACHED_LATENT_KEY, FIRST_STAGE_SHA_KEY, first_stage_sha256

    first_stage = model.first_stage_model.to(device)
    latents = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch):
            x = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(start, min(start + batch, len(dataset)))])
            latents.append(first_stage.encode(x.permute(0, 3, 1, 2).contiguous().to(device)).float().cpu())
    sha = first_stage_sha256(first_stage)
    z = torch.cat(latents)
    return torch.utils.data.StackDataset(**{CACHED_LATENT_KEY: z, FIRST_STAGE_SHA_KEY: [sha] * len(z)})


class StepTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch (device synchronised at both ends)."""

    def __init__(self, warmup: int, device: Any):
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        sync(self.device)
        self.end = time.perf_counter()


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration (runs in a child process)."""
    import torch
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    set_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    model_cfg = model_config(cfg["config"])
    size = OmegaConf.load(MODEL_CONFIGS[cfg["config"]]).data.params.train.params.size
    torch.manual_seed(0)
    model = instantiate_from_config(model_cfg)
    model.learning_rate = float(model_cfg["base_learning_rate"]) * cfg["batch"]
    dataset = _dataset(cfg, size)
    if cfg["inputs"] == "latents":
        dataset = _cached(dataset, model, device, cfg["batch"])
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg["batch"],
        shuffle=False,
        num_workers=cfg["workers"],
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg["workers"] > 0,
    )
    timer = StepTimer(cfg["warmup"], device)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=cfg["precision"],
        max_steps=cfg["warmup"] + cfg["steps"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=loader)
    seconds = timer.end - timer.start
    result = {
        "image_size": size,
        "s_per_step": seconds / cfg["steps"],
        "steps_s": cfg["steps"] / seconds,
        "img_s": cfg["steps"] * cfg["batch"] / seconds,
        "rss_mib": round(peak_rss_mib()),
        "unet_params_m": round(sum(p.numel() for p in model.model.parameters()) / 1e6, 1),
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=("tiny", "real"), default=["tiny", "real"])
    p.add_argument("--precisions", nargs="+", choices=("32-true", "bf16-mixed", "16-mixed"), default=["32-true", "bf16-mixed"])
    p.add_argument("--batch-size", type=int, default=None, help=f"per step (default: the config's on CUDA; {CPU_BATCH} on CPU)")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps (default: 20 on CUDA; {CPU_STEPS} on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--data", choices=("photos", "random"), default="photos")
    p.add_argument(
        "--inputs",
        nargs="+",
        choices=("images", "latents"),
        default=["images", "latents"],
        help="train from images (encoded every step) and/or from cached latents (default: both)",
    )
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 8 on CUDA)")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step includes one-off setup)")
    set_threads(args.threads)
    from omegaconf import OmegaConf

    cuda = args.device.startswith("cuda")
    rows = []
    for config, precision, inputs in itertools.product(args.configs, args.precisions, args.inputs):
        config_batch = int(OmegaConf.load(MODEL_CONFIGS[config]).data.params.batch_size)
        cfg = dict(
            config=config,
            precision=precision,
            inputs=inputs,
            data=args.data,
            warmup=args.warmup,
            threads=args.threads,
            device=args.device,
            batch=args.batch_size or (config_batch if cuda else CPU_BATCH[config]),
            steps=args.steps or (20 if cuda else CPU_STEPS[config]),
            workers=args.workers if args.workers is not None else (8 if cuda else 0),
        )
        print(f"running {cfg}", flush=True)
        rows.append({**cfg, **run_child(Path(__file__), cfg, timeout=args.timeout)})
    images = {(r["config"], r["precision"]): r.get("steps_s") for r in rows if r["inputs"] == "images"}
    for row in rows:
        base = images.get((row["config"], row["precision"]))
        if row["inputs"] == "latents" and base and row.get("steps_s"):
            row["vs_images"] = round(row["steps_s"] / base, 3)
    return report("bench_train", rows, COLUMNS, f"training steps on {args.device}, {args.threads} threads", args)


if __name__ == "__main__":
    run_script(measure, main)
