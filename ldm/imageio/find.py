"""Expanding command-line inputs (files, folders, globs) into a deterministic list of image files."""

from __future__ import annotations

import fnmatch
import operator
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ldm.imageio.errors import PathLike, format_path
from ldm.imageio.load import IMAGE_SUFFIXES

_GLOB_CHARS = frozenset("*?[")
_PARTS = operator.attrgetter("parts")  # sort by path components: "a/b" before "a-b/c"


def find_images(inputs: Iterable[PathLike]) -> tuple[list[Path], list[str]]:
    """Expand ``inputs`` into image files: ``(paths in input order, each once; one printable line per input that yields
    none or a folder that cannot be listed)``. A file is taken whatever its suffix; a folder is searched recursively for
    :data:`IMAGE_SUFFIXES` (any case), sorted by path, hidden names (``._photo.jpg``) skipped, links to folders not
    followed; anything else with ``*``, ``?`` or ``[`` is a glob as :func:`glob.glob` with ``recursive=True``, except
    that ``**`` neither follows nor matches links to folders (a link cycle cannot make it endless), its matched folders
    expanded as above."""
    found: list[Path] = []
    problems: list[str] = []
    seen: set[str] = set()

    def add(paths: Iterable[Path]) -> None:
        for p in paths:
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                found.append(p)

    for raw in inputs:
        text = os.fsdecode(raw)
        shown = format_path(text)
        folder, exists = os.path.isdir(text), os.path.exists(text)
        if folder or (not exists and _GLOB_CHARS.intersection(text)):
            images, errors = _images_in_folder(Path(text)) if folder else _images_from_glob(text)
            problems.extend(errors)
            add(images)
            if not images and not errors:
                what = f"folder holds no images (looked for {', '.join(IMAGE_SUFFIXES)})"
                problems.append(f"{shown}: {what if folder else 'the pattern matches no image files'}")
        elif exists:
            add([Path(text)])
        elif os.path.lexists(text):
            problems.append(f"{shown}: broken symbolic link")
        else:
            problems.append(f"{shown}: no such file or folder")
    return found, problems


def is_image_name(path: PathLike) -> bool:
    """Whether ``path``'s suffix is one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return os.path.splitext(os.fsdecode(path))[1].lower() in IMAGE_SUFFIXES


def _images_in_folder(folder: Path) -> tuple[list[Path], list[str]]:
    errors: list[str] = []

    def on_error(exc: OSError) -> None:
        errors.append(_cannot_list(exc.filename or folder, exc))

    images = []
    for root, dirs, files in os.walk(folder, onerror=on_error, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        images.extend(Path(root, name) for name in files if not name.startswith(".") and is_image_name(name))
    return sorted(images, key=_PARTS), errors


def _images_from_glob(pattern: str) -> tuple[list[Path], list[str]]:
    images: list[Path] = []
    errors: list[str] = []
    for match in sorted(_glob(pattern, errors)):
        if os.path.isdir(match):
            folder_images, folder_errors = _images_in_folder(Path(match))
            images.extend(folder_images)
            errors.extend(folder_errors)
        elif os.path.isfile(match) and is_image_name(match):
            images.append(Path(match))
    return sorted(images, key=_PARTS), list(dict.fromkeys(errors))  # ** and the next component may meet one folder


def _glob(pattern: str, errors: list[str]) -> list[str]:
    """The paths matching ``pattern`` (unlike :func:`glob.glob`, ``**`` does not go through links to folders); a folder
    that cannot be listed adds one line to ``errors``."""
    drive, rest = os.path.splitdrive(pattern)
    separators = os.sep + (os.altsep or "")
    parts = [part for part in re.split(f"[{re.escape(separators)}]", rest) if part]
    # consecutive ** match what one does; collapsing them keeps a pattern like **/**/** from multiplying the work
    parts = [part for i, part in enumerate(parts) if not (part == "**" and i and parts[i - 1] == "**")]
    dirs_only = rest.endswith(tuple(separators))
    current = [drive + rest[: len(rest) - len(rest.lstrip(separators))]]  # "" (relative) or the root
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        found: list[str] = []
        for base in current:
            if part == "**":
                found.extend(_below(base, files=last and not dirs_only, errors=errors))
            elif _GLOB_CHARS.intersection(part):
                for name in _list(base, errors):
                    if (part.startswith(".") or not name.startswith(".")) and fnmatch.fnmatch(name, part):
                        path = os.path.join(base, name)
                        if (last and not dirs_only) or os.path.isdir(path):
                            found.append(path)
            else:
                path = os.path.join(base, part)
                if os.path.isdir(path) or (last and not dirs_only and os.path.lexists(path)):
                    found.append(path)
        current = list(dict.fromkeys(found))
    return [path for path in current if path] if parts else []


def _list(folder: str, errors: list[str]) -> list[str]:
    """Names in ``folder`` ("" is the working folder); [] and a line in ``errors`` when it cannot be listed."""
    try:
        with os.scandir(folder or os.curdir) as entries:
            return sorted(entry.name for entry in entries)
    except NotADirectoryError:
        return []
    except OSError as exc:
        errors.append(_cannot_list(folder or os.curdir, exc))
        return []


def _below(base: str, files: bool, errors: list[str]) -> list[str]:
    """What ``**`` matches under ``base``: ``base`` and every non-hidden folder below it (links to folders are not
    entered), and with ``files`` also every other non-hidden entry except links to folders (unsorted)."""
    found = [base]
    stack = [base]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder or os.curdir) as it:
                entries = [entry for entry in it if not entry.name.startswith(".")]
        except OSError as exc:
            errors.append(_cannot_list(folder or os.curdir, exc))
            continue
        for entry in entries:
            path = os.path.join(folder, entry.name)
            try:
                real_folder = entry.is_dir(follow_symlinks=False)
                folder_link = entry.is_symlink() and entry.is_dir()
            except OSError:
                real_folder = folder_link = False
            if real_folder:
                found.append(path)
                stack.append(path)
            elif files and not folder_link:
                found.append(path)
    return found


def _cannot_list(folder: PathLike, exc: OSError) -> str:
    return f"{format_path(folder)}: cannot list folder ({exc.strerror or exc})"
