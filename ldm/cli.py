"""Argument parsing shared by the scripts: a bad argument is one line on stderr (``<prog>: error: <what> (see --help)``)
and exit code :data:`EXIT_USAGE`, before any model or image is loaded."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_USAGE = 2  # bad arguments, checkpoint, config or degradation: nothing was done
EXIT_INTERRUPTED = 130  # Ctrl+C (128 + SIGINT, the shell's convention)


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code :data:`EXIT_USAGE`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        flag = re.match(r"argument (?:\S+/)?(--\S+): expected one argument$", message)
        if flag:  # argparse takes a value that starts with '-' (--box -1,0,8,8) for a flag
            message += f"; to give a value that starts with '-', attach it with '=': {flag.group(1)}=<value>"
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def run_script(main: Callable[[], int], prog: str) -> None:
    """``sys.exit(main())`` for a script's ``__main__``: Ctrl+C outside ``main``'s own handlers (while modules or models
    load) is one line, ``<prog>: interrupted``, and exit :data:`EXIT_INTERRUPTED`, not a traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        code = EXIT_INTERRUPTED
    sys.exit(code)


def one_line_error(exc: BaseException) -> str:
    """An exception's message on one line (a KeyError without the quotes ``str()`` adds), or its type name."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


_DECIMAL = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)


def decimal_int(text: str) -> int:
    """``text`` as a decimal integer of ASCII digits (an optional sign, surrounding spaces allowed); ValueError for
    anything else.  ``int()`` also reads other scripts' digits (``"５０"`` is 50) and underscores (``"1_0"`` is 10): a
    typo or a pasted full-width number would run with a value the user did not see."""
    if _DECIMAL.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not a decimal integer")
    return int(text, 10)


_DECIMAL_FLOAT = re.compile(
    r"\s*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)\s*", re.ASCII | re.IGNORECASE
)


def decimal_float(text: str) -> float:
    """``text`` as a number of ASCII digits (``0.5``, ``5e-1``; ``nan`` and ``inf`` too, which callers refuse in their
    own words); ValueError for anything else, for the reason given in :func:`decimal_int`."""
    if _DECIMAL_FLOAT.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not a decimal number")
    return float(text)


def int_arg(text: str) -> int:
    """An argparse ``type`` for :func:`decimal_int`."""
    try:
        return decimal_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type`` for decimal integers ``>= lo``."""

    def parse(text: str) -> int:
        value = int_arg(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} must be >= {lo}")
        return value

    return parse


def int_in_range(lo: int, hi: int, why: str) -> Callable[[str], int]:
    """An argparse ``type`` for decimal integers in ``[lo, hi]``; above ``hi`` the error says ``why``."""
    at_least = int_at_least(lo)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > hi:
            raise argparse.ArgumentTypeError(f"{value} must be <= {hi} ({why})")
        return value

    return parse


def float_arg(text: str) -> float:
    """An argparse ``type`` for :func:`decimal_float` (the caller checks the range)."""
    try:
        return decimal_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def unit_interval(text: str) -> float:
    """An argparse ``type`` for a number in ``(0, 1]`` (img2img's strength)."""
    value = float_arg(text)
    if not 0 < value <= 1:  # NaN and inf fail too
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
    """An argparse ``type`` for DDIM's ``eta``: a number in ``[0, 1]`` (0 = deterministic DDIM, 1 = DDPM-like)."""
    value = float_arg(text)
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} must be a number in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like)")
    return value


def add_loading_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every script that loads expert checkpoints (``Refiner.from_checkpoints`` takes the same three)."""
    for flag, help_text in (
        (
            "--allow-outside-window",
            "run the nearest expert on steps no expert window covers (warned) instead of refusing them "
            "(evaluate.py: instead of skipping those start_t)",
        ),
        ("--trust-config", "let a config stored in a checkpoint build classes outside ldm.* / taming.modules.*"),
        ("--unsafe-load", "unpickle arbitrary objects in checkpoints: can run code, only for files you trust"),
    ):
        p.add_argument(flag, action="store_true", help=help_text)


def path_arg(text: str) -> str:
    """An argparse ``type`` for a file or folder path: any string but the empty one (``--outdir ""`` would otherwise
    mean the current folder, and ``--input ""`` a search of it)."""
    if text == "":
        raise argparse.ArgumentTypeError("the path is empty; give a file or folder name ('.' for the current folder)")
    return text


def check_outdir(outdir: str | os.PathLike) -> str | None:
    """Why ``outdir`` cannot be used as an output folder (one line naming the path), or None; creates nothing.  Found
    before any work: an empty path, a file in the way, a read-only parent, a symbolic link loop or one to nothing, a
    name too long.  Every message starts with ``output folder`` (refine.py tells its exit code by that)."""
    from ldm.imageio import format_path

    text = os.fsdecode(outdir)
    if text == "":
        return "output folder '': the path is empty; give a folder name ('.' for the current folder)"
    path = Path(os.path.abspath(text))
    shown = format_path(path)
    if len(shown) > 160:  # the line stays readable for a path of thousands of characters
        shown = f"{shown[:100]}...{shown[-40:]}"
    probe = path
    while True:
        try:
            os.stat(probe)
            break
        except (FileNotFoundError, NotADirectoryError):  # missing (created later), or under a file (found below)
            if os.path.islink(probe):
                target = format_path(Path(os.readlink(probe)))
                return (
                    f"output folder {shown}: {format_path(probe)} is a symbolic link to {target}, which does not "
                    "exist; create its target folder, remove the link or choose another output folder"
                )
        except OSError as exc:
            return _unusable(shown, probe, path, exc)
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == path else f" ({format_path(probe)} is a file)"
        return f"output folder {shown}: a file is in the way{where}; move it away or choose another output folder"
    too_long = _name_too_long(path, probe)
    if too_long:
        return f"output folder {shown}: {too_long}; choose a shorter output folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"output folder {shown}: permission denied (cannot write to {format_path(probe)})"
    return None


def _unusable(shown: str, probe: Path, path: Path, exc: OSError) -> str:
    """:func:`check_outdir`'s line for an error looking up ``probe`` (``path`` or one of its parents)."""
    from ldm.imageio import format_path

    if exc.errno == errno.ELOOP:
        while probe.parent != probe and _errno_of_stat(probe.parent) == errno.ELOOP:  # name the link, not a path below it
            probe = probe.parent
        return (
            f"output folder {shown}: {format_path(probe)} is a symbolic link loop (it leads back to itself); "
            "remove the link or choose another output folder"
        )
    if exc.errno == errno.ENAMETOOLONG:
        why = _name_too_long(path, None) or "the path is too long for the file system"
        return f"output folder {shown}: {why}; choose a shorter output folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"output folder {shown}: permission denied (cannot look up {format_path(probe)})"
    return f"output folder {shown}: cannot look up {format_path(probe)}: {exc.strerror or one_line_error(exc)}"


def _errno_of_stat(path: Path) -> int | None:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno
    return None


def _name_too_long(path: Path, existing: Path | None) -> str | None:
    """Why ``path`` is too long for the file system of ``existing`` (its nearest existing folder; None: unknown, the
    usual 255-byte names and 4096-byte paths), or None."""
    name_max, path_max = 255, 4096
    if existing is not None:
        try:
            name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
        except (OSError, ValueError):  # no pathconf here (Windows), or the file system does not tell
            pass
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
    size = len(os.fsencode(longest))
    if size > name_max:
        return f"the name {longest[:20]}... is {size} bytes long, more than the {name_max} the file system allows"
    if len(os.fsencode(str(path))) >= path_max:
        return f"the path is {len(os.fsencode(str(path)))} bytes long; the file system allows less than {path_max}"
    return None
