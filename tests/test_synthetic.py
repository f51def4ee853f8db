"""The synthetic image family (ldm/data/synthetic.py): determinism, held-out seeds, pinned statistics, the dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.data.synthetic import (
    HELDOUT_START,
    PALETTE,
    VALIDATION_STREAM,
    Scene,
    ShapesFamily,
    SyntheticShapes,
    draw_scene,
    heldout_image_seed,
    heldout_shapes,
    render_scene,
    render_shapes,
    train_image_seed,
)
from ldm.eval.sources import synthetic_images


def palette_histogram(image: np.ndarray) -> dict[int, int]:
    """Pixels exactly equal to each palette colour (index -> count), and -1 -> the others (soft edges)."""
    flat = image.reshape(-1, 3)
    hist = {-1: 0}
    exact = np.zeros(len(flat), dtype=bool)
    for i, colour in enumerate(PALETTE):
        hit = (flat == colour).all(axis=1)
        if hit.any():
            hist[i] = int(hit.sum())
        exact |= hit
    hist[-1] = int((~exact).sum())
    return hist


def test_a_fixed_seed_draws_a_pinned_scene_and_image():
    scene = draw_scene(0)
    assert scene.background == 6
    assert [(s.kind, s.colour) for s in scene.shapes] == [("rectangle", 1), ("rectangle", 5), ("rectangle", 0)]
    image = render_shapes(0, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert palette_histogram(image) == {6: 550, 0: 99, 5: 63, 1: 48, -1: 264}


def test_same_seed_same_bytes_and_scenes_do_not_depend_on_size():
    assert np.array_equal(render_shapes(123, 32), render_shapes(123, 32))
    assert not np.array_equal(render_shapes(123, 32), render_shapes(124, 32))
    assert draw_scene(5) == draw_scene(5)
    # one scene at two sizes: the 64 px image, averaged over 2x2 blocks, is close to the 32 px one
    small = render_shapes(7, 32).astype(np.float64)
    large = render_shapes(7, 64).astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(small - large).mean() < 3.0


def test_family_statistics_match_the_generative_process():
    family = ShapesFamily()
    scenes = [draw_scene(i, family) for i in range(4000)]
    counts = np.array([len(s.shapes) for s in scenes])
    assert set(counts) == set(range(family.n_min, family.n_max + 1))
    assert abs(counts.mean() - (family.n_min + family.n_max) / 2) < 0.06  # uniform on {2, 3, 4}: mean 3, sd/sqrt(n) 0.013
    shapes = [shape for s in scenes for shape in s.shapes]
    assert abs(np.mean([s.kind == "disc" for s in shapes]) - 0.5) < 0.02
    assert all(shape.colour != scene.background for scene in scenes for shape in scene.shapes)
    backgrounds = np.bincount([s.background for s in scenes], minlength=len(PALETTE))
    expected = len(scenes) / len(PALETTE)
    assert ((backgrounds - expected) ** 2 / expected).sum() < 24.3  # chi-square, 7 dof, p = 0.001
    radii = np.array([s.rx for s in shapes if s.kind == "disc"])
    assert family.radius_min <= radii.min() and radii.max() <= family.radius_max


def test_a_lone_disc_covers_its_area_and_is_the_palette_inside():
    from ldm.data.synthetic import Shape

    scene = Scene(0, (Shape("disc", 3, 0.5, 0.5, 0.25, 0.25),))
    image = render_scene(scene, 64)
    coverage = (image.astype(np.float64) - PALETTE[0]) / (PALETTE[3].astype(np.float64) - PALETTE[0])
    assert abs(coverage.mean() - np.pi * 0.25**2) < 0.01  # soft edges keep the area: pi r^2 of the image
    assert (image[32, 32] == PALETTE[3]).all() and (image[0, 0] == PALETTE[0]).all()


def test_heldout_seeds_are_never_training_seeds():
    train = [train_image_seed(seed, epoch, index) for seed in (0, 23, 2**31) for epoch in range(5) for index in range(200)]
    assert max(train) < HELDOUT_START
    heldout = [heldout_image_seed(i, seed) for seed in (0, 1, VALIDATION_STREAM) for i in (0, 1, 2**32 - 1)]
    assert min(heldout) >= HELDOUT_START and max(heldout) < 2**63
    assert len(set(heldout)) == len(heldout)  # streams do not overlap
    with pytest.raises(ValueError, match="held-out index"):
        heldout_image_seed(2**32, 0)


def test_dataset_training_draws_change_every_epoch_validation_is_fixed_and_heldout():
    train = SyntheticShapes(size=16, split="train", n_samples=4, seed=3)
    first = [train[i]["image_seed_"] for i in range(4)]
    assert all(s < HELDOUT_START for s in first)
    train.set_epoch(1)
    assert [train[i]["image_seed_"] for i in range(4)] != first
    train.set_epoch(0)
    assert [train[i]["image_seed_"] for i in range(4)] == first
    item = train[0]
    assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0

    val = SyntheticShapes(size=16, split="validation", n_samples=3)
    seeds = [val[i]["image_seed_"] for i in range(3)]
    val.set_epoch(4)
    assert [val[i]["image_seed_"] for i in range(3)] == seeds
    assert seeds == [heldout_image_seed(i, VALIDATION_STREAM) for i in range(3)]
    # the evaluation's streams 0 and 1 are not the validation split's
    evaluation = {heldout_image_seed(i, s) for s in (0, 1) for i in range(3)}
    assert not evaluation & set(seeds)


def test_sweep_images_are_the_heldout_stream():
    images = synthetic_images(2, 24, seed=1)
    assert [im.name for im in images] == ["synthetic_1_0000", "synthetic_1_0001"]
    expected = torch.from_numpy(heldout_shapes(2, 24, seed=1)[1]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(images[1].image[0], expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "test"}, "split"),
        ({"n_samples": 0}, "n_samples"),
        ({"size": 4}, "size"),
        ({"n_min": 3, "n_max": 2}, "n_min"),
        ({"radius_min": 0.0}, "radius"),
        ({"edge": 0.0}, "edge"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticShapes(**kwargs)
