"""ldm.util's atomic writes: errors name the destination and keep the old file; the temp files that killed writes
leave are recognised exactly and removed, except the real paths a caller still reads."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

import pytest

from ldm.util import atomic_write_bytes, remove_stale_temp_files


def test_atomic_write_errors_name_the_destination_and_keep_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "last.ckpt"
    dest.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{dest}'")) as err:
        atomic_write_bytes(dest, b"new")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(dest)

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(dest, b"new")
    monkeypatch.undo()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".last.ckpt.abcdefgh.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=re.escape(f"Permission denied: '{dest}'")):
        atomic_write_bytes(dest, b"new")
    assert dest.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_stale_temp_files_are_recognised_exactly(tmp_path):
    stale = [".last.ckpt.k2_x9q0a.tmp", ".img_t400_s0.png.abcdefgh.tmp"]
    kept = ["last.ckpt", ".hidden", "notes.tmp", ".last.ckpt.short.tmp", ".last.ckpt.ABCDEFGH.tmp", ".a.abcdefgh.tmpx"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()
    (tmp_path / ".link.abcdefgh.tmp").symlink_to(tmp_path / "last.ckpt")
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".dir.abcdefgh.tmp", ".link.abcdefgh.tmp"])
    assert remove_stale_temp_files(tmp_path / "missing") == []
    for name in stale:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path, names=["img_t400_s0.png", "other.png"]) == [tmp_path / stale[1]]
    assert remove_stale_temp_files(tmp_path, names=["last.ckpt"]) == [tmp_path / stale[0]]
    # what a real killed write leaves is matched
    fd, name = tempfile.mkstemp(prefix=".last.ckpt.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    assert remove_stale_temp_files(tmp_path) == [Path(name)]


def test_remove_stale_temp_files_keeps_the_real_paths_it_is_given(tmp_path):
    read, stale = tmp_path / ".x.png.abcdefgh.tmp", tmp_path / ".x.png.12345678.tmp"
    read.write_bytes(b"a mask")
    stale.write_bytes(b"partial")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)  # the folder named through a link: compared by real path
    keep = {os.path.realpath(read)}
    assert remove_stale_temp_files(link, names=["x.png"], keep=keep) == [link / stale.name]
    assert read.read_bytes() == b"a mask" and not stale.exists()
