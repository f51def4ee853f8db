"""Expanding command-line inputs (files, folders, globs) into a deterministic list of image files."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from ldm.imageio.errors import PathLike, format_path
from ldm.imageio.load import IMAGE_SUFFIXES

_GLOB_CHARS = frozenset("*?[")


def find_images(inputs: Iterable[PathLike]) -> tuple[list[Path], list[str]]:
    """Expand ``inputs`` into image files, reporting every input that yields none.

    - An existing file is taken as given, whatever its suffix (the loader reports it if it is not an image).
    - A folder is searched recursively for files with an image suffix (:data:`IMAGE_SUFFIXES`, case-insensitive);
      hidden files and folders (name starting with ``"."``, e.g. macOS ``._photo.jpg`` resource forks) are skipped, and
      symbolic links to folders are not followed.  Files are sorted by path, so the order is the same on every run.
    - Anything else containing ``*``, ``?`` or ``[`` is a glob (``**`` recursive); matched files with an image suffix
      and matched folders (expanded as above) are kept, sorted.

    A file reached through several inputs is listed once, at its first occurrence.

    Returns:
        ``(paths, problems)``: the image paths in input order, and one printable line per input that matched nothing
        (missing path, empty folder, glob without image matches, unreadable folder).
    """
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
        if os.path.isdir(text):
            images, errors = _images_in_folder(Path(text))
            problems.extend(errors)
            if images:
                add(images)
            elif not errors:
                problems.append(f"{shown}: folder holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        elif os.path.exists(text):
            add([Path(text)])
        elif _GLOB_CHARS.intersection(text):
            images, errors = _images_from_glob(text)
            problems.extend(errors)
            if images:
                add(images)
            elif not errors:
                problems.append(f"{shown}: the pattern matches no image files")
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
        errors.append(f"{format_path(exc.filename or folder)}: cannot list folder ({exc.strerror or exc})")

    images = []
    for root, dirs, files in os.walk(folder, onerror=on_error, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        images.extend(Path(root, name) for name in files if not name.startswith(".") and is_image_name(name))
    return sorted(images, key=_sort_key), errors


def _images_from_glob(pattern: str) -> tuple[list[Path], list[str]]:
    images: list[Path] = []
    errors: list[str] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        if os.path.isdir(match):
            folder_images, folder_errors = _images_in_folder(Path(match))
            images.extend(folder_images)
            errors.extend(folder_errors)
        elif os.path.isfile(match) and is_image_name(match):
            images.append(Path(match))
    return sorted(images, key=_sort_key), errors


def _sort_key(path: Path) -> tuple[str, ...]:
    return path.parts
