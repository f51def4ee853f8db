"""Errors raised by :mod:`ldm.imageio` and the path formatting that keeps their messages on one printable line."""

from __future__ import annotations

import os
import re

_CONTROL_CHARS = {i: f"\\x{i:02x}" for i in [*range(32), 127]}
_WHITESPACE_RUN = re.compile(r"\s+")

PathLike = str | bytes | os.PathLike


def format_path(path: PathLike) -> str:
    """A printable, single-line rendering of ``path`` for messages.

    Bytes paths and ``str`` paths holding surrogate escapes (file names that are not valid UTF-8 on POSIX) are shown
    with their undecodable bytes as ``\\xNN``; control characters (a newline in a file name) are escaped too, so the
    result can always be printed and logged without raising ``UnicodeEncodeError`` or breaking a line.
    """
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace").translate(_CONTROL_CHARS)


def one_line(text: str) -> str:
    """Collapse every whitespace run (newlines included) of ``text`` into a single space."""
    return _WHITESPACE_RUN.sub(" ", str(text)).strip()


class ImageLoadError(ValueError):
    """An input could not be read as an image.  ``str(err)`` is one line naming the path and the cause.

    Attributes:
        path: the path as given (str, bytes or PathLike).
        reason: the cause alone, without the path.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = path
        self.reason = one_line(reason)
        super().__init__(f"cannot load image {format_path(path)}: {self.reason}")

    def __reduce__(self):  # keep the two-argument constructor picklable (multiprocessing data loaders)
        return (type(self), (self.path, self.reason))


class ImageSaveError(OSError):
    """An image could not be written.  ``str(err)`` is one line naming the path and the cause.

    Attributes:
        path: the destination path as given.
        reason: the cause alone, without the path.
        errno: the OS error number of the underlying failure (``errno.ENOSPC``, ``errno.EACCES``, ...) or None.
    """

    def __init__(self, path: PathLike, reason: str, errno: int | None = None) -> None:
        self.path = path
        self.reason = one_line(reason)
        super().__init__(f"cannot save image {format_path(path)}: {self.reason}")
        self.errno = errno

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.errno))
