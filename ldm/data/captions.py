"""Captions of training samples (``cond_stage_key: caption``), from an image's ``<stem>.txt``, a shard sample's ``.txt``
member or its ``.json``'s ``caption`` (img2dataset / LAION), or a latent cache's ``.txt`` member."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CAPTION_KEY = "caption"
CAPTION_MODES: tuple[str, ...] = ("off", "optional", "required")
CACHE_CAPTION_MODES: tuple[str, ...] = ("auto", *CAPTION_MODES)
# Longest caption in bytes (UTF-8): far above CLIP's 77 tokens (about 300 characters), low enough that a .txt holding
# something else (a log, a dump) is refused before it is read into memory and tokenized.
MAX_CAPTION_BYTES = 10 * 1024
# Largest .json member read for its caption field (LAION metadata: up to a few KB).
MAX_CAPTION_JSON_BYTES = 1 << 16
# shard member extensions that carry captions, in the order they are looked for
CAPTION_EXTS: tuple[str, ...] = ("txt", "json")
# member size limits for ldm.data.tar_shards.iter_samples: caption members are refused from their tar headers
CAPTION_MEMBER_LIMITS: dict[str, int] = {"txt": MAX_CAPTION_BYTES, "json": MAX_CAPTION_JSON_BYTES}


class CaptionError(ValueError):
    """A caption that cannot be used: the sample is unreadable (a ValueError: datasets skip it as a corrupt image)."""


def check_caption_mode(mode: str, allowed: tuple[str, ...] = CAPTION_MODES) -> str:
    """``mode``, or a ValueError (what each choice does) unless it is in ``allowed``."""
    if mode not in allowed:
        raise ValueError(
            f"captions={mode!r} is not one of {list(allowed)}: 'off' yields no captions, 'optional' yields '' for a "
            "sample without one, 'required' treats a missing caption as an error"
            + (", 'auto' follows what the cache recorded" if "auto" in allowed else "")
        )
    return mode


def cache_caption_mode(mode: str, recorded: int | None) -> str:
    """A latent-cache reader's ``mode`` (one of :data:`CACHE_CAPTION_MODES`), ``"auto"`` resolved to ``"optional"``
    when the cache recorded captions (``recorded``: how many samples have one; None: unknown) and to ``"off"`` else."""
    if check_caption_mode(mode, CACHE_CAPTION_MODES) != "auto":
        return mode
    return "optional" if recorded else "off"


def decode_caption(data: bytes, what: str) -> str:
    """A caption from at most :data:`MAX_CAPTION_BYTES` of strict UTF-8 (byte-order mark dropped), whitespace stripped;
    else :class:`CaptionError` naming ``what``."""
    if len(data) > MAX_CAPTION_BYTES:
        raise CaptionError(
            f"{what}: caption of {len(data):,} bytes is longer than the {MAX_CAPTION_BYTES:,} allowed "
            "(ldm.data.captions.MAX_CAPTION_BYTES); shorten it"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(
            f"{what}: caption is not UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); re-save it as UTF-8"
        ) from None
    return text.strip()


def sidecar_path(image_path: str | os.PathLike) -> Path:
    return Path(image_path).with_suffix(".txt")


def read_caption_file(path: str | os.PathLike) -> str | None:
    """The caption in ``path``, or None when there is no such file; only a regular file is opened (a FIFO would block
    the open).  :class:`CaptionError` for an unusable file, OSError for one that cannot be read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        raise CaptionError(f"{path}: the caption is not a regular file (a folder, device, FIFO or socket)")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_CAPTION_BYTES:
            raise CaptionError(
                f"{path}: caption file of {size:,} bytes is longer than the {MAX_CAPTION_BYTES:,} "
                "allowed (ldm.data.captions.MAX_CAPTION_BYTES); shorten it"
            )
        data = fh.read(MAX_CAPTION_BYTES + 1)  # the file may have grown since fstat: the bound still holds
    return decode_caption(data, str(path))


def sample_caption(sample: Mapping[str, Any], what: str) -> str | None:
    """The caption of a raw shard sample (``{ext: bytes}``): its ``txt`` member, else its ``json`` member's
    ``caption`` field; None when it has neither.  :class:`CaptionError` for an unusable caption or ``json`` member."""
    if "txt" in sample:
        return decode_caption(sample["txt"], what)
    if "json" not in sample:
        return None
    raw = sample["json"]
    if len(raw) > MAX_CAPTION_JSON_BYTES:
        raise CaptionError(f"{what}: .json member of {len(raw):,} bytes is longer than {MAX_CAPTION_JSON_BYTES:,}")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deep enough to exhaust the parser's stack
        raise CaptionError(f"{what}: .json member is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise CaptionError(f"{what}: .json member is not a JSON object")
    caption = meta.get(CAPTION_KEY)
    if caption is None:
        return None
    if not isinstance(caption, str):
        raise CaptionError(f"{what}: the .json member's caption is {type(caption).__name__}, not a string")
    return decode_caption(caption.encode("utf-8", "surrogatepass"), what)


def caption_item(caption: str | None, mode: str, what: str) -> dict[str, str]:
    """``{CAPTION_KEY: caption}`` for an item in ``mode`` (``{}`` when ``"off"``; ``""`` for a missing caption when
    ``"optional"``: guidance's unconditional prompt); a missing caption in ``"required"`` mode raises :class:`CaptionError`."""
    if mode == "off":
        return {}
    if caption is None and mode == "required":
        raise CaptionError(
            f"{what}: no caption (captions='required'; give it a caption or use "
            "captions='optional' to train it with the empty caption)"
        )
    return {CAPTION_KEY: "" if caption is None else caption}
