"""Local degradations (ldm/eval/local_degrade.py): pixels outside the box exact, box and mask, seeds, registry."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm.eval.degrade import DEGRADATIONS, ElasticWarp, VQRoundTrip, build_degradation, degradation_from_spec, seed_generator
from ldm.eval.local_degrade import (
    LocalBlock,
    LocalBlotch,
    LocalNoise,
    LocalNone,
    LocalPaint,
    LocalShuffle,
    LocalSmear,
    LocalVQ,
    LocalWarp,
    PaintDisc,
    Pixelate,
    box_mask,
    edge_weights,
)
from ldm.models.autoencoder import VQModelInterface


@pytest.fixture(scope="module")
def tiny_vq() -> VQModelInterface:
    from conftest import TINY_DDCONFIG

    torch.manual_seed(0)
    return VQModelInterface(copy.deepcopy(TINY_DDCONFIG), {"target": "torch.nn.Identity"}, n_embed=64, embed_dim=3)


@pytest.fixture
def images() -> torch.Tensor:
    from conftest import photo_crops

    return photo_crops(3, 32, seed=2)


def _all(vq: VQModelInterface) -> list:
    return [LocalWarp(), LocalBlotch(), LocalShuffle(), LocalVQ(vq), LocalPaint(), LocalNoise(), LocalSmear(), LocalBlock()]


def test_outside_the_box_is_exact_and_the_mask_is_the_box(tiny_vq, images):
    for degradation in _all(tiny_vq):
        result = degradation.apply_local(images, 5)
        assert result.images.shape == images.shape and result.images.dtype == images.dtype
        assert result.masks.shape == (3, 1, 32, 32)
        for i, (x0, y0, x1, y1) in enumerate(result.boxes):
            assert x1 - x0 == y1 - y0 == round(0.4 * 32) and 0 <= x0 and x1 <= 32 and 0 <= y0 and y1 <= 32
            assert result.masks[i, 0].sum() == (x1 - x0) * (y1 - y0)
            assert result.masks[i, 0, y0:y1, x0:x1].eq(1).all()
        outside = (result.masks == 0).expand_as(images)
        assert torch.equal(result.images[outside], images[outside])
        assert not torch.equal(result.images, images), degradation.name
        torch.testing.assert_close(degradation(images, 5), result.images, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(12, 40),
    width=st.integers(12, 40),
    seed=st.integers(0, 2**31 - 1),
    box_size=st.floats(0.3, 1.0),
    kind=st.sampled_from(["local_warp", "local_blotch", "local_shuffle", "local_paint", "local_noise", "local_block"]),
    box_at=st.sampled_from(["uniform", "edges"]),
)
def test_outside_is_exact_for_any_size_and_box(height, width, seed, box_size, kind, box_at):
    images = torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    result = build_degradation(kind, box_size=box_size, box_at=box_at).apply_local(images, seed)
    keep = (result.masks == 0).expand_as(images)
    assert torch.equal(result.images[keep], images[keep])
    assert torch.equal(result.masks, box_mask(result.boxes, height, width, images))


def test_the_box_holds_the_inner_degradation_of_the_crop(images):
    """Hard paste (box_feather=0): the box is the inner degradation of the box cut out as an image, drawn from the
    generator right after the box."""
    local = LocalWarp(amplitude=0.2, scale=0.5, box_feather=0.0)
    result = local.apply_local(images[:1], 11)
    generator = seed_generator(11)
    x0, y0, x1, y1 = local.draw_box(32, 32, generator)
    assert (x0, y0, x1, y1) == result.boxes[0]
    expected = ElasticWarp(0.2, 0.5)._apply(images[:1, :, y0:y1, x0:x1], generator)
    torch.testing.assert_close(result.images[:1, :, y0:y1, x0:x1], expected.clamp(-1, 1), rtol=0, atol=0)


def test_local_vq_keeps_the_whole_image_round_trip_inside_the_box(tiny_vq, images):
    result = LocalVQ(tiny_vq, codebook_fraction=1.0, box_feather=0.0).apply_local(images, 3)
    full = VQRoundTrip(tiny_vq)(images, 0)
    for i, (x0, y0, x1, y1) in enumerate(result.boxes):
        torch.testing.assert_close(result.images[i, :, y0:y1, x0:x1], full[i, :, y0:y1, x0:x1])


def test_feathered_box_fades_to_the_input_at_its_edge(images):
    result = LocalBlotch(strength=1.0, radius=1.0, box_size=0.5, box_feather=0.5).apply_local(images, 1)
    x0, y0, x1, y1 = result.boxes[0]
    change = (result.images[0] - images[0]).abs().amax(dim=0)
    assert change[y0, x0:x1].max() < 0.1 * change[y0:y1, x0:x1].max()  # the box's first row barely changes


def test_seeds_fix_everything(images):
    local = LocalShuffle()
    a, b = local.apply_local(images, 7), local.apply_local(images, 7)
    assert a.boxes == b.boxes and torch.equal(a.images, b.images)
    assert local.apply_local(images, 8).boxes != a.boxes
    assert local.apply_local(images, torch.Generator().manual_seed(7)).boxes == a.boxes


def test_registry_and_specs_round_trip(tiny_vq):
    for name in (
        "local_warp",
        "local_blotch",
        "local_shuffle",
        "local_vq",
        "local_paint",
        "local_noise",
        "local_smear",
        "local_block",
        "local_none",
    ):
        assert name in DEGRADATIONS
    for degradation in [
        LocalWarp(amplitude=0.1),
        LocalBlotch(n_blobs=2),
        LocalShuffle(mode="swap", box_size=0.6),
        LocalPaint(radius=0.3, box_at="edges"),
        LocalNoise(noise_std=0.5),
        LocalSmear(sigma=2.5),
        LocalBlock(block=3, box_at="edges"),
        LocalNone(box_size=0.5),
    ]:
        rebuilt = degradation_from_spec(degradation.spec)
        assert type(rebuilt) is type(degradation) and rebuilt.params() == degradation.params()
    assert LocalVQ(tiny_vq, codebook_fraction=0.25).params()["codebook_fraction"] == 0.25


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"box_size": 0}, "box_size"),
        ({"box_size": 1.5}, "box_size"),
        ({"box_feather": 0.8}, "box_feather"),
        ({"amplitude": -1}, "amplitude"),
    ],
)
def test_bad_parameters_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        LocalWarp(**params)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "local_blotch:n_blobs=1000000",
            "n_blobs must be an integer in [1, 256] (each blob is a full-size map per image), got 1000000",
        ),
        ("local_shuffle:n_patches=1000000000", "n_patches must be an integer in [1, 256]"),
        ("local_smear:sigma=5000", "sigma must be in (0, 1024] (pixels), got 5000"),
        ("local_paint:radius=10", "radius must be in (0, 4] (a fraction of the image's or box's shorter side)"),
        ("local_warp:scale=1e9", "scale must be in (0, 4]"),
        ("local_block:block=100000", "block must be an integer in [2, 1024] (pixels), got 100000"),
        ("local_noise:box_size=2", "box_size must be in (0, 1]"),
    ],
)
def test_counts_and_sizes_are_refused_when_built(spec, message):
    """local_blotch / colour_blotches with a million blobs would take 18 GB on 32 px images: the spec is refused when
    the degradation is built, naming the allowed range."""
    with pytest.raises(ValueError) as info:
        degradation_from_spec(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_box_too_small_for_its_patches_says_so():
    with pytest.raises(ValueError, match="disjoint patches"):
        LocalShuffle(box_size=0.3).apply_local(torch.zeros(1, 3, 8, 8), 0)


def test_new_artifacts_do_what_they_say():
    flat = torch.zeros(2, 3, 20, 20)
    painted = PaintDisc(radius=0.4)(flat, 0)
    centre, corner = painted[:, :, 10, 10], painted[:, :, 0, 0]
    assert torch.equal(corner, flat[:, :, 0, 0])
    assert (centre.amax(dim=1) == 1).all() and (centre.amin(dim=1) == -1).all()  # fully saturated: one channel at
    # 1, one at -1 (hue in HSV with S = V = 1)
    import colorsys

    hues = torch.rand((2,), generator=seed_generator(0))  # PaintDisc's first draw
    expected = torch.tensor([colorsys.hsv_to_rgb(float(h), 1.0, 1.0) for h in hues]) * 2 - 1
    torch.testing.assert_close(centre, expected)
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 3, 8, 8) / 8
    blocks = Pixelate(4)(ramp, 0)
    assert torch.allclose(blocks[0, 0, 0], torch.tensor([0.1875] * 4 + [0.6875] * 4))  # means of 0..3 and 4..7, / 8
    noisy = LocalNoise(noise_std=0.2, box_size=1.0, box_feather=0.0).apply_local(flat, 3).images
    assert abs(float(noisy.std()) - 0.2) < 0.02
    smeared = LocalSmear(sigma=2.0, box_size=1.0, box_feather=0.0).apply_local(flat, 3).images
    assert torch.equal(smeared, flat)  # a blur of a flat image is the image
    control = LocalNone(box_size=0.5).apply_local(ramp, 1)
    assert torch.equal(control.images, ramp) and control.masks.sum() == 16


def test_boxes_at_edges_sit_on_the_content():
    image = -torch.ones(1, 3, 32, 32)
    image[:, :, :, 24:] = 1.0  # one vertical edge, between columns 23 and 24
    weights = edge_weights(image[0], 8)
    assert weights.shape == (25, 25)
    on_edge = weights[:, 17:24].min()  # boxes holding the edge
    assert on_edge > 50 * weights[:, :16].max()  # flat boxes keep only the floor
    boxes = [LocalNoise(box_size=0.25, box_at="edges").apply_local(image, seed).boxes[0] for seed in range(40)]
    assert sum(x0 <= 23 < x1 - 1 for x0, _, x1, _ in boxes) >= 38  # nearly always across the edge
    uniform = [LocalNoise(box_size=0.25).apply_local(image, seed).boxes[0] for seed in range(40)]
    assert sum(x0 <= 23 < x1 - 1 for x0, _, x1, _ in uniform) < 30
    with pytest.raises(ValueError, match="box_at"):
        LocalNoise(box_at="center")
