"""Local degradations (ldm/eval/local_degrade.py): pixels outside the box exact, box and mask, seeds, registry."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm.eval import DEGRADATIONS, build_degradation, degradation_from_spec
from ldm.eval.degrade import ElasticWarp, VQRoundTrip, seed_generator
from ldm.eval.local_degrade import LocalBlotch, LocalShuffle, LocalVQ, LocalWarp, box_mask
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
    return [LocalWarp(), LocalBlotch(), LocalShuffle(), LocalVQ(vq)]


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
    kind=st.sampled_from(["local_warp", "local_blotch", "local_shuffle"]),
)
def test_outside_is_exact_for_any_size_and_box(height, width, seed, box_size, kind):
    images = torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    result = build_degradation(kind, box_size=box_size).apply_local(images, seed)
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
    for name in ("local_warp", "local_blotch", "local_shuffle", "local_vq"):
        assert name in DEGRADATIONS
    for degradation in [LocalWarp(amplitude=0.1), LocalBlotch(n_blobs=2), LocalShuffle(mode="swap", box_size=0.6)]:
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


def test_a_box_too_small_for_its_patches_says_so():
    with pytest.raises(ValueError, match="disjoint patches"):
        LocalShuffle(box_size=0.3).apply_local(torch.zeros(1, 3, 8, 8), 0)
