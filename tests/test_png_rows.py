"""ldm.imageio.png_rows: a PNG whose image data ends early (a clean zlib stream of fewer rows than its header says),
which Pillow decodes without an error and fills with black, is refused by the loader."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm.imageio import ImageLoadError, decode_image
from ldm.imageio.png_rows import expected_bytes, png_problem


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def short_png(width: int, height: int, colour_type: int, channels: int, rows: int, idat_chunks: int = 1) -> bytes:
    """A PNG whose header says ``height`` rows but whose data holds ``rows`` (grey 128), split over ``idat_chunks``."""
    data = zlib.compress(b"".join(b"\x00" + bytes([128] * width * channels) for _ in range(rows)))
    cut = [len(data) * i // idat_chunks for i in range(idat_chunks + 1)]
    idats = b"".join(_chunk(b"IDAT", data[a:b]) for a, b in zip(cut[:-1], cut[1:]))
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + idats + _chunk(b"IEND", b"")


@pytest.mark.parametrize("colour_type, channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
@pytest.mark.parametrize("idat_chunks", [1, 3])
def test_a_png_with_missing_rows_is_refused_in_one_line(colour_type, channels, idat_chunks):
    data = short_png(16, 16, colour_type, channels, rows=8, idat_chunks=idat_chunks)
    with pytest.raises(ImageLoadError) as info:
        decode_image(data, source="short.png")
    message = str(info.value)
    assert "short.png" in message and "truncated or incomplete" in message and "8 of 16 rows" in message
    assert "\n" not in message
    complete = short_png(16, 16, colour_type, channels, rows=16, idat_chunks=idat_chunks)
    assert decode_image(complete, source="ok.png").rgb.shape == (16, 16, 3)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("size", [(1, 1), (3, 7), (17, 5), (64, 33)])
def test_complete_pngs_of_every_kind_pass(mode, size):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (size[1], size[0])).astype(np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8), "RGBA").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert png_problem(buffer.getvalue()) is None
    decode_image(buffer.getvalue())


def test_expected_bytes_closed_forms():
    # 8x8 RGB 8-bit: plain rows are 1 + 24 bytes; Adam7's passes are 1x1, 1x1, 2x1, 2x2, 4x2, 4x4, 8x4 pixels
    assert expected_bytes(8, 8, 8, 2, interlaced=False) == 8 * 25
    assert expected_bytes(8, 8, 8, 2, interlaced=True) == 4 + 4 + 7 + 2 * 7 + 2 * 13 + 4 * 13 + 4 * 25
    assert expected_bytes(1, 1, 8, 2, interlaced=True) == 4  # only the first pass holds a pixel
    assert expected_bytes(9, 1, 1, 0, interlaced=False) == 1 + 2  # 9 one-bit samples pack into 2 bytes


def test_what_it_cannot_parse_is_left_to_pillow():
    assert png_problem(b"not a png") is None
    assert png_problem(b"\x89PNG\r\n\x1a\n") is None  # no header: nothing to compare with
    for cut in (30, 40):  # cut inside the header or before the data: refused by Pillow
        with pytest.raises(ImageLoadError, match="truncated|incomplete|cannot"):
            decode_image(short_png(16, 16, 0, 1, rows=16)[:cut])


def test_a_png_of_millions_of_tiny_chunks_is_refused_before_pillow_decodes_it():
    from ldm.imageio.png_rows import MAX_IDAT_CHUNKS

    data = zlib.compress(b"".join(b"\x00" + bytes(16) for _ in range(16)), 0)
    idats = b"".join(_chunk(b"IDAT", data[i : i + 1]) for i in range(len(data)))
    many = idats + _chunk(b"IDAT", b"") * (MAX_IDAT_CHUNKS + 1 - len(data))
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0)) + many
    with pytest.raises(ImageLoadError, match=f"more than {MAX_IDAT_CHUNKS:,} image-data chunks"):
        decode_image(png + _chunk(b"IEND", b""))
    few = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0)) + idats
    assert decode_image(few + _chunk(b"IEND", b"")).rgb.shape == (16, 16, 3)  # one-byte chunks, well under the cap
