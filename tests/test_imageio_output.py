"""ldm.imageio after decoding: model tensors, padding and cropping back, grids, atomic saving with metadata."""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm import imageio
from ldm.imageio import ImageLoadError, ImageSaveError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def photo(photos) -> np.ndarray:
    """A 128x128 uint8 RGB crop of a real photograph (astronaut, downscaled by 4)."""
    return np.ascontiguousarray(photos[0][::4, ::4])


@pytest.fixture(scope="module")
def small_photo(photos) -> np.ndarray:
    """A non-square 24x40 crop of a real photograph (coffee)."""
    return np.ascontiguousarray(photos[1][100:148:2, 200:280:2])


def as_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(rgb * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# tensors


def test_uint8_tensor_round_trip_every_value():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([values, values[::-1], values.T], axis=-1)
    x = imageio.image_to_tensor(rgb)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    torch.testing.assert_close(x[0, 1], torch.from_numpy(values[::-1].astype(np.float32) / 127.5 - 1.0), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(imageio.tensor_to_image(x), rgb)
    np.testing.assert_array_equal(imageio.tensor_to_image(x[0].to(torch.bfloat16)), rgb)


def test_float_image_to_tensor_and_channel_order(small_photo):
    rgb = small_photo.astype(np.float32) / 255.0
    x = imageio.image_to_tensor(rgb)
    np.testing.assert_allclose(x[0, 0].numpy(), rgb[..., 0] * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(imageio.tensor_to_image(x), small_photo)


def test_tensor_to_image_rounds_clamps_and_refuses_nan():
    x = torch.tensor([-3.0, -1.0, 1.4 / 127.5 - 1, 0.0, 0.9999, 5.0]).reshape(1, 1, 6).expand(3, 1, 6)
    np.testing.assert_array_equal(imageio.tensor_to_image(x)[0, :, 0], [0, 0, 1, 128, 255, 255])
    with pytest.raises(ValueError, match="NaN"):
        imageio.tensor_to_image(torch.full((1, 3, 2, 2), float("nan")))


# ---------------------------------------------------------------------------------------------------------------------
# padding


SIZES = [(1, 1), (3, 5), (33, 17), (7, 64), (64, 64), (2, 31)]


@pytest.mark.parametrize("mode", imageio.PAD_MODES)
@pytest.mark.parametrize("multiple", [4, 8, 32])
def test_pad_then_crop_is_identity(mode, multiple):
    gen = torch.Generator().manual_seed(0)
    for height, width in SIZES:
        x = torch.rand(2, 3, height, width, generator=gen)
        padded, padding = imageio.pad_to_multiple(x, multiple, mode=mode)
        assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
        assert padded.shape[-2] - height < multiple and padded.shape[-1] - width < multiple
        assert tuple(padded.shape[-2:]) == padding.padded_size
        assert torch.equal(imageio.crop_padding(padded, padding), x)


@pytest.mark.parametrize("mode, numpy_mode", [("reflect", "reflect"), ("replicate", "edge"), ("constant", "constant")])
def test_padding_values_match_numpy(mode, numpy_mode):
    """Against numpy's np.pad, including pads larger than the image (numpy reflects repeatedly) and 1-pixel axes."""
    for height, width in SIZES:
        x = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width)
        padded, p = imageio.pad_to_multiple(x, 32, mode=mode)
        expected = np.pad(x[0, 0].numpy(), ((p.top, p.bottom), (p.left, p.right)), mode=numpy_mode)
        np.testing.assert_array_equal(padded[0, 0].numpy(), expected)


def test_reflect_matches_torch_when_torch_can():
    x = torch.rand(1, 3, 30, 27)
    padded, p = imageio.pad_to_multiple(x, 8)
    torch.testing.assert_close(padded, F.pad(x, (p.left, p.right, p.top, p.bottom), mode="reflect"), rtol=0, atol=0)


def test_padding_details():
    x = torch.rand(1, 3, 3, 5)
    padded, padding = imageio.pad_to_multiple(x, 8, min_size=(16, 9))
    assert padded.shape == (1, 3, 16, 16) and (padding.top, padding.bottom, padding.left, padding.right) == (6, 7, 5, 6)
    same, none = imageio.pad_to_multiple(torch.rand(1, 3, 8, 16), 8)
    assert none.is_zero and same.shape == (1, 3, 8, 16)
    ints, _ = imageio.pad_to_multiple(torch.arange(6, dtype=torch.uint8).reshape(1, 1, 2, 3), 4)
    assert ints.dtype == torch.uint8 and ints.shape == (1, 1, 4, 4)


def test_crop_padding_at_other_scales():
    x = torch.rand(1, 3, 21, 30)
    padded, padding = imageio.pad_to_multiple(x, 8, mode="replicate")
    upsampled = padded.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    assert torch.equal(imageio.crop_padding(upsampled, padding, scale=2), x.repeat_interleave(2, -2).repeat_interleave(2, -1))
    aligned_x = torch.rand(1, 3, 16, 8)
    aligned, aligned_padding = imageio.pad_to_multiple(aligned_x, 8, min_size=24)
    latent = F.avg_pool2d(aligned, 4)
    assert imageio.crop_padding(latent, aligned_padding, scale=0.25).shape == (1, 3, 4, 2)


# ---------------------------------------------------------------------------------------------------------------------
# saving


def test_png_metadata_round_trip(tmp_path, photo):
    metadata = {"start_t": "500", "ckpt_sha256": "ab" * 32, "prompt": "naïve café ☕", "config": "x: 1\n" * 600}
    path = imageio.save_image_atomic(tmp_path / "sub" / "out.png", photo, metadata=metadata)
    assert imageio.read_png_metadata(path) == metadata
    assert imageio.read_image_metadata(path) == metadata
    np.testing.assert_array_equal(as_uint8(imageio.load_image(path).rgb), photo)
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]
    if os.name == "posix":  # not the 0600 of the temp file: readable by others as the umask allows
        umask = os.umask(0o022)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_lossy_formats_with_metadata(tmp_path, photo, suffix, caplog):
    alpha = np.full(photo.shape[:2], 0.25, dtype=np.float32)
    path = imageio.save_image_atomic(tmp_path / f"out{suffix}", photo, alpha=alpha, metadata={"seed": "3", "note": "é"})
    assert imageio.read_image_metadata(path) == {"seed": "3", "note": "é"}
    loaded = imageio.load_image(path)
    assert np.abs(as_uint8(loaded.rgb).astype(int) - photo).mean() < 6
    if suffix == ".webp":
        np.testing.assert_allclose(loaded.alpha, 64 / 255, atol=2 / 255)
    else:
        assert loaded.alpha is None and "JPEG cannot store transparency" in caplog.text


def test_read_metadata_errors(tmp_path, small_photo):
    jpg = imageio.save_image_atomic(tmp_path / "a.jpg", small_photo)
    assert imageio.read_image_metadata(jpg) == {}
    with pytest.raises(ImageLoadError, match="PNG"):
        imageio.read_png_metadata(jpg)
    with pytest.raises(ImageLoadError, match="missing.png"):
        imageio.read_png_metadata(tmp_path / "missing.png")


def test_save_replaces_atomically_and_leaves_nothing_on_disk_full(tmp_path, small_photo, monkeypatch):
    path = imageio.save_image_atomic(tmp_path / "out.png", small_photo)
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ImageSaveError) as info:
        imageio.save_image_atomic(path, 255 - small_photo)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert str(info.value).startswith(f"cannot save image {path}: no space left on device") and "\n" not in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_save_permission_denied(tmp_path, small_photo, monkeypatch):
    def deny(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", deny)
    with pytest.raises(ImageSaveError, match="permission denied") as info:
        imageio.save_image_atomic(tmp_path / "out.png", small_photo)
    assert info.value.errno == errno.EACCES and "out.png" in str(info.value)


@pytest.mark.skipif(IS_ROOT or os.name != "posix", reason="root writes regardless of permissions")
def test_save_permission_denied_real_folder(tmp_path, small_photo):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ImageSaveError, match="permission denied"):
            imageio.save_image_atomic(folder / "out.png", small_photo)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_save_into_a_file_or_onto_a_folder(tmp_path, small_photo):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImageSaveError, match="is a file, not a folder") as info:
        imageio.save_image_atomic(tmp_path / "file" / "out.png", small_photo)
    assert "file/out.png" in str(info.value)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageSaveError, match="destination is a directory"):
        imageio.save_image_atomic(tmp_path / "dir.png", small_photo)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file names are bytes")
def test_save_non_utf8_name(tmp_path, small_photo):
    path = os.fsencode(tmp_path) + b"/r\xe9sultat.png"
    imageio.save_image_atomic(path, small_photo, metadata={"k": "v"})
    assert imageio.read_png_metadata(path) == {"k": "v"}
    with pytest.raises(ImageSaveError) as info:
        imageio.save_image_atomic(os.fsencode(tmp_path) + b"/r\xe9sultat.png/x.png", small_photo)
    assert "r\\xe9sultat.png/x.png" in str(info.value)


def test_save_argument_errors(tmp_path, small_photo):
    with pytest.raises(ValueError, match="suffix '.gif'"):
        imageio.save_image_atomic(tmp_path / "a.gif", small_photo)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# grids and input expansion


def test_side_by_side_different_heights(small_photo, photo):
    grid = imageio.side_by_side([photo, small_photo], pad=4)
    assert grid.shape == (128 + 8, 128 + 40 + 12, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[4:132, 4:132], photo)
    top = 4 + (128 - 24) // 2
    np.testing.assert_array_equal(grid[top : top + 24, 136:176], small_photo)
    assert (grid[:4] == 255).all() and (grid[4:top, 136:176] == 255).all()
    np.testing.assert_array_equal(imageio.side_by_side([small_photo], pad=0), small_photo)
