"""Region refinement: start maps from masks and boxes, pixels outside the selection bit-exact, held latent pixels at the
right noise level, feathered composites without seams, crop mode geometry."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm.refine import Refiner
from ldm.refine import regions as regions_module
from ldm.refine.regions import (
    MAX_FEATHER,
    MAX_REGIONS,
    Box,
    RegionOptions,
    build_start_map,
    composite,
    composite_weight,
    crop_geometry,
    find_regions,
    latent_start_map,
    load_mask,
    mask_to_array,
    parse_box,
    region_crops,
    region_metadata,
    resize_start_map,
)
from ldm.refine.request import RefineRequest
from ldm.sampling import NoiseSchedule, build_plan, run_tail

from conftest import photo_crops


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


@pytest.fixture(scope="module")
def photo():
    return photo_crops(1, 40, seed=2)[:, :, :37, :35]  # odd sizes: padded internally


ARGS = dict(start_t=400, ddim_steps=10)


# ------------------------------------------------------------------------------------------- the bit-exact promises
def test_zero_map_returns_the_input_and_a_full_map_equals_the_unmasked_refinement(refiner, photo):
    zero = torch.zeros(1, 1, *photo.shape[-2:], dtype=torch.long)
    assert torch.equal(refiner.refine_tensors(photo, seeds=3, start_map=zero, **ARGS), photo)
    assert torch.equal(refiner.refine_tensors(photo, seeds=3, start_map=zero, crop_regions=True, **ARGS), photo)
    for kw in (dict(eta=0.0), dict(eta=1.0), dict(sampler="dpmpp_2m", tail_steps=4, ddim_steps=None)):
        args = {**ARGS, **kw}
        plain = refiner.refine_tensors(photo, seeds=3, **args)
        full = torch.full_like(zero, 400)
        assert torch.equal(refiner.refine_tensors(photo, seeds=3, start_map=full, **args), plain), kw


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(5, 41),
    height=st.integers(5, 41),
    seed=st.integers(0, 2**16),
    grey=st.booleans(),
    rgba=st.booleans(),
    crop=st.booleans(),
)
def test_pixels_outside_the_mask_come_back_byte_identical(refiner, width, height, seed, grey, rgba, crop):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4 if rgba else 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA" if rgba else "RGB")
    mask = np.zeros((height, width), dtype=np.uint8)
    y, x = rng.integers(0, height), rng.integers(0, width)
    mask[y : y + rng.integers(1, 12), x : x + rng.integers(1, 12)] = rng.integers(1, 256) if grey else 255
    out = np.asarray(refiner(image, seed=1, mask=Image.fromarray(mask, "L"), crop_regions=crop, **ARGS))
    keep = mask == 0
    assert out.shape == pixels.shape
    assert np.array_equal(out[keep], pixels[keep])  # RGB (and alpha) where the mask is black: the same bytes
    if rgba:
        assert np.array_equal(out[..., 3], pixels[..., 3])  # alpha untouched everywhere


def test_held_pixels_enter_each_step_at_that_steps_noise_level():
    """A latent pixel that has not started is fed to the network as z0 noised to the level of the step consuming it."""
    model_acp = torch.cumprod(1 - torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2, 0)
    schedule = NoiseSchedule.from_alphas_cumprod(model_acp)
    inputs = []

    def spy(x, t, cond=None):
        inputs.append((int(t[0]), x.clone()))
        return torch.zeros_like(x)

    z0, eps = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    start_map = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    start_map[..., :2] = 400  # the left half starts at once
    start_map[..., 2] = 150  # one column later
    plan = build_plan(schedule, 400, [spy], "cpu", tail_steps=6)
    z, _ = run_tail(plan, z0, eps, start_map=start_map)
    for t, x in inputs:
        held = schedule.sqrt_alphas_cumprod[t] * z0 + schedule.sqrt_one_minus_alphas_cumprod[t] * eps
        assert torch.equal(x[..., 3], held[..., 3])  # never started: held at this step's level, every step
        if t >= 150:
            assert t == 400 or not torch.equal(x[..., 0], held[..., 0])  # started: follows its own trajectory
        first_late = max(s for s, _ in inputs if s <= 150)
        if t > 150 or t == first_late:
            assert torch.equal(x[..., 2], held[..., 2])  # the late column enters at exactly its first step's level
    assert torch.equal(z[..., 3], z0[..., 3])  # after the last step: the clean latent


# ---------------------------------------------------------------------------------------------- maps and weights
def test_start_maps_from_masks_and_boxes():
    mask = np.zeros((6, 8), dtype=np.float32)
    mask[1, 1], mask[2, 2] = 1.0, 0.5
    starts = build_start_map(6, 8, 400, mask, [Box(5, 3, 8, 6, 700), Box(0, 0, 2, 1)])
    assert starts.dtype == torch.long and starts.shape == (1, 1, 6, 8)
    assert starts[0, 0, 1, 1] == 400 and starts[0, 0, 2, 2] == 200  # grey: a proportional start
    assert (starts[0, 0, 3:, 5:] == 700).all() and (starts[0, 0, 0, :2] == 400).all()
    assert int((starts > 0).sum()) == 1 + 1 + 9 + 2
    grown = build_start_map(6, 8, 400, mask, dilate=1)
    assert grown[0, 0, 0, 0] == 400 and grown[0, 0, 3, 3] == 200 and grown[0, 0, 5, 7] == 0
    assert torch.equal(build_start_map(3, 4, 300), torch.full((1, 1, 3, 4), 300))
    with pytest.raises(ValueError, match="select.* nothing"):
        build_start_map(6, 8, 400, np.zeros((6, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="box 5,3,9,6 lies outside the 8x6 image"):
        build_start_map(6, 8, 400, None, [Box(5, 3, 9, 6)])


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 30), width=st.integers(1, 30), dilate=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_dilation_is_the_square_max_filter(height, width, dilate, seed):
    """Dilation runs as a row pass and a column pass (a dense (2d+1)^2 max pool took minutes at d = 256): the same map."""
    rng = np.random.default_rng(seed)
    mask = ((rng.random((height, width)) > 0.9) * rng.random((height, width))).astype(np.float32)
    starts = torch.from_numpy(np.rint(mask.astype(np.float64) * 400).astype(np.int64))[None, None]
    square = torch.nn.functional.max_pool2d(starts.double(), 2 * dilate + 1, stride=1, padding=dilate).long()
    if bool((square > 0).any()):
        assert torch.equal(build_start_map(height, width, 400, mask, (), dilate), square)


def test_parse_box():
    assert parse_box("1,2,30,40") == Box(1, 2, 30, 40) and parse_box(" 1, 2,30,40@250") == Box(1, 2, 30, 40, 250)
    assert parse_box("1,2,30,40@250").describe() == "1,2,30,40@250"
    for bad in ("1,2,3", "a,b,c,d", "5,5,5,9", "1,2,30,40@", "-1,0,4,4", "1,2,30,40@2.5"):
        with pytest.raises(ValueError, match="box"):
            parse_box(bad)
    for bad in ("0,0,8,8@0", "0,0,8,8@-5"):  # no start: every image would fail later, naming no box
        with pytest.raises(ValueError, match=r"box '0,0,8,8@-?\d' starts at t=-?\d: a box's own start_t must be in \[1, T-1\]"):
            parse_box(bad)
    for bad in ("\uff11,0,8,8", "0,0,8,8@\u0665", "0,0," + "9" * 5000 + ",8"):  # other digits; no pixel coordinate
        with pytest.raises(ValueError, match="is not x0,y0,x1,y1") as info:
            parse_box(bad)
        assert len(str(info.value)) < 200  # a 5000-digit coordinate is not echoed whole


def test_masks_are_read_like_images_and_must_match_the_image_size():
    grey = np.array([[0, 128], [255, 64]], dtype=np.uint8)
    got = mask_to_array(Image.fromarray(grey, "L"), 2, 2)
    np.testing.assert_allclose(got, grey / 255.0, atol=1e-6)
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # mode I;16
    np.testing.assert_allclose(mask_to_array(sixteen, 2, 2), grey / 255.0, atol=1e-4)
    rgb = Image.fromarray(np.stack([grey] * 3, -1), "RGB")
    np.testing.assert_allclose(mask_to_array(rgb, 2, 2), grey / 255.0, atol=1e-3)
    np.testing.assert_array_equal(mask_to_array(torch.ones(1, 1, 2, 2, dtype=torch.bool), 2, 2), np.ones((2, 2)))
    half = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    for dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16: "Got unsupported ScalarType BFloat16"
        np.testing.assert_array_equal(mask_to_array(half.to(dtype), 2, 2), half.numpy())
    with pytest.raises(ValueError, match="a mask path is not read here"):  # was "must be [H, W] ..., got shape ()"
        mask_to_array("mask.png", 2, 2)
    with pytest.raises(ValueError, match="the mask is 2x2 but the image is 3x2"):
        mask_to_array(grey, 3, 2)
    with pytest.raises(ValueError, match="finite and in \\[0, 1\\]"):
        mask_to_array(np.full((2, 2), 2.0), 2, 2)


def test_latent_map_is_conservative_and_dilated_by_one_latent_pixel():
    starts = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    starts[0, 0, 5, 6] = 300  # one pixel in latent cell (1, 1)
    latent = latent_start_map(starts, 4)
    assert latent.shape == (1, 1, 4, 4) and latent.dtype == torch.long
    assert (latent[0, 0, :3, :3] == 300).all() and latent[0, 0, 3].sum() == 0 and latent[0, 0, :, 3].sum() == 0


def test_composite_weight_is_zero_outside_and_ramps_inward():
    starts = torch.zeros(1, 1, 3, 16, dtype=torch.long)
    starts[..., 2:14] = 100
    w = composite_weight(starts, 3)[0, 0, 1]
    assert w[:2].sum() == 0 and w[14:].sum() == 0
    torch.testing.assert_close(w[2:8], torch.tensor([0.25, 0.5, 0.75, 1.0, 1.0, 1.0]))
    edge = torch.full((1, 1, 4, 4), 7)
    assert torch.equal(composite_weight(edge, 5), torch.ones(1, 1, 4, 4))  # the image border is not an edge
    x, r = torch.randn(1, 3, 3, 16), torch.randn(1, 3, 3, 16)
    out = composite(x, r, composite_weight(starts, 3))
    assert torch.equal(out[..., :2], x[..., :2]) and torch.equal(out[..., 6:10], r[..., 6:10])


# ------------------------------------------------------------------------------------------------------ crop mode
@pytest.mark.parametrize(
    "bbox,padding,aspect,size,expect",
    [
        ((40, 40, 60, 50), 10, 1.0, (200, 200), (30, 25, 70, 65)),  # padded to 40x30, grown to 40x40 around its centre
        ((0, 0, 10, 10), 5, 1.0, (100, 80), (0, 0, 20, 20)),  # shifted inside at the top-left corner
        ((90, 70, 100, 80), 5, 1.0, (100, 80), (80, 60, 100, 80)),  # ... and at the bottom-right corner
        ((10, 0, 90, 10), 8, 1.0, (100, 50), (2, 0, 98, 50)),  # wider than the image is tall: clipped to the height
        ((10, 10, 20, 20), 0, 2.0, (100, 100), (5, 10, 25, 20)),  # a 2:1 training shape
        ((0, 0, 100, 100), 32, 1.0, (100, 100), (0, 0, 100, 100)),  # the whole image
    ],
)
def test_crop_geometry_hand_computed(bbox, padding, aspect, size, expect):
    assert crop_geometry(bbox, padding, aspect, *size) == expect


def test_crop_mode_refines_each_region_in_its_crop_and_keeps_the_rest(refiner):
    x = photo_crops(1, 96, seed=4)
    starts = torch.zeros(1, 1, 96, 96, dtype=torch.long)
    starts[..., 4:12, 6:14] = 400
    starts[..., 70:80, 60:75] = 250
    regions = find_regions(starts)
    assert [r.bbox for r in regions] == [(6, 4, 14, 12), (60, 70, 75, 80)]
    assert region_crops(starts, 8) == [(0, 0, 24, 24), (52, 60, 83, 91)]  # padded 31x26, grown to 31x31
    calls = []
    original = refiner._generate
    refiner._generate = lambda xs, run, sm=None: calls.append(tuple(xs.shape)) or original(xs, run, sm)
    try:
        out = refiner.refine_tensors(x, seeds=5, start_map=starts, crop_regions=True, region_padding=8, **ARGS)
    finally:
        del refiner._generate
    assert calls == [(1, 3, 32, 32), (1, 3, 32, 32)]  # each crop resized to the experts' native 32 px
    outside = starts == 0
    assert torch.equal(out.masked_select(outside), x.masked_select(outside))
    assert not torch.equal(out[..., 4:12, 6:14], x[..., 4:12, 6:14])
    with pytest.raises(ValueError, match="crop_regions needs a start map"):
        refiner.refine_tensors(x, seeds=5, crop_regions=True, **ARGS)


def test_start_map_resizing_is_conservative():
    starts = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    starts[..., 3, 3] = 9
    small = resize_start_map(starts, 2, 2)
    assert small[0, 0, 0, 0] == 9 and small.sum() == 9
    assert resize_start_map(small, 8, 8)[0, 0, :4, :4].eq(9).all()


def test_bad_start_maps_and_region_arguments_are_refused(refiner, photo):
    h, w = photo.shape[-2:]
    cases = [
        (dict(start_map=torch.zeros(1, 1, h, w + 1, dtype=torch.long)), "does not match the images"),
        (dict(start_map=torch.zeros(1, 1, h, w)), "integer timesteps"),
        (dict(start_map=torch.full((1, 1, h, w), 401)), r"must lie in \[0, start_t=400\]"),
        (dict(start_map=torch.full((1, 1, h, w), 1), mask_blur=-1), "mask_blur"),
        (dict(start_map=torch.full((1, 1, h, w), 1), crop_regions=True, region_size=3), "region_size"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            refiner.refine_tensors(photo, seeds=0, **{**ARGS, **kw})
    image = Image.new("RGB", (w, h))
    with pytest.raises(ValueError, match="box 0,0,99,5 lies outside"):
        refiner(image, boxes=[Box(0, 0, 99, 5)], **ARGS)
    with pytest.raises(ValueError, match="outside every expert window"):
        refiner(image, boxes=[Box(0, 0, 5, 5, 700)], **ARGS)  # a box's own start decides the plan's first step
    with pytest.raises(ValueError, match="selects nothing|select.* nothing"):
        refiner(image, mask=Image.new("L", (w, h)), **ARGS)


# ------------------------------------------------------------------------------- many regions, masks, mask folders
def dotted(height: int, width: int, start: int = 300) -> torch.Tensor:
    """A start map with a dot on every other pixel of every other row: (height/2) x (width/2) separate regions."""
    starts = torch.zeros(1, 1, height, width, dtype=torch.long)
    starts[..., ::2, ::2] = start
    return starts


def test_many_regions_cost_one_label_image_and_crop_mode_refuses_more_than_its_limit(refiner):
    starts = dotted(100, 100)  # 2,500 regions: one 100 x 100 map each took 25 MB, a dotted 1024^2 mask ~120 GB
    tracemalloc.start()
    try:
        regions = find_regions(starts)
        meta = region_metadata(starts, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(regions) == 2500 and all(r.labels is regions[0].labels for r in regions)
    assert peak < 5 * 2**20, peak  # the label image and small per-region records, not 2,500 full-size maps
    listed = json.loads(meta["regions"])
    assert len(listed) == MAX_REGIONS and meta["regions_total"] == "2500"  # in-place mode: listed up to the limit
    assert listed[:2] == [{"bbox": [0, 0, 1, 1], "start_t": 300}, {"bbox": [2, 0, 3, 1], "start_t": 300}]
    assert region_metadata(dotted(8, 8), None).keys() == {"regions"}  # under the limit: as before
    message = r"the selection has 2,500 separate regions, more than the 256 crop mode refines one by one; merge .*--mask-dilate"
    with pytest.raises(ValueError, match=message):
        region_crops(starts, 4)
    x = photo_crops(1, 100, seed=1)
    with pytest.raises(ValueError, match=message):  # refused before any region is refined
        refiner.refine_tensors(x, seeds=0, start_map=starts, crop_regions=True, **ARGS)


def test_a_box_is_checked_where_it_is_made():
    """Python API boxes were never checked: Box(-30, 0, 8, 8) refined columns 2..7 (a negative slice), tuples and
    strings ended in AttributeError."""
    assert Box(np.int64(1), 2, 30, 40) == Box(1, 2, 30, 40) and type(Box(np.int64(1), 2, 30, 40).x0) is int
    for args, match in [((-30, 0, 8, 8), r"box '-30,0,8,8' must have 0 <= x0 < x1"), ((8, 8, 0, 0), "0 <= x0 < x1"),
                        ((0, 0, 8, 8, 0), "starts at t=0"), ((0.5, 0, 8, 8), r"Box.x0=0.5 must be an integer"),
                        ((0, 0, True, 8), "Box.x1=True")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Box(*args)
    assert RegionOptions(mask="masks/a.png").mask == Path("masks/a.png")  # a str mask path: an AttributeError later
    for boxes in (((0, 0, 8, 8),), ("0,0,8,8",)):
        with pytest.raises(ValueError, match=r"boxes must be Box objects \(Box\(x0, y0, x1, y1\)"):
            RegionOptions(boxes=boxes)


def test_a_request_with_boxes_refines_only_its_boxes(refiner, photo):
    """Refiner.refine(x, request) with boxes and no start map refined the whole image."""
    request = RefineRequest(regions=RegionOptions(boxes=(Box(4, 4, 20, 16),), blur=0), **ARGS)
    out = refiner.refine(photo, request, 3)
    starts = build_start_map(*photo.shape[-2:], 400, None, request.regions.boxes)
    assert torch.equal(out, refiner.refine(photo, request, 3, start_map=starts))
    assert torch.equal(out[..., :4, :], photo[..., :4, :]) and not torch.equal(out[..., 4:16, 4:20], photo[..., 4:16, 4:20])
    with pytest.raises(ValueError, match="the request names a mask file, which Refiner.refine does not read"):
        refiner.refine(photo, RefineRequest(regions=RegionOptions(mask=Path("mask.png")), **ARGS))


def test_region_options_are_checked_once_where_they_are_made():
    for kw, match in [(dict(blur=99999), rf"mask_blur=99999 must be an integer in \[0, {MAX_FEATHER}\]"),
                      (dict(dilate=999999), "mask_dilate=999999"), (dict(padding=999999999), "region_padding=999999999"),
                      (dict(size=100000), r"region_size=100000 must be an integer in \[1, 4096\]")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            RegionOptions(**kw)


def test_a_mask_folder_is_listed_once_for_all_inputs(tmp_path, monkeypatch):
    folder = tmp_path / "masks"
    folder.mkdir()
    for i in range(50):
        (folder / f"img{i}.png").write_bytes(b"")
    (folder / "img3.jpg").write_bytes(b"")
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(path) or real_scandir(path))
    options = RegionOptions(mask=folder)
    assert [options.mask_for(Path(f"in/img{i}.png")).name for i in (0, 49)] == ["img0.png", "img49.png"]
    for i in range(50):
        if i != 3:
            options.mask_for(Path(f"elsewhere/img{i}.jpg"))
    with pytest.raises(ValueError, match="several masks for it"):
        options.mask_for(Path("img3.png"))
    with pytest.raises(ValueError, match="holds no mask named img50"):
        options.mask_for(Path("img50.png"))
    assert listed == [folder]  # once, not once per input (quadratic: hours for 100,000 masks)
    assert len(options.mask_files()) == 51 and listed == [folder]


def test_a_mask_of_another_size_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(big)
    right = tmp_path / "right.png"
    Image.new("L", (32, 24), 255).save(right)
    decoded = []
    real_load = regions_module.load_image
    monkeypatch.setattr(regions_module, "load_image", lambda path: decoded.append(path) or real_load(path))
    with pytest.raises(ValueError, match="the mask is 3000x2000 but the image is 32x24; masks must have the image's size"):
        load_mask(big, (32, 24))
    assert decoded == []  # a 9000 x 9000 mask took 1.2 GB before its size was compared
    mask, _ = load_mask(right, (32, 24))
    assert mask.shape == (24, 32) and decoded == [right]
    (tmp_path / "junk.png").write_bytes(b"not an image")  # an unreadable header: the loader says why, as before
    with pytest.raises(ValueError, match="cannot load image"):
        load_mask(tmp_path / "junk.png", (32, 24))
