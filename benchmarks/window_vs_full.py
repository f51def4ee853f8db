#!/usr/bin/env python
"""The seed's compute claim, measured: does training only the window [250, 500) reach a given window loss in fewer
steps than training the full range [0, 1000)?

    python benchmarks/window_vs_full.py                                # ~10-15 min on 2 CPU cores
    python benchmarks/window_vs_full.py --steps 6000 --eval-every 200 --batch-size 32
    python benchmarks/window_vs_full.py --first-stage vq --first-stage-ckpt logs/<vq run>/checkpoints/last.ckpt

Two models with the architecture of ``configs/quickstart/latesteps_500_750.yaml`` start from the same random weights:
the window model draws training timesteps from ``[250, 500)``, the full-range model from ``[0, 1000)``.  Both see the
same batches (crops of the embedded photographs, ``EmbeddedPhotos``), the same noise, the same AdamW optimizer and
learning rate, and the same number of steps; each step costs the same compute for both.  Every ``--eval-every``
steps both are evaluated on the window's validation loss with the same fixed draws (held-out crops, timesteps
stratified over the window's sub-bands and noise from fixed seeds, as ``LateStepsLatentDiffusion.window_losses``
draws them), with the training weights and with the EMA weights; the loss over the full range ``[0, 1000)`` is
recorded too.

Output: a table of the curves, ``benchmarks/results/window_vs_full-<time>.json`` with the steps
each model needs to first reach the full-range model's final window loss, and their ratio (the window model's
speed-up in training compute for the window), and the loss curves next to it (``.png``; ``--replot JSON`` redraws them).

First stage: ``pool`` (default) is a fixed 4x4 average pooling, an f4 "autoencoder" with 3 latent channels whose
latents are small versions of the photographs (no training needed, natural-image statistics); ``vq`` is the quickstart
VQ-f4 (pass a trained checkpoint with ``--first-stage-ckpt``; random weights otherwise).  Latents are computed once
per batch, outside both models, so the comparison is about the diffusion models alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402 (after the path setup)
    THREADS_HELP,
    machine_info,
    model_config,
    print_table,
    set_threads,
    shown,
    write_results,
)

WINDOW = (250, 500)
FULL = (0, 1000)
VAL_BATCH = 32


def build_pair(seed: int, ema_decay: float) -> tuple[Any, Any]:
    """The window and the full-range model, identical architecture and initial weights."""
    import torch

    from ldm.util import instantiate_from_config

    models = []
    for t_min, t_max in (WINDOW, FULL):
        cfg = model_config("tiny", t_min, t_max)
        cfg["params"]["ema_decay"] = ema_decay
        torch.manual_seed(seed)
        models.append(instantiate_from_config(cfg))
    window, full = models
    for (name, a), (_, b) in zip(window.model.state_dict().items(), full.model.state_dict().items()):
        if not torch.equal(a, b):
            raise RuntimeError(f"initial weights differ at {name}")
    return window, full


def build_encoder(kind: str, ckpt: str | None) -> Any:
    """Image ``[B, 3, H, W]`` -> latent ``[B, 3, H/4, W/4]``."""
    import torch

    if kind == "pool":
        return lambda x: torch.nn.functional.avg_pool2d(x, 4)
    from ldm.checkpoint import load_state_dict
    from ldm.util import instantiate_from_config

    cfg = copy.deepcopy(model_config("tiny")["params"]["first_stage_config"])
    vq = instantiate_from_config(cfg).eval()
    if ckpt is None:
        print("warning: --first-stage vq without --first-stage-ckpt: random VQ weights", flush=True)
    else:
        state = load_state_dict(ckpt)
        state = {k.removeprefix("first_stage_model."): v for k, v in state.items()}
        vq.load_state_dict({k: v for k, v in state.items() if k in vq.state_dict()}, strict=True)
    return lambda x: vq.encode(x)


def validation_latents(encode: Any, size: int, n: int) -> Any:
    import torch

    from ldm.data.embedded import EmbeddedPhotos

    data = EmbeddedPhotos(size=size, split="validation", n_samples=n)
    x = torch.stack([torch.from_numpy(data[i]["image"]) for i in range(n)]).permute(0, 3, 1, 2)
    with torch.no_grad():
        return torch.cat([encode(chunk) for chunk in x.split(64)])


def fixed_draws(z: Any, t_range: tuple[int, int], draws: int, bands: int = 4) -> list[tuple[Any, Any, Any]]:
    """``(z, t, noise)`` per validation batch and draw: stratified timesteps and noise from fixed seeds
    (``validation_generator``'s seeds, as ``window_losses`` uses them)."""
    import torch

    from ldm.models.diffusion.latesteps import stratified_window_timesteps

    out = []
    for draw in range(draws):
        for i, chunk in enumerate(z.split(VAL_BATCH)):
            batch_idx = draw * math.ceil(z.shape[0] / VAL_BATCH) + i
            gen = torch.Generator().manual_seed(1_000_003 * (batch_idx + 1))
            t, _ = stratified_window_timesteps(chunk.shape[0], *t_range, bands, gen)
            out.append((chunk, t, torch.randn(chunk.shape, generator=gen)))
    return out


def evaluate(model: Any, draws: list[tuple[Any, Any, Any]]) -> tuple[float, float]:
    """Mean per-sample loss over the fixed draws with the training weights and with the EMA weights."""
    import torch

    def mean_loss() -> float:
        with torch.no_grad():
            total = sum(float(model.per_sample_loss(z, t, noise).sum()) for z, t, noise in draws)
        return total / sum(z.shape[0] for z, _, _ in draws)

    model.eval()
    raw = mean_loss()
    with model.ema_scope():
        ema = mean_loss()
    model.train()
    return raw, ema


def first_reach(steps: list[int], losses: list[float], target: float) -> int | None:
    """The first evaluated step whose loss is <= target (None if never)."""
    return next((s for s, v in zip(steps, losses) if v <= target), None)


def plot(rows: list[dict[str, float]], targets: dict[str, float], path: Path) -> None:
    """Loss curves from the evaluation rows (the untrained step 0 left out; log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["step"] > 0]
    steps = [r["step"] for r in rows]
    history = {key: [r[key] for r in rows] for key in rows[0] if key not in ("step", "elapsed_s")}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, weights in zip(axes[:2], ("raw", "ema")):
        for name, style, window in (("window", "-", WINDOW), ("full", "--", FULL)):
            ax.plot(steps, history[f"{name}_{weights}"], style, label=f"{name} model, trained on {list(window)}")
        ax.axhline(targets[weights], color="grey", lw=0.8, ls=":", label="full model's final window loss")
        ax.set_title(f"window [250, 500) validation loss, {'training' if weights == 'raw' else 'EMA'} weights")
        ax.set_xlabel("optimizer steps (same batches, same compute per step)")
        ax.set_ylabel("L_simple (eps MSE), log scale")
        ax.set_yscale("log")
        ax.legend()
    for name, style in (("window", "-"), ("full", "--")):
        axes[2].plot(steps, history[f"{name}_fullrange"], style, label=f"{name} model")
    axes[2].set_title("full-range [0, 1000) validation loss (training weights)")
    axes[2].set_xlabel("optimizer steps")
    axes[2].set_yscale("log")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps for each model")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="image crop side (latent side = size / 4)")
    p.add_argument("--base-lr", type=float, default=None, help="per sample (default: the quickstart config's)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--val-samples", type=int, default=256, help="held-out crops")
    p.add_argument("--val-draws", type=int, default=4, help="fixed (t, noise) draws per held-out crop")
    p.add_argument("--first-stage", choices=("pool", "vq"), default="pool")
    p.add_argument("--first-stage-ckpt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an earlier run's results file")
    args = p.parse_args(argv)
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        targets = {w: s["target_window_loss"] for w, s in results["summary"].items()}
        plot(results["curves"], targets, Path(args.replot).with_suffix(".png"))
        print(f"plot: {Path(args.replot).with_suffix('.png')}")
        return 0
    set_threads(args.threads)
    import numpy as np
    import torch

    from ldm.data.embedded import EmbeddedPhotos

    encode = build_encoder(args.first_stage, args.first_stage_ckpt)
    window, full = build_pair(args.seed, args.ema_decay)
    base_lr = args.base_lr or float(model_config("tiny")["base_learning_rate"])
    lr = base_lr * args.batch_size
    optimizers = {m: torch.optim.AdamW(m.model.parameters(), lr=lr) for m in (window, full)}
    z_val = validation_latents(encode, args.size, args.val_samples)
    window_draws = fixed_draws(z_val, WINDOW, args.val_draws)
    full_draws = fixed_draws(z_val, FULL, args.val_draws)
    train = EmbeddedPhotos(size=args.size, split="train", n_samples=args.batch_size * args.eval_every, seed=args.seed)
    history: dict[str, list[float]] = {k: [] for k in ("window_raw", "window_ema", "full_raw", "full_ema")}
    history.update(window_fullrange=[], full_fullrange=[])
    steps: list[int] = []
    rows = []
    started = time.perf_counter()

    def record(step: int) -> None:
        steps.append(step)
        for name, model in (("window", window), ("full", full)):
            raw, ema = evaluate(model, window_draws)
            history[f"{name}_raw"].append(raw)
            history[f"{name}_ema"].append(ema)
            history[f"{name}_fullrange"].append(evaluate(model, full_draws)[0])
        row = {"step": step, **{k: v[-1] for k, v in history.items()}, "elapsed_s": time.perf_counter() - started}
        rows.append(row)
        print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    window.train()
    full.train()
    record(0)
    per_epoch = len(train) // args.batch_size
    for step in range(1, args.steps + 1):
        epoch, index = divmod(step - 1, per_epoch)
        if index == 0:
            train.set_epoch(epoch)
        items = [train[index * args.batch_size + j]["image"] for j in range(args.batch_size)]
        x = torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2)
        with torch.no_grad():
            z = encode(x)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        noise = torch.randn(z.shape, generator=gen)
        for model in (window, full):
            t = model.sample_training_timesteps(z.shape[0], z.device, torch.Generator().manual_seed(step))
            loss, _ = model.p_losses(z, t, noise=noise)
            optimizers[model].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[model].step()
            model.model_ema(model.model)
        if step % args.eval_every == 0 or step == args.steps:
            record(step)

    summary: dict[str, Any] = {}
    targets = {}
    for weights in ("raw", "ema"):
        target = history[f"full_{weights}"][-1]
        targets[weights] = target
        n_full = first_reach(steps, history[f"full_{weights}"], target)
        n_window = first_reach(steps, history[f"window_{weights}"], target)
        summary[weights] = {
            "target_window_loss": target,
            "full_steps_to_target": n_full,
            "window_steps_to_target": n_window,
            "speedup": (n_full / n_window) if n_full and n_window else None,
            "window_final_loss": history[f"window_{weights}"][-1],
        }
    print_table(
        rows,
        ["step", "window_raw", "full_raw", "window_ema", "full_ema", "window_fullrange", "full_fullrange"],
        title="window [250, 500) validation loss (and full-range loss) vs optimizer steps",
    )
    for weights, s in summary.items():
        print(
            f"{weights:>4} weights: full-range model's final window loss {s['target_window_loss']:.5f}; reached after "
            f"{s['full_steps_to_target']} steps (full) vs {s['window_steps_to_target']} steps (window): "
            f"speed-up {s['speedup'] if s['speedup'] is None else round(s['speedup'], 2)}x"
        )
    path = write_results(
        "window_vs_full",
        {
            "machine": machine_info("cpu"),
            "args": vars(args),
            "lr": lr,
            "summary": summary,
            "curves": rows,
            "wall_s": time.perf_counter() - started,
        },
    )
    plot(rows, targets, path.with_suffix(".png"))
    print(f"plot: {shown(path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
