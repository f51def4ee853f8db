#!/usr/bin/env python
"""Encode a training set once with a window config's frozen first stage and write the latents as tar shards.

    python scripts/cache_latents.py --config configs/latesteps_500_750.yaml --data data/train --out cache/train
    python scripts/cache_latents.py --config configs/quickstart/latesteps_500_750.yaml --data data/train --out cache/x \
        model.params.first_stage_config.params.ckpt_path=outputs/quickstart/checkpoints/vq_f4.ckpt
    python scripts/cache_latents.py --config cfg.yaml --data 'shards/train-{000000..000999}.tar' --out cache/train
    torchrun --nproc-per-node 8 scripts/cache_latents.py --config cfg.yaml --data data/train --out cache/train

Training then reads the cache instead of the images (the model skips its encoder; a cache of another first stage is
refused): ``data.params.train: {target: ldm.data.cached_latents.CachedLatents, params: {root: cache/train}}``, or
``ldm.data.shard_stream.LatentShards`` to stream it on many nodes.  Each image is stored as its --crops fixed crops
(1: the centre crop) and, with --flip, their mirror images; see ldm/data/latent_cache_writer.py for why and for the
layout.  A killed run continues where it stopped when started again with the same arguments (finished shards are
kept; a shard is never half-written).  Under torchrun (or SLURM: SLURM_PROCID / SLURM_NTASKS) process r encodes
shards r, r + N, ...; the process that finishes last writes index.json.

``key=value`` overrides and ``~key`` deletions apply to the merged --config files exactly as in ``main.py`` (same
parser, same checks: a misspelled key stops the script in one line, exit 2, before anything is written).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ldm.cli import EXIT_USAGE, OneLineParser, decimal_float, int_at_least, int_in_range, one_line_error, path_arg, run_script

EXIT_OK = 0
EXIT_INPUT_FAILED = 1  # some inputs were unreadable (skipped; the cache holds the others) or there were none
EXIT_OUTPUT = 3  # the output folder cannot be written

PROG = "cache_latents.py"
EPILOG = f"""
exit codes: {EXIT_OK} done; {EXIT_INPUT_FAILED} some inputs were unreadable (each logged and listed in its shard's .json
sidecar; the cache holds the others) or no input was found; {EXIT_USAGE} bad arguments or config, or --out holds a cache
made with other settings, or --out is a folder that is not a cache or would overwrite an input (nothing done);
{EXIT_OUTPUT} the output folder cannot be written.
"""


def fraction(text: str) -> float:
    """An argparse ``type`` for --val-fraction: a number in [0, 1)."""
    try:
        value = decimal_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must lie in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line (bad arguments exit with code 2 in one line, before any model is loaded)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument(
        "--config",
        nargs="+",
        required=True,
        metavar="YAML",
        help="window config(s), merged left to right: model.params.first_stage_config encodes; the defaults "
        "of --size/--split/--val-fraction/--flip come from its data.params.train.params",
    )
    p.add_argument(
        "--data",
        required=True,
        type=path_arg,
        metavar="PATH",
        help="a folder of images (searched recursively) or tar shards (brace pattern, e.g. "
        "'shards/train-{000000..000099}.tar')",
    )
    p.add_argument(
        "--out",
        required=True,
        type=path_arg,
        metavar="DIR",
        help="the cache folder (created; resumed if it holds a plan; refused if it holds other files or an input)",
    )
    p.add_argument("--split", choices=("train", "validation", "all"), help="folder split (default: the config's, else train)")
    p.add_argument(
        "--val-fraction",
        type=fraction,
        metavar="F",
        help="folder validation fraction, as the config's image dataset (default: its value, else 0.05)",
    )
    p.add_argument(
        "--size",
        type=int_in_range(1, 4096, "a batch of crops is held in memory; 4096 px is far above any expert's training size"),
        metavar="PX",
        help="crop side (default: the config's crop size)",
    )
    p.add_argument(
        "--crops",
        type=int_in_range(1, 256, "every crop of an image is held in memory at once"),
        default=1,
        metavar="N",
        help="crops per image: 1 = centre crop, N = evenly spaced along the long side (default: %(default)s)",
    )
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also store each crop's mirror image (default: the config's flip, else on)",
    )
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage (default: %(default)s)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="images per encoder call (default: %(default)s)")
    p.add_argument(
        "--shard-size",
        type=int_at_least(1),
        default=1000,
        help="images per output shard for a folder; shard inputs keep their shards (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU (default: %(default)s)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides as in main.py, applied after the --config files (e.g. "
        "model.params.first_stage_config.params.ckpt_path=outputs/quickstart/checkpoints/vq_f4.ckpt); "
        "~key deletes a key",
    )
    return p


def parse_args(argv: list[str] | None):
    """``(args, None)``, or ``(None, message)`` for overrides that are not ``key=value`` / ``~key``; ``args.overrides``
    collects them wherever they stand (argparse puts those right after --config into its list of files)."""
    from ldm.train.cli import CLIError, check_dotlist_tokens, split_dotlist

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.config, moved = split_dotlist(args.config)
    args.overrides = [*moved, *args.overrides, *unknown]
    try:
        check_dotlist_tokens(args.overrides, [s for a in parser._actions for s in a.option_strings], "--config")
    except CLIError as exc:
        return None, f"{exc} (see --help)"
    if not args.config:
        return None, "--config needs at least one YAML file (key=value overrides come in addition)"
    return args, None


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's RANK / WORLD_SIZE or SLURM's SLURM_PROCID / SLURM_NTASKS, else (0, 1)."""
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if size_var in os.environ:
            try:
                rank, world = int(os.environ.get(rank_var, "0")), int(os.environ[size_var])
            except ValueError:
                raise ValueError(
                    f"{rank_var}/{size_var} must be integers (got {os.environ.get(rank_var)!r}/{os.environ[size_var]!r})"
                ) from None
            if not 0 <= rank < world:
                raise ValueError(f"{rank_var}={rank} must lie in [0, {size_var}={world})")
            return rank, world
    return 0, 1


def load_config(paths: list[str], overrides: list[str] = ()):
    """The merged configs with the overrides applied (OmegaConf, merged by main.py's rules:
    :func:`ldm.train.cli.merge_configs`) and the train dataset's params (a dict, empty when there are none)."""
    from omegaconf import OmegaConf

    from ldm.train.cli import merge_configs
    from ldm.util import ConfigError

    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path} does not exist or is not a file")
    config = merge_configs(paths, list(overrides))
    first_stage = OmegaConf.select(config, "model.params.first_stage_config")
    if first_stage is None or "target" not in first_stage:
        raise ConfigError(f"--config {' '.join(paths)} has no model.params.first_stage_config {{target, params}}")
    train = OmegaConf.select(config, "data.params.train.params")
    train = OmegaConf.to_container(train, resolve=True) if train is not None else {}
    return config, OmegaConf.to_container(first_stage, resolve=True), dict(train) if isinstance(train, dict) else {}


def check_data_and_out(args: argparse.Namespace):
    """What --data reads, once it is checked that --out may be written (see ``check_output_folder``): returns the
    folder's scanned image list (None for shards) for ``plan_units``.  Runs before the model is loaded."""
    from ldm.data.latent_cache_writer import check_output_folder, source_inputs
    from ldm.util import ConfigError

    if not os.path.isdir(args.data) and (args.split is not None or args.val_fraction is not None):
        raise ConfigError("--split/--val-fraction select files of an image folder; shards are cached whole")
    if os.path.isfile(args.data) and not args.data.lower().endswith(".tar"):  # it was read as a tar shard, to no image
        raise ConfigError(f"--data {args.data} is a file but not a .tar shard: pass the folder that holds the images")
    inputs, scanned = source_inputs(args.data)
    check_output_folder(Path(args.out), inputs)
    return scanned


def resolve_settings(args: argparse.Namespace, config, train: dict, factor: int):
    """The cache's settings from the arguments, the config's train dataset params and ImageFolderDataset's defaults."""
    from ldm.data.latent_cache_writer import CacheSettings
    from ldm.util import ConfigError

    folder = os.path.isdir(args.data)
    image_size = config.model.params.get("image_size")
    size = args.size or train.get("size") or (int(image_size) * factor if image_size else None)
    if size is None:
        raise ConfigError(
            "the crop size is unknown: pass --size (the config sets neither data...train.params.size nor "
            "model.params.image_size)"
        )
    if int(size) % factor:
        raise ConfigError(f"--size {size} must be a multiple of the first stage's downsampling factor {factor}")
    return CacheSettings(
        source=str(Path(args.data).resolve()) if folder else args.data,
        split=args.split or (train.get("split", "train") if folder else "all"),
        val_fraction=float(args.val_fraction if args.val_fraction is not None else train.get("val_fraction", 0.05))
        if folder
        else 0.0,
        split_seed=int(train.get("split_seed", 0)) if folder else 0,
        size=int(size),
        min_side_resize=bool(train.get("min_side_resize", True)),
        n_crops=args.crops,
        flip=bool(args.flip if args.flip is not None else train.get("flip", True)),
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see EPILOG: 0, 1 unreadable inputs, 2 usage, 3 output)."""
    args, problem = parse_args(argv)
    if problem:
        _err(f"error: {problem}")
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    )
    import numpy as np
    import torch
    from tqdm import tqdm

    from ldm.checkpoint import CheckpointError
    from ldm.data.latent_cache_writer import (
        claim_plan,
        encode_crops,
        plan_document,
        plan_units,
        read_sidecar,
        write_index_if_complete,
        write_unit,
    )
    from ldm.data.latent_format import first_stage_sha256
    from ldm.refine.loading import resolve_device
    from ldm.util import ConfigError, instantiate_from_config, remove_stale_temp_files

    out = Path(args.out)
    try:
        rank, world = process_rank()
        config, first_stage_cfg, train = load_config(args.config, args.overrides)
        scanned = check_data_and_out(args)  # before any work: nothing loaded, nothing written
        if first_stage_cfg.get("params", {}).get("ckpt_path") is None:
            logging.getLogger(PROG).warning("first_stage_config has no ckpt_path: encoding with random weights")
        device_name = args.device
        if device_name != "cpu" and world > 1 and torch.cuda.is_available():
            device_name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per process of the node
        device = resolve_device(device_name)
        first_stage = instantiate_from_config(first_stage_cfg).eval().to(device)
        factor = int(getattr(first_stage, "downsampling_factor", 1))
        settings = resolve_settings(args, config, train, factor)
        units, digest = plan_units(settings, scanned)
        sha256 = first_stage_sha256(first_stage)
        probe = encode_crops(first_stage, np.zeros((1, settings.size, settings.size, 3), np.uint8), device)
        latent_shape = tuple(int(v) for v in probe.shape[1:])
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        _err(f"error: {one_line_error(exc)}")
        return EXIT_USAGE
    try:
        out.mkdir(parents=True, exist_ok=True)
        claim_plan(out, plan_document(settings, sha256, latent_shape, len(units), digest))
        mine = [u for u in units if u.index % world == rank]
        remove_stale_temp_files(out, names=[f"{u.name}{ext}" for u in mine for ext in (".tar", ".json")])
        todo = [u for u in mine if read_sidecar(out, u) is None]
    except ConfigError as exc:
        _err(f"error: {one_line_error(exc)}")
        return EXIT_USAGE
    except OSError as exc:
        _err(f"error: output folder {out}: {one_line_error(exc)}")
        return EXIT_OUTPUT
    logging.getLogger(PROG).info(
        "rank %d/%d: %d of my %d shards to write (%d shards in all)", rank, world, len(todo), len(mine), len(units)
    )
    known = all(u.url is None for u in todo)
    bar = tqdm(
        total=sum(len(u.files) for u in todo) if known else None,
        unit="img",
        disable=rank != 0,
        desc=f"{PROG} rank {rank}",
        dynamic_ncols=True,
    )
    try:
        with bar:
            for unit in todo:
                write_unit(unit, out, first_stage, settings, sha256, device, advance=bar.update)
        done = [read_sidecar(out, u) for u in mine]
        skipped_mine = sum(len(s["skipped"]) for s in done if s)
        index = write_index_if_complete(out, units, settings, sha256, latent_shape)
    except OSError as exc:
        _err(f"error: output folder {out}: {one_line_error(exc)}")
        return EXIT_OUTPUT
    except (MemoryError, torch.OutOfMemoryError) as exc:  # finished shards are kept: a smaller --batch-size resumes
        _err(f"error: out of memory encoding {settings.size} px crops {args.batch_size} at a time ({one_line_error(exc)}); "
             "lower --batch-size and run the same command again")  # fmt: skip
        return EXIT_OUTPUT
    if index is None:
        print(
            f"rank {rank}: my {len(mine)} shards are done ({skipped_mine} unreadable inputs); index.json is written by "
            "the last process to finish",
            flush=True,
        )
    else:
        print(
            f"wrote {index.num_samples} latents ({index.variants} variant(s) of {'x'.join(map(str, latent_shape))} "
            f"{settings.dtype} each) in {len(index.shards)} shard(s) to {out}; {index.skipped} input(s) unreadable; "
            f"first stage sha256 {sha256}",
            flush=True,
        )
        if index.num_samples == 0:
            _err(f"error: no readable image in {args.data}")
            return EXIT_INPUT_FAILED
    return EXIT_INPUT_FAILED if skipped_mine else EXIT_OK


if __name__ == "__main__":
    run_script(main, PROG)
