"""scripts/refine.py with regions (--mask, --box, --crop-regions) and the step options (--tail-steps, --sampler,
--strength): outputs, metadata, and every bad case in one line with the batch going on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.checkpoint import sha256_file
from ldm.imageio import read_png_metadata

from conftest import load_photos

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "refine.py"


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("refine_script_regions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(cli, capsys, argv: list[str]) -> tuple[int, list[str], str]:
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code)
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two photographs (48x40 and 53x37), a mask folder matching one of them, a mask file of the first's size."""
    root = tmp_path_factory.mktemp("region_inputs")
    astro, coffee, _ = load_photos()
    images = root / "images"
    images.mkdir()
    Image.fromarray(astro[::10, ::10][:40, :48]).save(images / "astro.png")
    Image.fromarray(coffee[::10, ::10][:37, :53]).save(images / "coffee.png")
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[8:20, 10:30] = 255
    mask[25:30, 5:9] = 128
    Image.fromarray(mask).save(root / "astro_mask.png")
    masks = root / "masks"
    masks.mkdir()
    Image.fromarray(mask).save(masks / "astro.png")
    return root


def args(expert_checkpoints, out, *extra) -> list[str]:
    return ["--ckpt", str(expert_checkpoints[0]), "--ckpt", str(expert_checkpoints[1]), "--outdir", str(out),
            "--device", "cpu", "--ddim-steps", "10", *extra]  # fmt: skip


def test_mask_file_keeps_every_other_pixel_and_records_the_region(cli, capsys, expert_checkpoints, inputs, tmp_path):
    out = tmp_path / "out"
    source = inputs / "images" / "astro.png"
    code, err, _ = run(cli, capsys, ["--input", str(source), "--mask", str(inputs / "astro_mask.png"), "--grid",
                                     *args(expert_checkpoints, out, "--start-t", "400")])  # fmt: skip
    assert code == 0, err
    refined = np.asarray(Image.open(out / "astro_t400_s0.png"))
    original, mask = np.asarray(Image.open(source)), np.asarray(Image.open(inputs / "astro_mask.png"))
    assert np.array_equal(refined[mask == 0], original[mask == 0]) and not np.array_equal(refined, original)
    meta = read_png_metadata(out / "astro_t400_s0.png")
    assert meta["mask_sha256"] == sha256_file(inputs / "astro_mask.png") and meta["mask"].endswith("astro_mask.png")
    regions = json.loads(meta["regions"])
    assert [r["bbox"] for r in regions] == [[10, 8, 30, 20], [5, 25, 9, 30]]
    assert [r["start_t"] for r in regions] == [400, 201]  # grey 128/255 of 400
    assert meta["mask_blur"] == "4" and meta["crop_regions"] == "False" and meta["sampler"] == "ddim"
    parameters = json.loads(meta["parameters"])  # the defaults are recorded, as when they were argparse's
    assert parameters["region_padding"] == 32 and parameters["mask_blur"] == 4 and parameters["mask_dilate"] == 0
    grid = Image.open(out / "astro_t400_s0_grid.png")
    assert grid.size == (3 * 48 + 4 * 8, 40 + 2 * 8)  # input | mask overlay | refined


def test_mask_folder_boxes_and_crop_mode(cli, capsys, expert_checkpoints, inputs, tmp_path):
    out = tmp_path / "folder"
    code, err, _ = run(cli, capsys, ["--input", str(inputs / "images"), "--mask", str(inputs / "masks"),
                                     *args(expert_checkpoints, out, "--start-t", "300")])  # fmt: skip
    assert code == 1 and len(err) == 2, err  # coffee has no mask in the folder: one line, astro refined
    assert "coffee.png" in err[0] and "holds no mask named coffee" in err[0] and "1 image(s) failed" in err[1]
    assert sorted(p.name for p in out.iterdir()) == ["astro_t300_s0.png"]

    out = tmp_path / "boxes"
    code, err, _ = run(cli, capsys, ["--input", str(inputs / "images"), "--box", "2,2,20,20@450", "--box", "30,5,50,30",
                                     "--crop-regions", "--region-padding", "4",
                                     *args(expert_checkpoints, out, "--start-t", "300")])  # fmt: skip
    assert code == 1 and len(err) == 2, err  # the second box lies outside the 48-px-wide image only
    assert "astro.png" in err[0] and "box 30,5,50,30 lies outside the 48x40 image" in err[0]
    name = "coffee_t450_s0.png"  # the plan starts at the latest box start
    assert sorted(p.name for p in out.iterdir()) == [name]
    meta = read_png_metadata(out / name)
    assert meta["boxes"] == "2,2,20,20@450;30,5,50,30" and meta["crop_regions"] == "True"
    assert meta["region_padding"] == "4" and json.loads(meta["parameters"])["region_padding"] == 4
    regions = json.loads(meta["regions"])
    assert [(r["bbox"], r["start_t"]) for r in regions] == [([2, 2, 20, 20], 450), ([30, 5, 50, 30], 300)]
    assert all(len(r["crop"]) == 4 for r in regions)
    original = np.asarray(Image.open(inputs / "images" / "coffee.png"))
    refined = np.asarray(Image.open(out / name))
    keep = np.ones(original.shape[:2], dtype=bool)
    keep[2:20, 2:20] = keep[5:30, 30:50] = False
    assert np.array_equal(refined[keep], original[keep])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask", "{root}/nowhere.png"], "--mask {root}/nowhere.png: no such file or folder"),
        (["--crop-regions"], "--crop-regions needs --mask or --box"),
        (["--box", "1,2,3"], "--box: box '1,2,3' is not x0,y0,x1,y1"),
        (["--box", "5,5,2,9"], "must have 0 <= x0 < x1"),
        (["--box", "1,1,5,5@800"], "outside every expert window"),
        (["--box", "1,1,5,5@1000"], "start_t=1000 is outside [1, 999]"),
        (["--tail-steps", "5"], "ddim_steps=10 and tail_steps=5 were both given"),
        (["--strength", "0.4", "--start-t", "400"], "--start-t and --strength were both given"),
        (["--strength", "1.5"], "--strength: 1.5 must be a number in (0, 1]"),
        (["--sampler", "dpmpp_2m", "--eta", "0.5"], "eta=0.5 applies to the ddim sampler only"),
        (["--sampler", "euler"], "--sampler: invalid choice"),
        (["--mask-blur", "-1"], "--mask-blur: -1 must be >= 0"),
        # refused at parsing, not by every image after it is loaded
        (["--box", "0,0,8,8@0"], "--box: box '0,0,8,8@0' starts at t=0: a box's own start_t must be in [1, T-1]"),
        (["--box", "0,0,8,8@-5"], "starts at t=-5: a box's own start_t must be in [1, T-1]"),
        (["--region-size", "100000"], "--region-size: 100000 must be <= 4096 (each region is refined at PX x PX"),
        (["--region-padding", "999999999"], "--region-padding: 999999999 must be <= 4096 (px of context"),
        (["--mask-blur", "99999"], "--mask-blur: 99999 must be <= 256 (each px of feather is one more pass"),
        (["--mask-dilate", "999999"], "--mask-dilate: 999999 must be <= 256 (the growing filter's cost"),
        # crop-mode flags without crop mode were ignored
        (["--box", "1,1,5,5", "--region-padding", "8"], "--region-padding applies only with --crop-regions: add"),
        (["--region-padding", "32", "--region-size", "64"], "--region-padding and --region-size apply only with"),
        (["--mask-blur", "8"], "--mask-blur applies only with --mask or --box: add a region, or drop it"),
        (["--mask-blur", "4", "--mask-dilate", "2"], "--mask-blur and --mask-dilate apply only with --mask or --box"),
    ],
)
def test_bad_region_and_step_arguments_exit_2_in_one_line(cli, capsys, expert_checkpoints, inputs, tmp_path, extra,
                                                          message):  # fmt: skip
    out = tmp_path / "out"
    extra = [e.format(root=inputs) for e in extra]
    code, err, _ = run(cli, capsys, ["--input", str(inputs / "images"), *args(expert_checkpoints, out, *extra)])
    assert code == 2 and len(err) == 1 and message.format(root=inputs) in err[0], err
    assert err[0].startswith("refine.py: error:") and not out.exists()


def test_bad_masks_cost_their_input_only(cli, capsys, expert_checkpoints, inputs, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((40, 48), dtype=np.uint8)).save(masks / "astro.png")  # selects nothing
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(masks / "coffee.png")  # wrong size
    out = tmp_path / "out"
    code, err, _ = run(cli, capsys, ["--input", str(inputs / "images"), "--mask", str(masks),
                                     *args(expert_checkpoints, out, "--start-t", "300")])  # fmt: skip
    assert code == 1 and len(err) == 3, err
    assert "astro.png" in err[0] and "selects nothing" in err[0]
    assert "coffee.png" in err[1] and "the mask is 10x10 but the image is 53x37" in err[1]
    (masks / "coffee.png").write_bytes(b"not a png")
    code, err, _ = run(cli, capsys, ["--input", str(inputs / "images" / "coffee.png"), "--mask", str(masks),
                                     *args(expert_checkpoints, out, "--start-t", "300")])  # fmt: skip
    assert code == 1 and "cannot load image" in err[0] and f"{inputs / 'images' / 'coffee.png'}: mask " in err[0], err


def test_exact_steps_solver_and_strength(cli, capsys, expert_checkpoints, inputs, tmp_path):
    source = str(inputs / "images" / "astro.png")
    base = ["--ckpt", str(expert_checkpoints[0]), "--ckpt", str(expert_checkpoints[1]), "--device", "cpu"]
    code, err, stdout = run(cli, capsys, ["--input", source, "--outdir", str(tmp_path / "a"), *base, "--start-t", "400",
                                          "--tail-steps", "4", "--sampler", "dpmpp_2m"])  # fmt: skip
    assert code == 0, err
    assert "4 exact step(s) from t=400, dpmpp_2m" in stdout
    meta = read_png_metadata(tmp_path / "a" / "astro_t400_s0.png")
    steps = [int(t) for t in meta["tail_timesteps"].split(",")]
    assert len(steps) == 4 and steps[0] == 400 and meta["tail_steps"] == "4" and meta["ddim_steps"] == ""
    assert meta["sampler"] == "dpmpp_2m" and meta["start_step"] == "600"
    code, err, _ = run(cli, capsys, ["--input", source, "--outdir", str(tmp_path / "b"), *base, "--strength", "0.4",
                                     "--tail-steps", "4", "--sampler", "dpmpp_2m"])  # fmt: skip
    assert code == 0, err
    pixels = [np.asarray(Image.open(tmp_path / d / "astro_t400_s0.png")) for d in ("a", "b")]
    assert np.array_equal(*pixels)  # --strength 0.4 is --start-t 400


def test_the_cli_bounds_are_the_library_bounds(cli):
    from ldm.refine import regions

    assert (cli.MAX_FEATHER, cli.MAX_REGION_SIZE, cli.MAX_REGION_PADDING, cli.DEFAULT_REGION_PADDING,
            cli.DEFAULT_MASK_BLUR) == (regions.MAX_FEATHER, regions.MAX_REGION_SIZE, regions.MAX_REGION_PADDING,
                                       regions.DEFAULT_REGION_PADDING, regions.DEFAULT_MASK_BLUR)  # fmt: skip


def test_a_huge_mask_is_refused_from_its_header_and_a_dotted_one_is_capped_in_crop_mode(
    cli, capsys, expert_checkpoints, inputs, tmp_path, monkeypatch
):
    from ldm.refine import regions as regions_module

    huge = tmp_path / "huge.png"
    Image.new("L", (4000, 3000), 255).save(huge)
    decoded = []
    real_load = regions_module.load_image
    monkeypatch.setattr(regions_module, "load_image", lambda path: decoded.append(path) or real_load(path))
    source = str(inputs / "images" / "astro.png")
    code, err, _ = run(cli, capsys, ["--input", source, "--mask", str(huge),
                                     *args(expert_checkpoints, tmp_path / "a", "--start-t", "300")])  # fmt: skip
    assert code == 1 and len(err) == 2, err
    assert f"astro.png: mask {huge}: the mask is 4000x3000 but the image is 48x40" in err[0] and decoded == []

    dots = np.zeros((40, 48), dtype=np.uint8)
    dots[::2, ::2] = 255  # 20 x 24 = 480 separate regions
    Image.fromarray(dots).save(tmp_path / "dots.png")
    code, err, _ = run(cli, capsys, ["--input", source, "--mask", str(tmp_path / "dots.png"), "--crop-regions",
                                     *args(expert_checkpoints, tmp_path / "b", "--start-t", "300")])  # fmt: skip
    assert code == 1 and len(err) == 2, err
    assert (
        "the selection has 480 separate regions, more than the 256 crop mode refines one by one; merge nearby "
        "ones by growing the selection (--mask-dilate PX), or refine in place (without --crop-regions)"
    ) in err[0]
    code, err, _ = run(cli, capsys, ["--input", source, "--mask", str(tmp_path / "dots.png"),
                                     *args(expert_checkpoints, tmp_path / "c", "--start-t", "300")])  # fmt: skip
    assert code == 0, err  # in place: any number of regions, the metadata lists the first 256
    meta = read_png_metadata(tmp_path / "c" / "astro_t300_s0.png")
    assert len(json.loads(meta["regions"])) == 256 and meta["regions_total"] == "480"
