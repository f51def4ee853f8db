"""An exclusive ``flock`` on ``<run>/.lock``: two ``main.py`` processes never train into one run at once (the one
finishing last would win ``last.ckpt``).  The kernel drops the lock when its holder exits in any way, SIGKILL included,
so a lock file left behind is no held lock; the file holds the holder's pid, only to name it in the error message."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# Where the file system has no flock (some network file systems): train unprotected, with a warning.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock (``main.py`` exits 2)."""


class RunFolderLockError(OSError):
    """The lock file cannot be created (the run folder is not writable; ``main.py`` exits 1)."""


@contextlib.contextmanager
def hold_run_folder(logdir: str | os.PathLike) -> Iterator[Path | None]:
    """Hold the lock of run folder ``logdir`` inside the context; yields the lock file (None: not locked).  Raises
    :class:`RunFolderBusy` (naming the holder's pid) or :class:`RunFolderLockError` (cannot create or open it)."""
    try:
        import fcntl
    except ImportError:  # no flock outside POSIX
        logger.warning("cannot lock %s on this platform: do not start a second run on it", logdir)
        yield None
        return
    path = Path(logdir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise RunFolderLockError(
            exc.errno,
            f"cannot create the lock file of run folder {str(logdir)!r} ({exc.strerror or exc}); "
            "the run folder must be writable",
            str(path),
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = None
            with contextlib.suppress(OSError):
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                holder = int(text) if text.isdigit() else None
            raise RunFolderBusy(
                f"run folder {str(logdir)!r} is in use by another main.py{f' (pid {holder})' if holder else ''}: two "
                "runs training into one folder would overwrite each other's checkpoints; wait for it to finish or stop "
                "it, then resume"
            ) from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKING:
                raise RunFolderLockError(
                    exc.errno, f"cannot lock run folder {str(logdir)!r}: {exc.strerror}", str(path)
                ) from exc
            logger.warning("the file system of %s has no file locks: do not start a second run on it", logdir)
            path = None  # not locked
        else:
            with contextlib.suppress(OSError):  # the pid only names the holder in a second run's error message
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # drops the lock
