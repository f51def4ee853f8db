#!/usr/bin/env python
"""Quality against training compute for the photo quick start (``configs/quickstart/``): what more steps and a wider
expert buy, measured on the held-out photographs, to decide the quick start's sizes, steps and recipe.

    python benchmarks/photo_curve.py                          # VQ 7200 steps, experts 4000 + 2800, widths 32 and 64
    python benchmarks/photo_curve.py --vq outputs/quickstart/checkpoints/vq_f4.ckpt --widths 32   # experts only

Training (``main.py`` with the quick start's configs and ``key=value`` overrides; each run is skipped when its
checkpoint exists under ``--outdir``):

* ``vq``: ``configs/quickstart/vq_f4.yaml`` for ``--vq-steps`` (the quick start: 1800), a checkpoint every
  ``--vq-save-every`` (skipped with ``--vq``);
* per UNet width ``w`` of ``--widths`` (``model_channels``; the quick start: 32): ``a<w>`` =
  ``latesteps_500_750.yaml`` for ``--steps-a`` (the quick start: 1000), then ``b<w>`` = ``latesteps_750_1000.yaml``
  initialised from it for ``--steps-b`` (the quick start: 700), on the final first stage.

Measured on the held-out photographs (``chelsea``, ``coffee``: never trained on), every figure a mean with its 95 %
bootstrap interval over ``--n-images`` crops:

1. the first stage's round trip (PSNR) at every saved VQ step, on 32 and 64 px crops and on the two whole
   photographs (n = 2: no interval);
2. the experts' noise-prediction MSE (EMA weights, 4 noise draws per crop, 64 px crops = 16x16 latents) at t = 300
   (the 500-750 expert, at each of its saved steps) and at t = 50 and 100 (the 750-1000 expert);
3. at every saved step of the 750-1000 expert, chained after the final 500-750 one: SWD x 10^3 of whole-image
   refinement from ``start_t`` 50 minus that of the first stage's round trip (the same crops, paired resamples: 0 or
   below means no less realistic than the round trip), and the in-box PSNR gain of region refinement on a saturated
   colour disc over most of a box (``local_paint``; ``local_blotch`` is a faint one) at the cross-fitted best of
   ``start_t`` 50, 200, 300, 450.

Output: tables on stdout, ``benchmarks/results/photo_curve-<time>.json`` and a Markdown table next to it.
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

CONFIGS = REPO / "configs" / "quickstart"
NOISE_DRAWS = 4
EPS_TS = {"a": (300,), "b": (50, 100)}
WHOLE_START = 50
PAINT = "local_paint"
PAINT_STARTS = (200, 300, 450)
MAX_WIDTH = 256


def train_all(args: argparse.Namespace, outdir: Path) -> dict[str, list[tuple[int, Path]]]:
    """The VQ (unless ``--vq``) and the experts of each width; ``{run: [(step, checkpoint), ...]}``."""
    common = {"outdir": outdir, "seed": args.seed, "smoke": args.smoke}
    saved: dict[str, list[tuple[int, Path]]] = {}
    if args.vq:
        vq = Path(args.vq).resolve()
    else:
        saved["vq"] = train_saving(
            "vq", CONFIGS / "vq_f4.yaml", args.vq_steps, [], save_every=args.vq_save_every, threads=args.threads, **common
        )
        vq = saved["vq"][-1][1].resolve()
    first_stage = f"model.params.first_stage_config.params.ckpt_path={vq}"
    for width in args.widths:
        unet = f"model.params.unet_config.params.model_channels={width}"
        saved[f"a{width}"] = train_saving(
            f"a{width}",
            CONFIGS / "latesteps_500_750.yaml",
            args.steps_a,
            [first_stage, unet],
            save_every=args.save_every_a,
            threads=args.expert_threads,
            **common,
        )
        saved[f"b{width}"] = train_saving(
            f"b{width}",
            CONFIGS / "latesteps_750_1000.yaml",
            args.steps_b,
            [first_stage, unet, f"model.params.ckpt_path={saved[f'a{width}'][-1][1].resolve()}"],
            save_every=args.save_every_b,
            threads=args.expert_threads,
            **common,
        )
    saved["first_stage"] = [(0, vq)]
    return saved


def crops(n: int, size: int, seed: int = 0) -> Any:
    """``[n, 3, size, size]`` held-out crops in [-1, 1]."""
    import torch

    from ldm.eval.sources import heldout_images

    return torch.cat([im.image for im in heldout_images(n, size, seed=seed)])


def whole_photographs() -> dict[str, Any]:
    """The held-out photographs whole, cut to a multiple of 8 px, ``{name: [1, 3, H, W]}`` in [-1, 1]."""
    import torch

    from ldm.data.embedded import HELDOUT_PHOTOS, load_photo

    out = {}
    for name in HELDOUT_PHOTOS:
        photo = load_photo(name)
        h, w = (s - s % 8 for s in photo.shape[:2])
        out[name] = torch.from_numpy(photo[:h, :w].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return out


def load_first_stage(ckpt: Path) -> Any:
    """The quick start's first stage (``VQModelInterface`` as the experts build it) with the weights of ``ckpt``."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    config = OmegaConf.load(CONFIGS / "latesteps_500_750.yaml").model.params.first_stage_config
    config.params.ckpt_path = str(ckpt)
    return instantiate_from_config(config).eval()


def vq_curve(saved: list[tuple[int, Path]], n: int) -> list[dict[str, Any]]:
    """Round-trip PSNR at every saved VQ step."""
    import torch

    from ldm.eval.metrics import psnr
    from ldm.eval.stats import bootstrap_mean

    sets = {"32px": crops(n, 32), "64px": crops(n, 64)}
    photos = whole_photographs()
    rows = []
    for step, path in saved:
        first_stage = load_first_stage(path)

        def round_trip(x: Any, first_stage: Any = first_stage) -> Any:  # encode, quantize, decode
            return first_stage.decode(first_stage.encode(x)).clamp(-1, 1)

        row: dict[str, Any] = {"step": step}
        with torch.no_grad():
            for name, x in sets.items():
                value = bootstrap_mean(psnr(torch.cat([round_trip(x[i : i + 32]) for i in range(0, len(x), 32)]), x).numpy())
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = value.estimate, value.lo, value.hi
            for name, x in photos.items():
                row[name] = float(psnr(round_trip(x), x)[0])
        rows.append(row)
    return rows


def eps_mse(path: Path, ts: tuple[int, ...], images: Any) -> dict[str, Any]:
    """The EMA model's eps-MSE at each of ``ts`` on the latents of ``images``, mean and interval over images."""
    import torch

    from ldm.eval.stats import bootstrap_mean
    from ldm.refine.loading import load_expert

    model = load_expert(path)[0].model.eval()
    out: dict[str, Any] = {}
    with torch.no_grad(), model.ema_scope():
        z = model.get_first_stage_encoding(model.encode_first_stage(images))
        for t in ts:
            per_image = torch.zeros(z.shape[0], dtype=torch.float64)
            for draw in range(NOISE_DRAWS):
                gen = torch.Generator().manual_seed(1_000_003 * (draw + 1) + t)
                noise = torch.randn(z.shape, generator=gen)
                per_image += model.per_sample_loss(z, torch.full((z.shape[0],), t), noise).double() / NOISE_DRAWS
            value = bootstrap_mean(per_image.numpy())
            out[f"eps_t{t}"], out[f"eps_t{t}_lo"], out[f"eps_t{t}_hi"] = value.estimate, value.lo, value.hi
    return out


def refinement(a: Path, b: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Whole-image refinement at WHOLE_START against the round trip (SWD), and the saturated disc's in-box gain."""
    from ldm.eval.baselines import autoencoder_baseline, identity_baseline
    from ldm.eval.sources import heldout_images
    from ldm.eval.summary import best_start, summarize
    from ldm.eval.swd import paired_swd_difference
    from ldm.eval.sweep import SWD_SCALE, build_sweep_degradation, run_sweep
    from ldm.refine import Refiner

    refiner = Refiner.from_checkpoints([a, b], device="cpu", batch_invariant=False)
    model = refiner.model
    starts = PAINT_STARTS[:2] if args.smoke else PAINT_STARTS
    result = run_sweep(
        [("experts", refiner)],
        heldout_images(args.n_images, 64, seed=0),
        [build_sweep_degradation(spec, model.first_stage_model) for spec in ("local_none", PAINT)],
        (WHOLE_START, *starts),
        baselines=[identity_baseline(), autoencoder_baseline(model)],
        batch_size=32,
        realism_reference=heldout_images(args.n_images, 64, seed=1),
        n_examples=0,
        progress=False,
    )
    sets = {(s["degradation"], s["method"], s["start_t"]): s for s in result.set_metrics}
    none = next(d for d in result.degradations if d.startswith("local_none"))
    paint = next(d for d in result.degradations if d.startswith(PAINT))
    whole, trip = sets[(none, "experts", WHOLE_START)], sets[(none, "autoencoder", None)]
    row: dict[str, Any] = {"swd_rt": trip["swd"], "swd_whole50": whole["swd"]}
    if "swd_bootstrap" in whole and "swd_bootstrap" in trip:
        diff = paired_swd_difference(whole["swd_bootstrap"], trip["swd_bootstrap"])
        row["dswd"], row["dswd_lo"], row["dswd_hi"] = (v * SWD_SCALE for v in (diff.estimate, diff.lo, diff.hi))
    summary = {(s["degradation"], s["method"], s["start_t"]): s for s in summarize(result)}
    row["psnr_whole50"] = summary[(none, "experts", WHOLE_START)]["psnr_clean"]
    row["psnr_rt"] = summary[(none, "autoencoder", None)]["psnr_clean"]
    best = best_start(result, "experts (region)", paint)
    if best is not None:
        row["paint_gain"], row["paint_gain_lo"], row["paint_gain_hi"] = best.gain.estimate, best.gain.lo, best.gain.hi
        row["paint_start"] = "/".join(dict.fromkeys(map(str, best.start_ts)))
        row["paint_artifact"] = summary[(paint, "identity", None)]["psnr_clean_in"]
    return row


def expert_curves(saved: dict[str, list[tuple[int, Path]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per width: eps-MSE at t=300 along the 500-750 run; eps-MSE at 50/100 and the refinement figures along the
    750-1000 run (chained after the final 500-750 checkpoint)."""
    images = crops(args.n_images, 64)
    rows = []
    for width in args.widths:
        for step, path in saved[f"a{width}"]:
            rows.append({"width": width, "run": "500-750", "step": step, **eps_mse(path, EPS_TS["a"], images)})
        final_a = saved[f"a{width}"][-1][1]
        for step, path in saved[f"b{width}"]:
            rows.append(
                {
                    "width": width,
                    "run": "750-1000",
                    "step": step,
                    **eps_mse(path, EPS_TS["b"], images),
                    **refinement(final_a, path, args),
                }
            )
            print(f"width {width}, 750-1000 step {step}: {rows[-1]}", flush=True)
    return rows


def _ci(row: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    from ldm.eval.summary import format_entry

    return format_entry(row, key, fmt, missing="-")


def markdown(vq: list[dict[str, Any]], experts: list[dict[str, Any]]) -> str:
    """The two curves as Markdown tables."""
    lines = []
    if vq:
        lines += ["| VQ steps | 32 px crops | 64 px crops | chelsea (whole) | coffee (whole) |", "|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {_ci(r, '32px')} | {_ci(r, '64px')} | {r['chelsea']:.2f} | {r['coffee']:.2f} |" for r in vq]
        lines.append("")
    lines += [
        "| width | run | steps | eps-MSE t=300 | t=100 | t=50 | SWD x10^3 whole@50 − round trip | "
        "disc (local_paint) in-box gain, dB (start_t) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in experts:
        paint = f"{_ci(r, 'paint_gain', '{:+.2f}')} ({r['paint_start']})" if "paint_gain" in r else "-"
        lines.append(
            f"| {r['width']} | {r['run']} | {r['step']} | {_ci(r, 'eps_t300', '{:.4f}')} | "
            f"{_ci(r, 'eps_t100', '{:.4f}')} | {_ci(r, 'eps_t50', '{:.4f}')} | {_ci(r, 'dswd', '{:+.1f}')} | "
            f"{paint} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ldm.cli import EXIT_USAGE, OneLineParser, check_outdir
    from ldm.train.cli import MAX_SEED

    p = OneLineParser(prog="photo_curve.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--vq", help="a first stage of configs/quickstart/vq_f4.yaml to train the experts on (skips the VQ run and its curve)"
    )
    p.add_argument("--outdir", default="outputs/photo_curve", help="checkpoints and logs (reused when present)")
    p.add_argument("--vq-steps", type=int, default=7200, help="steps of the VQ run (the quick start: 1800)")
    p.add_argument("--vq-save-every", type=int, default=900, help="VQ checkpoint cadence")
    p.add_argument("--steps-a", type=int, default=4000, help="steps of the 500-750 expert (the quick start: 1000)")
    p.add_argument("--steps-b", type=int, default=2800, help="steps of the 750-1000 expert (the quick start: 700)")
    p.add_argument("--save-every-a", type=int, default=500, help="500-750 checkpoint cadence")
    p.add_argument("--save-every-b", type=int, default=350, help="750-1000 checkpoint cadence")
    p.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[32, 64],
        help=f"UNet model_channels to train, each a multiple of 16 up to {MAX_WIDTH} (the quick start: 32)",
    )
    p.add_argument("--n-images", type=int, default=64, help="held-out 64 px crops per measurement")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--threads", type=int, default=2, help="VQ training threads; " + THREADS_HELP)
    p.add_argument("--expert-threads", type=int, default=1, help="expert training threads (1 was faster, README)")
    p.add_argument("--smoke", action="store_true", help="3 steps per run, 4 images, 2 start_ts (for the tests)")
    args = p.parse_args(argv)
    if args.smoke:  # main.py stops after 3 steps (ldm.train.stages.SMOKE_OVERRIDES): label the curves so
        args.n_images, args.vq_steps, args.steps_a, args.steps_b = 4, 3, 3, 3
        args.vq_save_every = args.save_every_a = args.save_every_b = 1
    counts = (
        args.vq_steps,
        args.vq_save_every,
        args.steps_a,
        args.steps_b,
        args.save_every_a,
        args.save_every_b,
        args.n_images,
        args.threads,
        args.expert_threads,
    )
    if min(counts) < 1 or args.n_images > 1024:
        p.error("step counts, cadences and thread counts must be positive, --n-images in [1, 1024]")
    bad = [w for w in args.widths if not 16 <= w <= MAX_WIDTH or w % 16]
    if bad:
        p.error(f"--widths {bad}: each must be a multiple of 16 in [16, {MAX_WIDTH}] (the UNet's 16-channel heads)")
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed {args.seed} is outside main.py's seed range [0, {MAX_SEED}]")
    if args.vq and not Path(args.vq).is_file():
        p.error(
            f"--vq {args.vq} is not a file; pass a checkpoint of configs/quickstart/vq_f4.yaml (the quick start's "
            "outputs/quickstart/checkpoints/vq_f4.ckpt) or leave --vq out to train one"
        )
    problem = check_outdir(args.outdir)
    if problem:
        p.error(problem)
    args.widths = list(dict.fromkeys(args.widths))
    set_threads(args.threads)
    started = time.perf_counter()
    from ldm.train.stages import StageError

    try:
        saved = train_all(args, Path(args.outdir))
    except StageError as exc:
        print(f"photo_curve.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    vq = vq_curve(saved["vq"], args.n_images) if "vq" in saved else []
    if vq:
        print_table(vq, list(vq[0]), title="first-stage round trip, PSNR dB, against VQ steps")
    experts = expert_curves(saved, args)
    table = markdown(vq, experts)
    print(table)
    path = write_results(
        "photo_curve",
        {
            "machine": machine_info("cpu"),
            "args": vars(args),
            "vq": vq,
            "experts": experts,
            "wall_s": time.perf_counter() - started,
        },
    )
    path.with_suffix(".md").write_text(table)
    print(f"table: {shown(path.with_suffix('.md'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
