"""Tar shards in the webdataset layout (``dir/000123.jpg`` + ``dir/000123.json`` -> one sample): brace patterns, reading
samples from a shard's ``n``-th on (local shards seek), counting them, writing them reproducibly.  Shards are untrusted:
headers are checked (:class:`CheckedTarInfo`), only wanted members are read, and they are capped before they are read.
"""

from __future__ import annotations

import io
import logging
import os
import re
import string
import tarfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

# member extensions of an image sample, in the order they are looked for
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")
# What a damaged shard raises while it is read: tarfile's errors, OS errors (a vanished mount), premature ends.
TAR_READ_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError, ValueError)
# Largest member read into memory (read whole: a forged sparse member can claim GBs), far above an encoded training image
# or a cached latent; a larger member makes its sample unreadable.
MAX_MEMBER_BYTES = 64 << 20
# Most bytes read into memory for one sample (all its wanted members together: one key may hold many large members).
MAX_SAMPLE_BYTES = 2 * MAX_MEMBER_BYTES
# Largest GNU long-name/long-link or pax extension header: tarfile reads one whole while it iterates, before any member
# check could run (a forged 2**40-byte one: MemoryError); real ones take a few KB.
MAX_EXTENSION_HEADER_BYTES = 1 << 20
# Most extension headers in a row before a member: tarfile follows a chain recursively (a real member has at most a
# pax header, a long name and a long link name).
MAX_EXTENSION_CHAIN = 8
# Most digits a number of a brace range may have (int() refuses more than 4,300; a shard number has a dozen at most).
MAX_RANGE_DIGITS = 64
# Most shard names one pattern (or list of patterns) may expand to, counted before expanding: braceexpand builds every
# name at once, so a typo like {0..99999999} would run out of memory instead of failing.
MAX_SHARDS = 1_000_000
# Most samples a shard's count (sizes.json, index.json) may claim: far above any real shard, and low enough that a
# million of them add up without overflowing int64 offsets (into a negative len()).
MAX_SHARD_SAMPLES = 1 << 32
# the key of the error message iter_samples puts into a sample it could not read (no member is named "__...")
SAMPLE_ERROR_KEY = "__error__"

_LONG_NAME_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_EXTENSION_TYPES = (*_LONG_NAME_TYPES, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_STREAM_CHUNK = 1 << 20
_ENV_REFERENCE = re.compile(r"\$\{(\w+)\}")  # webdataset's envsubst pattern
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_ALPHABET = string.ascii_uppercase + string.ascii_lowercase
# Nesting deeper than this is not a shard name; refusing it keeps the recursion far from Python's limit.
_MAX_BRACE_DEPTH = 32


class ShardFormatError(tarfile.ReadError):
    """A shard header this module refuses to follow; one of :data:`TAR_READ_ERRORS` (a ``ReadError``), so the shard
    is unreadable from that point on and the other shards are read."""


class CheckedTarInfo(tarfile.TarInfo):
    """tarfile's header reader with the checks tarfile lacks, made before it acts on a header's size field: it refuses
    an extension header larger than :data:`MAX_EXTENSION_HEADER_BYTES`, more than :data:`MAX_EXTENSION_CHAIN` of them
    in a row, and a negative size (base-256 field or pax record: it moves the next header backwards, forever)."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        at = f"the header at byte {self.offset:,}"
        if self.size < 0:
            raise ShardFormatError(f"{at} gives {self.name!r} a negative size ({self.size:,}): the shard is damaged")
        if self.type not in _EXTENSION_TYPES:
            member = super()._proc_member(archive)
        else:
            kind = "a GNU long-name" if self.type in _LONG_NAME_TYPES else "a pax"
            if self.size > MAX_EXTENSION_HEADER_BYTES:
                raise ShardFormatError(
                    f"{at} is {kind} extension header of {self.size:,} bytes, more than the "
                    f"{MAX_EXTENSION_HEADER_BYTES:,} allowed (ldm.data.tar_shards.MAX_EXTENSION_HEADER_BYTES; real ones "
                    "take a few KB): the shard is damaged or forged; re-create it (e.g. with tar --format=ustar or "
                    "webdataset's TarWriter)"
                )
            depth = getattr(archive, "_extension_chain", 0)
            if depth >= MAX_EXTENSION_CHAIN:
                raise ShardFormatError(
                    f"{at} is the {depth + 1}th extension header in a row, more than the "
                    f"{MAX_EXTENSION_CHAIN} allowed before a member: the shard is damaged or forged"
                )
            archive._extension_chain = depth + 1
            try:
                member = super()._proc_member(archive)
            finally:
                archive._extension_chain = depth
        if member.size < 0:  # a pax "size" record, or a sparse member's real size
            raise ShardFormatError(f"{at} gives {member.name!r} a negative size ({member.size:,}): the shard is damaged")
        return member


def expand_shards(patterns: str | Iterable[str]) -> list[str]:
    """Shard names from brace patterns (``data/train-{000000..000099}.tar``), ``::``-joined lists or lists of them;
    :class:`ConfigError` for none, more than :data:`MAX_SHARDS` (counted before expanding) or a missing local shard."""
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
    urls = [url for item in items for url in expand_urls(item)]
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
    braces as ``braceexpand`` reads them), counted without building them; unbalanced braces count 1 (expanding then
    raises braceexpand's error).  :class:`ConfigError` for an unset ``WDS_VAR``, deep nesting or huge range numbers."""
    from webdataset.shardlists import envsubst

    if "{" not in pattern and "$" not in pattern and "::" not in pattern:  # a plain name (most entries of a long list)
        return 1
    total = 0
    for url in pattern.split("::"):
        for _ in range(10):  # as expand_urls: substitutes until nothing changes, at most 10 times
            for name in _ENV_REFERENCE.findall(url):  # before each envsubst, which asserts that WDS_<name> is set
                if f"WDS_{name}" not in os.environ:
                    raise ConfigError(
                        f"shard pattern {pattern!r} uses ${{{name}}}, which webdataset fills in from the environment "
                        f"variable WDS_{name} (not from {name}), and WDS_{name} is not set; set it (export WDS_{name}=...) "
                        "or write the path out (the shell expands $HOME-style variables in an unquoted argument)"
                    )
            last, url = url, envsubst(url)
            if url == last:
                break
        total += _count_pattern(url, depth=0, whole=pattern)
    return total


def _count_pattern(pattern: str, depth: int, whole: str) -> int:
    """braceexpand's ``parse_pattern``, counting (``whole``: the pattern as given, for messages)."""
    if depth > _MAX_BRACE_DEPTH:
        raise ConfigError(
            f"shard pattern {_shorten(whole)} nests braces more than {_MAX_BRACE_DEPTH} deep; write the shard names plainly"
        )
    count, start, bracket = 1, 0, 0
    for pos, char, bracket in _scan_braces(pattern):
        if char == "{" and bracket == 1:
            start = pos
        elif char == "}" and bracket == 0:
            count *= _count_expression(pattern[start + 1 : pos], depth + 1, whole)
    return 1 if bracket != 0 else count  # unbalanced: left to braceexpand's own error


def _count_expression(expr: str, depth: int, whole: str) -> int:
    """braceexpand's ``parse_expression``, counting: an integer or letter range, a comma list, or literal braces."""
    match = _INT_RANGE.match(expr)
    if match:
        longest = max(len(g.lstrip("-")) for g in match.groups() if g is not None)
        if longest > MAX_RANGE_DIGITS:  # int() of it fails (over 4,300 digits) or the range is absurd
            raise ConfigError(
                f"shard pattern {_shorten(whole)}: a number of the brace range {_shorten(expr, 40)} has "
                f"{longest:,} digits, more than the {MAX_RANGE_DIGITS} allowed; write ranges like {{000000..000999}}"
            )
        first, last, step = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1) or 1
        return abs(last - first) // step + 1
    match = _CHAR_RANGE.match(expr)
    if match:
        if len(match.group(3) or "") > MAX_RANGE_DIGITS:
            raise ConfigError(
                f"shard pattern {_shorten(whole)}: the step of the letter range has more than "
                f"{MAX_RANGE_DIGITS} digits; write ranges like {{a..z}}"
            )
        step = int(match.group(3) or 1) or 1
        first, last = _ALPHABET.index(match.group(1)), _ALPHABET.index(match.group(2))
        return abs(last - first) // step + 1
    parts, start, bracket = [], 0, 0
    for pos, char, bracket in _scan_braces(expr):
        if char == "," and bracket == 0:
            parts.append(expr[start:pos])
            start = pos + 1
    if bracket != 0 or not parts:  # not a list: "{expr}" stays literal braces around expr's own expansion
        return _count_pattern(expr, depth, whole)
    parts.append(expr[start:])
    return sum(_count_pattern(part, depth, whole) for part in parts)


def _scan_braces(text: str) -> Iterator[tuple[int, str, int]]:
    """``(position, character, brace depth after it)`` of each character no backslash escapes (as braceexpand)."""
    pos, depth = 0, 0
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2
            continue
        depth += (char == "{") - (char == "}")
        yield pos, char, depth
        pos += 1


def _shorten(text: str, limit: int = 120) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[: limit // 2]}...{shown[-limit // 2 :]}"


def is_local(url: str) -> bool:
    """Whether ``url`` names a local file (seekable), not a ``pipe:`` command or a URL."""
    return not url.startswith("pipe:") and "://" not in url


def _members(tar: tarfile.TarFile, streamed: bool, file_size: int | None) -> Iterator[tarfile.TarInfo]:
    """The archive's members; after each, a local member is checked to end inside the file and a stream is moved over
    the unread data here (tarfile gives a bare "unexpected end of data", and in a stream never ends for a huge size)."""
    while True:
        member = tar.next()
        if member is None:
            return
        yield member
        if file_size is not None:
            _check_extent(tar, member, file_size)
        if streamed:
            remaining = tar.offset - tar.fileobj.tell()
            while remaining > 0:
                got = len(tar.fileobj.read(min(remaining, _STREAM_CHUNK)))
                if not got:
                    raise ShardFormatError(
                        f"the stream ends inside member {member.name!r} (header at byte {member.offset:,}, "
                        f"{member.size:,} bytes): the shard is cut short or this header is damaged, and nothing after "
                        "it can be located"
                    )
                remaining -= got


def _check_extent(tar: tarfile.TarFile, member: tarfile.TarInfo, file_size: int) -> None:
    """:class:`ShardFormatError` when ``member``'s data runs past the file's end (beyond its last block's padding)."""
    if tar.offset - file_size >= tarfile.BLOCKSIZE:
        raise ShardFormatError(
            f"member {member.name!r} (header at byte {member.offset:,}) claims {member.size:,} bytes, but the file "
            f"ends {max(0, file_size - member.offset_data):,} bytes after its header: the shard is cut short or this "
            "header is damaged, and nothing after it can be located"
        )


def _member_problem(
    member: tarfile.TarInfo, ext: str, sample: dict[str, Any], held: int, member_limits: Mapping[str, int] | None
) -> str | None:
    """Why a wanted member of ``sample`` (which holds ``held`` bytes so far) must not be read, or None."""
    if ext in sample:
        return (
            f"two members named {member.name!r} next to each other (a sample holds one member per extension, so "
            "which one is meant is unclear); rename or remove one of them"
        )
    if member.size > MAX_MEMBER_BYTES:
        return (
            f"member {member.name!r} is {member.size:,} bytes, more than the {MAX_MEMBER_BYTES:,} a sample member may "
            "have (ldm.data.tar_shards.MAX_MEMBER_BYTES)"
        )
    if member_limits is not None and member.size > member_limits.get(ext, MAX_MEMBER_BYTES):
        return (
            f"member {member.name!r} is {member.size:,} bytes, more than the {member_limits[ext]:,} a .{ext} member "
            "may have here"
        )
    if held + member.size > MAX_SAMPLE_BYTES:
        return (
            f"the members of sample {sample['__key__']!r} read so far and {member.name!r} add up to "
            f"{held + member.size:,} bytes, more than the {MAX_SAMPLE_BYTES:,} a sample may have "
            "(ldm.data.tar_shards.MAX_SAMPLE_BYTES)"
        )
    return None


def iter_samples(
    url: str,
    skip: int = 0,
    limit: int | None = None,
    exts: Collection[str] | None = None,
    member_limits: Mapping[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples of shard ``url`` in file order, from its ``skip``-th on, at most ``limit`` of them.

    Each sample is ``{"__key__": str, "__url__": url, "__index__": position in the shard, ext: bytes, ...}`` with the
    members whose (lower-case) extension is in ``exts`` (None: all); other members are passed over unread.  Errors of
    a damaged shard (:data:`TAR_READ_ERRORS`) propagate after the samples read before them.  A sample that cannot be
    read safely (see :func:`_member_problem`) is yielded without members, with ``sample[SAMPLE_ERROR_KEY]`` saying why:
    the caller skips it and the shard goes on.
    """
    from webdataset.tariterators import base_plus_ext

    if limit is not None and limit <= 0:
        return
    wanted = None if exts is None else frozenset(exts)
    label = shard_label(url)
    if is_local(url):
        stream, file_size = None, os.path.getsize(url)
        with open(url, "rb") as fh:
            if fh.read(2) == b"\x1f\x8b":  # tarfile's "r:" says only "bad checksum"
                raise ShardFormatError(f"{label} is gzip-compressed: shards are read uncompressed (seekable); gunzip it")
        tar = tarfile.open(url, mode="r:", tarinfo=CheckedTarInfo)  # seekable: skipped data is never read
    else:
        from webdataset.gopen import gopen

        stream, file_size = gopen(url, "rb"), None
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=CheckedTarInfo)
        except BaseException:
            stream.close()
            raise
    try:
        position, current, yielded, held = -1, None, 0, 0
        for member in _members(tar, stream is not None, file_size):
            if not member.isreg():
                continue
            key, ext = base_plus_ext(member.name)  # webdataset's sample key and extension: a/b.c.d -> a/b, c.d
            if key is None or key.startswith("__"):
                continue
            ext = ext.lower()
            if current is None or key != current["__key__"]:
                if current is not None and position >= skip:
                    yield current
                    yielded += 1
                    if limit is not None and yielded >= limit:
                        return
                position += 1
                current, held = {"__key__": key, "__url__": url, "__index__": position}, 0
            if position < skip or SAMPLE_ERROR_KEY in current or ext.startswith("__"):
                continue
            if wanted is not None and ext not in wanted:
                continue
            if file_size is not None:
                _check_extent(tar, member, file_size)  # a plain message, not tarfile's "unexpected end of data"
            # checked before reading: the header's size is the only thing that says what the read would allocate
            problem = _member_problem(member, ext, current, held, member_limits)
            if problem is not None:  # what has been read of the sample is let go
                current = {k: current[k] for k in ("__key__", "__url__", "__index__")}
                current[SAMPLE_ERROR_KEY] = f"{label}: {problem}"
            else:
                handle = tar.extractfile(member)
                current[ext] = handle.read() if handle is not None else b""
                held += member.size
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
    return sum(1 for _ in iter_samples(url, exts=()))  # no member is wanted: none is read


class MemberSpan(NamedTuple):
    """Where a member's bytes lie in a tar file written by :func:`write_tar`."""

    name: str
    offset: int
    size: int


def write_tar(fh: BinaryIO, members: Iterable[tuple[str, bytes]]) -> list[MemberSpan]:
    """Write ``(name, bytes)`` members as a USTAR archive with fixed metadata, so that the same members give the same
    bytes on every run; returns where each member's data lies.  Names: ASCII, at most 100 characters (no extensions)."""
    spans = []
    with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)  # its defaults are the fixed metadata: mtime 0, mode 0644, owner 0, no names
            info.size = len(data)
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
