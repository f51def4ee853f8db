#!/usr/bin/env python
"""Export an expert checkpoint of main.py to one small .safetensors file for refinement (how weights/demo/ was made).

    python scripts/export_weights.py --ckpt logs/<run>/checkpoints/last.ckpt --out weights/mine/latesteps_750_1000.safetensors

The file holds the EMA weights in place of the training weights (the UNet's in fp16 by default: half their size;
loading casts them back), the model config rebuilt for inference, the window and the training step, and no optimizer state: what
refine.py --ckpt, the app and Refiner.from_checkpoints need, nothing to resume training from.  --out must not exist
and appears complete or not at all.  The work is in ldm.refine.shipped.export_expert.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ldm.cli import EXIT_USAGE, OneLineParser, one_line_error, path_arg, run_script

EXIT_OK = 0
EXIT_OUTPUT = 3  # the output cannot be written (permission, disk full)
PROG = "export_weights.py"
EPILOG = f"""
exit codes: {EXIT_OK} written; {EXIT_USAGE} bad arguments or checkpoint (nothing written); {EXIT_OUTPUT} the output
cannot be written.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line (bad arguments exit with code 2 in one line, before anything is read)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument("--ckpt", required=True, metavar="PATH", type=path_arg, help="expert checkpoint written by main.py")
    p.add_argument(
        "--out", required=True, metavar="PATH", type=path_arg, help="the .safetensors file to create; must not exist"
    )
    p.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        default="fp16",
        help="storage type of the UNet's parameters (the first stage stays as trained) (default: %(default)s)",
    )
    p.add_argument(
        "--trust-config",
        action="store_true",
        help="let the config stored in the checkpoint build classes outside ldm.* / taming.modules.*",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 written, 2 bad arguments or checkpoint, 3 output not writable)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    )
    if not args.out.endswith(".safetensors") or os.path.basename(args.out) == ".safetensors":
        parser.error(f"--out {args.out} must be a file name ending with .safetensors, e.g. expert.safetensors")
    if os.path.lexists(args.out):
        parser.error(f"--out {args.out} already exists; choose a new path (nothing is overwritten)")
    parent = os.path.dirname(args.out) or "."  # as written: x/../e.safetensors needs x too (nothing is created)
    if not os.path.isdir(parent):
        what = "is a file, not a folder" if os.path.exists(parent) else "does not exist"
        parser.error(f"--out {args.out}: {parent} {what}; choose an existing folder")
    from ldm.checkpoint import CheckpointError
    from ldm.refine.shipped import export_expert
    from ldm.util import ConfigError

    try:
        written = export_expert(args.ckpt, args.out, dtype=args.dtype, trust_config=args.trust_config)
    except (CheckpointError, ConfigError) as exc:
        print(f"{PROG}: error: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno is None:  # a loader's words about an input (a CLIP folder that is gone), not the OS writing
            print(f"{PROG}: error: {one_line_error(exc)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{PROG}: error: cannot write {args.out}: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_OUTPUT
    except ValueError as exc:  # a model's own argument checks while building it from the checkpoint's config
        print(f"{PROG}: error: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    window = written["window"]
    print(
        f"wrote {written['out']}: window t in [{window[0]}, {window[1]}), step {written['global_step']}, "
        f"{'EMA' if written['ema'] else 'training'} weights, {written['parameters'] / 1e6:.2f}M parameters (the "
        f"UNet's as {args.dtype}), {written['bytes'] / 2**20:.1f} MiB, sha256 {written['sha256']}"
    )
    return EXIT_OK


if __name__ == "__main__":
    run_script(main, PROG)
