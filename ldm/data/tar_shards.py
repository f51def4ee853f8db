"""Tar shards in the webdataset layout: brace patterns, reading samples, counting them, writing them reproducibly.

A shard is a tar file whose members are grouped into samples by key: ``dir/000123.jpg`` and ``dir/000123.json`` form
the sample ``{"__key__": "dir/000123", "jpg": b"...", "json": b"..."}`` (webdataset's rule: the key is the path up to
the first dot of the file name, the rest is the extension, lower-cased).  Names are expanded and opened with
``webdataset`` 1.0.2 (``expand_urls``: ``{000000..000099}`` braces and ``::``-joined lists; ``gopen``: local paths,
``pipe:`` commands, ``http(s)://`` through curl).  Reading and writing are this module's own, because the training
loaders need what webdataset does not offer: starting a shard at its ``n``-th sample without decoding the ones
before it (local shards seek over them), and tar bytes that do not depend on when they were written.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

# member extensions of an image sample, in the order they are looked for
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")
# What a damaged shard raises while it is read: tarfile's own errors (bad header, truncated archive), OS errors
# (unreadable file, vanished network mount) and premature ends.
TAR_READ_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError, ValueError)


def expand_shards(patterns: str | Iterable[str]) -> list[str]:
    """Shard names from brace patterns (``data/train-{000000..000099}.tar``), ``::``-joined lists or lists of them.

    Raises :class:`ConfigError` when nothing is given or a local shard does not exist.
    """
    from webdataset.shardlists import expand_urls

    items = [patterns] if isinstance(patterns, str) else list(patterns)
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"shards={patterns!r}: every entry must be a non-empty path or brace pattern")
        urls.extend(expand_urls(item))
    if not urls:
        raise ConfigError(f"shards={patterns!r} names no shard; give a path like data/train-{{000000..000099}}.tar")
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    if missing:
        raise ConfigError(
            f"{len(missing)} of {len(urls)} shard(s) do not exist (first: {missing[0]!r}); check the brace pattern "
            "(e.g. {000000..000099} zero-padded to the file names' width)"
        )
    return urls


def is_local(url: str) -> bool:
    """Whether ``url`` names a local file (seekable), not a ``pipe:`` command or a URL."""
    return not url.startswith(("pipe:", "http://", "https://", "gs://", "s3://", "ais://")) and "://" not in url


def split_name(name: str) -> tuple[str, str] | None:
    """webdataset's sample key and extension of a member name (``a/b.c.d`` -> ``("a/b", "c.d")``), or None."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    if key is None:
        return None
    return key, ext.lower()


def _open_tar(url: str) -> tuple[tarfile.TarFile, BinaryIO | None]:
    if is_local(url):
        return tarfile.open(url, mode="r:"), None  # seekable: skipped members are never read
    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    return tarfile.open(fileobj=stream, mode="r|"), stream


def iter_samples(url: str, skip: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of shard ``url`` in file order, from its ``skip``-th on, at most ``limit`` of them.

    Each sample is ``{"__key__": str, "__url__": url, "__index__": position in the shard, ext: bytes, ...}``.
    Members of skipped samples are passed over by their headers (seeked over in a local shard).  Errors of a damaged
    shard (:data:`TAR_READ_ERRORS`) propagate to the caller after the samples read before them.
    """
    if limit is not None and limit <= 0:
        return
    tar, stream = _open_tar(url)
    try:
        position, current, yielded = -1, None, 0
        for member in tar:
            if not member.isreg():
                continue
            parts = split_name(member.name)
            if parts is None or parts[0].startswith("__"):
                continue
            key, ext = parts
            if current is None or key != current["__key__"]:
                if current is not None and position >= skip:
                    yield current
                    yielded += 1
                    if limit is not None and yielded >= limit:
                        return
                position += 1
                current = {"__key__": key, "__url__": url, "__index__": position}
            if position < skip:
                continue
            if ext in current:
                raise tarfile.TarError(f"{url}: sample {key!r} holds two members with extension {ext!r}")
            handle = tar.extractfile(member)
            current[ext] = handle.read() if handle is not None else b""
        if current is not None and position >= skip:
            yield current
    finally:
        tar.close()
        if stream is not None:
            stream.close()


def count_samples(url: str) -> int:
    """Number of samples in a local shard, from its member headers alone (the data is seeked over)."""
    if not is_local(url):
        raise ConfigError(
            f"cannot count the samples of {url!r} without downloading it; give the shard sizes "
            "(sizes: a JSON file {shard file name: samples}) for shards that are not local files"
        )
    keys = 0
    last = None
    with tarfile.open(url, mode="r:") as tar:
        for member in tar:
            parts = split_name(member.name) if member.isreg() else None
            if parts is None or parts[0].startswith("__"):
                continue
            if parts[0] != last:
                keys += 1
                last = parts[0]
    return keys


@dataclass(frozen=True)
class MemberSpan:
    """Where a member's bytes lie in a tar file written by :func:`write_tar`."""

    name: str
    offset: int
    size: int


def write_tar(fh: BinaryIO, members: Iterable[tuple[str, bytes]]) -> list[MemberSpan]:
    """Write ``(name, bytes)`` members as a USTAR archive with fixed metadata (mtime 0, mode 0644, owner 0, no user
    names), so that the same members give the same bytes on every run; returns where each member's data lies.

    Names must be ASCII, at most 100 characters (one header block each, no extension headers).
    """
    spans = []
    with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if len(name) > 100 or not name.isascii():
                raise ValueError(f"tar member name {name!r} must be ASCII and at most 100 characters")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header_at = tar.offset
            tar.addfile(info, io.BytesIO(data))
            spans.append(MemberSpan(name, header_at + tarfile.BLOCKSIZE, len(data)))
    return spans


def read_span(path: str | os.PathLike, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a local file (one member of a shard written by :func:`write_tar`)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise EOFError(f"{path}: expected {size} bytes at offset {offset}, the file ends after {len(data)}")
    return data


def shard_label(url: str) -> str:
    """A short name of a shard for messages (the file name of a local path)."""
    return Path(url).name if is_local(url) else url
