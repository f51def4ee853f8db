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
import re
import string
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
# Largest member read into memory.  Every member is read whole, and its size comes from the tar header, which costs
# nothing to forge: a 10 KB shard with a sparse 2 GB member took 2.9 GB.  64 MiB is far above an encoded training
# image or a cached latent; a larger member makes its sample unreadable (skipped and counted like a corrupt one).
MAX_MEMBER_BYTES = 64 << 20
# Most shard names one pattern (or list of patterns) may expand to.  Brace ranges are counted before they are expanded:
# braceexpand builds every name at once, so a typo like {0..99999999} ran out of memory instead of failing.  A million
# shards of 10,000 samples hold ten billion samples.
MAX_SHARDS = 1_000_000
# Most samples a shard's count (sizes.json, index.json) may claim: far above any real shard, and low enough that a
# million of them add up without overflowing int64 offsets (a count near 2**63 made len() negative).
MAX_SHARD_SAMPLES = 1 << 32
# the key of the error message iter_samples puts into a sample it could not read (no member is named "__...")
SAMPLE_ERROR_KEY = "__error__"


def expand_shards(patterns: str | Iterable[str]) -> list[str]:
    """Shard names from brace patterns (``data/train-{000000..000099}.tar``), ``::``-joined lists or lists of them.

    Raises :class:`ConfigError` when nothing is given, when the patterns name more than :data:`MAX_SHARDS` shards
    (counted before anything is expanded) or when a local shard does not exist.
    """
    from webdataset.shardlists import expand_urls

    items = [patterns] if isinstance(patterns, str) else list(patterns)
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"shards={patterns!r}: every entry must be a non-empty path or brace pattern")
    total = sum(count_expansions(item) for item in items)
    if total > MAX_SHARDS:
        shown = items[0] if len(items) == 1 else f"{len(items)} patterns"
        raise ConfigError(
            f"shards {shown!r} expand to {total:,} shard names, more than the {MAX_SHARDS:,} allowed; check the brace "
            "ranges (e.g. {000000..000999} for 1,000 shards)"
        )
    urls: list[str] = []
    for item in items:
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


def count_expansions(pattern: str) -> int:
    """How many names webdataset's ``expand_urls`` makes of ``pattern`` (``::`` lists, ``${VAR}`` from ``WDS_VAR``,
    bash-style braces as the ``braceexpand`` package reads them), counted without building them.

    A pattern braceexpand would refuse (unbalanced braces) counts as 1: expanding it then raises braceexpand's error.
    """
    from webdataset.shardlists import envsubst

    if "{" not in pattern and "$" not in pattern and "::" not in pattern:  # a plain name (most entries of a long list)
        return 1
    total = 0
    for url in pattern.split("::"):
        for _ in range(10):  # as expand_urls: substitutes until nothing changes, at most 10 times
            last, url = url, envsubst(url)
            if url == last:
                break
        total += _count_pattern(url, depth=0)
    return total


_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_ALPHABET = string.ascii_uppercase + string.ascii_lowercase
# Nesting deeper than this is not a shard name; refusing it keeps the recursion far from Python's limit.
_MAX_BRACE_DEPTH = 32


def _count_pattern(pattern: str, depth: int) -> int:
    """braceexpand's ``parse_pattern``, counting: the product of the counts of its literal and brace parts."""
    if depth > _MAX_BRACE_DEPTH:
        raise ConfigError(f"shard pattern nests braces more than {_MAX_BRACE_DEPTH} deep; write the shard names plainly")
    count, start, pos, bracket = 1, 0, 0, 0
    while pos < len(pattern):
        char = pattern[pos]
        if char == "\\":
            pos += 2
            continue
        if char == "{":
            bracket += 1
            if bracket == 1:
                start = pos
        elif char == "}":
            bracket -= 1
            if bracket == 0:
                count *= _count_expression(pattern[start + 1 : pos], depth + 1)
        pos += 1
    return 1 if bracket != 0 else count  # unbalanced: left to braceexpand's own error


def _count_expression(expr: str, depth: int) -> int:
    """braceexpand's ``parse_expression``, counting: an integer or letter range, a comma list, or literal braces."""
    match = _INT_RANGE.match(expr)
    if match:
        first, last, step = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1) or 1
        return abs(last - first) // step + 1
    match = _CHAR_RANGE.match(expr)
    if match:
        step = int(match.group(3) or 1) or 1
        first, last = _ALPHABET.index(match.group(1)), _ALPHABET.index(match.group(2))
        return abs(last - first) // step + 1
    parts, start, pos, bracket = [], 0, 0, 0
    while pos < len(expr):
        char = expr[pos]
        if char == "\\":
            pos += 2
            continue
        if char == "{":
            bracket += 1
        elif char == "}":
            bracket -= 1
        elif char == "," and bracket == 0:
            parts.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if bracket != 0 or not parts:  # not a list: "{expr}" stays literal braces around expr's own expansion
        return _count_pattern(expr, depth)
    parts.append(expr[start:])
    return sum(_count_pattern(part, depth) for part in parts)


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

    A sample with a member larger than :data:`MAX_MEMBER_BYTES` is yielded without its members and with
    ``sample[SAMPLE_ERROR_KEY]``, a message naming the shard and the member: the caller skips it as unreadable.
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
            if position < skip or SAMPLE_ERROR_KEY in current:
                continue
            if ext in current:
                raise tarfile.TarError(f"{url}: sample {key!r} holds two members with extension {ext!r}")
            if member.size > MAX_MEMBER_BYTES:
                # checked before reading: the header's size is the only thing that says what the read would allocate
                current = {"__key__": key, "__url__": url, "__index__": position, SAMPLE_ERROR_KEY: (
                    f"{shard_label(url)}: member {member.name!r} is {member.size:,} bytes, more than the "
                    f"{MAX_MEMBER_BYTES:,} a sample member may have (ldm.data.tar_shards.MAX_MEMBER_BYTES)")}
                continue
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
