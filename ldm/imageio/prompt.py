"""Prompts for text-conditioned experts: the validated :class:`Prompt`, and :class:`FoundPrompt` read back from PNGs and
prompt files, whose unrecorded fields the caller's defaults fill."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import struct
import sys
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ldm.cli import decimal_float
from ldm.imageio.errors import PathLike, format_path, short_repr
from ldm.imageio.png_rows import PNG_SIGNATURE
from ldm.util import one_line

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 10_000  # far above any text encoder's context (CLIP: 77 tokens); a guard against pasted files
DEFAULT_GUIDANCE_SCALE = 7.5  # CompVis txt2img's --scale and diffusers' StableDiffusionPipeline default
MAX_PROMPT_FILE_BYTES = 32 * 1024 * 1024
MAX_TEXT_CHUNK_BYTES = 1024 * 1024  # = Pillow's PngImagePlugin.MAX_TEXT_CHUNK
MAX_PNG_CHUNKS = 100_000  # chunks walked before giving up (a 1 GB PNG written by Pillow has ~16k IDAT chunks)
# this project's outputs: ``Software`` starts with this (ldm/refine/batch.py writes "latesteps refine")
LATESTEPS_SOFTWARE = "latesteps"
PROMPT_KEYS = ("prompt", "negative_prompt", "guidance_scale")
A1111_KEY = "parameters"

_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
# one ``Key: value`` of A1111's settings line: a key starting with a word character, then a JSON-quoted value or a
# run without commas (the grammar of A1111's ``re_param``)
_A1111_KEY = re.compile(r"\w[\w \-/]*")
MAX_SETTINGS_CHARS = 16384  # a longer last line is prompt text, not A1111's settings line
MAX_PARAMETERS_CHARS = 2 * MAX_PROMPT_CHARS + MAX_SETTINGS_CHARS + 64
_NEGATIVE = "Negative prompt:"


class PromptError(ValueError):
    """A prompt, a prompt file or a prompt in an image is not acceptable; ``str(err)`` is one line saying why."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def check_guidance_scale(value: Any, name: str = "guidance_scale") -> float:
    """``value`` as a float if it is a finite number ``>= 0``, else PromptError: ``s`` in CompVis'
    ``eps_u + s (eps_c - eps_u)`` (0: unconditional, 1: conditional, no guidance; diffusers treats every ``s <= 1`` as
    "conditional only", here ``0 < s < 1`` interpolates)."""
    number = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not number or not 0 <= value <= sys.float_info.max:  # NaN compares False; an int beyond float range is refused
        raise PromptError(
            f"{name}={short_repr(value)} must be a finite number >= 0 (1 = the conditional model, no guidance; Stable "
            f"Diffusion usually 5-12; default {DEFAULT_GUIDANCE_SCALE:g})"
        )
    return float(value)


def check_prompt_text(value: Any, name: str = "prompt") -> str:
    """``value`` if it is a str of at most :data:`MAX_PROMPT_CHARS` characters, encodable as UTF-8, without NUL."""
    if not isinstance(value, str):
        raise PromptError(f"{name} must be a str, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise PromptError(
            f"{name} has {len(value):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted (the text encoder reads "
            "only its first tokens anyway: shorten it)"
        )
    if "\x00" in value:
        raise PromptError(f"{name} contains a NUL character, which PNG text cannot hold: remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates, e.g. from os.fsdecode of a non-UTF-8 name
        raise PromptError(f"{name} is not valid Unicode text (character {exc.start}: {value[exc.start]!r})") from None
    return value


@dataclass(frozen=True)
class Prompt:
    """What a text-conditioned refinement is told (PromptError for a field outside what is allowed): ``prompt`` ("" is
    the unconditional embedding), ``negative_prompt`` (the unconditional branch's text; "" = the usual empty prompt),
    both at most :data:`MAX_PROMPT_CHARS` characters, and ``guidance_scale`` (:func:`check_guidance_scale`)."""

    prompt: str
    negative_prompt: str = ""
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE

    def __post_init__(self) -> None:
        check_prompt_text(self.prompt, "prompt")
        check_prompt_text(self.negative_prompt, "negative_prompt")
        object.__setattr__(self, "guidance_scale", check_guidance_scale(self.guidance_scale))

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def as_metadata(self) -> dict[str, str]:
        """The metadata entries an output refined with this prompt carries (read back by :func:`read_image_prompt`)."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "guidance_scale": repr(self.guidance_scale)}


@dataclass(frozen=True)
class FoundPrompt:
    """A prompt read from an image or a prompt file (``source``: ``"p.txt line 3"``, which errors name);
    ``negative_prompt`` and ``guidance_scale`` are None where the source did not record them."""

    prompt: str
    negative_prompt: str | None
    guidance_scale: float | None
    source: str

    def __post_init__(self) -> None:
        try:
            check_prompt_text(self.prompt, "prompt")
            if self.negative_prompt is not None:
                check_prompt_text(self.negative_prompt, "negative_prompt")
            if self.guidance_scale is not None:
                object.__setattr__(self, "guidance_scale", check_guidance_scale(self.guidance_scale))
        except PromptError as exc:
            raise PromptError(f"{self.source}: {exc}") from None

    def resolve(self, negative_prompt: str = "", guidance_scale: float = DEFAULT_GUIDANCE_SCALE) -> Prompt:
        neg = self.negative_prompt if self.negative_prompt is not None else negative_prompt
        scale = self.guidance_scale if self.guidance_scale is not None else guidance_scale
        return Prompt(self.prompt, neg, scale)


def parse_a1111_parameters(text: str, source: str = "A1111 parameters") -> FoundPrompt:
    """Prompt, negative prompt (None without a ``Negative prompt:`` line) and ``CFG scale`` (None, warned, when absent
    or not a finite number ``>= 0``) of A1111's ``parameters`` text; PromptError (naming ``source``) for a text or
    prompt that is too long. Format: the prompt's lines; optionally a line starting ``Negative prompt:`` (it and every
    later line are the negative prompt); a ``Key: value, ...`` settings line, which counts only with at least three
    pairs (as A1111's ``parse_generation_parameters``)."""
    if len(text) > MAX_PARAMETERS_CHARS:
        raise PromptError(f"{source} holds {len(text):,} characters; at most {MAX_PARAMETERS_CHARS:,} are read (a prompt, a "
                          "negative prompt and a settings line)")  # fmt: skip
    *lines, last = text.strip().split("\n")
    settings = _settings_line(last)
    if len(settings) < 3:  # not a settings line: part of the prompt
        lines.append(last)
        settings = []
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for raw in lines:
        line = raw.strip()
        if line.startswith(_NEGATIVE):  # as A1111: this line and every later one are the negative prompt
            line = line[len(_NEGATIVE) :].strip()
            negative_lines = [] if negative_lines is None else negative_lines
        (prompt_lines if negative_lines is None else negative_lines).append(line)
    scale = None
    values = {key.strip(): _unquote(value.strip()) for key, value in settings}
    if "CFG scale" in values:
        try:
            scale = check_guidance_scale(decimal_float(values["CFG scale"]), "CFG scale")
        except (ValueError, PromptError):
            logger.warning("%s: ignoring CFG scale %r (not a finite number >= 0)", source, values["CFG scale"])
    negative = None if negative_lines is None else "\n".join(negative_lines)
    return FoundPrompt("\n".join(prompt_lines), negative, scale, source)


def _settings_line(line: str) -> list[tuple[str, str]]:
    """``Key: value`` pairs of A1111's settings line (values JSON-quoted where they hold commas): the grammar of A1111's
    ``re_param`` in one pass, without its regex, which backtracks quadratically on a long line without commas."""
    if len(line) > MAX_SETTINGS_CHARS:
        return []
    pieces, current, quoted, escaped = [], [], False, False
    for ch in line:
        if quoted:
            escaped, quoted = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            quoted = True
        elif ch == ",":
            pieces.append("".join(current))
            current = []
            continue
        current.append(ch)
    pieces.append("".join(current))
    out = []
    for piece in pieces:
        key, sep, value = piece.partition(":")
        key = key.strip()
        if sep and len(key) >= 2 and _A1111_KEY.fullmatch(key):
            out.append((key, value.strip()))
    return out


def _unquote(value: str) -> str:
    """A1111 JSON-quotes values holding commas, colons or newlines; others stay as they are."""
    if len(value) < 2 or not value[0] == value[-1] == '"':
        return value
    try:
        out = json.loads(value)
    except ValueError:
        return value
    return out if isinstance(out, str) else value


def read_png_text(source: PathLike | bytes, keys: Iterable[str]) -> dict[str, str] | None:
    """The PNG text chunks (``tEXt``, ``zTXt``, ``iTXt``) named ``keys`` from a path or the file's bytes, as ``{keyword:
    text}`` (the last chunk wins, as in Pillow; a file that ends early gives what came before); None when ``source`` is
    not a PNG. Other chunks are skipped unread (Pillow's ``.text`` decodes every pixel). PromptError for an unreadable
    file or a wanted chunk over :data:`MAX_TEXT_CHUNK_BYTES` (stored or decompressed), with a bad CRC, or not valid
    text."""
    if isinstance(source, (bytes, bytearray)):
        return _walk_png(io.BytesIO(bytes(source)), set(keys), "<bytes>")
    name = format_path(source)
    try:
        if not stat.S_ISREG(os.stat(os.fspath(source)).st_mode):  # before open: opening a FIFO would block
            raise PromptError(f"cannot read prompt from {name}: not a regular file")
        with open(os.fspath(source), "rb") as fh:
            return _walk_png(fh, set(keys), name)
    except OSError as exc:
        raise PromptError(f"cannot read prompt from {name}: {exc.strerror or exc}") from None


def _walk_png(fh: BinaryIO, wanted: set[str], name: str) -> dict[str, str] | None:
    if fh.read(8) != PNG_SIGNATURE:
        return None
    found: dict[str, str] = {}
    for _ in range(MAX_PNG_CHUNKS):
        head = fh.read(8)
        if len(head) < 8:
            logger.warning("%s ends without an IEND chunk; prompt text read up to there", name)
            return found
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            return found
        if kind not in _TEXT_CHUNKS:
            fh.seek(length + 4, io.SEEK_CUR)  # data and CRC, unread (IDAT: the pixels)
            continue
        # the keyword is 1-79 Latin-1 bytes and a NUL: peek at it before reading a chunk no one asked for
        peek = fh.read(min(length, 80))
        keyword = peek.split(b"\0", 1)[0].decode("latin-1")
        if keyword not in wanted:
            fh.seek(length - len(peek) + 4, io.SEEK_CUR)
            continue
        where = f"{name}: PNG {kind.decode()} chunk {keyword!r}"
        if length > MAX_TEXT_CHUNK_BYTES:
            raise PromptError(f"{where} holds {length:,} bytes; at most {MAX_TEXT_CHUNK_BYTES:,} are read")
        data = peek + fh.read(length - len(peek))
        crc = fh.read(4)
        if len(data) < length or len(crc) < 4:
            logger.warning("%s is cut short; prompt text read up to there", name)
            return found
        if zlib.crc32(kind + data) & 0xFFFFFFFF != struct.unpack(">I", crc)[0]:
            raise PromptError(f"{where} is corrupt (CRC mismatch)")
        found[keyword] = _chunk_text(kind, data[len(keyword) + 1 :], where)
    logger.warning("%s has more than %d chunks; prompt text read from the first %d", name, MAX_PNG_CHUNKS, MAX_PNG_CHUNKS)
    return found


def _chunk_text(kind: bytes, body: bytes, where: str) -> str:
    if kind == b"tEXt":
        return body.decode("latin-1")
    if kind == b"zTXt":
        if not body or body[0] != 0:
            raise PromptError(f"{where} uses an unknown compression method")
        return _inflate(body[1:], where).decode("latin-1")
    # iTXt: compression flag, method, language tag NUL, translated keyword NUL, UTF-8 text
    if len(body) < 2 or body.count(b"\0", 2) < 2:
        raise PromptError(f"{where} is malformed (missing language or translated keyword)")
    flag, method = body[0], body[1]
    text = body[2:].split(b"\0", 2)[2]
    if flag:
        if method != 0:
            raise PromptError(f"{where} uses an unknown compression method")
        text = _inflate(text, where)
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{where} is not UTF-8 (byte {exc.start})") from None


def _inflate(data: bytes, where: str) -> bytes:
    """zlib-decompress at most :data:`MAX_TEXT_CHUNK_BYTES` (a decompression bomb stops there)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_CHUNK_BYTES)
    except zlib.error as exc:
        raise PromptError(f"{where} does not decompress ({exc})") from None
    if inflater.unconsumed_tail:
        raise PromptError(f"{where} decompresses to more than {MAX_TEXT_CHUNK_BYTES:,} bytes")
    return out


def read_image_prompt(source: PathLike | bytes) -> FoundPrompt | None:
    """The prompt a PNG records (None without one, and for other files); PromptError when the file cannot be read, a
    prompt chunk is corrupt or oversized, or the prompt is not acceptable. This project's ``prompt`` chunks are trusted
    only next to a ``Software`` starting with :data:`LATESTEPS_SOFTWARE` (ComfyUI writes a ``prompt`` chunk holding its
    node graph); a ``parameters`` chunk holding a JSON object (this project's CLI record, or Fooocus's) is read only for
    its prompt entries, any other is A1111's infotext."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else format_path(source)
    text = read_png_text(source, ("Software", A1111_KEY, *PROMPT_KEYS))
    if text is None:
        return None
    if text.get("Software", "").startswith(LATESTEPS_SOFTWARE):
        if "prompt" not in text:
            return None
        return _from_fields(text, f"latesteps metadata of {name}")
    params = text.get(A1111_KEY)
    if params is None or not params.strip():  # an empty chunk records no prompt
        return None
    record = _json_object(params)
    if record is not None:  # a JSON record (ours or Fooocus's), never A1111 text
        if not isinstance(record.get("prompt"), str):
            return None
        return _from_fields(record, f"JSON parameters of {name}")
    return parse_a1111_parameters(params, f"A1111 parameters of {name}")


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # deep nesting; a number over Python's digit limit
        raise PromptError(f"JSON parameters are not readable ({_json_failure(exc)})") from None
    return value if isinstance(value, dict) else None


def _json_failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {one_line(exc)[:80]}"


def _from_fields(fields: Mapping[str, Any], source: str) -> FoundPrompt:
    """prompt / negative_prompt / guidance_scale entries (text or JSON values) as a :class:`FoundPrompt`."""
    scale = fields.get("guidance_scale")
    if isinstance(scale, str):
        try:
            scale = decimal_float(scale) if scale.strip() else None
        except ValueError:
            raise PromptError(f"{source}: guidance_scale={scale!r} is not a number") from None
    return FoundPrompt(fields.get("prompt"), fields.get("negative_prompt"), scale, source)


@dataclass(frozen=True)
class PromptFile:
    """A prompt file's entries by stem; built by :func:`load_prompt_file`."""

    path: str
    entries: Mapping[str, FoundPrompt]

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, stem: str) -> FoundPrompt | None:
        return self.entries.get(stem)

    def for_path(self, path: PathLike) -> FoundPrompt | None:
        return self.lookup(Path(os.fsdecode(path)).stem)

    def missing(self, stems: Iterable[str]) -> list[str]:
        return [s for s in stems if s not in self.entries]


def load_prompt_file(path: PathLike) -> PromptFile:
    """Read and check a prompt file: one prompt per input stem (``Path(input).stem``), UTF-8 (a byte-order mark is
    accepted), each stem once. ``.json``: one object, ``{"stem": "prompt", ...}`` or ``{"stem": {"prompt": ...,
    "negative_prompt": ..., "guidance_scale": 7.5}, ...}``; any other suffix: ``stem<TAB>prompt[<TAB>negative prompt]``
    lines, blank lines and ``#`` lines skipped, fields stripped. PromptError naming the file (and line) for anything
    else."""
    name = format_path(path)
    try:
        text = _read_bounded(path, name).decode("utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as exc:
        data = exc.object  # the bytes after a byte-order mark, which exc.start counts in
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PromptError(
            f"prompt file {name} is not UTF-8: line {line}, byte {column} (0x{data[exc.start]:02x}); save it as UTF-8"
        ) from None
    if os.fsdecode(path).lower().endswith(".json"):
        entries = _parse_json_prompts(text, name)
    else:
        entries = _parse_tsv_prompts(text, name)
    return PromptFile(name, entries)


def _read_bounded(path: PathLike, name: str) -> bytes:
    try:
        st = os.stat(os.fspath(path))  # before open: opening a FIFO would block
        if not stat.S_ISREG(st.st_mode):
            raise PromptError(f"prompt file {name} is not a regular file")
        if st.st_size > MAX_PROMPT_FILE_BYTES:
            raise PromptError(
                f"prompt file {name} is {st.st_size:,} bytes; at most {MAX_PROMPT_FILE_BYTES:,} are accepted (split the batch)"
            )
        with open(os.fspath(path), "rb") as fh:
            data = fh.read(MAX_PROMPT_FILE_BYTES + 1)  # + 1: a file that grew after the check is caught too
    except OSError as exc:
        raise PromptError(f"cannot read prompt file {name}: {exc.strerror or exc}") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise PromptError(f"prompt file {name} is over {MAX_PROMPT_FILE_BYTES:,} bytes (split the batch)")
    return data


def _check_stem(stem: str, where: str) -> None:
    if not stem:
        raise PromptError(f"{where}: empty stem (write stem<TAB>prompt, the stem being the input's name without suffix)")
    if "/" in stem or "\\" in stem:
        raise PromptError(f"{where}: stem {stem!r} holds a path separator; give the file name without folder or suffix")


def _parse_tsv_prompts(text: str, name: str) -> dict[str, FoundPrompt]:
    entries: dict[str, FoundPrompt] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"prompt file {name} line {number}"
        fields = line.split("\t")
        if len(fields) not in (2, 3):
            raise PromptError(
                f"{where}: {len(fields) - 1} TAB(s); write stem<TAB>prompt or stem<TAB>prompt<TAB>negative prompt"
            )
        stem = fields[0].strip()
        _check_stem(stem, where)
        if stem in entries:
            raise PromptError(f"{where}: stem {stem!r} was already given on line {first_line[stem]}; give each once")
        negative = fields[2].strip() if len(fields) == 3 else None
        entries[stem] = FoundPrompt(fields[1].strip(), negative, None, where)
        first_line[stem] = number
    return entries


def _parse_json_prompts(text: str, name: str) -> dict[str, FoundPrompt]:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise PromptError(f"prompt file {name}: key {key!r} appears twice; give each stem once")
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise PromptError(f"prompt file {name} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except PromptError:
        raise
    except (ValueError, RecursionError) as exc:  # nested too deeply; a number over Python's digit limit
        raise PromptError(f"prompt file {name} is not readable JSON ({_json_failure(exc)})") from None
    if not isinstance(data, dict):
        raise PromptError(f"prompt file {name} must hold one JSON object {{stem: prompt}}, got {type(data).__name__}")
    entries: dict[str, FoundPrompt] = {}
    allowed = set(PROMPT_KEYS)
    for stem, value in data.items():
        where = f"prompt file {name}, stem {stem!r}"
        _check_stem(stem, where)
        if isinstance(value, str):
            entries[stem] = FoundPrompt(value, None, None, where)
            continue
        if not isinstance(value, dict) or not isinstance(value.get("prompt"), str) or set(value) - allowed:
            raise PromptError(
                f'{where}: must be a prompt string or an object with "prompt" and optionally "negative_prompt", '
                '"guidance_scale" (no other keys)'
            )
        entries[stem] = FoundPrompt(value["prompt"], value.get("negative_prompt"), value.get("guidance_scale"), where)
    return entries
