#!/usr/bin/env python
"""Refine images SDEdit-style with late-steps experts: encode, noise to --start-t, run the steps below it, decode.

    python scripts/refine.py --input artifacts/ --start-t 500 \\
        --ckpt logs/latesteps_500_750/checkpoints/last.ckpt --ckpt logs/latesteps_750_1000/checkpoints/last.ckpt
    python scripts/refine.py --input face.png --mask face_mask.png --start-t 400 --ckpt A.ckpt --ckpt B.ckpt
    python scripts/refine.py --input photo.png --box 8,8,40,40 --start-t 150 --ckpt demo    # the shipped demo experts
    python scripts/refine.py --input face.png --box 40,60,120,150@450 --crop-regions --ckpt A.ckpt --ckpt B.ckpt
    python scripts/refine.py --input sd_outputs/ --start-t 200 --ckpt sd_late.ckpt --guidance-scale 5    # prompts read
    python scripts/refine.py --input a.png --prompt "a photo of a cat" --negative-prompt blurry --ckpt sd_late.ckpt

Each --ckpt is one expert; each step runs on the expert whose training window holds its timestep.  Under ``torchrun
--nproc-per-node N`` (or SLURM) the inputs are split between the processes, one GPU each.  --mask / --box
refine only a region (every other pixel comes back unchanged).  Text-conditioned experts (Stable Diffusion's UNet)
take a prompt: --prompt for every input, else the input's --prompt-file entry, else the prompt the image records
(A1111's 'parameters' chunk or this project's metadata), with classifier-free guidance.
Outputs are ``<outdir>/<stem>_t<start>_s<seed>[_k].png``
with every parameter and each checkpoint's sha256 in PNG text metadata.  This file only parses arguments and prints;
the work is in :mod:`ldm.refine`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from ldm.cli import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    OneLineParser,
    add_loading_flags,
    box_arg,
    check_outdir,
    ddim_eta,
    decimal_float,
    int_at_least,
    int_in_range,
    one_line_error,
    path_arg,
    run_script,
    unit_interval,
)

SAMPLERS = ("ddim", "dpmpp_2m")  # ldm.sampling.SAMPLERS, not imported here so that --help does not load torch
# ldm.refine.regions' bounds (same reason), checked at parsing rather than on each image after it is loaded
MAX_FEATHER = 256  # MAX_FEATHER: px of --mask-blur / --mask-dilate
MAX_REGION_SIZE = 4096  # MAX_REGION_SIZE
MAX_REGION_PADDING = 4096  # MAX_REGION_PADDING
DEFAULT_REGION_PADDING = 32  # DEFAULT_REGION_PADDING
DEFAULT_MASK_BLUR = 4  # DEFAULT_MASK_BLUR

EXIT_OK = 0
EXIT_INPUT_FAILED = 1  # some inputs could not be refined (the others were)
EXIT_OUTPUT = 3  # the output folder cannot be written (permission, a file in the way, disk full)

PROG = "refine.py"
EPILOG = f"""
exit codes: {EXIT_OK} all inputs refined; {EXIT_INPUT_FAILED} some inputs failed (each reported in one line, the others
were refined); {EXIT_USAGE} bad arguments, checkpoint or config (nothing done); {EXIT_OUTPUT} the output folder cannot be
written. Timesteps: t in [0, T), T = 1000; "steps a-b" of sampling are t = 1000 - b .. 1000 - a.
"""


def prompt_text(text: str) -> str:
    """An argparse ``type`` for --prompt / --negative-prompt (:func:`ldm.imageio.prompt.check_prompt_text`)."""
    from ldm.imageio.prompt import check_prompt_text

    try:
        return check_prompt_text(text, "the prompt")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def guidance_scale(text: str) -> float:
    """An argparse ``type`` for --guidance-scale: a finite number >= 0."""
    try:
        value = decimal_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text} must be a finite number >= 0 (1 = the conditional model without guidance; Stable Diffusion usually 5-12)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line (bad arguments exit with code 2 in one line, before any model is loaded)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        type=path_arg,
        help="image files, folders (searched recursively) and globs; repeatable",
    )
    p.add_argument("--outdir", default="outputs/refine", type=path_arg, help="output folder (default: %(default)s)")
    p.add_argument(
        "--start-t",
        type=int_at_least(1),
        help="timestep to noise to, in [1, T-1] (step T - t); with --ddim-steps the tail starts at the largest "
        "DDIM grid step <= it (500 with 50 steps: t=481). Lower = more faithful (default: 500)",
    )
    p.add_argument(
        "--strength",
        type=unit_interval,
        help="img2img's strength s in (0, 1] instead of --start-t: start_t = round(s * T) (at most T - 1)",
    )
    p.add_argument(
        "--ddim-steps",
        type=int_at_least(1),
        help="DDIM grid size over [0, T), 1..T; the tail runs the grid steps <= --start-t (default: 50)",
    )
    p.add_argument(
        "--tail-steps",
        type=int_at_least(1),
        metavar="K",
        help="run exactly K steps from --start-t itself (uniform in log-SNR) instead of the DDIM grid's tail",
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="ddim",
        help="ddim, or dpmpp_2m (DPM-Solver++(2M): second order, fewer steps; deterministic) (default: %(default)s)",
    )
    p.add_argument("--eta", type=ddim_eta, default=0.0, help="DDIM noise, in [0, 1]; ddim only (default: %(default)s)")
    p.add_argument(
        "--mask",
        metavar="PATH",
        type=path_arg,
        help="refine only where this grayscale image is white (black = keep exactly, grey = a proportional "
        "start); a folder holds one mask per input, matched by file stem",
    )
    p.add_argument(
        "--box",
        action="append",
        type=box_arg,
        default=[],
        metavar="X0,Y0,X1,Y1[@T]",
        help="refine this rectangle (pixels, x1/y1 exclusive), optionally from its own start timestep T; "
        "repeatable; a value starting with '-' is attached: --box=-1,0,8,8",
    )
    p.add_argument(
        "--mask-blur",
        metavar="PX",
        type=int_in_range(
            0,
            MAX_FEATHER,
            "each px of feather is one more pass over the whole image; "
            f"{MAX_FEATHER} px already fades over {2 * MAX_FEATHER} px",
        ),
        help=f"feather of the composite inside the region's edge, 0..{MAX_FEATHER} (default: {DEFAULT_MASK_BLUR})",
    )
    p.add_argument(
        "--mask-dilate",
        metavar="PX",
        type=int_in_range(
            0, MAX_FEATHER, "the growing filter's cost rises with the square of PX; paint a larger mask or box instead"
        ),
        help=f"grow the mask/boxes by PX pixels first, 0..{MAX_FEATHER} (default: 0)",
    )
    p.add_argument(
        "--crop-regions",
        action="store_true",
        help="refine each region in a crop resized to the experts' native size, then paste it back "
        "(fixes small faces/hands in large images)",
    )
    p.add_argument(
        "--region-padding",
        metavar="PX",
        type=int_in_range(0, MAX_REGION_PADDING, "px of context around a region; a crop is clipped to the image anyway"),
        help=f"context around each region in --crop-regions, 0..{MAX_REGION_PADDING} (default: {DEFAULT_REGION_PADDING})",
    )
    p.add_argument(
        "--region-size",
        metavar="PX",
        type=int_in_range(
            8,
            MAX_REGION_SIZE,
            f"each region is refined at PX x PX; {MAX_REGION_SIZE} px is already 16 MP, far above the experts' training size",
        ),
        help=f"side a region's crop is refined at, 8..{MAX_REGION_SIZE} (default: the experts' training size)",
    )
    p.add_argument(
        "--prompt",
        type=prompt_text,
        metavar="TEXT",
        help="prompt for text-conditioned experts, for every input (else each input's --prompt-file entry, "
        "else the prompt the image records: A1111 'parameters' or this project's metadata)",
    )
    p.add_argument(
        "--negative-prompt",
        type=prompt_text,
        metavar="TEXT",
        help="the unconditional branch's text, where the prompt's source records none (default: empty)",
    )
    p.add_argument(
        "--guidance-scale",
        type=guidance_scale,
        metavar="S",
        help="classifier-free guidance scale s in eps_u + s (eps_c - eps_u), where the prompt's source "
        "records none; 1 = no guidance (default: 7.5)",
    )
    p.add_argument(
        "--prompt-file",
        type=path_arg,
        metavar="PATH",
        help="one prompt per input stem: UTF-8 lines stem<TAB>prompt[<TAB>negative prompt], or a .json "
        "object {stem: prompt or {prompt, negative_prompt, guidance_scale}}",
    )
    p.add_argument(
        "--allow-unconditional-experts",
        action="store_true",
        help="in a chain of text-conditioned and unconditional experts, run the unconditional ones without "
        "the prompt instead of refusing",
    )
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sample k uses seed + k (default: %(default)s)")
    p.add_argument("--n-samples", type=int_at_least(1), default=1, help="samples per input (default: %(default)s)")
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=1,
        help="samples refined together (same-size images; several samples of one image are encoded once) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the networks one sample at a time so results do not depend on --batch-size (bit-identical); "
        "--no-batch-invariant runs whole batches per forward (faster, results then agree to float "
        "rounding) (default: on for CPU, off for CUDA)",
    )
    p.add_argument(
        "--ckpt",
        action="append",
        required=True,
        metavar="PATH",
        type=path_arg,
        help="expert checkpoint, or 'demo' for the shipped demo experts (weights/demo/); repeat once per "
        "expert (each runs the steps in its window)",
    )
    p.add_argument(
        "--config", metavar="YAML", type=path_arg, help="model config for checkpoints that carry none (e.g. CompVis releases)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="network precision via autocast; fp16 needs CUDA (default: %(default)s)",
    )
    p.add_argument(
        "--tile-size",
        type=int_at_least(0),
        metavar="PX",
        help="encode/decode images with a side above PX in PX x PX tiles (multiple of 4; bounded memory, "
        "seamless blending); 0 never tiles (default: 512 px tiles for images with a side above 768 px)",
    )
    p.add_argument(
        "--tile-overlap",
        type=int_at_least(0),
        metavar="PX",
        help="overlap between tiles, a multiple of 4 below the tile size (default: a quarter of the tile size)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="run the networks with NHWC weights (often faster; same results up to float rounding)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the UNets (slow first call per image size, faster afterwards)"
    )
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use the EMA weights when the checkpoint has them (default: on)",
    )
    p.add_argument("--skip-existing", action="store_true", help="leave outputs that already exist")
    p.add_argument(
        "--grid",
        action="store_true",
        help="also write <name>_grid.png: input | refined (input | mask overlay | refined with regions)",
    )
    add_loading_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return p


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def region_problem(args: argparse.Namespace) -> str | None:
    """Why the region arguments cannot work (one line), or None; reads nothing but the mask path's type."""
    if args.start_t is not None and args.strength is not None:
        return "--start-t and --strength were both given: pass one (strength s means start_t = round(s * T))"
    if args.mask is not None and not os.path.exists(args.mask):
        return f"--mask {args.mask}: no such file or folder"
    if args.crop_regions and args.mask is None and not args.box:
        return "--crop-regions needs --mask or --box: there is no region to crop"
    crop_flags = [flag for flag, value in (("--region-padding", args.region_padding), ("--region-size", args.region_size))
                  if value is not None]  # fmt: skip
    mask_flags = [flag for flag, value in (("--mask-blur", args.mask_blur), ("--mask-dilate", args.mask_dilate))
                  if value is not None]  # fmt: skip
    if mask_flags and args.mask is None and not args.box:
        verb, them = ("apply", "them") if len(mask_flags) > 1 else ("applies", "it")
        return f"{' and '.join(mask_flags)} {verb} only with --mask or --box: add a region, or drop {them}"
    if crop_flags and not args.crop_regions:
        verb, them = ("apply", "them") if len(crop_flags) > 1 else ("applies", "it")
        return f"{' and '.join(crop_flags)} {verb} only with --crop-regions: add --crop-regions, or drop {them}"
    if args.tile_size == 0 and args.tile_overlap is not None:
        return "--tile-overlap was given with --tile-size 0, which never tiles: drop one of them"
    if args.prompt is not None and args.prompt_file is not None:
        return (
            "--prompt and --prompt-file were both given: --prompt would apply to every input and leave the file "
            "unused; pass one"
        )
    return None


def prompt_flags(args: argparse.Namespace) -> list[str]:
    """The prompt flags given (for the refusal when no expert that runs is text-conditioned)."""
    flags = {
        "--prompt": args.prompt,
        "--negative-prompt": args.negative_prompt,
        "--guidance-scale": args.guidance_scale,
        "--prompt-file": args.prompt_file,
    }
    return [flag for flag, value in flags.items() if value is not None]


def input_prompts(args: argparse.Namespace, refiner, plan, paths: list[Path], prompt_file) -> tuple[list | None, str | None]:
    """``(prompts per input or None, one-line refusal or None)``: None prompts when no expert that runs is
    text-conditioned; a refusal for prompt flags no expert takes, a chain :func:`check_chain` refuses, or no input
    with a prompt.  Reads the inputs' PNG text chunks (no pixels) where --prompt is not given."""
    from ldm.imageio.prompt import DEFAULT_GUIDANCE_SCALE, Prompt
    from ldm.refine.conditioning import check_chain, resolve_input_prompts, text_experts

    if not text_experts(refiner.experts, plan):
        given = prompt_flags(args)
        if given:
            return None, (
                f"{', '.join(given)} given, but no expert that runs is text-conditioned "
                f"({plan.describe_routing()}): drop {'them' if len(given) > 1 else 'it'}"
            )
        return None, None
    try:
        check_chain(refiner.experts, plan, True, refiner.allow_unconditional_experts)
        prompt = None
        if args.prompt is not None:
            prompt = Prompt(
                args.prompt,
                args.negative_prompt or "",
                DEFAULT_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale,
            )
    except ValueError as exc:
        return None, one_line_error(exc)
    prompts = resolve_input_prompts(paths, prompt, prompt_file, args.negative_prompt, args.guidance_scale)
    if not any(isinstance(p, Prompt) for p in prompts):
        return None, f"no input has a prompt for the text-conditioned expert(s) (first: {prompts[0]})"
    return prompts, None


def tiling_from_args(args: argparse.Namespace):
    """The refiner's ``tiling`` from --tile-size / --tile-overlap: "auto" when neither is given, None for size 0, else
    the automatic tiling (same statistics passes) with the given tile side (tiling images above it) and overlap."""
    import dataclasses

    from ldm.refine.first_stage import AUTO_TILING

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
    from ldm.refine.request import MAX_SEED

    if args.seed + args.n_samples - 1 > MAX_SEED:  # sample k uses seed + k
        parser.error(
            f"argument --seed: {args.seed} + {args.n_samples - 1} (--n-samples - 1) is above the largest seed {MAX_SEED}"
        )
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    )
    from ldm.checkpoint import CheckpointError
    from ldm.refine import Refiner
    from ldm.refine.batch import collect_inputs, mask_clash, refine_files
    from ldm.refine.distributed import close, gather, rank_device, ranks_from_env
    from ldm.refine.regions import RegionOptions
    from ldm.refine.request import RefineRequest
    from ldm.util import ConfigError

    problem = check_outdir(args.outdir) or region_problem(args)
    if problem:
        _err(f"error: {problem}")
        return EXIT_OUTPUT if problem.startswith("output folder") else EXIT_USAGE
    # filled here, after the checks above, so the metadata records the values used
    args.region_padding = DEFAULT_REGION_PADDING if args.region_padding is None else args.region_padding
    args.mask_blur = DEFAULT_MASK_BLUR if args.mask_blur is None else args.mask_blur
    args.mask_dilate = 0 if args.mask_dilate is None else args.mask_dilate
    try:  # before any model is loaded: a bad prompt file is a usage error
        from ldm.imageio.prompt import load_prompt_file

        prompt_file = load_prompt_file(args.prompt_file) if args.prompt_file is not None else None
    except ValueError as exc:
        _err(f"error: {one_line_error(exc)}")
        return EXIT_USAGE
    try:  # every refinement option, checked once here, before any model is loaded
        regions = RegionOptions(
            mask=Path(args.mask) if args.mask else None,
            boxes=tuple(args.box),
            blur=args.mask_blur,
            dilate=args.mask_dilate,
            crop=args.crop_regions,
            padding=args.region_padding,
            size=args.region_size,
        )
        request = RefineRequest(start_t=args.start_t, strength=args.strength, ddim_steps=args.ddim_steps,
                                tail_steps=args.tail_steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
                                n_samples=args.n_samples, regions=regions)  # fmt: skip
    except ValueError as exc:
        _err(f"error: {one_line_error(exc)}")
        return EXIT_USAGE
    try:
        ranks = ranks_from_env()
        refiner = Refiner.from_checkpoints(
            args.ckpt,
            device=rank_device(args.device, ranks),
            precision=args.precision,
            ema=args.ema,
            config=args.config,
            allow_outside_window=args.allow_outside_window,
            trust_config=args.trust_config,
            unsafe_load=args.unsafe_load,
            batch_invariant=args.batch_invariant,
            tiling=tiling_from_args(args),
            channels_last=args.channels_last,
            compile=args.compile,
            allow_unconditional_experts=args.allow_unconditional_experts,
        )
        plan = refiner.plan_for(request)
    except (CheckpointError, ConfigError, ValueError, OSError) as exc:
        _err(f"error: {one_line_error(exc)}")
        return EXIT_USAGE
    if ranks.is_main:
        print(f"{refiner.describe()}\n{plan.describe()}", flush=True)

    paths, problems = collect_inputs(args.input, args.outdir)
    for line in problems if ranks.is_main else ():
        _err(line)
    if not paths:
        _err(f"error: no images to refine in {args.input}")
        return EXIT_INPUT_FAILED
    clash = mask_clash(paths, args.outdir, plan.start_t, request.seed, request.n_samples, args.grid, regions)
    if clash is not None:  # a file the batch reads is never written: refused before any output is written
        _err(f"error: {clash}")
        return EXIT_USAGE
    prompts, refusal = input_prompts(args, refiner, plan, paths, prompt_file)
    if refusal is not None:
        _err(f"error: {refusal}")
        return EXIT_USAGE
    try:
        os.makedirs(args.outdir, exist_ok=True)
    except OSError as exc:
        _err(f"error: output folder {args.outdir}: {exc.strerror or one_line_error(exc)}")
        return EXIT_OUTPUT

    started = time.perf_counter()
    try:
        report = refine_files(
            refiner,
            paths,
            args.outdir,
            request,
            batch_size=args.batch_size,
            skip_existing=args.skip_existing,
            grid=args.grid,
            parameters={k: v for k, v in vars(args).items() if k != "input"},  # the list: O(batch) bytes per output
            progress=sys.stderr.isatty(),
            on_error=_err,
            share=ranks.share(len(paths)),
            prompts=prompts,
        )
    except KeyboardInterrupt:
        _err("interrupted; finished outputs are complete (re-run with --skip-existing to continue)")
        return EXIT_INTERRUPTED
    try:
        reports = gather(report, ranks)  # every rank's outcome, for one summary and one exit code
    except (RuntimeError, ValueError, OSError) as exc:  # e.g. no rendezvous: this rank's outputs are written, whole
        _err(f"error: rank {ranks.rank} could not exchange reports with the other processes: {one_line_error(exc)}")
        return EXIT_INPUT_FAILED
    close(ranks)
    seconds = time.perf_counter() - started
    done = sum(len(r.done) for r in reports)
    written = [out for r in reports for out in r.written]
    failed = [f for r in reports for f in r.failed]
    fatal = [r.fatal for r in reports if r.fatal]
    if ranks.is_main:
        refined = sum(1 for out in written if not out.name.endswith("_grid.png"))
        by = f" by {ranks.world} processes" if ranks.world > 1 else ""
        print(
            f"{done} of {len(paths)} images done in {seconds:.1f} s{by}: {refined} refined files written, "
            f"{sum(len(r.skipped) for r in reports)} skipped as existing, into {args.outdir}",
            flush=True,
        )
    if fatal:
        if ranks.is_main:
            _err(f"error: {fatal[0]}; stopped")
        return EXIT_OUTPUT
    if failed or problems:
        if ranks.is_main:
            parts = []
            if failed:
                parts.append(f"{len(failed)} image(s) failed: {', '.join(name for name, _ in failed)}")
            if problems:
                parts.append(f"{len(problems)} input(s) matched no image")
            _err("; ".join(parts))
        return EXIT_INPUT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    run_script(main, PROG)
