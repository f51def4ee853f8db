"""Does a PNG's image data hold every row its header announces? Pillow decodes a PNG whose zlib stream ends early but
cleanly without an error and leaves the missing rows black."""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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


MAX_IDAT_CHUNKS = 100_000  # encoders write a few large chunks (8 KiB to 1 MiB); millions cost seconds to walk


def png_problem(data: bytes) -> str | None:
    """None when ``data`` (a PNG file's bytes) holds all its image data in a sane number of chunks, else the rest of a
    sentence starting "PNG file ..." ("is truncated or incomplete (...)"). Files it cannot parse are left to Pillow
    (None): this only finds what Pillow lets through."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    view = memoryview(data)
    pos, inflate, have, chunks = len(PNG_SIGNATURE), zlib.decompressobj(), 0, 0
    need = height = None
    pending: list[memoryview] = []
    pending_size = 0
    while True:
        kind = None  # past the last whole chunk header: the pending data is inflated, then the loop ends
        if pos + 8 <= len(data):
            length, kind = struct.unpack_from(">I4s", data, pos)
            body = view[pos + 8 : pos + 8 + length]
            pos += 12 + length
            if kind == b"IDAT" and need is not None:
                chunks += 1
                if chunks > MAX_IDAT_CHUNKS:
                    return (f"holds more than {MAX_IDAT_CHUNKS:,} image-data chunks (encoders write a few large ones); "
                            "re-save it with any image editor")  # fmt: skip
                pending.append(body)
                pending_size += len(body)
                if pending_size < _CHUNK:
                    continue
        if pending:
            try:
                have += _inflated_size(inflate, b"".join(pending), need + 1 - have)
            except zlib.error:
                return None  # corrupt data: Pillow says so itself
            pending, pending_size = [], 0
            if have >= need:
                return None
        if kind is None or kind == b"IEND":
            break
        if kind == b"IHDR" and len(body) == 13 and need is None:
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if colour not in _CHANNELS:
                return None
            need = expected_bytes(width, height, depth, colour, interlace == 1)
    if need is None or height is None or have >= need:
        return None
    row = need / max(height, 1)
    return f"is truncated or incomplete (its image data ends after about {int(have // row)} of {height} rows)"


def _inflated_size(inflate: zlib._Decompress, body: bytes, limit: int) -> int:  # type: ignore[name-defined]
    """Bytes ``body`` inflates to (fed into ``inflate``), counting at most ``limit`` of them, 64 KiB at a time."""
    total = len(inflate.decompress(body, min(_CHUNK, limit)))
    while inflate.unconsumed_tail and total < limit:
        total += len(inflate.decompress(inflate.unconsumed_tail, min(_CHUNK, limit - total)))
    return total
