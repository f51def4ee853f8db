"""Loading images: every pixel mode, EXIF orientation, alpha, one-line errors. Files are decoded fully (a truncated file
fails here, not half-way through a batch) to float32 RGB in ``[0, 1]`` (keeps 16-bit precision), alpha apart."""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ldm.imageio.errors import ImageLoadError, PathLike, format_path
from ldm.imageio.png_rows import png_problem
from ldm.util import one_line

logger = logging.getLogger(__name__)

# Pillow format names the loader opens (others run external programs, EPS via Ghostscript, or parse rarely audited
# formats).  JPEG includes the multi-picture JPEGs of cameras and phones, which Pillow reports as format "MPO".
LOADER_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "AVIF", "BMP", "GIF", "TIFF", "PPM")

# File suffixes (lower case) that folder and glob expansion treat as images.
IMAGE_SUFFIXES: tuple[str, ...] = tuple(
    ".png .jpg .jpeg .jpe .jfif .webp .avif .bmp .gif .tif .tiff .ppm .pgm .pbm .pnm".split()
)

_SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_GRAY_MODES = ("1", "L", "LA", "La")
_MODE_BITS = {"1": 1, "I": 32, "F": 32, **dict.fromkeys(_SIXTEEN_BIT_GRAY_MODES, 16)}  # bits per sample; others 8
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)  # 1 is upright; other values are invalid and ignored, as Pillow does
_PIXEL_COUNT = re.compile(r"\((\d+) pixels\)")
_warned_truncation_hidden = False


@dataclass
class LoadedImage:
    """A decoded image: ``rgb`` float32 ``[H, W, 3]`` in ``[0, 1]``, C-contiguous (grayscale replicated to three
    channels, 16-bit sources divided by 65535: no clipping, no loss); ``alpha`` float32 ``[H, W]`` in ``[0, 1]``
    (straight, not premultiplied) or None without transparency; ``info``: ``path`` (printable), ``format`` (Pillow's
    name), ``mode`` (source pixel mode), ``size`` ``(width, height)`` after orientation, ``bit_depth`` (bits per sample
    in the file), ``decoded_bit_depth`` (bits that reached ``rgb``: Pillow decodes colour at 8 bits even when the file
    holds 16), ``frames`` (None if uncountable), ``exif_orientation`` (the tag or None), ``orientation_applied``,
    ``has_alpha``, ``icc_profile`` (the file embeds a colour profile; pixels are not colour-managed), ``file_bytes``.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def load_image(path: PathLike) -> LoadedImage:
    """Read and fully decode the image at ``path`` (str, bytes or PathLike; names that are not valid UTF-8 work).
    ImageLoadError (one line naming the path and the cause) for a missing, empty, unreadable, non-image, truncated,
    corrupt or too large (decompression bomb) file, or a folder; TypeError when ``path`` is not a path (an int)."""
    return decode_image(_read_file(path), source=path)


def decode_image(data: bytes, source: PathLike = "<bytes>") -> LoadedImage:
    """:func:`load_image` for a file's bytes; ``source`` only names it in errors, logs and ``info["path"]``."""
    if not data:
        raise ImageLoadError(source, "file is empty (0 bytes)")
    _warn_if_truncation_hidden()
    fmt: str | None = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat the warning as the error it guards against.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=_available_formats())
                fmt = image.format
                image, frames = _first_frame(image, data, source)
                problem = png_problem(data) if fmt == "PNG" else None  # before Pillow decodes: a bound on its work
                if problem is not None:
                    raise ImageLoadError(source, f"PNG file {problem}")
                image.load()
                return _convert(image, source, frames, _file_bit_depth(image, data), len(data))
            finally:
                # Pillow warns about recoverable damage (corrupt EXIF, odd TIFF tags); say which file it was.
                for message in dict.fromkeys(one_line(w.message) for w in caught):
                    logger.warning("%s: %s", format_path(source), message)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(source, _bomb_reason(exc)) from None
    except UnidentifiedImageError:
        raise ImageLoadError(source, _unidentified_reason(data, source)) from None
    except ImageLoadError:
        raise
    except Exception as exc:  # Pillow's decoders raise a wide, version-dependent set of types on corrupt data
        raise ImageLoadError(source, _corrupt_reason(exc, fmt)) from exc


def from_pil(image: Image.Image, source: str = "<PIL.Image>") -> LoadedImage:
    """Convert an in-memory PIL image (any mode) exactly as :func:`load_image` converts a file (callers have checked
    that it is a ``PIL.Image.Image``)."""
    try:
        image.load()
        frames = getattr(image, "n_frames", 1)
        return _convert(image, source, frames, _MODE_BITS.get(image.mode, 8), None)
    except ImageLoadError:
        raise
    except Exception as exc:  # a lazily opened PIL image decodes here and can fail like any file
        raise ImageLoadError(source, _corrupt_reason(exc, image.format)) from exc


def _read_file(path: PathLike) -> bytes:
    fs_path = os.fspath(path)  # TypeError for non-paths (an int would otherwise be taken as a file descriptor)
    try:
        st = os.stat(fs_path)
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied (a parent folder is not searchable)") from None
    except ValueError as exc:  # embedded NUL byte
        raise ImageLoadError(path, f"invalid path ({exc})") from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot stat the file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(path, "is not a regular file (device, FIFO or socket)")
    limit = max_file_bytes()
    if limit is not None and st.st_size > limit:
        raise ImageLoadError(path, _too_large_reason(st.st_size, limit))
    try:
        data = _read_bytes(fs_path)
    except PermissionError:
        raise ImageLoadError(path, "permission denied (the file is not readable by this user; check chmod)") from None
    except OSError as exc:
        raise ImageLoadError(path, f"read failed ({exc.strerror or exc})") from None
    if limit is not None and len(data) > limit:  # the file grew after it was checked
        raise ImageLoadError(path, _too_large_reason(len(data), limit))
    return data


def max_file_bytes() -> int | None:
    """The largest file the loader reads (refused before any of it is read): ``PIL.Image.MAX_IMAGE_PIXELS`` pixels of
    16 bytes (four float32 channels uncompressed) plus 1 MiB of headers and metadata; None when that limit is off."""
    pixels = Image.MAX_IMAGE_PIXELS
    return None if pixels is None else 16 * int(pixels) + 2**20


def _read_bytes(fs_path: str | bytes) -> bytes:
    """The file's bytes, at most :func:`max_file_bytes` + 1 of them (enough to tell that it is too large)."""
    limit = max_file_bytes()
    with open(fs_path, "rb") as fh:
        return fh.read() if limit is None else fh.read(limit + 1)


def _too_large_reason(size: int, limit: int) -> str:
    return (
        f"file is {size:,} bytes, more than an image within Pillow's decompression-bomb limit "
        f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS:,} pixels can take ({limit:,} bytes); if you trust the file, "
        "raise the limit before loading (PIL.Image.MAX_IMAGE_PIXELS = <pixels>, or None to disable)"
    )


def _first_frame(image: Image.Image, data: bytes, source: PathLike) -> tuple[Image.Image, int | None]:
    """Position a multi-frame image on its first frame; returns the image and its frame count (None if uncountable)."""
    try:
        frames: int | None = int(getattr(image, "n_frames", 1))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as exc:  # a corrupt later frame must not cost the first one
        logger.warning("%s: cannot count frames (%s); using the first frame", format_path(source), one_line(exc))
        image = Image.open(io.BytesIO(data), formats=(image.format,))
        return image, None
    if frames > 1:
        logger.info("%s: %s with %d frames; using the first frame", format_path(source), image.format, frames)
        image.seek(0)
    return image, frames


def _convert(
    image: Image.Image,
    source: PathLike,
    frames: int | None,
    bit_depth: int,
    file_bytes: int | None,
) -> LoadedImage:
    fmt, source_mode = image.format, image.mode
    has_icc = bool(image.info.get("icc_profile"))
    orientation, oriented, image = _orient(image, source)
    rgb, alpha, decoded_bits = _to_arrays(image, source)
    if bit_depth > decoded_bits and decoded_bits == 8:
        logger.warning(
            "%s: %d-bit %s decoded at 8 bits per channel (Pillow has no 16-bit colour mode)",
            format_path(source),
            bit_depth,
            source_mode,
        )
    info = {
        "path": format_path(source),
        "format": fmt,
        "mode": source_mode,
        "size": (int(rgb.shape[1]), int(rgb.shape[0])),
        "bit_depth": bit_depth,
        "decoded_bit_depth": decoded_bits,
        "frames": frames,
        "exif_orientation": orientation,
        "orientation_applied": oriented,
        "has_alpha": alpha is not None,
        "icc_profile": has_icc,
        "file_bytes": file_bytes,
    }
    return LoadedImage(rgb=rgb, alpha=alpha, info=info)


def _orient(image: Image.Image, source: PathLike) -> tuple[int | None, bool, Image.Image]:
    """``(EXIF orientation or None, whether it was applied, image)``; malformed EXIF is logged and ignored."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
        if orientation not in _TRANSPOSING_ORIENTATIONS:
            return orientation, False, image
        return orientation, True, ImageOps.exif_transpose(image)
    except Exception as exc:  # EXIF is untrusted metadata; its parser raises many types on junk
        logger.warning("%s: ignoring unreadable EXIF data (%s)", format_path(source), one_line(exc))
        return None, False, image


def _to_arrays(image: Image.Image, source: PathLike) -> tuple[np.ndarray, np.ndarray | None, int]:
    """``(rgb float32 [H, W, 3] in [0, 1], alpha float32 [H, W] or None, decoded bits per sample)``."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_GRAY_MODES or mode == "I":
        values = np.asarray(image)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageLoadError(
                source,
                f"32-bit integer pixels in [{lo}, {hi}] are outside the 16-bit range [0, 65535]; "
                "convert the image to 8- or 16-bit first",
            )
        if mode == "I":
            logger.info("%s: 32-bit integer pixels in [%d, %d] read as 16-bit (divided by 65535)", format_path(source), lo, hi)
        gray = values.astype(np.float32) / np.float32(65535.0)
        key = image.info.get("transparency")  # a tRNS chunk marking one gray value as transparent
        alpha = (values != key).astype(np.float32) if isinstance(key, int) else None
        return _gray_to_rgb(gray), alpha, 16
    if mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        if not np.isfinite(gray).all() or (gray.size and (gray.min() < 0.0 or gray.max() > 1.0)):
            raise ImageLoadError(
                source, "32-bit float pixels must be finite and in [0, 1]; rescale the image or save it as 8/16-bit"
            )
        return _gray_to_rgb(gray), None, 32
    has_alpha = mode in _ALPHA_MODES or image.info.get("transparency") is not None
    gray_mode = mode in _GRAY_MODES
    target = ("LA" if has_alpha else "L") if gray_mode else ("RGBA" if has_alpha else "RGB")
    if mode != target:
        try:
            image = image.convert(target)
        except ValueError as exc:
            raise ImageLoadError(source, f"pixel mode {mode} cannot be converted to {target} ({exc})") from None
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if gray_mode:
        rgb = _gray_to_rgb(pixels[..., 0] if has_alpha else pixels)
    else:
        rgb = np.ascontiguousarray(pixels[..., :3])
    alpha = np.ascontiguousarray(pixels[..., -1]) if has_alpha else None
    return rgb, alpha, 8


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def _file_bit_depth(image: Image.Image, data: bytes) -> int:
    """Bits per sample as stored in the file (PNG IHDR, TIFF BitsPerSample), else implied by the pixel mode."""
    if image.format == "PNG" and data[12:16] == b"IHDR" and len(data) > 24:
        return int(data[24])
    if image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(258)
        if isinstance(bits, tuple) and bits:
            return int(max(bits))
        if isinstance(bits, int):
            return bits
    return _MODE_BITS.get(image.mode, 8)


def header_size(source: PathLike | bytes) -> tuple[int, int] | None:
    """``(width, height)`` from an image file's header (a path or the file's bytes; no pixel decoded); None when it
    cannot be read (the loader then says why) or a path is not a regular file (a FIFO would block)."""
    try:
        if not isinstance(source, bytes) and not stat.S_ISREG(os.stat(source).st_mode):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a decompression-bomb warning: the loader turns those into its error
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=_available_formats()) as image:
                return int(image.size[0]), int(image.size[1])
    except Image.DecompressionBombError:  # over twice the limit: the size is still in the header, and callers want it
        return _size_past_bomb_limit(source)
    except Exception:  # Pillow's header parsers raise a wide, version-dependent set of types on junk
        return None


def _size_past_bomb_limit(source: PathLike | bytes) -> tuple[int, int] | None:
    """The header's size through the format's own parser, as ``Image.open`` finds it but without its bomb check (no
    pixel is decoded)."""
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as fh:
        prefix = fh.read(16)
        for name in _available_formats():
            factory, accept = Image.OPEN[name]
            fh.seek(0)
            if accept is not None and not accept(prefix):
                continue
            try:
                with factory(fh) as image:
                    return int(image.size[0]), int(image.size[1])
            except Exception:  # as Image.open does: the next format may take it
                continue
    return None


def _available_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(name for name in LOADER_FORMATS if name in Image.OPEN)


def _bomb_reason(exc: Exception) -> str:
    match = _PIXEL_COUNT.search(str(exc))
    limit = Image.MAX_IMAGE_PIXELS
    count = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    limit_text = f"{limit:,}" if limit is not None else "None"
    return (
        f"image has {count}, more than Pillow's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS={limit_text}; "
        "if you trust the file, raise the limit before loading (PIL.Image.MAX_IMAGE_PIXELS = <pixels>, or None to disable)"
    )


def _corrupt_reason(exc: Exception, fmt: str | None) -> str:
    name = fmt or "image"
    message = one_line(exc) or type(exc).__name__
    if isinstance(exc, (EOFError, struct.error)) or "truncated" in message.lower():
        return f"{name} file is truncated or incomplete ({message})"
    if isinstance(exc, MemoryError):
        return f"not enough memory to decode this {name} file"
    return f"{name} data is corrupt ({type(exc).__name__}: {message})"


def _unidentified_reason(data: bytes, source: PathLike) -> str:
    head = data[:64]
    suffix = os.path.splitext(os.fsdecode(source))[1].lower()
    named = f"named {suffix} but " if suffix else ""
    supported = ", ".join(_available_formats())
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"heim", b"heis"):
        return f"{named}it is a HEIC/HEIF image, which Pillow cannot read; convert it to PNG or JPEG first"
    if head.startswith(b"%PDF"):
        return f"{named}it is a PDF document, not a raster image (supported: {supported})"
    if head.startswith(b"%!PS") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        return f"{named}it is a PostScript/EPS file, which is not opened (it would run Ghostscript); rasterise it first"
    stripped = head.lstrip()
    if stripped.startswith((b"<svg", b"<?xml", b"<!DOCTYPE", b"<html", b"<!doctype")):
        return f"{named}it is an SVG/XML/HTML text file, not a raster image (a failed download?)"
    for signature, kind in ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF")):
        if head.startswith(signature):  # a cut-off download, not another format
            return f"it starts like a {kind} file but its header is truncated or damaged ({len(data)} bytes in all)"
    if _looks_like_text(head):
        preview = head[:24].decode("utf-8", "backslashreplace").translate({i: " " for i in range(32)})
        return f"{named}it is a text file, not an image (starts with {preview.strip()!r})"
    return f"{named}its content is not a supported image format (first bytes {head[:8].hex()}; supported: {supported})"


def _looks_like_text(head: bytes) -> bool:
    text = head.decode("utf-8", "replace")  # a multi-byte character cut at the end becomes one U+FFFD
    odd = sum(ch == "\ufffd" or not (ch.isprintable() or ch in "\r\n\t") for ch in text)
    return bool(text) and odd <= max(1, len(text) // 20)


def _warn_if_truncation_hidden() -> None:
    """Warn once per process when ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set: it hides truncation."""
    global _warned_truncation_hidden
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncation_hidden:
        _warned_truncation_hidden = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated files will load with grey areas "
            "instead of failing; set it back to False to have them reported"
        )
