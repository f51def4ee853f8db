#!/usr/bin/env python
"""Refine images SDEdit-style with late-steps experts: encode, noise to --start-t, DDIM tail, decode.

    python scripts/refine.py --input artifacts/ --start-t 500 \\
        --ckpt logs/latesteps_500_750/checkpoints/last.ckpt --ckpt logs/latesteps_750_1000/checkpoints/last.ckpt

Each --ckpt is one expert; each DDIM step runs on the expert whose training window holds its timestep.  Outputs are
``<outdir>/<stem>_t<start>_s<seed>[_k].png`` with every parameter and each checkpoint's sha256 in PNG text metadata.
This file only parses arguments and prints; the work is in :mod:`ldm.refine`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ldm.cli import EXIT_INTERRUPTED, EXIT_USAGE, OneLineParser, check_outdir, ddim_eta, int_at_least, one_line_error

EXIT_OK = 0
EXIT_INPUT_FAILED = 1  # some inputs could not be refined (the others were)
EXIT_OUTPUT = 3  # the output folder cannot be written (permission, a file in the way, disk full)

PROG = "refine.py"
EPILOG = f"""
exit codes: {EXIT_OK} all inputs refined; {EXIT_INPUT_FAILED} some inputs failed (each reported in one line, the others
were refined); {EXIT_USAGE} bad arguments, checkpoint or config (nothing done); {EXIT_OUTPUT} the output folder cannot be
written. Timesteps: t in [0, T), T = 1000; "steps a-b" of sampling are t = 1000 - b .. 1000 - a.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line (bad arguments exit with code 2 in one line, before any model is loaded)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="image files, folders (searched recursively) and globs; repeatable")
    p.add_argument("--outdir", default="outputs/refine", help="output folder (default: %(default)s)")
    p.add_argument("--start-t", type=int_at_least(1), default=500,
                   help="timestep to noise to, in [1, T-1]; the tail starts at the largest DDIM grid step <= it "
                        "(500 with 50 steps: t=481). Lower = more faithful (default: %(default)s)")
    p.add_argument("--ddim-steps", type=int_at_least(1), default=50,
                   help="DDIM grid size over [0, T), 1..T; the tail runs the grid steps <= --start-t (default: %(default)s)")
    p.add_argument("--eta", type=ddim_eta, default=0.0, help="DDIM noise, >= 0 (default: %(default)s)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sample k uses seed + k (default: %(default)s)")
    p.add_argument("--n-samples", type=int_at_least(1), default=1, help="samples per input (default: %(default)s)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1,
                   help="samples refined together (same-size images; several samples of one image are encoded once) "
                        "(default: %(default)s)")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="run the networks one sample at a time so results do not depend on --batch-size (bit-identical); "
                        "--no-batch-invariant runs whole batches per forward (faster, results then agree to float "
                        "rounding) (default: on for CPU, off for CUDA)")
    p.add_argument("--ckpt", action="append", required=True, metavar="PATH",
                   help="expert checkpoint; repeat once per expert (each runs the steps in its window)")
    p.add_argument("--config", metavar="YAML",
                   help="model config for checkpoints that carry none (e.g. CompVis releases)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="network precision via autocast; fp16 needs CUDA (default: %(default)s)")
    p.add_argument("--tile-size", type=int_at_least(0), metavar="PX",
                   help="encode/decode images with a side above PX in PX x PX tiles (multiple of 4; bounded memory, "
                        "seamless blending); 0 never tiles (default: 512 px tiles for images with a side above 768 px)")
    p.add_argument("--tile-overlap", type=int_at_least(0), metavar="PX",
                   help="overlap between tiles, a multiple of 4 below the tile size (default: a quarter of the tile size)")
    p.add_argument("--channels-last", action="store_true",
                   help="run the networks with NHWC weights (often faster; same results up to float rounding)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNets (slow first call per image size, faster afterwards)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights when the checkpoint has them (default: on)")
    p.add_argument("--skip-existing", action="store_true", help="leave outputs that already exist")
    p.add_argument("--grid", action="store_true", help="also write <name>_grid.png: input | refined")
    p.add_argument("--allow-outside-window", action="store_true",
                   help="run the nearest expert on steps no expert window covers (warned) instead of refusing")
    p.add_argument("--trust-config", action="store_true",
                   help="let a config stored in a checkpoint build classes outside ldm.* / taming.modules.*")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle arbitrary objects in checkpoints: can run code, only for files you trust")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return p


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def tiling_from_args(args: argparse.Namespace):
    """The refiner's ``tiling`` from --tile-size / --tile-overlap: "auto" when neither is given, None for size 0, else
    the automatic tiling (same statistics passes) with the given tile side (tiling images above it) and overlap."""
    import dataclasses

    from ldm.refine.speed import AUTO_TILING

    if args.tile_size == 0:
        return None
    if args.tile_size is None:
        return "auto" if args.tile_overlap is None else dataclasses.replace(AUTO_TILING, overlap=args.tile_overlap)
    overlap = args.tile_overlap if args.tile_overlap is not None else args.tile_size // 16 * 4
    return dataclasses.replace(AUTO_TILING, min_side=args.tile_size, tile=args.tile_size, overlap=overlap)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see EPILOG: 0, 1 some inputs failed, 2 usage, 3 output, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ldm.refine.refiner import MAX_SEED

    if args.seed + args.n_samples - 1 > MAX_SEED:  # sample k uses seed + k
        parser.error(f"argument --seed: {args.seed} + {args.n_samples - 1} (--n-samples - 1) is above the largest seed "
                     f"{MAX_SEED}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(name)s: %(message)s")
    from ldm.checkpoint import CheckpointError
    from ldm.refine import Refiner
    from ldm.refine.batch import collect_inputs, refine_files
    from ldm.util import ConfigError

    problem = check_outdir(args.outdir)
    if problem:
        _err(f"error: {problem}")
        return EXIT_OUTPUT
    try:
        refiner = Refiner.from_checkpoints(
            args.ckpt, device=args.device, precision=args.precision, ema=args.ema, config=args.config,
            allow_outside_window=args.allow_outside_window, trust_config=args.trust_config, unsafe_load=args.unsafe_load,
            batch_invariant=args.batch_invariant, tiling=tiling_from_args(args), channels_last=args.channels_last,
            compile=args.compile,
        )
        plan = refiner.plan(args.start_t, args.ddim_steps, args.eta)
    except (CheckpointError, ConfigError, ValueError, OSError) as exc:
        _err(f"error: {one_line_error(exc)}")
        return EXIT_USAGE
    print(f"{refiner.describe()}\n{plan.describe()}", flush=True)

    paths, problems = collect_inputs(args.input, args.outdir)
    for line in problems:
        _err(line)
    if not paths:
        _err(f"error: no images to refine in {args.input}")
        return EXIT_INPUT_FAILED
    try:
        os.makedirs(args.outdir, exist_ok=True)
    except OSError as exc:
        _err(f"error: output folder {args.outdir}: {exc.strerror or one_line_error(exc)}")
        return EXIT_OUTPUT

    started = time.perf_counter()
    try:
        report = refine_files(
            refiner, paths, args.outdir, start_t=args.start_t, ddim_steps=args.ddim_steps, eta=args.eta,
            seed=args.seed, n_samples=args.n_samples, batch_size=args.batch_size, skip_existing=args.skip_existing,
            grid=args.grid, parameters=vars(args), progress=sys.stderr.isatty(), on_error=_err,
        )
    except KeyboardInterrupt:
        _err("interrupted; finished outputs are complete (re-run with --skip-existing to continue)")
        return EXIT_INTERRUPTED
    seconds = time.perf_counter() - started

    refined = sum(1 for out in report.written if not out.name.endswith("_grid.png"))
    print(f"{len(report.done)} of {len(paths)} images done in {seconds:.1f} s: {refined} refined files written, "
          f"{len(report.skipped)} skipped as existing, into {args.outdir}", flush=True)
    if report.fatal:
        _err(f"error: {report.fatal}; stopped")
        return EXIT_OUTPUT
    if report.failed or problems:
        parts = []
        if report.failed:
            parts.append(f"{len(report.failed)} image(s) failed: {', '.join(name for name, _ in report.failed)}")
        if problems:
            parts.append(f"{len(problems)} input(s) matched no image")
        _err("; ".join(parts))
        return EXIT_INPUT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
