#!/usr/bin/env python
"""Measure refinement: degrade clean images, refine them at several start_t, compare with baselines.

    python scripts/evaluate.py --ckpt logs/<500-750 run>/checkpoints/last.ckpt \\
        --ckpt logs/<750-1000 run>/checkpoints/last.ckpt \\
        --degradations "vq_roundtrip:codebook_fraction=0.125" "jpeg:quality=15" --start-t 100 200 300 400

Writes into --outdir: sweep.csv (one row per image x degradation x method x start_t x seed), summary.csv (means), the
printed table, curves.png (distance to clean and to the input against start_t), realism.png (SWD realism against
faithfulness, with a realism reference), examples.png (clean | degraded | outputs) and sweep.json (parameters, notes).
Without --images, held-out crops of the embedded photographs are used (never seen in training), and other crops of them
(seed --crop-seed + 1) are the realism reference.  Local degradations (local_warp, local_blotch, local_shuffle,
local_vq) also run every refiner inside their box only (--region-modes).  --no-reference DIR takes real artifact images
(no clean version): faithfulness and the grid only.  This file only parses arguments and prints; the work is in
ldm.eval.sweep and ldm.eval.report.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ldm.cli import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    OneLineParser,
    add_loading_flags,
    check_outdir,
    ddim_eta,
    int_at_least,
    one_line_error,
    path_arg,
    run_script,
)

EXIT_OK = 0
EXIT_INPUT = 1  # an image of the folders could not be read
NUM_TIMESTEPS = 1000  # T of the checkpoints this project trains (the epilog's); the sweep checks each model's own

PROG = "evaluate.py"


_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    """The command line (bad arguments exit with code 2 in one line, before any model is loaded)."""
    from ldm.eval.baselines import FILTERS
    from ldm.eval.sweep import DEFAULT_DEGRADATIONS, DEFAULT_START_TS

    p = OneLineParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Timesteps: t in [0, T), T = 1000; sampling 'steps a-b' are t = 1000 - b .. 1000 - a.",
    )
    p.add_argument(
        "--ckpt",
        action="append",
        required=True,
        metavar="PATH",
        type=path_arg,
        help="expert checkpoint of the refiner under test; repeat once per expert (chained by window)",
    )
    p.add_argument(
        "--compare-ckpt",
        action="append",
        default=[],
        metavar="PATH",
        type=path_arg,
        help="checkpoint(s) of a second refiner evaluated head to head (e.g. a full-range model)",
    )
    p.add_argument("--name", default="experts", help="label of the refiner under test (default: %(default)s)")
    p.add_argument("--compare-name", default="compare", help="label of the second refiner (default: %(default)s)")
    p.add_argument(
        "--config", metavar="YAML", type=path_arg, help="model config for checkpoints that carry none (CompVis releases)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--images",
        metavar="DIR",
        type=path_arg,
        help="clean images to degrade (default: held-out crops of the embedded photographs)",
    )
    src.add_argument(
        "--no-reference",
        metavar="DIR",
        type=path_arg,
        help="real artifact images without clean references: faithfulness curve and grid only",
    )
    src.add_argument(
        "--synthetic",
        action="store_true",
        help="held-out images of the synthetic family (ldm.data.synthetic; never drawn for training) "
        "instead of crops of the embedded photographs",
    )
    p.add_argument(  # the defaults of the held-out flags are None, so that one given with --images is refused
        "--n-images",
        type=_positive_int,
        help=f"held-out crops (or --synthetic images), at most {MAX_SYNTHETIC_IMAGES} (default: {DEFAULT_N_IMAGES})",
    )
    p.add_argument(
        "--size",
        type=_positive_int,
        help="side of the held-out crops or synthetic images in pixels (default: the model's training size)",
    )
    p.add_argument(
        "--crop-seed",
        type=_non_negative_int,
        help="seed of the held-out crops or the synthetic images' held-out stream (default: 0)",
    )
    p.add_argument(
        "--realism-images",
        metavar="DIR",
        type=path_arg,
        help="clean images (other than the evaluated ones, all of their size) for the SWD realism measure "
        "(default: other held-out crops of the embedded photographs; none with --images)",
    )
    p.add_argument(
        "--region-modes",
        nargs="*",
        choices=("region", "crop"),
        metavar="MODE",
        help="on local degradations, also refine inside the box only: region (in place), crop (crop mode); "
        "none: whole images only (default: region when --degradations holds a local one)",
    )
    p.add_argument(
        "--degradations",
        nargs="+",
        metavar="SPEC",
        help="name or name:key=value,... (ldm.eval.degrade; vq_roundtrip uses the refiner's first stage "
        f"unless first_stage=<yaml>); default: one of each family ({' '.join(DEFAULT_DEGRADATIONS)})",
    )
    p.add_argument(
        "--start-t",
        nargs="+",
        type=_positive_int,
        default=list(DEFAULT_START_TS),
        metavar="T",
        help="start timesteps; those outside the experts' windows are skipped with a note (default: %(default)s)",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=_non_negative_int,
        default=[0],
        metavar="S",
        help="one case per seed: degradation and refinement noise (default: 0)",
    )
    p.add_argument("--ddim-steps", type=_positive_int, default=50, help="DDIM grid size (default: %(default)s)")
    p.add_argument("--eta", type=ddim_eta, default=0.0, help="DDIM noise (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="cases refined together (default: %(default)s)")
    p.add_argument(
        "--filter", choices=(*FILTERS, "none"), default="nl_means", help="classical baseline filter (default: %(default)s)"
    )
    p.add_argument("--no-autoencoder", action="store_true", help="leave out the first-stage round-trip baseline")
    p.add_argument(
        "--region-only",
        action="store_true",
        help="refine only inside the boxes (--region-modes), not the whole images; local degradations only",
    )
    p.add_argument(
        "--examples", type=_non_negative_int, default=4, help="images per degradation in examples.png (default: %(default)s)"
    )
    p.add_argument("--lpips-net", choices=("vgg", "alex", "squeeze"), default="vgg", help="(default: %(default)s)")
    p.add_argument(
        "--lpips-weights", metavar="PATH", type=path_arg, help="torchvision backbone weights for LPIPS (default: hub cache)"
    )
    p.add_argument("--inception-weights", metavar="PATH", type=path_arg, help="torch-fidelity Inception weights for FID/KID")
    p.add_argument(
        "--outdir",
        default="outputs/evaluate",
        type=path_arg,
        help="output folder, not an image folder itself; one inside an image folder is left out of it (default: %(default)s)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="(default: %(default)s)")
    add_loading_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 done, 1 images unreadable, 2 bad arguments/checkpoint/config/degradation/
    output folder, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    )
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    """:func:`main` after parsing: checks, loads, runs the sweep, then writes the report files."""
    from ldm.checkpoint import CheckpointError
    from ldm.eval.baselines import autoencoder_baseline, default_baselines
    from ldm.eval.metrics import LPIPSMetric, Skipped, load_inception, load_lpips
    from ldm.eval.report import format_table, write_report
    from ldm.eval.sources import folder_image_paths, heldout_images, images_at, synthetic_images
    from ldm.eval.summary import summarize
    from ldm.eval.swd import PATCH_SIZE as SWD_PATCH_SIZE
    from ldm.eval.sweep import build_sweep_degradation, run_sweep
    from ldm.imageio import ImageLoadError, format_path
    from ldm.refine import Refiner
    from ldm.util import ConfigError

    # found now, not after loading or the whole sweep
    problem = check_outdir(args.outdir) or _check_unused_flags(args)
    if not problem:
        _fill_in_defaults(args)
        problem = _check_methods(args) or _check_inputs(args)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    region_modes = ["region"] if args.region_modes is None else args.region_modes
    # every degradation is built (its parameters checked) before a model is loaded; None: no reference, no degradation
    prebuilt: list[Any] | None = None if args.no_reference is not None else []
    for spec in args.degradations if prebuilt is not None else []:
        try:
            prebuilt.append(_prebuild(spec))
        except (ConfigError, ValueError, TypeError, KeyError, OSError) as exc:  # CheckpointError: a ValueError
            print(f"{PROG}: error: --degradations {spec!r}: {one_line_error(exc)}", file=sys.stderr)
            return EXIT_USAGE

    read: dict[str, Any] = {}  # the folders' images, read before any model is loaded: an unreadable one costs nothing
    for name in ("no_reference", "images", "realism_images"):
        folder = getattr(args, name)
        if folder is None:
            continue
        paths, left_out = folder_image_paths(folder, args.outdir)
        try:
            read[name] = images_at(folder, paths)
        except (FileNotFoundError, ImageLoadError) as exc:
            named = "--realism-images: " if name == "realism_images" else ""  # --images may be a folder too
            print(f"{PROG}: error: {named}{one_line_error(exc)}", file=sys.stderr)
            return EXIT_INPUT
        if left_out:
            flag, shown = "--" + name.replace("_", "-"), format_path(args.outdir)
            print(f"note: {flag}: left out {left_out} image(s) under the output folder {shown} (earlier reports)")
    evaluated = read.get("images") or read.get("no_reference")  # the evaluated sizes, where known before loading
    sizes = {tuple(im.image.shape[-2:]) for im in evaluated} if evaluated else {(args.size,) * 2} if args.size else None
    if "realism_images" in read and sizes is not None:
        problem = _check_realism_sizes(sizes, read["realism_images"])
        if problem:
            print(f"{PROG}: error: --realism-images: {problem}", file=sys.stderr)
            return EXIT_USAGE
    try:  # a weights file of the wrong shapes, with NaN, or no weights file at all: before the refiners load (on the CPU)
        lpips = load_lpips(args.lpips_net, args.lpips_weights)
        inception = load_inception(args.inception_weights) if args.no_reference is None else None
    except (CheckpointError, OSError) as exc:  # a weights file that is not what --lpips-weights/--inception-weights need
        print(f"{PROG}: error: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_USAGE

    def load(paths: list[str]) -> Refiner:
        return Refiner.from_checkpoints(
            paths,
            device=args.device,
            precision=args.precision,
            config=args.config,
            allow_outside_window=args.allow_outside_window,
            trust_config=args.trust_config,
            unsafe_load=args.unsafe_load,
            batch_invariant=False,  # the sweep's batches are fixed, so its figures are reproducible all the same
        )

    try:
        refiners = [(args.name, load(args.ckpt))]
        if args.compare_ckpt:
            refiners.append((args.compare_name, load(args.compare_ckpt)))
        model = refiners[0][1].model
        degradations = None
        if prebuilt is not None:
            problem = _check_vq_first_stage(args, [s for s, d in zip(args.degradations, prebuilt) if d is None], model)
            if problem:
                print(f"{PROG}: error: {problem}", file=sys.stderr)
                return EXIT_USAGE
            degradations = [
                build_sweep_degradation(spec, model.first_stage_model) if d is None else d
                for spec, d in zip(args.degradations, prebuilt)
            ]
    except (CheckpointError, ConfigError, ValueError, TypeError, KeyError, OSError) as exc:
        print(f"{PROG}: error: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    for name, refiner in refiners:
        print(f"{name}: {refiner.describe()}", flush=True)

    try:
        if args.no_reference is not None:
            images = read["no_reference"]
            source = f"artifact images in {args.no_reference} (no reference)"
        elif args.images is not None:
            images = read["images"]
            source = f"clean images in {args.images}"
        else:
            size = args.size or int(model.image_size) * int(model.downsampling_factor)
            held_out = synthetic_images if args.synthetic else heldout_images
            images = held_out(args.n_images, size, seed=args.crop_seed)
            what = "images of the synthetic family" if args.synthetic else "crops of the embedded photographs"
            source = f"{args.n_images} held-out {size}x{size} {what} (seed {args.crop_seed})"
        realism = None
        if args.images is None and args.no_reference is None and args.realism_images is None:
            if size >= SWD_PATCH_SIZE:
                realism = held_out(args.n_images, size, seed=args.crop_seed + 1)
            else:
                print(f"note: no SWD realism: crops of {size} px are smaller than its {SWD_PATCH_SIZE} px patches")
    except ValueError as exc:  # --size beyond what the embedded photographs give (checked in _check_inputs too)
        print(f"{PROG}: error: --size: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if args.realism_images is not None:
        realism = read["realism_images"]
        problem = _check_realism_sizes({tuple(im.image.shape[-2:]) for im in images}, realism)
        if problem:
            print(f"{PROG}: error: --realism-images: {problem}", file=sys.stderr)
            return EXIT_USAGE
    print(f"images: {source}", flush=True)

    filter_name = None if args.filter == "none" else args.filter
    baselines = default_baselines(None if args.no_autoencoder else model, filter_name)
    if isinstance(lpips, LPIPSMetric):
        lpips = lpips.to(refiners[0][1].device)
    started = time.perf_counter()
    try:
        result = run_sweep(
            refiners,
            images,
            degradations,
            args.start_t,
            args.seeds,
            baselines=baselines,
            ddim_steps=args.ddim_steps,
            eta=args.eta,
            batch_size=args.batch_size,
            lpips=lpips,
            inception=inception,
            realism_reference=realism,
            n_examples=args.examples,
            region_modes=region_modes,
            whole_image=not args.region_only,
            round_trip=None if args.no_autoencoder else autoencoder_baseline(model),
            progress=sys.stderr.isatty(),
        )
    except ValueError as exc:
        print(f"{PROG}: error: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    seconds = time.perf_counter() - started
    # LPIPS skipped on images too small for its backbone: the cells read "skipped", the reason goes with the notes
    small = {str(v) for row in result.rows for k, v in row.items() if k.startswith("lpips") and isinstance(v, Skipped)}
    result.notes.extend(sorted(small - set(result.notes)))
    parameters = {k: v for k, v in vars(args).items()}
    parameters["checkpoints"] = {name: [c.as_dict(r.num_timesteps) for c in r.checkpoints] for name, r in refiners}
    paths = write_report(result, args.outdir, parameters, title=f"{args.name}: {source}")

    print(f"\n{format_table(summarize(result))}\n")
    for note in result.notes:
        print(f"note: {note}")
    print(f"{len(result.rows)} rows in {seconds:.1f} s; wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    return EXIT_OK


MAX_SYNTHETIC_IMAGES = 4096  # every case is kept in memory with its outputs (held-out crops of the photographs too)
DEFAULT_N_IMAGES = 8
DEFAULT_CROP_SEED = 0
VQ_DEGRADATIONS = ("vq_roundtrip", "local_vq")  # they round-trip through a VQ: by default the refiner's own


def _image_folder_problem(folder: str, outdir: str) -> str | None:
    """Why ``folder`` cannot be an image folder (missing, not a folder, no images, the output folder: one line), or
    None.  Lists the folder's names (as :func:`~ldm.eval.sources.folder_image_paths` does later) without reading any
    image."""
    from ldm import imageio
    from ldm.eval.sources import folder_image_paths

    root = Path(folder)
    if not root.is_dir():
        return f"image folder {imageio.format_path(root)} does not exist or is not a folder; pass a folder of images"
    if os.path.realpath(root) == os.path.realpath(outdir):  # its figures would be read as images by the next run
        return (
            f"{imageio.format_path(root)} is also --outdir: the report's figures (curves.png, examples.png, ...) would "
            "be evaluated as images by the next run; choose another --outdir (a folder inside it is left out of it)"
        )
    paths, left_out = folder_image_paths(folder, outdir)
    if left_out and not paths:
        return (
            f"every image under {imageio.format_path(root)} lies in --outdir {imageio.format_path(outdir)}, whose files "
            "are left out; pass a folder of images outside --outdir"
        )
    if not paths:
        problems = imageio.find_images([root])[1]
        return ("; ".join(problems) or f"no images under {imageio.format_path(root)}") + "; pass a folder of images"
    return None


def _check_unused_flags(args: argparse.Namespace) -> str | None:
    """Why a flag given would have no effect (one line), or None: the held-out flags with a folder of images, and what
    degrades or needs a clean reference with --no-reference (they were silently ignored)."""
    source = "--images" if args.images is not None else "--no-reference" if args.no_reference is not None else None
    held_out = [f for f in ("n_images", "size", "crop_seed") if getattr(args, f) is not None]
    if source and held_out:
        flag = "--" + held_out[0].replace("_", "-")
        return (
            f"{flag} only applies to the held-out crops (or --synthetic images), not to the images of {source}, which "
            f"are evaluated as they are; leave out {flag}"
        )
    if args.no_reference is not None:
        if args.degradations is not None:
            return "--degradations does not apply to --no-reference images (degraded already, no clean version); leave it out"
        if args.inception_weights is not None:
            return "--inception-weights: FID/KID need clean references, which --no-reference images lack; leave it out"
    return None


def _fill_in_defaults(args: argparse.Namespace) -> None:
    """The defaults of the flags :func:`_check_unused_flags` tells from given (None there), as sweep.json records them."""
    from ldm.eval.sweep import DEFAULT_DEGRADATIONS

    args.n_images = DEFAULT_N_IMAGES if args.n_images is None else args.n_images
    args.crop_seed = DEFAULT_CROP_SEED if args.crop_seed is None else args.crop_seed
    args.degradations = list(DEFAULT_DEGRADATIONS) if args.degradations is None else args.degradations


def _check_inputs(args: argparse.Namespace) -> str | None:
    """Why a path or number flag cannot work (one line), or None; before any model is loaded, so that a mistyped
    folder or an impossible number costs nothing (they failed after both models had loaded, or in the sweep)."""
    from ldm.data.embedded import heldout_crops
    from ldm.imageio import format_path
    from ldm.refine.request import MAX_SEED

    for flag, folder in (
        ("--images", args.images),
        ("--no-reference", args.no_reference),
        ("--realism-images", args.realism_images),
    ):
        problem = None if folder is None else _image_folder_problem(folder, args.outdir)
        if problem:
            return f"{flag}: {problem}"
    for flag, path in (
        ("--config", args.config),
        ("--lpips-weights", args.lpips_weights),
        ("--inception-weights", args.inception_weights),
    ):
        if path is not None and not Path(path).is_file():
            what = "is a folder" if Path(path).is_dir() else "does not exist"
            return f"{flag} {format_path(path)} {what}; pass the path of the file, or leave {flag} out"
    for flag, values in (("--seeds", args.seeds), ("--degradations", args.degradations), ("--start-t", args.start_t)):
        twice = sorted({v for v in values if values.count(v) > 1}, key=values.index)
        if twice:  # the same cases again: n doubles and the intervals narrow with no new evidence
            return f"{flag}: {twice[0]} is given more than once; give each value once"
    too_late = [t for t in args.start_t if t > NUM_TIMESTEPS - 1]
    if too_late:
        return f"--start-t: start_t={too_late[0]} must be an integer in [1, {NUM_TIMESTEPS - 1}]"
    if args.ddim_steps > NUM_TIMESTEPS:
        return f"--ddim-steps: ddim_steps={args.ddim_steps} must be an integer in [1, {NUM_TIMESTEPS}]"
    too_large = [s for s in args.seeds if s > MAX_SEED]
    if too_large:
        return f"--seeds: seed={too_large[0]} must be an integer in [0, {MAX_SEED}]"
    if args.images is None and args.no_reference is None and not args.synthetic:  # held-out crops of the photographs
        if args.n_images > MAX_SYNTHETIC_IMAGES:
            return (
                f"--n-images {args.n_images}: at most {MAX_SYNTHETIC_IMAGES} held-out crops (every case is kept in "
                "memory with its outputs); pass a folder of your own with --images for a larger set"
            )
        if args.size is not None:
            try:
                heldout_crops(args.size, 0)  # checks the size, crops nothing
            except ValueError as exc:
                return f"--size: {one_line_error(exc)}"
    return None


def _prebuild(spec: str) -> Any:
    """The degradation of ``spec`` (:class:`ldm.eval.sweep.SweepDegradation`), or None for one that round-trips through
    the refiner's own first stage, which is built after loading (its parameters are checked now, on a stand-in).
    Raises what :func:`ldm.eval.sweep.build_sweep_degradation` raises."""
    from types import SimpleNamespace

    from ldm.eval.sweep import build_sweep_degradation

    stand_in = SimpleNamespace(encode=None, decode=None, quantize=SimpleNamespace(embedding=None))  # what VQRoundTrip
    built = build_sweep_degradation(spec, stand_in)  # looks for on a first stage
    inner = getattr(built.degradation, "inner", built.degradation)
    return None if getattr(inner, "first_stage", None) is stand_in else built


def _check_vq_first_stage(args: argparse.Namespace, specs: list[str], model: Any) -> str | None:
    """Why ``specs`` (vq_roundtrip / local_vq on the refiner's own first stage) cannot run on ``model`` (one line), or
    None: a pixel-space checkpoint (IdentityFirstStage) or any first stage without a VQ codebook has nothing to
    round-trip through."""
    from ldm.eval.sweep import DEFAULT_DEGRADATIONS

    first_stage = model.first_stage_model
    if not specs or hasattr(getattr(first_stage, "quantize", None), "embedding"):
        return None
    kind = type(first_stage).__name__
    what = (
        f"a pixel-space model (its first stage is {kind}, no VQ)"
        if kind == "IdentityFirstStage"
        else f"a model whose first stage ({kind}) has no VQ codebook"
    )
    default = " (one of the default --degradations)" if list(args.degradations) == list(DEFAULT_DEGRADATIONS) else ""
    return (
        f"--degradations {specs[0]!r}{default} round-trips through the refiner's own VQ first stage, but "
        f"{args.ckpt[0]} is {what}; pass --degradations without {' and '.join(VQ_DEGRADATIONS)}, or give them a VQ "
        "with first_stage=<VQ config.yaml>"
    )


def _check_methods(args: argparse.Namespace) -> str | None:
    """Why the method names or --region-modes cannot work (one line), or None; before any model is loaded."""
    from ldm.eval.local_degrade import LOCAL_DEGRADATIONS
    from ldm.eval.sweep import REGION_MODES

    modes = ["region"] if args.region_modes is None else list(dict.fromkeys(args.region_modes))
    local_names = [cls.name for cls in LOCAL_DEGRADATIONS]
    has_local = args.no_reference is None and any(spec.partition(":")[0].strip() in local_names for spec in args.degradations)
    if args.region_modes and not has_local:
        why = "--no-reference images have no masks" if args.no_reference is not None else "none of --degradations is"
        return (
            f"--region-modes {' '.join(args.region_modes)} only applies to local degradations "
            f"({', '.join(local_names)}), but {why}; add one or leave out --region-modes"
        )
    if args.synthetic:
        from ldm.data.synthetic import MAX_SIZE, MAX_STREAM, VALIDATION_STREAM

        if args.crop_seed + 1 >= min(VALIDATION_STREAM, MAX_STREAM) or args.n_images > MAX_SYNTHETIC_IMAGES:
            return (
                f"--synthetic: --crop-seed must be below {VALIDATION_STREAM - 1} (the validation split's streams "
                f"start there, the realism reference uses the next one) and --n-images at most {MAX_SYNTHETIC_IMAGES}"
            )
        if args.size is not None and not 8 <= args.size <= MAX_SIZE:
            return f"--synthetic --size {args.size}: synthetic images are 8 to {MAX_SIZE} px"
    all_local = all(spec.partition(":")[0].strip() in local_names for spec in args.degradations)
    if args.region_only and (args.no_reference is not None or not modes or not all_local):
        return (
            "--region-only refines only inside the boxes of local degradations: give only local --degradations "
            f"({', '.join(local_names)}), no --no-reference, and keep a region mode"
        )
    for flag, label in (("--name", args.name), ("--compare-name", args.compare_name)):
        if not label.strip() or "|" in label or not label.isprintable():
            return f"{flag} {label!r}: a method name needs a visible character, and no '|' or control characters (tables)"
    refiners = [args.name] + ([args.compare_name] if args.compare_ckpt else [])
    names = refiners + ["identity"] + ([] if args.filter == "none" else [args.filter])
    names += [] if args.no_autoencoder else ["autoencoder"]
    names += [name + REGION_MODES[m] for name in refiners for m in modes] if has_local else []
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        return (
            f"method names {twice} are used twice (--name {args.name!r}, --compare-name {args.compare_name!r}, "
            f"baselines, region modes); choose distinct names"
        )
    return None


def _check_realism_sizes(evaluated: set[tuple[int, ...]], realism: list) -> str | None:
    """Why the realism images cannot serve as the SWD reference of images of the sizes ``evaluated`` (one line), or
    None."""
    from ldm.eval.swd import PATCH_SIZE

    sizes = {tuple(im.image.shape[-2:]) for im in realism}
    if len(sizes) > 1 or sizes != evaluated:
        return (
            f"the realism images must all have the evaluated images' size, got sizes (H, W) {sorted(sizes)} "
            f"against {sorted(evaluated)}; crop or resize them to one size"
        )
    if min(next(iter(sizes))) < PATCH_SIZE:
        return f"SWD needs images of at least {PATCH_SIZE}x{PATCH_SIZE} px, got {next(iter(sizes))}"
    return None


if __name__ == "__main__":
    run_script(main, PROG)
