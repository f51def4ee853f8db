"""Speed and memory options of refinement give the default results: channels_last, bf16, batching, compile, tiling and
memory-efficient attention (the loop that never reads the device back is tested in test_sampling.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.imageio import read_png_metadata
from ldm.models.tiling import GroupNormStatistics, TilingConfig
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock
from ldm.refine import Refiner
from ldm.refine.first_stage import AUTO_TILING

from conftest import build_tiny_expert, load_photos, photo_crops

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "refine.py"
ARGS = dict(start_t=400, ddim_steps=10)  # tail t = 301 (expert [250, 500)), 201, 101, 1 (expert [0, 250))


def fresh_experts():
    """The two tiny experts of conftest's ``expert_checkpoints`` rebuilt in memory (options mutate the models)."""
    shapes = build_tiny_expert(250, 500, seed=0)
    details = build_tiny_expert(0, 250, seed=1, first_stage_state=shapes.first_stage_model.state_dict())
    return [shapes, details]


@pytest.fixture(scope="module")
def crops():
    return photo_crops(3, 32, seed=5)


@pytest.fixture(scope="module")
def reference(crops):
    """The default refiner's output on ``crops`` with seeds 3, 4, 5."""
    return Refiner(fresh_experts(), "cpu").refine_tensors(crops, seeds=[3, 4, 5], **ARGS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------ same results
@pytest.mark.parametrize(
    "options,max_abs,mean_abs",
    [
        ({"channels_last": True}, 1e-4, 1e-5),  # other conv kernels: rounding only
        ({"batch_invariant": False}, 1e-4, 1e-5),  # whole-batch kernels: rounding only
        ({"precision": "bf16"}, 0.25, 0.03),  # networks in bf16, trajectory in fp32
        ({"precision": "bf16", "channels_last": True, "batch_invariant": False}, 0.25, 0.03),
    ],
)
def test_options_match_the_default_refiner(crops, reference, options, max_abs, mean_abs):
    refiner = Refiner(fresh_experts(), "cpu", **options)
    out = refiner.refine_tensors(crops, seeds=[3, 4, 5], **ARGS)
    diff = (out - reference).abs()
    assert float(diff.max()) < max_abs and float(diff.mean()) < mean_abs, (float(diff.max()), float(diff.mean()))
    if options.get("channels_last"):
        conv = refiner.experts[1].model.model.diffusion_model.input_blocks[0][0]
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_identical_inputs_are_encoded_once_and_refined_as_alone(crops, reference, monkeypatch):
    refiner = Refiner(fresh_experts(), "cpu")
    encoded_rows = []
    original = refiner.first_stage.encode
    monkeypatch.setattr(refiner.first_stage, "encode", lambda x: encoded_rows.append(x.shape[0]) or original(x))
    batch = torch.cat([crops[:1], crops[:1], crops[1:2], crops[:1]])
    out = refiner.refine_tensors(batch, seeds=[3, 9, 4, 3], **ARGS)
    assert sum(encoded_rows) == 2  # two distinct images
    assert torch.equal(out[0], reference[0]) and torch.equal(out[2], reference[1]) and torch.equal(out[3], reference[0])
    assert not torch.equal(out[1], out[0])  # another seed


def test_timings_are_reported_per_phase(crops):
    timings: dict[str, float] = {}
    Refiner(fresh_experts(), "cpu").refine_tensors(crops[:1], seeds=0, timings=timings, **ARGS)
    assert set(timings) == {"encode", "sample", "decode"} and all(v > 0 for v in timings.values())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile needs a C++ compiler")
def test_compiled_unets_match_the_default(crops, reference):
    refiner = Refiner(fresh_experts(), "cpu", compile=True)
    out = refiner.refine_tensors(crops[:1], seeds=3, **ARGS)
    torch.testing.assert_close(out, reference[:1], atol=1e-4, rtol=0)
    assert "compiled" in refiner.describe()


# ------------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("block", [AttnBlock(64), AttentionBlock(64, num_head_channels=16)], ids=["first_stage", "unet"])
def test_attention_blocks_use_a_memory_efficient_kernel_and_match_the_math_kernel(block):
    torch.manual_seed(0)
    block = block.eval()
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 64, 16, 12)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        out = block(x)
    names = [event.name for event in prof.events()]
    assert any("flash_attention" in n or "efficient_attention" in n for n in names), names  # no N x N scores kept
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]):
        ref = block(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- tiling
def exact_tiling(model, tile: int, overlap: int) -> TilingConfig:
    """Tiles with as many statistics passes as GroupNorm layers: tiled equals untiled up to the tiles' context."""
    vq = model.first_stage_model
    passes = max(len(GroupNormStatistics(vq.encoder).layers), len(GroupNormStatistics(vq.decoder).layers))
    return TilingConfig(min_side=tile, tile=tile, overlap=overlap, stat_passes=passes)


def test_auto_tiling_is_the_default_and_fits_the_first_stage():
    refiner = Refiner(fresh_experts(), "cpu")
    assert refiner.tiling == AUTO_TILING and refiner.first_stage.tiling == AUTO_TILING
    assert not AUTO_TILING.applies_to(768, 768) and AUTO_TILING.applies_to(1024, 600)  # 1024 px: tiled (memory)
    assert "tiling 512 px tiles" in refiner.describe()
    assert Refiner(fresh_experts(), "cpu", tiling=None).first_stage.tiling is None
    with pytest.raises(ValueError, match="multiples of the first-stage factor 4"):
        Refiner(fresh_experts(), "cpu", tiling=TilingConfig(min_side=64, tile=66, overlap=8))
    with pytest.raises(ValueError, match="'auto', None or a TilingConfig"):
        Refiner(fresh_experts(), "cpu", tiling="always")


@pytest.mark.parametrize("height,width", [(100, 76), (52, 124)])
def test_tiled_refiner_equals_untiled_on_non_square_non_multiple_images(height, width):
    """Images that fit both ways; sizes that are neither square nor multiples of the padding (8) or the tile."""
    image = photo_crops(1, 128, seed=2)[:, :, :height, :width]
    experts = fresh_experts()
    tiled = Refiner(experts, "cpu", tiling=exact_tiling(experts[0], 48, 32)).refine_tensors(image, seeds=1, **ARGS)
    untiled = Refiner(fresh_experts(), "cpu", tiling=None).refine_tensors(image, seeds=1, **ARGS)
    assert tiled.shape == untiled.shape == (1, 3, height, width)
    diff = (tiled - untiled).abs()
    # the tiny decoder's receptive field exceeds the unused tile margin (overlap / 4), so borders differ a little
    assert float(diff.mean()) < 0.03 and float(diff.max()) < 0.5, (float(diff.mean()), float(diff.max()))


# ----------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("refine_script_perf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(cli, argv):
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code)


def test_cli_speed_options_and_tiling(cli, expert_checkpoints, tmp_path, capsys):
    src = tmp_path / "in" / "photo.png"
    src.parent.mkdir()
    Image.fromarray(load_photos()[0][:84:2, :120:2]).save(src)  # 42 x 60
    ckpts = [a for c in expert_checkpoints for a in ("--ckpt", c)]
    base = ["--input", src, "--start-t", 400, "--ddim-steps", 10, "--device", "cpu", *ckpts]
    assert run_cli(cli, [*base, "--outdir", tmp_path / "plain", "--tile-size", 0]) == 0
    fast = ["--channels-last", "--no-batch-invariant", "--tile-size", 32, "--tile-overlap", 16]
    assert run_cli(cli, [*base, "--outdir", tmp_path / "fast", *fast]) == 0
    out = capsys.readouterr().out
    assert "tiling 32 px tiles, 16 px overlap, above 32 px" in out and "batched" in out and "channels_last" in out
    meta = read_png_metadata(tmp_path / "fast" / "photo_t400_s0.png")
    assert meta["tiling"].startswith("32 px tiles") and meta["batch_invariant"] == "False"
    assert read_png_metadata(tmp_path / "plain" / "photo_t400_s0.png")["tiling"] == "off"
    plain = np.asarray(Image.open(tmp_path / "plain" / "photo_t400_s0.png"), dtype=np.float64)
    tiled = np.asarray(Image.open(tmp_path / "fast" / "photo_t400_s0.png"), dtype=np.float64)
    assert plain.shape == tiled.shape == (42, 60, 3)
    assert np.abs(plain - tiled).mean() < 40  # default statistics on 32 px tiles of a random tiny VQ: same picture


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tile-size", 18], "multiples of the first-stage factor 4"),
        (["--tile-size", 64, "--tile-overlap", 64], "overlap < tile"),
        (["--tile-size", -4], "must be >= 0"),
        (["--tile-size", 0, "--tile-overlap", 8], "--tile-overlap was given with --tile-size 0, which never tiles"),
    ],
)
def test_cli_refuses_bad_tiling_in_one_line(cli, expert_checkpoints, tmp_path, capsys, args, message):
    src = tmp_path / "photo.png"
    Image.fromarray(load_photos()[1][:40, :40]).save(src)
    ckpts = [a for c in expert_checkpoints for a in ("--ckpt", c)]
    code = run_cli(cli, ["--input", src, "--outdir", tmp_path / "out", "--device", "cpu", *ckpts, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_cli_tiling_arguments(cli):
    parse = lambda *argv: cli.tiling_from_args(cli.build_parser().parse_args(["--input", "x", "--ckpt", "c", *argv]))  # noqa: E731
    passes = AUTO_TILING.stat_passes
    assert parse() == "auto"
    assert parse("--tile-size", "0") is None
    assert parse("--tile-overlap", "64") == dataclasses.replace(AUTO_TILING, overlap=64)
    assert parse("--tile-size", "256") == TilingConfig(min_side=256, tile=256, overlap=64, stat_passes=passes)
    expected = TilingConfig(min_side=96, tile=96, overlap=8, stat_passes=passes)
    assert parse("--tile-size", "96", "--tile-overlap", "8") == expected
