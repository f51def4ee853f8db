"""ldm.imageio input side: loading every pixel mode and format, every bad input, fuzzing, input expansion."""

from __future__ import annotations

import errno
import io
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, features

import ldm.imageio.load as load
from ldm import imageio
from ldm.imageio import ImageLoadError, find_images, load_image

from conftest import load_photos

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def photo(photos) -> np.ndarray:
    """A 128x128 uint8 RGB crop of a real photograph (astronaut, downscaled by 4)."""
    return np.ascontiguousarray(photos[0][::4, ::4])


@pytest.fixture(scope="module")
def small_photo(photos) -> np.ndarray:
    """A non-square 24x40 crop of a real photograph (coffee), small enough for per-case files."""
    return np.ascontiguousarray(photos[1][100:148:2, 200:280:2])


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def as_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(rgb * 255.0).astype(np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def assert_load_error(path, *needles: str) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        imageio.load_image(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot load image ")
    message.encode("utf-8")  # printable: never holds lone surrogates
    for needle in needles:
        assert needle in message, message
    return info.value


# ---------------------------------------------------------------------------------------------------------------------
# pixel modes


def test_rgb_png_round_trip_is_exact(tmp_path, photo):
    path = imageio.save_image_atomic(tmp_path / "rgb.png", photo)
    loaded = imageio.load_image(path)
    assert loaded.rgb.dtype == np.float32 and loaded.rgb.shape == (128, 128, 3) and loaded.rgb.flags.c_contiguous
    assert loaded.alpha is None
    np.testing.assert_array_equal(as_uint8(loaded.rgb), photo)
    info = loaded.info
    assert (info["format"], info["mode"], info["size"], info["bit_depth"], info["frames"]) == ("PNG", "RGB", (128, 128), 8, 1)
    assert info["has_alpha"] is False and info["orientation_applied"] is False and info["path"] == str(path)


def test_rgba_alpha_is_kept_separately_and_reattached(tmp_path, photo):
    alpha = np.tile(np.linspace(0, 255, 128).round().astype(np.uint8), (128, 1))
    src = write(tmp_path / "rgba.png", encode(Image.fromarray(np.dstack([photo, alpha]), "RGBA"), "PNG"))
    loaded = imageio.load_image(src)
    np.testing.assert_array_equal(as_uint8(loaded.rgb), photo)
    np.testing.assert_array_equal(as_uint8(loaded.alpha), alpha)
    assert loaded.alpha.dtype == np.float32 and loaded.info["has_alpha"]
    out = imageio.save_image_atomic(tmp_path / "out.png", as_uint8(loaded.rgb), alpha=loaded.alpha)
    with Image.open(out) as reread:
        assert reread.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(reread), np.dstack([photo, alpha]))


def test_grayscale_l_and_la(tmp_path, photo):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    loaded = imageio.load_image(write(tmp_path / "l.png", encode(Image.fromarray(gray, "L"), "PNG")))
    assert loaded.rgb.shape == (128, 128, 3) and loaded.alpha is None and loaded.info["mode"] == "L"
    for c in range(3):
        np.testing.assert_array_equal(as_uint8(loaded.rgb[..., c]), gray)
    alpha = (gray > 100).astype(np.uint8) * 255
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    loaded = imageio.load_image(write(tmp_path / "la.png", encode(la, "PNG")))
    np.testing.assert_array_equal(as_uint8(loaded.rgb[..., 1]), gray)
    np.testing.assert_array_equal(as_uint8(loaded.alpha), alpha)


def test_grayscale_with_trns_key_gives_alpha(tmp_path, photo):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    loaded = imageio.load_image(write(tmp_path / "k.png", encode(Image.fromarray(gray), "PNG", transparency=int(gray[0, 0]))))
    np.testing.assert_array_equal(loaded.alpha == 0, gray == gray[0, 0])


def test_bilevel_mode_1(tmp_path, photo):
    bits = Image.fromarray(photo).convert("1")
    loaded = imageio.load_image(write(tmp_path / "b.png", encode(bits, "PNG")))
    assert loaded.info["bit_depth"] == 1 and set(np.unique(loaded.rgb)) <= {0.0, 1.0}
    np.testing.assert_array_equal(loaded.rgb[..., 0] == 1.0, np.asarray(bits))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_becomes_alpha(tmp_path, photo, fmt):
    pal = Image.fromarray(photo).quantize(colors=16, dither=Image.Dither.NONE)
    index = np.asarray(pal)
    transparent = int(index[0, 0])
    loaded = imageio.load_image(write(tmp_path / f"p.{fmt.lower()}", encode(pal, fmt, transparency=transparent)))
    assert loaded.info["mode"] == "P"
    np.testing.assert_array_equal(loaded.alpha == 0.0, index == transparent)
    np.testing.assert_array_equal(loaded.alpha[index != transparent], 1.0)
    palette = np.asarray(pal.getpalette()[: 3 * 16], dtype=np.uint8).reshape(-1, 3)
    opaque = index != transparent
    np.testing.assert_array_equal(as_uint8(loaded.rgb)[opaque], palette[index][opaque])


def test_palette_without_transparency_has_no_alpha(tmp_path, photo):
    pal = Image.fromarray(photo).quantize(colors=32)
    loaded = imageio.load_image(write(tmp_path / "p.png", encode(pal, "PNG")))
    assert loaded.alpha is None
    np.testing.assert_array_equal(as_uint8(loaded.rgb), np.asarray(pal.convert("RGB")))


SIXTEEN = (np.arange(20 * 30, dtype=np.int64).reshape(20, 30) * 109 % 65536).astype(np.uint16)
SIXTEEN[0, :3] = [0, 65535, 257]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: encode(Image.fromarray(SIXTEEN), "PNG"), id="png-I;16"),
        pytest.param(
            lambda: encode(Image.frombytes("I;16B", (30, 20), SIXTEEN.astype(">u2").tobytes()), "TIFF"), id="tiff-I;16B"
        ),
        pytest.param(lambda: encode(Image.fromarray(SIXTEEN.astype(np.int32)), "TIFF"), id="tiff-I"),
    ],
)
def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path, make):
    loaded = imageio.load_image(write(tmp_path / "g16.img", make()))
    expected = SIXTEEN.astype(np.float32) / np.float32(65535.0)
    np.testing.assert_array_equal(loaded.rgb[..., 0], expected)
    np.testing.assert_array_equal(loaded.rgb[..., 2], expected)
    assert loaded.rgb.max() == 1.0 and loaded.info["decoded_bit_depth"] == 16
    assert loaded.info["bit_depth"] in (16, 32)


def test_sixteen_bit_png_round_trip_through_tensor(tmp_path):
    loaded = imageio.load_image(write(tmp_path / "g16.png", encode(Image.fromarray(SIXTEEN), "PNG")))
    x = imageio.image_to_tensor(loaded.rgb)
    back = np.round((x[0, 0].double().numpy() + 1.0) / 2.0 * 65535.0).astype(np.uint16)
    np.testing.assert_array_equal(back, SIXTEEN)


def test_sixteen_bit_rgb_png_keeps_the_high_byte(tmp_path, caplog):
    values = np.random.default_rng(0).integers(0, 65536, (6, 7, 3)).astype(">u2")
    values[0, 0] = 65535
    rows = b"".join(b"\x00" + values[y].tobytes() for y in range(6))
    ihdr = struct.pack(">IIBBBBB", 7, 6, 16, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    loaded = imageio.load_image(write(tmp_path / "rgb16.png", data))
    np.testing.assert_array_equal(as_uint8(loaded.rgb), (values >> 8).astype(np.uint8))
    assert loaded.rgb.max() == 1.0
    assert (loaded.info["bit_depth"], loaded.info["decoded_bit_depth"]) == (16, 8)
    assert "decoded at 8 bits" in caplog.text


def test_32_bit_integer_outside_16_bit_range_is_refused(tmp_path):
    data = encode(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "TIFF")
    assert_load_error(write(tmp_path / "i32.tif", data), "outside the 16-bit range")


def test_float_tiff(tmp_path):
    values = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    loaded = imageio.load_image(write(tmp_path / "f.tif", encode(Image.fromarray(values, "F"), "TIFF")))
    np.testing.assert_array_equal(loaded.rgb[..., 1], values)
    assert_load_error(write(tmp_path / "f2.tif", encode(Image.fromarray(values * 3, "F"), "TIFF")), "[0, 1]")


def test_cmyk_jpeg(tmp_path, photo):
    pure = {(255, 0, 0, 0): (0, 255, 255), (0, 255, 0, 0): (255, 0, 255), (0, 0, 0, 255): (0, 0, 0)}
    for cmyk, rgb in pure.items():
        loaded = imageio.load_image(write(tmp_path / "c.jpg", encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=100)))
        assert loaded.info["mode"] == "CMYK"
        assert np.abs(as_uint8(loaded.rgb).astype(int) - rgb).max() <= 3
    data = encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95)
    loaded = imageio.load_image(write(tmp_path / "photo_cmyk.jpg", data))
    assert np.abs(as_uint8(loaded.rgb).astype(int) - photo).mean() < 6


EXIF_REFERENCE = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),
    8: lambda a: np.rot90(a, 1),
    9: lambda a: a,  # not a valid orientation: ignored
}


@pytest.mark.parametrize("orientation", sorted(EXIF_REFERENCE))
def test_exif_orientation_is_applied(tmp_path, small_photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = write(tmp_path / "o.png", encode(Image.fromarray(small_photo), "PNG", exif=exif))
    loaded = imageio.load_image(path)
    np.testing.assert_array_equal(as_uint8(loaded.rgb), EXIF_REFERENCE[orientation](small_photo))
    assert loaded.info["exif_orientation"] == orientation
    assert loaded.info["orientation_applied"] == (2 <= orientation <= 8)
    assert loaded.info["size"] == (loaded.width, loaded.height)


def test_exif_orientation_on_jpeg_and_from_pil(tmp_path, small_photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write(tmp_path / "o.jpg", encode(Image.fromarray(small_photo), "JPEG", exif=exif, quality=98))
    loaded = imageio.load_image(path)
    assert loaded.rgb.shape == (40, 24, 3)
    assert np.abs(as_uint8(loaded.rgb).astype(int) - np.rot90(small_photo, -1)).mean() < 4
    with Image.open(path) as im:
        via_pil = imageio.from_pil(im, source="o.jpg")
    np.testing.assert_array_equal(via_pil.rgb, loaded.rgb)


LOSSLESS = {"PNG": {}, "BMP": {}, "TIFF": {}, "WEBP": {"lossless": True}, "PPM": {}}


@pytest.mark.parametrize("fmt", [*LOSSLESS, "JPEG", "GIF", "AVIF"])
def test_formats(tmp_path, small_photo, fmt):
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow build has no AVIF codec")
    data = encode(Image.fromarray(small_photo), fmt, **LOSSLESS.get(fmt, {}))
    loaded = imageio.load_image(write(tmp_path / "x.img", data))
    assert loaded.rgb.shape == (24, 40, 3) and loaded.info["format"] == fmt
    error = np.abs(as_uint8(loaded.rgb).astype(int) - small_photo)
    if fmt in LOSSLESS:
        assert error.max() == 0
    else:
        assert error.mean() < 12


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame_with_log(tmp_path, fmt, caplog):
    frames = [Image.new("RGB", (10, 8), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
    with caplog.at_level(logging.INFO, logger="ldm.imageio"):
        loaded = imageio.load_image(write(tmp_path / f"anim.{fmt.lower()}", data))
    assert loaded.info["frames"] == 3
    np.testing.assert_array_equal(as_uint8(loaded.rgb)[0, 0], [255, 0, 0])
    assert "3 frames; using the first frame" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs: one line each, naming the path and the cause


def test_zero_byte_file(tmp_path):
    assert_load_error(write(tmp_path / "empty.png", b""), "empty.png", "empty (0 bytes)")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, photo, fmt):
    data = encode(Image.fromarray(photo), fmt)
    path = write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) * 6 // 10])
    assert_load_error(path, "cut.", "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_named_png(tmp_path):
    assert_load_error(write(tmp_path / "notes.png", b"hello, this is not an image\n"), "named .png", "text file")


@pytest.mark.parametrize(
    "head, needle",
    [
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"),
        (b"%PDF-1.7\n", "PDF"),
        (b"<svg xmlns='x'>", "SVG"),
        (bytes(range(200, 256)), "first bytes"),
    ],
)
def test_other_non_images_are_named(tmp_path, head, needle):
    assert_load_error(write(tmp_path / "thing.jpg", head * 4), needle)


@pytest.mark.parametrize("head", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a"])
def test_a_file_cut_off_inside_its_header_says_so(tmp_path, head):
    """A PNG signature alone was 'not a supported image format (first bytes 89504e47...; supported: PNG, ...)'."""
    assert_load_error(write(tmp_path / "cut.png", head), "header is truncated or damaged", f"({len(head)} bytes in all)")


def test_directory_named_png(tmp_path):
    (tmp_path / "x.png").mkdir()
    assert_load_error(tmp_path / "x.png", "x.png", "is a directory")


def test_missing_file_and_fifo(tmp_path):
    assert_load_error(tmp_path / "missing.png", "no such file")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")
        assert_load_error(tmp_path / "pipe.png", "not a regular file")


@pytest.mark.parametrize("limit, size", [(3000, 64), (1000, 64)], ids=["warning-range", "error-range"])
def test_decompression_bomb(tmp_path, monkeypatch, limit, size):
    path = write(tmp_path / "bomb.png", encode(Image.new("RGB", (size, size)), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    assert_load_error(path, f"{size * size:,} pixels", f"MAX_IMAGE_PIXELS={limit:,}", "raise the limit")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert imageio.load_image(path).rgb.shape == (size, size, 3)


@pytest.mark.skipif(IS_ROOT or os.name != "posix", reason="root reads files regardless of permissions")
def test_unreadable_file_real_permissions(tmp_path, small_photo):
    path = imageio.save_image_atomic(tmp_path / "locked.png", small_photo)
    path.chmod(0)
    try:
        assert_load_error(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_unreadable_file(tmp_path, small_photo, monkeypatch):
    path = imageio.save_image_atomic(tmp_path / "locked.png", small_photo)

    def deny(fs_path):
        raise PermissionError(errno.EACCES, "Permission denied", fs_path)

    monkeypatch.setattr("ldm.imageio.load._read_bytes", deny)
    assert_load_error(path, "locked.png", "permission denied")


@pytest.mark.skipif(os.name != "posix", reason="POSIX file names are bytes")
def test_non_utf8_file_names(tmp_path, small_photo):
    folder = os.fsencode(tmp_path)
    good = folder + b"/caf\xe9.png"
    with open(good, "wb") as fh:
        fh.write(encode(Image.fromarray(small_photo), "PNG"))
    for path in (good, os.fsdecode(good), Path(os.fsdecode(good))):
        loaded = imageio.load_image(path)
        np.testing.assert_array_equal(as_uint8(loaded.rgb), small_photo)
        assert loaded.info["path"].endswith("caf\\xe9.png")
    bad = folder + b"/bad\xff\nname.png"
    with open(bad, "wb") as fh:
        fh.write(b"junk")
    error = assert_load_error(bad, "bad\\xff\\x0aname.png")
    assert_load_error(os.fsdecode(bad), "bad\\xff\\x0aname.png")
    assert error.path == bad


@pytest.mark.parametrize(
    "exif, logged",
    [
        (b"MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06", "Corrupt EXIF data"),
        (b"garbage", "ignoring unreadable EXIF"),
    ],
)
def test_damaged_exif_is_logged_with_the_path_and_the_image_loads(tmp_path, exif, logged, caplog):
    png = encode(Image.new("RGB", (4, 3), (9, 8, 7)), "PNG")
    after_ihdr = 8 + 25
    path = write(tmp_path / "exif.png", png[:after_ihdr] + png_chunk(b"eXIf", exif) + png[after_ihdr:])
    loaded = imageio.load_image(path)
    assert loaded.rgb.shape == (3, 4, 3) and loaded.info["orientation_applied"] is False
    assert any(str(path) in r.getMessage() and logged in r.getMessage() for r in caplog.records)


def test_path_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError):
        imageio.load_image(3)


PNG_SEED = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 5, 4), dtype=np.uint8), "RGBA"), "PNG")
GIF_SEED = encode(Image.new("P", (5, 4), 3), "GIF", transparency=3)
JPEG_SEED = encode(Image.new("RGB", (9, 7), (10, 200, 30)), "JPEG")


def check_fuzz_case(data: bytes) -> None:
    """``load_image`` returns a valid image or raises ImageLoadError; anything else fails the test."""
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 1 << 20)  # keep mutated headers from allocating huge images
        path = Path(folder) / "fuzz.png"
        path.write_bytes(data)
        try:
            loaded = imageio.load_image(path)
        except ImageLoadError as exc:
            assert "\n" not in str(exc) and "fuzz.png" in str(exc)
            return
        assert loaded.rgb.dtype == np.float32 and loaded.rgb.ndim == 3 and loaded.rgb.shape[2] == 3
        assert np.isfinite(loaded.rgb).all() and loaded.rgb.min() >= 0.0 and loaded.rgb.max() <= 1.0
        assert loaded.alpha is None or loaded.alpha.shape == loaded.rgb.shape[:2]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=512))
def test_fuzz_random_bytes(data):
    check_fuzz_case(data)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from([PNG_SEED, GIF_SEED, JPEG_SEED]),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])), max_size=8
    ),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_fuzz_mutated_valid_files(seed, edits, cut):
    data = bytearray(seed)
    for position, value, kind in edits:
        i = position % max(len(data), 1)
        if kind == "set" and data:
            data[i] = value
        elif kind == "insert":
            data.insert(i, value)
        elif data:
            del data[i]
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    check_fuzz_case(bytes(data))


# ---------------------------------------------------------------------------------------------------------------------
# input expansion


def test_find_images(tmp_path, small_photo):
    png = encode(Image.fromarray(small_photo), "PNG")
    for rel in ["b/2.png", "b/10.JPG", "a.webp", "b/c/deep.tif", ".hidden/x.png", "b/._junk.png", "b/notes.txt", "z.PNG"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(png)
    (tmp_path / "empty").mkdir()
    inputs = [
        str(tmp_path),
        str(tmp_path / "b" / "notes.txt"),
        str(tmp_path / "b" / "*.png"),
        str(tmp_path / "nope.png"),
        str(tmp_path / "empty"),
        str(tmp_path / "*.gif"),
    ]
    paths, problems = imageio.find_images(inputs)
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert rel == ["a.webp", "b/10.JPG", "b/2.png", "b/c/deep.tif", "z.PNG", "b/notes.txt"]
    assert len(problems) == 3 and all("\n" not in p for p in problems)
    assert "nope.png: no such file or folder" in problems[0]
    assert "empty: folder holds no images" in problems[1]
    assert "*.gif: the pattern matches no image files" in problems[2]
    assert imageio.find_images(inputs) == (paths, problems)
    recursive, none = imageio.find_images([str(tmp_path / "**" / "*.tif")])
    assert [p.name for p in recursive] == ["deep.tif"] and none == []


def test_header_size_reads_the_header_of_a_path_or_bytes_without_decoding(tmp_path):
    from ldm.imageio import header_size

    path = tmp_path / "a.png"
    Image.new("RGB", (37, 21)).save(path)
    assert header_size(path) == (37, 21) == header_size(path.read_bytes())
    # a PNG whose header claims 10000 x 10000 (above the bomb warning) and holds no such pixels: read, not decoded
    data = path.read_bytes()
    ihdr = b"IHDR" + (10000).to_bytes(4, "big") * 2 + data[24:29]
    forged = data[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + data[33:]
    assert header_size(forged) == (10000, 10000)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    assert header_size(fifo) is None and header_size(b"not an image") is None and header_size(tmp_path / "none") is None


# ---------------------------------------------------------------------------------------------------------------------
# recursive globs: links to folders are not followed


def tiny_photo(height: int, width: int) -> np.ndarray:
    return np.ascontiguousarray(load_photos()[0][::8, ::8][:height, :width])


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.mark.timeout(60)
def test_recursive_glob_ends_on_folder_link_cycles(tmp_path, monkeypatch):
    loop = tmp_path / "loop"
    (loop / "sub" / ".hidden").mkdir(parents=True)
    for rel in ("a.png", "sub/b.png", "sub/.c.png", "sub/.hidden/d.png", "notes.txt"):
        save_png(loop / rel, tiny_photo(4, 4)) if rel.endswith(".png") else (loop / rel).write_text("x")
    (loop / "self").symlink_to(".")
    (loop / "up").symlink_to("..")
    (loop / "sub" / "again").symlink_to("..")
    (loop / "sub" / "link.png").symlink_to("../a.png")  # a link to a file is a file: listed once (same real file)
    monkeypatch.chdir(tmp_path)
    expected = ["loop/a.png", "loop/sub/b.png"]
    for pattern in ("loop/**/*.png", "loop/**", "loop/**/", "loop/**/**/*.png", str(loop / "**" / "*.png")):
        paths, problems = find_images([pattern])
        assert [p.relative_to(tmp_path).as_posix() if p.is_absolute() else p.as_posix() for p in paths] == expected
        assert problems == []
    assert [p.as_posix() for p in find_images(["**/b.png"])[0]] == ["loop/sub/b.png"]
    assert [p.as_posix() for p in find_images(["loop/sub/.*.png"])[0]] == ["loop/sub/.c.png"]  # explicit dot
    assert [p.as_posix() for p in find_images(["loop/self/*.png"])[0]] == ["loop/self/a.png"]  # a named link is used


def test_recursive_glob_names_a_folder_it_cannot_list_and_finds_the_rest(tmp_path, monkeypatch):
    for rel in ("a/x.png", "locked/y.png", "z/w.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        save_png(tmp_path / rel, tiny_photo(4, 4))
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):  # what chmod 000 gives a user other than root
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    paths, problems = find_images([str(tmp_path / "**" / "*.png")])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a/x.png", "z/w.png"]
    assert problems == [f"{tmp_path / 'locked'}: cannot list folder (Permission denied)"]


# ---------------------------------------------------------------------------------------------------------------------
# files larger than any image within the decompression-bomb limit


def test_a_file_larger_than_any_image_within_the_bomb_limit_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load.max_file_bytes() == 16 * 1000 + 2**20
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    big = tmp_path / "huge.png"
    with open(big, "wb") as fh:  # a PNG header, then a sparse hole: no disk space used
        fh.write((tmp_path / "tiny.png").read_bytes())
        fh.truncate(5 * 2**30)
    read: list[str] = []
    monkeypatch.setattr(load, "_read_bytes", lambda path: read.append(path) or b"")
    with pytest.raises(
        ImageLoadError,
        match=r"file is 5,368,709,120 bytes, more than an image within Pillow's "
        r"decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS=1,000 pixels",
    ):
        load_image(big)
    assert read == []
    monkeypatch.undo()
    assert load_image(tmp_path / "tiny.png").rgb.shape == (1, 1, 3)
    assert os.path.getsize(big) == 5 * 2**30
