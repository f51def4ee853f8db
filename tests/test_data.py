"""ldm/data: image folder (scan, split, transforms, corrupt files), embedded photographs, DataModuleFromConfig."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data import DataModuleFromConfig, EmbeddedPhotos, ImageFolderDataset
from ldm.data.embedded import (
    DEFAULT_PHOTOS,
    GRAY_PHOTOS,
    HELDOUT_PHOTOS,
    PHOTO_LOADERS,
    TRAIN_PHOTOS,
    heldout_crops,
    load_photo,
    sample_crop,
)
from ldm.data.image_folder import (
    IMAGE_SUFFIXES,
    UnreadableDatasetError,
    pil_to_rgb,
    scan_image_files,
)
from ldm.util import ConfigError

# ---------------------------------------------------------------------------------------------------------------------
# helpers


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image: every window is unique, so crops can be located exactly."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def write_images(root: Path, names: list[str], width: int = 40, height: int = 30) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = noise_image(width, height, seed=i)
        if path.suffix.lower() in (".jpg", ".jpeg"):
            image.save(path, quality=95)
        else:
            image.save(path)
        paths.append(path)
    return paths


def write_corrupt_files(root: Path) -> list[Path]:
    """A truncated PNG, text named .jpg, an empty .webp."""
    truncated = root / "bad" / "truncated.png"
    truncated.parent.mkdir(parents=True, exist_ok=True)
    noise_image(64, 64, seed=99).save(truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = root / "bad" / "notes.jpg"
    text.write_text("this is not an image\n")
    empty = root / "empty.webp"
    empty.write_bytes(b"")
    return [truncated, text, empty]


def find_window(haystack: np.ndarray, needle: np.ndarray) -> list[tuple[int, int]]:
    """All (top, left) where ``needle`` (h, w, 3) occurs exactly in ``haystack``."""
    h, w = needle.shape[:2]
    hits = []
    ys, xs = np.nonzero(np.all(haystack[: haystack.shape[0] - h + 1, : haystack.shape[1] - w + 1] == needle[0, 0], axis=-1))
    for y, x in zip(ys.tolist(), xs.tolist()):
        if np.array_equal(haystack[y : y + h, x : x + w], needle):
            hits.append((y, x))
    return hits


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint((np.asarray(image) + 1.0) * 127.5).astype(np.uint8)


def digest(array: np.ndarray | torch.Tensor) -> str:
    data = array.numpy() if isinstance(array, torch.Tensor) else array
    return hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest()


def unreadable_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "unreadable image" in r.getMessage()]


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """Nested folder with every accepted suffix (mixed case), plus files that must be ignored."""
    root = tmp_path / "images"
    write_images(root, ["a.png", "sub/b.JPG", "sub/deeper/c.jpeg", "d.webp", "sub/e.BMP", "z/f.Png"])
    (root / "readme.txt").write_text("not an image")
    noise_image(8, 8, 0).save(root / "sub" / "g.gif")
    write_images(root, [".hidden/h.png", ".i.png"])
    return root


# ---------------------------------------------------------------------------------------------------------------------
# scanning and errors


def test_scan_is_recursive_sorted_and_filters_suffixes(image_tree: Path):
    found = [p.relative_to(image_tree).as_posix() for p in scan_image_files(image_tree)]
    assert found == ["a.png", "d.webp", "sub/b.JPG", "sub/deeper/c.jpeg", "sub/e.BMP", "z/f.Png"]
    assert len(ImageFolderDataset(image_tree, size=16, split="all")) == 6


def test_missing_root_is_a_clear_error(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataset(missing, size=16)
    assert str(missing) in str(info.value) and ".png" in str(info.value)


def test_empty_folder_is_a_clear_error(tmp_path: Path):
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataset(tmp_path / "only_text", size=16)
    message = str(info.value)
    assert str(tmp_path / "only_text") in message
    assert all(suffix in message for suffix in IMAGE_SUFFIXES)


def test_root_that_is_a_file_is_refused(tmp_path: Path):
    path = write_images(tmp_path, ["single.png"])[0]
    with pytest.raises(NotADirectoryError, match="single.png"):
        ImageFolderDataset(path, size=16)


@pytest.mark.parametrize(
    "kwargs",
    [{"split": "val"}, {"val_fraction": 1.0}, {"val_fraction": -0.1}, {"size": 0}, {"seed": -1}],
)
def test_invalid_arguments_are_refused(image_tree: Path, kwargs: dict):
    with pytest.raises(ValueError):
        ImageFolderDataset(image_tree, **{"size": 16, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# split


def test_split_is_disjoint_complete_and_deterministic(tmp_path: Path):
    write_images(tmp_path, [f"img_{i:02d}.png" for i in range(20)], width=20, height=20)
    train = ImageFolderDataset(tmp_path, size=16, split="train", val_fraction=0.25)
    val = ImageFolderDataset(tmp_path, size=16, split="validation", val_fraction=0.25)
    assert len(val) == 5 and len(train) == 15
    assert set(train.files).isdisjoint(val.files)
    assert set(train.files) | set(val.files) == set(scan_image_files(tmp_path))
    again = ImageFolderDataset(tmp_path, size=16, split="validation", val_fraction=0.25, seed=7)
    assert again.files == val.files, "the augmentation seed must not move files between splits"
    other = ImageFolderDataset(tmp_path, size=16, split="validation", val_fraction=0.25, split_seed=1)
    assert other.files != val.files


def test_tiny_folder_keeps_at_least_one_training_image(tmp_path: Path):
    write_images(tmp_path, ["one.png"])
    assert len(ImageFolderDataset(tmp_path, size=16, split="train", val_fraction=0.5)) == 1
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(tmp_path, size=16, split="validation", val_fraction=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# transforms


def reference_resized(path: Path, size: int) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    factor = size / min(image.size)
    new = (round(image.size[0] * factor), round(image.size[1] * factor))
    return np.asarray(image.resize(new, resample=Image.Resampling.BICUBIC))


def test_items_are_hwc_float32_in_range(image_tree: Path):
    dataset = ImageFolderDataset(image_tree, size=16, split="all")
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["image"]
        assert image.shape == (16, 16, 3) and image.dtype == np.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert Path(item["file_path_"]).is_file()


def test_validation_is_a_centre_crop_of_the_resized_image(tmp_path: Path):
    paths = write_images(tmp_path, [f"{i}.png" for i in range(4)], width=50, height=30)
    dataset = ImageFolderDataset(tmp_path, size=20, split="validation", val_fraction=0.5)
    for i in range(len(dataset)):
        path = Path(dataset[i]["file_path_"])
        ref = reference_resized(path, 20)
        top, left = (ref.shape[0] - 20) // 2, (ref.shape[1] - 20) // 2
        np.testing.assert_array_equal(to_uint8(dataset[i]["image"]), ref[top : top + 20, left : left + 20])
        dataset.set_epoch(3)
        np.testing.assert_array_equal(to_uint8(dataset[i]["image"]), ref[top : top + 20, left : left + 20])
    assert {Path(p) for p in paths} >= {Path(dataset[i]["file_path_"]) for i in range(len(dataset))}


def test_train_crops_are_windows_of_the_resized_image_and_flips_happen(tmp_path: Path):
    write_images(tmp_path, ["wide.png"], width=60, height=40)
    dataset = ImageFolderDataset(tmp_path, size=16, split="all", seed=3)
    ref = reference_resized(tmp_path / "wide.png", 16)
    assert ref.shape[:2] == (16, 24)
    flipped = 0
    positions = set()
    for epoch in range(16):
        dataset.set_epoch(epoch)
        crop = to_uint8(dataset[0]["image"])
        hits, hits_flipped = find_window(ref, crop), find_window(ref, crop[:, ::-1])
        assert hits or hits_flipped, "a training crop must be a (possibly mirrored) window of the resized image"
        flipped += bool(hits_flipped)
        positions.update(hits + hits_flipped)
    assert 0 < flipped < 16
    assert len(positions) > 1


def test_no_resize_keeps_native_resolution_and_upscales_small_images(tmp_path: Path):
    write_images(tmp_path, ["big.png"], width=48, height=36)
    write_images(tmp_path / "small", ["small.png"], width=10, height=12)
    big = ImageFolderDataset(tmp_path, size=16, split="all", min_side_resize=False, flip=False)
    native = np.asarray(Image.open(tmp_path / "big.png"))
    crop = to_uint8(big[0]["image"])
    assert find_window(native, crop)
    small = ImageFolderDataset(tmp_path / "small", size=16, split="all", min_side_resize=False)
    assert small[0]["image"].shape == (16, 16, 3)


def test_same_seed_reproduces_and_epochs_and_seeds_differ(image_tree: Path):
    a = ImageFolderDataset(image_tree, size=16, split="all", seed=5)
    b = ImageFolderDataset(image_tree, size=16, split="all", seed=5)
    c = ImageFolderDataset(image_tree, size=16, split="all", seed=6)
    items = lambda ds: np.stack([ds[i]["image"] for i in range(len(ds))])  # noqa: E731
    np.testing.assert_array_equal(items(a), items(b))
    assert not np.array_equal(items(a), items(c))
    first = items(a)
    a.set_epoch(1)
    assert not np.array_equal(first, items(a))
    a.set_epoch(0)
    np.testing.assert_array_equal(first, items(a))


def test_modes_are_converted_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    np.testing.assert_array_equal(np.asarray(pil_to_rgb(rgba)), np.full((4, 4, 3), 255, dtype=np.uint8))
    la = Image.new("LA", (2, 2), (0, 255))
    np.testing.assert_array_equal(np.asarray(pil_to_rgb(la)), np.zeros((2, 2, 3), dtype=np.uint8))
    sixteen = Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.uint16))
    np.testing.assert_array_equal(np.asarray(pil_to_rgb(sixteen))[..., 0], [[0, 255, 128]])
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert pil_to_rgb(cmyk).mode == "RGB"
    palette = Image.new("P", (2, 2), 0)
    palette.info["transparency"] = 0
    assert pil_to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_grey_and_alpha_files_give_three_channels(tmp_path: Path):
    Image.fromarray(np.full((20, 20), 128, dtype=np.uint8), mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("RGBA", (20, 20), (0, 0, 255, 255)).save(tmp_path / "alpha.png")
    dataset = ImageFolderDataset(tmp_path, size=8, split="all")
    values = {Path(dataset[i]["file_path_"]).name: dataset[i]["image"] for i in range(3)}
    np.testing.assert_allclose(values["grey.png"], 128 / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(values["deep.png"], round(40000 / 257) / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(values["alpha.png"][..., 2], 1.0)
    np.testing.assert_allclose(values["alpha.png"][..., :2], -1.0)


def test_exif_orientation_is_applied(tmp_path: Path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20, 0] = 255  # left half red
    stored[:, 20:, 2] = 255  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left half ends up on top
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    item = ImageFolderDataset(tmp_path, size=20, split="all", random_crop=False, flip=False)[0]["image"]
    assert item[:8, :, 0].mean() > 0.8 and item[:8, :, 2].mean() < -0.8
    assert item[-8:, :, 2].mean() > 0.8 and item[-8:, :, 0].mean() < -0.8


# ---------------------------------------------------------------------------------------------------------------------
# unreadable files


def test_corrupt_files_are_skipped_with_one_warning_each(tmp_path: Path, caplog):
    good = write_images(tmp_path, [f"good_{i}.png" for i in range(5)])
    bad = write_corrupt_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, size=16, split="all")
    assert len(dataset) == 8
    loader = DataLoader(dataset, batch_size=3, shuffle=True, num_workers=0)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert [b["image"].shape[0] for b in batches] == [3, 3, 2]
        for batch in batches:
            assert torch.isfinite(batch["image"]).all()
            assert {Path(p) for p in batch["file_path_"]} <= set(good)
    assert dataset.num_skipped == 3
    assert sorted(dataset.skipped_files) == sorted(str(p) for p in bad)
    warnings = unreadable_warnings(caplog)
    assert len(warnings) == 3
    assert {p.name for p in bad} == {Path(str(r.args[0])).name for r in warnings}


def test_corrupt_files_are_counted_across_workers(tmp_path: Path):
    write_images(tmp_path, [f"good_{i}.png" for i in range(6)])
    write_corrupt_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, size=16, split="all")
    loader = DataLoader(dataset, batch_size=3, num_workers=2)
    sizes = [batch["image"].shape[0] for batch in loader]
    assert sizes == [3, 3, 3]
    assert dataset.num_skipped == 3, "workers share the table of unreadable files with the main process"


def test_all_files_unreadable_is_a_clear_error(tmp_path: Path):
    write_corrupt_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, size=16, split="all")
    with pytest.raises(UnreadableDatasetError, match="unreadable"):
        dataset[0]
    assert dataset.num_skipped == 3


# ---------------------------------------------------------------------------------------------------------------------
# embedded photographs


def test_embedded_items_shapes_and_range():
    for split, photos in (("train", TRAIN_PHOTOS), ("validation", HELDOUT_PHOTOS)):
        dataset = EmbeddedPhotos(size=32, split=split, n_samples=12)
        assert len(dataset) == 12
        for i in range(12):
            item = dataset[i]
            assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.float32
            assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
            assert item["photo_"] in photos
        assert item["image"].std() > 0.01


def test_embedded_is_deterministic_and_epochs_vary_training_only():
    items = lambda ds: np.stack([ds[i]["image"] for i in range(len(ds))])  # noqa: E731
    train_a, train_b = EmbeddedPhotos(32, "train", 16, seed=1), EmbeddedPhotos(32, "train", 16, seed=1)
    np.testing.assert_array_equal(items(train_a), items(train_b))
    assert not np.array_equal(items(train_a), items(EmbeddedPhotos(32, "train", 16, seed=2)))
    before = items(train_a)
    train_a.set_epoch(1)
    assert not np.array_equal(before, items(train_a))
    val = EmbeddedPhotos(32, "validation", 16, seed=1)
    fixed = items(val)
    val.set_epoch(5)
    np.testing.assert_array_equal(fixed, items(val))


def test_heldout_crops_match_validation_items_and_are_deterministic():
    crops = heldout_crops(24, 10, seed=4)
    assert len(crops) == 10
    assert all(c.shape == (24, 24, 3) and c.dtype == np.uint8 for c in crops)
    np.testing.assert_array_equal(np.stack(crops), np.stack(heldout_crops(24, 10, seed=4)))
    assert not np.array_equal(np.stack(crops), np.stack(heldout_crops(24, 10, seed=5)))
    val = EmbeddedPhotos(24, "validation", 10, seed=4)
    for i, crop in enumerate(crops):
        np.testing.assert_allclose(val[i]["image"], crop.astype(np.float32) / 127.5 - 1.0, atol=1e-6)
        assert val[i]["photo_"] == HELDOUT_PHOTOS[i % len(HELDOUT_PHOTOS)]


def test_heldout_photographs_never_appear_in_any_training_crop():
    """The split is by whole photographs: no training photograph is a held-out one (nor the same picture under another
    name), every training item names a training photograph and is found in it pixel for pixel, and the datasets
    refuse to mix the two sets."""
    assert set(HELDOUT_PHOTOS) and not set(HELDOUT_PHOTOS) & set(TRAIN_PHOTOS)
    assert not set(HELDOUT_PHOTOS) & set(GRAY_PHOTOS)
    assert DEFAULT_PHOTOS == TRAIN_PHOTOS
    heldout_pixels = {name: load_photo(name) for name in HELDOUT_PHOTOS}
    for name in PHOTO_LOADERS:
        if name in HELDOUT_PHOTOS:
            continue
        photo = load_photo(name)
        for held in heldout_pixels.values():  # not the same picture (e.g. skimage's ``cat`` is ``chelsea``)
            assert photo.shape != held.shape or not np.array_equal(photo, held)
    size = 16
    for photos in (None, list(TRAIN_PHOTOS) + list(GRAY_PHOTOS)):
        train = EmbeddedPhotos(size, "train", n_samples=12, seed=3, scale=1.0, flip=False, photos=photos)
        for epoch in (0, 1):
            train.set_epoch(epoch)
            for i in range(len(train)):
                item = train[i]
                assert item["photo_"] not in HELDOUT_PHOTOS
                crop = to_uint8(item["image"])
                assert find_window(load_photo(item["photo_"]), crop), f"training crop {i} not found in {item['photo_']}"
                assert not any(find_window(held, crop) for held in heldout_pixels.values())
    for i, crop in enumerate(heldout_crops(size, 8, seed=0, scale=1.0)):
        assert find_window(load_photo(HELDOUT_PHOTOS[i % len(HELDOUT_PHOTOS)]), crop)
    with pytest.raises(ValueError, match="held out for validation and evaluation"):
        EmbeddedPhotos(size, "train", photos=["astronaut", "chelsea"])
    with pytest.raises(ValueError, match="validate on the held-out"):
        EmbeddedPhotos(size, "validation", photos=["astronaut"])
    with pytest.raises(ValueError, match="validate on the held-out"):
        heldout_crops(size, 2, photos=["rocket"])


def test_training_crops_cover_the_whole_photograph():
    """No region of a training photograph is reserved: crop positions reach all four borders (pixel (y, x) of this
    photograph holds (y, x, 0), so a crop's first pixel is its position)."""
    ys, xs = np.meshgrid(np.arange(40), np.arange(50), indexing="ij")
    photo = np.stack([ys, xs, np.zeros_like(ys)], axis=-1).astype(np.uint8)
    rng = np.random.default_rng(0)
    positions = np.array([sample_crop(photo, 8, (1.0, 1.0), rng, flip=False)[0, 0, :2] for _ in range(600)])
    assert positions[:, 0].min() == 0 and positions[:, 0].max() == 40 - 8
    assert positions[:, 1].min() == 0 and positions[:, 1].max() == 50 - 8


def test_sample_crop_fits_small_photographs_by_shrinking_the_source_square():
    photo = np.zeros((20, 200, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        crop = sample_crop(photo, 16, (1.0, 12.0), rng, flip=True)
        assert crop.shape == (16, 16, 3)


def test_embedded_argument_errors():
    with pytest.raises(ValueError, match="available"):
        EmbeddedPhotos(16, photos=["astronaut", "no_such_photo"])
    with pytest.raises(ValueError, match="scale"):
        EmbeddedPhotos(16, scale=(3.0, 1.0))
    for bad in [(0.5, 0.7, 0.9), "ab", "12", None, (0.5,)]:  # three numbers was "too many values to unpack", "12" (1, 2)
        with pytest.raises(ValueError, match=r"must be a positive number or a pair \(low, high\)"):
            EmbeddedPhotos(16, scale=bad)
    assert EmbeddedPhotos(16, scale=np.float32(0.5)).scale == (0.5, 0.5)  # was "not iterable"
    with pytest.raises(ValueError, match="split"):
        EmbeddedPhotos(16, split="test")


def test_grey_photos_are_available_as_three_channels():
    dataset = EmbeddedPhotos(16, "train", 4, photos=["camera", "coins"])
    image = dataset[0]["image"]
    np.testing.assert_array_equal(image[..., 0], image[..., 1])


# ---------------------------------------------------------------------------------------------------------------------
# DataModuleFromConfig

DATA_YAML = """
target: ldm.data.datamodule.DataModuleFromConfig
params:
  batch_size: 4
  num_workers: {workers}
  train:
    target: ldm.data.embedded.EmbeddedPhotos
    params: {{size: 16, split: train, n_samples: 12, seed: 0}}
  validation:
    target: ldm.data.embedded.EmbeddedPhotos
    params: {{size: 16, split: validation, n_samples: 6}}
"""


def datamodule_from_yaml(workers: int) -> DataModuleFromConfig:
    from ldm.util import instantiate_from_config

    return instantiate_from_config(OmegaConf.create(DATA_YAML.format(workers=workers)))


@pytest.mark.parametrize("workers", [0, 2])
def test_datamodule_builds_from_yaml_and_yields_batches(workers: int):
    datamodule = datamodule_from_yaml(workers)
    datamodule.setup("fit")
    train = list(datamodule.train_dataloader())
    assert len(train) == 3
    assert all(b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == torch.float32 for b in train)
    val = list(datamodule.val_dataloader())
    assert [b["image"].shape[0] for b in val] == [4, 2]
    assert datamodule.persistent_workers == (workers > 0)
    expected = EmbeddedPhotos(16, "validation", 6)
    np.testing.assert_array_equal(val[0]["image"][0].numpy(), expected[0]["image"])


def test_datamodule_only_exposes_configured_splits_and_checks_configs():
    datamodule = DataModuleFromConfig(batch_size=2, validation={"target": "ldm.data.embedded.EmbeddedPhotos"})
    datamodule.setup("validate")
    assert set(datamodule.datasets) == {"validation"}
    with pytest.raises(MisconfigurationException, match="train_dataloader"):
        datamodule.train_dataloader()
    with pytest.raises(ConfigError, match="train"):
        DataModuleFromConfig(batch_size=2, train={"params": {"size": 16}})
    with pytest.raises(ValueError, match="persistent_workers"):
        DataModuleFromConfig(batch_size=2, persistent_workers=True)
    for kw, words in [
        (dict(batch_size=2.5), "batch_size=2.5 must be an integer >= 1"),  # trained with batches of 2
        (dict(batch_size=0), "batch_size=0 must be"),
        (dict(batch_size=2, num_workers=-1), "num_workers=-1"),
    ]:
        with pytest.raises(ValueError, match=words):
            DataModuleFromConfig(**kw)


def test_datamodule_takes_latent_diffusion_arguments_in_their_order():
    """latent-diffusion's (batch_size, train, validation, test, predict, wrap, num_workers, shuffle_test_loader,
    use_worker_init_fn, shuffle_val_dataloader): its configs set wrap and predict, and num_workers None meant
    2 * batch_size; here num_workers came fifth (predict's place) and wrap was refused."""
    import inspect

    names = list(inspect.signature(DataModuleFromConfig).parameters)[:10]
    assert names == ["batch_size", "train", "validation", "test", "predict", "wrap", "num_workers", "shuffle_test_loader",
                     "use_worker_init_fn", "shuffle_val_dataloader"]  # fmt: skip
    photos = {"target": "ldm.data.embedded.EmbeddedPhotos", "params": {"size": 16, "n_samples": 6}}
    datamodule = DataModuleFromConfig(2, None, None, photos, photos, True, None, True)
    assert datamodule.num_workers == 4 and datamodule.shuffle_test_loader
    datamodule.num_workers, datamodule.persistent_workers = 0, False  # no worker processes in this test
    datamodule.setup("predict")
    assert [b["image"].shape[0] for b in datamodule.predict_dataloader()] == [2, 2, 2]
    datamodule.setup("test")
    assert isinstance(datamodule.test_dataloader().sampler, torch.utils.data.RandomSampler)


def test_datamodule_refuses_a_train_split_smaller_than_a_batch():
    datamodule = DataModuleFromConfig(
        batch_size=8, train={"target": "ldm.data.embedded.EmbeddedPhotos", "params": {"size": 16, "n_samples": 5}}
    )
    with pytest.raises(ValueError, match="batch_size=8"):
        datamodule.setup("fit")
    loose = DataModuleFromConfig(
        batch_size=8,
        drop_last=False,
        train={"target": "ldm.data.embedded.EmbeddedPhotos", "params": {"size": 16, "n_samples": 5}},
    )
    loose.setup("fit")
    assert [b["image"].shape[0] for b in loose.train_dataloader()] == [5]


class RecordingModule(pl.LightningModule):
    """Records a digest of every training image, per epoch (and, under DDP, writes them per rank)."""

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.out_dir = out_dir
        self.seen: dict[int, list[str]] = {}
        self.paths: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(digest(image) for image in batch["image"].cpu())
        self.paths.extend(batch.get("file_path_", []))
        return self.weight * batch["image"].mean()

    def on_train_end(self) -> None:
        if self.out_dir is not None:
            Path(self.out_dir, f"rank{self.global_rank}.txt").write_text("\n".join(self.paths))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def tiny_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("persistent", [False, True])
def test_trainer_epochs_draw_new_crops_in_workers(persistent: bool):
    """Through Lightning, workers see each epoch's set_epoch: the crops of epoch e equal the dataset's at epoch e."""
    config = {"target": "ldm.data.embedded.EmbeddedPhotos", "params": {"size": 8, "n_samples": 8, "seed": 3}}
    datamodule = DataModuleFromConfig(batch_size=4, train=config, num_workers=2, persistent_workers=persistent)
    module = RecordingModule()
    tiny_trainer(max_epochs=3).fit(module, datamodule=datamodule)
    reference = EmbeddedPhotos(8, "train", 8, seed=3)
    for epoch in range(3):
        reference.set_epoch(epoch)
        expected = sorted(digest(torch.from_numpy(reference[i]["image"])) for i in range(8))
        assert sorted(module.seen[epoch]) == expected, f"epoch {epoch}"
    assert set(module.seen[0]) != set(module.seen[1])


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_shards(tmp_path: Path):
    write_images(tmp_path / "images", [f"{i}.png" for i in range(8)], width=12, height=12)
    config = {
        "target": "ldm.data.image_folder.ImageFolderDataset",
        "params": {"root": str(tmp_path / "images"), "size": 8, "split": "all"},
    }
    datamodule = DataModuleFromConfig(batch_size=2, train=config)
    trainer = tiny_trainer(devices=2, strategy="ddp_spawn", max_epochs=1)
    trainer.fit(RecordingModule(out_dir=str(tmp_path)), datamodule=datamodule)
    shards = [set(Path(tmp_path, f"rank{r}.txt").read_text().splitlines()) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    assert shards[0].isdisjoint(shards[1])
    assert shards[0] | shards[1] == {str(p) for p in scan_image_files(tmp_path / "images")}
