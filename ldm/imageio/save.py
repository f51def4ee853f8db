"""Atomic image writing (a killed job or a full disk never leaves a partial image) with metadata: PNG text chunks, or
for JPEG and WebP a JSON object in the EXIF ``ImageDescription`` tag, which ``exiftool`` reads too."""

from __future__ import annotations

import errno as errno_codes
import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ldm.imageio.errors import ImageLoadError, ImageSaveError, PathLike, format_path
from ldm.util import atomic_write_bytes, one_line

logger = logging.getLogger(__name__)

SAVE_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_IMAGE_DESCRIPTION_TAG = 0x010E
_ZIP_TEXT_ABOVE = 1024

_ERRNO_REASONS = {
    errno_codes.EACCES: "permission denied (the folder is not writable by this user)",
    errno_codes.EPERM: "operation not permitted",
    errno_codes.ENOSPC: "no space left on device",
    errno_codes.EDQUOT: "disk quota exceeded",
    errno_codes.EROFS: "read-only file system",
    errno_codes.ENOTDIR: "a component of the output folder is a file, not a folder",
    errno_codes.EEXIST: "a component of the output folder is a file, not a folder",
    errno_codes.EISDIR: "the destination is a directory",
    errno_codes.ENAMETOOLONG: "file name too long",
}


def save_image_atomic(
    path: PathLike,
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    quality: int = 95,
) -> Path:
    """Write uint8 ``rgb`` ``[H, W, 3]`` (+ ``alpha`` ``[H, W]``, uint8 or float in ``[0, 1]``: RGBA for PNG/WebP,
    dropped with a warning for JPEG) to ``path`` atomically, creating missing parent folders, in the suffix's format
    (:data:`SAVE_FORMATS`), with ``metadata`` (keys: 1-79 Latin-1 characters) and JPEG/WebP ``quality`` 1-100; returns
    the destination. ImageSaveError (one line, ``errno``; no partial or temporary file left); ValueError for an
    unsupported suffix, before writing."""
    dest = Path(os.fsdecode(path))
    fmt = SAVE_FORMATS.get(dest.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot save {format_path(path)}: suffix {dest.suffix!r} is not one of {sorted(SAVE_FORMATS)}")
    image = to_pil(rgb, alpha)
    if fmt == "JPEG" and image.mode == "RGBA":
        logger.warning("%s: JPEG cannot store transparency; the alpha channel is dropped", format_path(path))
        image = image.convert("RGB")
    options = _format_options(fmt, dict(metadata or {}), quality)
    if dest.is_dir():
        raise ImageSaveError(path, _ERRNO_REASONS[errno_codes.EISDIR], errno_codes.EISDIR)
    try:
        atomic_write_bytes(dest, lambda fh: image.save(fh, format=fmt, **options))  # mode as the umask gives
    except OSError as exc:
        reason, detail = _ERRNO_REASONS.get(exc.errno), one_line(exc.strerror or exc)
        raise ImageSaveError(path, f"{reason} ({detail})" if reason else detail, exc.errno) from exc
    return dest


def to_pil(rgb: np.ndarray, alpha: np.ndarray | None) -> Image.Image:
    """uint8 ``[H, W, 3]`` (+ ``[H, W]`` alpha, uint8 or float in ``[0, 1]``) as a PIL RGB or RGBA image."""
    rgb = np.ascontiguousarray(rgb)
    if alpha is None:
        return Image.fromarray(rgb, mode="RGB")
    alpha = np.asarray(alpha)
    if alpha.dtype != np.uint8:
        alpha = np.round(alpha.astype(np.float64) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.dstack([rgb, alpha])), mode="RGBA")


def _format_options(fmt: str, metadata: dict[str, str], quality: int) -> dict:
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value, zip=len(value) > _ZIP_TEXT_ABOVE)
        return {"pnginfo": info}
    options: dict = {"quality": quality}
    if metadata:
        exif = Image.Exif()
        exif[_IMAGE_DESCRIPTION_TAG] = json.dumps(metadata, ensure_ascii=True, sort_keys=True)
        options["exif"] = exif.tobytes()
    return options


def read_png_metadata(path: PathLike) -> dict[str, str]:
    """The text chunks of a PNG file as ``{key: value}``; ImageLoadError when it is missing, not a PNG, or corrupt."""
    image = _open_for_metadata(path, ("PNG",))
    return {str(key): str(value) for key, value in image.text.items()}


def read_image_metadata(path: PathLike) -> dict[str, str]:
    """Metadata written by :func:`save_image_atomic`: PNG text chunks, or the JSON object in JPEG/WebP EXIF ({} when
    there is none; an ``ImageDescription`` that is not such an object comes back under the key ``"ImageDescription"``)."""
    image = _open_for_metadata(path, ("PNG", "JPEG", "WEBP"))
    if image.format == "PNG":
        return {str(key): str(value) for key, value in image.text.items()}
    description = image.getexif().get(_IMAGE_DESCRIPTION_TAG)
    if description is None:
        return {}
    try:
        parsed = json.loads(description)
    except (TypeError, ValueError):
        parsed = None
    if isinstance(parsed, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
        return parsed
    return {"ImageDescription": str(description)}


def _open_for_metadata(path: PathLike, formats: tuple[str, ...]) -> Image.Image:
    try:
        with open(os.fspath(path), "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageLoadError(path, one_line(exc.strerror or exc)) from None
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
        image.load()
    except Exception as exc:  # Pillow raises many types on corrupt data
        raise ImageLoadError(path, f"not a readable {'/'.join(formats)} file ({one_line(exc)})") from exc
    return image
