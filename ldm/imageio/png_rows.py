"""Does a PNG's image data hold every row its header announces?

Pillow decodes a PNG whose compressed stream ends early but cleanly (a complete zlib stream of fewer rows) without an
error and leaves the missing rows black, so such a file would be refined as if its bottom were black.  This check
inflates the file's ``IDAT`` data again, counting bytes without keeping them (at most 64 KiB at a time), and compares the
count with what the header's size, colour type, bit depth and interlacing need.
"""

from __future__ import annotations

import struct
import zlib

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
# Adam7 passes: (x start, y start, x step, y step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_CHUNK = 1 << 16


def expected_bytes(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """Bytes of filtered image data (a filter byte per row, then the row's packed samples) a PNG of this header holds."""
    bits = _CHANNELS[colour_type] * bit_depth

    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)

    if not interlaced:
        return rows(width, height)
    return sum(rows(max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy))
               for x0, y0, dx, dy in _ADAM7)  # fmt: skip


def missing_rows(data: bytes) -> str | None:
    """None when ``data`` (a PNG file's bytes) holds all its image data, else a short reason ("its image data ends
    after 8 of 16 rows").  Files it cannot parse are left to Pillow (None): this only finds what Pillow lets through."""
    if not data.startswith(_SIGNATURE):
        return None
    pos, header, inflate, have = len(_SIGNATURE), None, zlib.decompressobj(), 0
    need = None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR" and len(body) == 13:
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if colour not in _CHANNELS:
                return None
            header = (width, height)
            need = expected_bytes(width, height, depth, colour, interlace == 1)
        elif kind == b"IDAT" and need is not None:
            try:
                have += _inflated_size(inflate, body, need + 1 - have)
            except zlib.error:
                return None  # corrupt data: Pillow says so itself
            if have >= need:
                return None
        elif kind == b"IEND":
            break
    if need is None or header is None or have >= need:
        return None
    width, height = header
    row = need / max(height, 1)
    return f"its image data ends after about {int(have // row)} of {height} rows"


def _inflated_size(inflate: zlib._Decompress, body: bytes, limit: int) -> int:  # type: ignore[name-defined]
    """Bytes ``body`` inflates to (fed into ``inflate``), counting at most ``limit`` of them, 64 KiB at a time."""
    total = len(inflate.decompress(body, min(_CHUNK, limit)))
    while inflate.unconsumed_tail and total < limit:
        total += len(inflate.decompress(inflate.unconsumed_tail, min(_CHUNK, limit - total)))
    return total
