#!/usr/bin/env python
"""Degrade a folder of clean images with one seeded artifact family, to build paired evaluation data.

    python scripts/degrade.py --input clean/ --output jpeg15/ --degradation "jpeg:quality=15" --seed 0
    python scripts/degrade.py --list

Every image under --input (recursive, hidden files skipped) is written to --output as PNG with the same relative
layout (a/b.jpg -> a/b.png), carrying the PNG text keys ``degradation`` (its full spec) and ``degradation_seed``.  Each
file's seed derives from --seed and its relative path, so a file's output does not depend on the other files.
``vq_roundtrip`` needs ``first_stage=<config.yaml>`` here (scripts/evaluate.py can use the refiner's own first stage).
This file only parses arguments and prints; the work is in ldm.eval.degrade_files.degrade_folder.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.cli import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    OneLineParser,
    check_outdir,
    int_at_least,
    one_line_error,
    path_arg,
    run_script,
)

EXIT_OK = 0
EXIT_INPUT = 1  # no such folder, no images, an unreadable image, or a write that failed (disk full)

PROG = "degrade.py"


def build_parser() -> argparse.ArgumentParser:
    """The command line (bad arguments exit with code 2 in one line, before any image is read)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--input", metavar="DIR", type=path_arg, help="folder of clean images")
    p.add_argument(
        "--output",
        metavar="DIR",
        type=path_arg,
        help="folder for the degraded PNGs (not inside --input; above it only where no output would land inside it)",
    )
    p.add_argument(
        "--degradation",
        metavar="SPEC",
        help="name or name:key=value,... (e.g. jpeg:quality=15, blur_noise:sigma=2,noise_std=0.1); see --list",
    )
    p.add_argument("--seed", type=int_at_least(0), default=0, help="run seed (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="print the degradations and their parameters, then exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 done, 1 unreadable/refused input, 2 bad arguments, spec or output folder,
    130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    )
    from ldm.eval.degrade import DEGRADATIONS, describe_degradation

    if args.list:
        for name in sorted(DEGRADATIONS):
            print(describe_degradation(name))
        return EXIT_OK
    missing = [
        flag
        for flag, value in (("--input", args.input), ("--output", args.output), ("--degradation", args.degradation))
        if value is None
    ]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    problem = check_outdir(args.output)  # a file, a link loop or a read-only folder in the way: before any image is read
    if problem:
        print(f"{PROG}: error: --output: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the images written so far are complete (every write is atomic)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    """:func:`main` after parsing: builds the degradation and degrades the folder."""
    from ldm.eval.degrade import degradation_from_spec
    from ldm.eval.degrade_files import DegradeFolderError, degrade_folder
    from ldm.imageio import ImageLoadError, ImageSaveError

    try:
        degradation = degradation_from_spec(args.degradation)
    except (KeyError, TypeError, ValueError, OSError) as exc:  # ConfigError, CheckpointError: ValueErrors
        print(f"{PROG}: error: --degradation {args.degradation!r}: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    failed: list[str] = []

    def report(line: str) -> None:  # an image that cannot be read or degraded: named, and the others go on
        failed.append(line)
        print(f"{PROG}: error: {line}", file=sys.stderr)

    try:
        written = degrade_folder(args.input, args.output, degradation, seed=args.seed, on_error=report)
    except (ImageLoadError, ImageSaveError, OSError, DegradeFolderError) as exc:  # ImageLoadError: a ValueError
        print(f"{PROG}: error: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except ValueError as exc:  # --output inside --input, an output on an input, two inputs mapping to one output
        print(f"{PROG}: error: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    not_done = f"; {len(failed)} image(s) failed (above)" if failed else ""
    print(f"wrote {len(written)} images to {args.output} with {degradation.spec} (seed {args.seed}){not_done}")
    return EXIT_INPUT if failed else EXIT_OK


if __name__ == "__main__":
    run_script(main, PROG)
