"""Argument parsing shared by the scripts (``scripts/refine.py``, ``evaluate.py``, ``quickstart.py``, ``degrade.py``).

Bad arguments are answered in one line on stderr (``<prog>: error: <what> (see --help)``, no usage block) with exit
code :data:`EXIT_USAGE`, before any model or image is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_USAGE = 2  # bad arguments, checkpoint, config or degradation: nothing was done
EXIT_INTERRUPTED = 130  # Ctrl+C (128 + SIGINT, the shell's convention)


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code :data:`EXIT_USAGE`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def one_line_error(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed; a KeyError without the quotes ``str()`` adds),
    or its type name when it has none."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type`` that accepts decimal integers ``>= lo`` and names the bad value otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} must be >= {lo}")
        return value

    return parse


def int_in_range(lo: int, hi: int, why: str) -> Callable[[str], int]:
    """An argparse ``type`` that accepts decimal integers in ``[lo, hi]``; above ``hi`` the error says ``why`` (what the
    bound protects), below ``lo`` it reads as :func:`int_at_least`'s."""
    at_least = int_at_least(lo)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > hi:
            raise argparse.ArgumentTypeError(f"{value} must be <= {hi} ({why})")
        return value

    return parse


def unit_interval(text: str) -> float:
    """An argparse ``type`` for a number in ``(0, 1]`` (img2img's strength)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be a number in (0, 1]")
    return value


def box_arg(text: str):
    """An argparse ``type`` for ``x0,y0,x1,y1[@start_t]`` (:func:`ldm.refine.regions.parse_box`)."""
    from ldm.refine.regions import parse_box

    try:
        return parse_box(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ddim_eta(text: str) -> float:
    """An argparse ``type`` for DDIM's ``eta``: a finite number ``>= 0`` (0 = deterministic DDIM, 1 = DDPM-like)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (0 = deterministic DDIM)")
    return value


def add_loading_flags(p: argparse.ArgumentParser) -> None:
    """The flags every script that loads expert checkpoints shares: ``--allow-outside-window``, ``--trust-config``,
    ``--unsafe-load`` (one wording everywhere; ``Refiner.from_checkpoints`` takes the same three)."""
    p.add_argument("--allow-outside-window", action="store_true",
                   help="run the nearest expert on steps no expert window covers (warned) instead of refusing them "
                        "(evaluate.py: instead of skipping those start_t)")
    p.add_argument("--trust-config", action="store_true",
                   help="let a config stored in a checkpoint build classes outside ldm.* / taming.modules.*")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle arbitrary objects in checkpoints: can run code, only for files you trust")


def check_outdir(outdir: str | os.PathLike) -> str | None:
    """Why ``outdir`` cannot be used as an output folder (one line naming the path), or None; creates nothing.

    The folder or its nearest existing parent must be a folder this process can write into: a file in the way or a
    read-only parent is found before any work is done, not when the first output is written.
    """
    from ldm.imageio import format_path

    path = Path(os.path.abspath(outdir))
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == path else f" ({format_path(probe)} is a file)"
        return f"output folder {format_path(path)}: a file is in the way{where}"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"output folder {format_path(path)}: permission denied (cannot write to {format_path(probe)})"
    return None
