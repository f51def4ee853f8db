"""Errors raised by :mod:`ldm.imageio` and the formatting that keeps messages on one printable line."""

from __future__ import annotations

import os
from typing import Any

from ldm.util import one_line

_CONTROL_CHARS = {i: f"\\x{i:02x}" for i in [*range(32), 127]}

PathLike = str | bytes | os.PathLike


def format_path(path: PathLike) -> str:
    """``path`` on one printable line: undecodable bytes (bytes paths, surrogate escapes) and control characters (a
    newline in a file name) shown as ``\\xNN``, so printing or logging it never raises ``UnicodeEncodeError``."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace").translate(_CONTROL_CHARS)


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters; a huge int is described by its digit count (``str()`` refuses
    ints over 4300 digits, and a 4000-digit number would not be one short line anyway)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class ImageLoadError(ValueError):
    """An input could not be read as an image: ``str(err)`` is one line naming the path (``.path``, as given) and the
    cause (``.reason``)."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = path
        self.reason = one_line(reason)
        super().__init__(f"cannot load image {format_path(path)}: {self.reason}")

    def __reduce__(self):  # keep the two-argument constructor picklable (multiprocessing data loaders)
        return (type(self), (self.path, self.reason))


class ImageSaveError(OSError):
    """An image could not be written: ``str(err)`` is one line naming the path (``.path``) and the cause
    (``.reason``); ``.errno`` is the OS error number (``errno.ENOSPC``, ...) or None."""

    def __init__(self, path: PathLike, reason: str, errno: int | None = None) -> None:
        self.path = path
        self.reason = one_line(reason)
        super().__init__(f"cannot save image {format_path(path)}: {self.reason}")
        self.errno = errno

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.errno))
