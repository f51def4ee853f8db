#!/usr/bin/env python
"""Convert diffusers LDM / Stable Diffusion v1 folders to this project's checkpoints, and experts back to diffusers.

    python scripts/convert_diffusers.py --from-diffusers ldm-celebahq-256/ --out models/ldm/celebahq.ckpt
    python scripts/convert_diffusers.py --to-diffusers logs/<run>/checkpoints/last.ckpt --out exported/latesteps_750_1000
    python scripts/convert_diffusers.py --from-diffusers stable-diffusion-v1-5/ --out models/ldm/sd15.ckpt

--from-diffusers reads an unconditional LDM folder (unet/ UNet2DModel, vqvae/ VQModel, scheduler/ DDIM or DDPM
config) or a Stable Diffusion v1 folder (model_index.json naming a text encoder: unet/ UNet2DConditionModel, vae/
AutoencoderKL, text_encoder/ CLIPTextModel, tokenizer/ CLIPTokenizer, scheduler/ PNDM, DDIM, ... config; the kind is
read from the folder) and writes a checkpoint with its embedded config: a full-range expert for scripts/refine.py
--ckpt (with --prompt for SD), or the init of a window model (model.params.ckpt_path=).  An SD checkpoint's text encoder
reads its tokenizer and config from the diffusers folder (absolute path; or --clip-dir), which must stay.
--to-diffusers writes an expert checkpoint (EMA weights by default) as a folder that diffusers' from_pretrained loads
(LDMPipeline, or StableDiffusionPipeline for an SD v1-shaped expert), with the window in unet/config.json
("_latesteps_window").  SD 2.x, SDXL, v-prediction and inpainting folders are refused.  Nothing is downloaded; the
output must not exist and appears complete or not at all.  This file only parses arguments and prints; the work is
in ldm.convert.diffusers.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from ldm.cli import EXIT_USAGE, OneLineParser, decimal_float, one_line_error, path_arg, run_script

EXIT_OK = 0
EXIT_OUTPUT = 3  # the output cannot be written (permission, disk full)

PROG = "convert_diffusers.py"
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth")
EPILOG = f"""
exit codes: {EXIT_OK} written; {EXIT_USAGE} bad arguments, folder or checkpoint (nothing written); {EXIT_OUTPUT} the
output cannot be written.
"""


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        value = decimal_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line (bad arguments exit with code 2 in one line, before anything is read)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-diffusers", metavar="DIR", type=path_arg, help="diffusers LDM folder to convert into a checkpoint")
    way.add_argument("--to-diffusers", metavar="CKPT", type=path_arg, help="expert checkpoint to write as a diffusers folder")
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        type=path_arg,
        help="the checkpoint (.ckpt/.pt/.pth) or folder to create; must not exist",
    )
    p.add_argument(
        "--scale-factor",
        type=positive_float,
        metavar="S",
        help="--from-diffusers: the latent scale, overriding vqvae/config.json's scaling_factor "
        "(default: that value, else 1.0 as in CompVis' VQ LDMs)",
    )
    p.add_argument(
        "--clip-dir",
        metavar="DIR",
        type=path_arg,
        help="--from-diffusers of a Stable Diffusion folder: the local CLIP folder (tokenizer + text "
        "config.json, or a diffusers folder with tokenizer/ and text_encoder/) that the checkpoint's "
        "text encoder reads (default: the diffusers folder itself, by absolute path)",
    )
    p.add_argument(
        "--config", metavar="YAML", help="--to-diffusers: model config for checkpoints that carry none (e.g. CompVis releases)"
    )
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--to-diffusers: export the EMA weights when the checkpoint has them (default: on)",
    )
    p.add_argument(
        "--trust-config",
        action="store_true",
        help="--to-diffusers: let a config stored in the checkpoint build classes outside ldm.*",
    )
    p.add_argument(
        "--unsafe-load",
        action="store_true",
        help="unpickle arbitrary objects (.bin weights, .ckpt files): can run code, only for files you trust",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return p


def _err(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 written, 2 bad arguments/input, 3 output not writable)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    )
    if os.path.lexists(args.out):
        parser.error(f"--out {args.out} already exists; choose a new path (nothing is overwritten)")
    if args.from_diffusers is not None:
        if args.config is not None or args.trust_config or not args.ema:
            parser.error("--config, --trust-config and --no-ema apply to --to-diffusers only")
        if args.clip_dir is not None and not os.path.isdir(args.clip_dir):
            parser.error(
                f"--clip-dir {args.clip_dir} is not a folder; pass a local folder with the CLIP tokenizer and "
                "text config.json (or a diffusers folder with tokenizer/ and text_encoder/)"
            )
        if not args.out.endswith(CKPT_SUFFIXES):
            parser.error(
                f"--out {args.out} must end with one of {', '.join(CKPT_SUFFIXES)} (a checkpoint that keeps "
                "its embedded config)"
            )
        return _from_diffusers(args)
    if args.scale_factor is not None:
        parser.error("--scale-factor applies to --from-diffusers only (an export writes the model's own scale_factor)")
    if args.clip_dir is not None:
        parser.error("--clip-dir applies to --from-diffusers only (an export writes the model's own tokenizer)")
    return _to_diffusers(args)


def _from_diffusers(args: argparse.Namespace) -> int:
    from ldm.checkpoint import CheckpointError, save_checkpoint
    from ldm.convert.diffusers import diffusers_to_checkpoint
    from ldm.models.diffusion.latesteps import window_to_steps

    try:
        ckpt = diffusers_to_checkpoint(
            args.from_diffusers, scale_factor=args.scale_factor, unsafe_load=args.unsafe_load, clip_dir=args.clip_dir
        )
    except (CheckpointError, ValueError, OSError) as exc:  # DiffusersFormatError is a CheckpointError
        _err(one_line_error(exc))
        return EXIT_USAGE
    try:
        save_checkpoint(ckpt, args.out)
    except OSError as exc:
        _err(f"cannot write {args.out}: {one_line_error(exc)}")
        return EXIT_OUTPUT
    cfg = ckpt["config"]["model"]
    params = cfg["params"]
    window = ckpt.get("window") or [0, params["timesteps"]]
    a, b = window_to_steps(window[0], window[1], params["timesteps"])
    cond = params.get("cond_stage_config")
    text = (
        f", text-conditioned (CLIP tokenizer and config read from {cond['params']['version']}, which must stay)"
        if isinstance(cond, dict)
        else ""
    )
    print(
        f"wrote {args.out}: {cfg['target'].rsplit('.', 1)[-1]}, window t in [{window[0]}, {window[1]}) = steps {a}-{b} "
        f"of T={params['timesteps']}, scale_factor {params['scale_factor']:g}{text}, from "
        f"{ckpt['converted_from']['folder']} (sha256 {ckpt['converted_from']['sha256'][:12]})"
    )
    return EXIT_OK


def _to_diffusers(args: argparse.Namespace) -> int:
    from ldm.checkpoint import CheckpointError
    from ldm.convert.common import DiffusersFormatError
    from ldm.convert.diffusers import checkpoint_to_diffusers
    from ldm.util import ConfigError

    try:
        out, info = checkpoint_to_diffusers(
            args.to_diffusers,
            args.out,
            config=args.config,
            ema=args.ema,
            trust_config=args.trust_config,
            unsafe_load=args.unsafe_load,
        )
    except (CheckpointError, ConfigError, DiffusersFormatError, FileExistsError) as exc:
        _err(one_line_error(exc))
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno is None:  # a loader's words about an input (a CLIP folder that is gone), not the OS writing
            _err(one_line_error(exc))
            return EXIT_USAGE
        _err(f"cannot write {args.out}: {one_line_error(exc)}")
        return EXIT_OUTPUT
    except ValueError as exc:  # a model's own argument checks while building it from the checkpoint's config
        _err(one_line_error(exc))
        return EXIT_USAGE
    print(
        f"wrote {out}: {info.target.rsplit('.', 1)[-1]} from {info.path} ({'EMA' if info.ema else 'training'} "
        f"weights), window t in [{info.window[0]}, {info.window[1]})"
    )
    return EXIT_OK


if __name__ == "__main__":
    run_script(main, PROG)
