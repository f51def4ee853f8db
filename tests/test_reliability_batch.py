"""Reliability of a refinement batch, round 2 (issue 13): grids never replace inputs, globs end on link cycles, long thin
images tile, and a batch the networks fail on costs its inputs only; round 3 (issue 25): no output replaces a mask;
round 4: the clean-up of a killed run's temps never removes a file the batch reads.

In process (``refine_files`` / ``scripts/refine.py``'s ``main``) with the tiny experts of conftest; the image sizes are
the smallest that show each defect.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.imageio import find_images
from ldm.models.autoencoder import VQModelInterface
from ldm.models.tiling import GroupNormStatistics, TilingConfig, downscale_to, tiled_vq_decode, tiled_vq_encode
from ldm.refine import Refiner
from ldm.refine.batch import refine_files
from ldm.refine.region_files import RegionOptions
from ldm.util import remove_stale_temp_files

from conftest import TINY_DDCONFIG, load_photos

REPO = Path(__file__).resolve().parents[1]
STEPS = {"start_t": 300, "ddim_steps": 10, "progress": False}


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("refine_script_batch", REPO / "scripts" / "refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def photo(height: int = 24, width: int = 32, index: int = 0) -> np.ndarray:
    return np.ascontiguousarray(load_photos()[index][::8, ::8][:height, :width])


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def run_cli(cli, argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code)


def cli_args(expert_checkpoints, outdir: Path) -> list[str]:
    return [*(a for p in expert_checkpoints for a in ("--ckpt", str(p))), "--outdir", str(outdir), "--start-t", "300",
            "--ddim-steps", "10", "--device", "cpu"]


# ---------------------------------------------------------------------------------------------------------------------
# data loss: every file the batch writes is checked against the inputs


@pytest.mark.parametrize("n_samples, user_file", [(1, "photo_t300_s0_grid.png"), (2, "photo_t300_s0_1_grid.png")])
def test_a_grid_never_replaces_an_input(refiner, tmp_path, n_samples, user_file):
    save_png(tmp_path / "photo.png", photo())
    mine = save_png(tmp_path / user_file, photo(index=1))
    before = mine.read_bytes()
    paths = [tmp_path / "photo.png", mine]
    lines: list[str] = []
    report = refine_files(refiner, paths, tmp_path, grid=True, n_samples=n_samples, on_error=lines.append, **STEPS)
    assert mine.read_bytes() == before
    assert len(lines) == 1 and f"output {tmp_path / user_file} would overwrite an input" in lines[0], lines
    assert [name for name, _ in report.failed] == [str(tmp_path / "photo.png")]
    assert report.done == [str(mine)] and len(report.written) == 2 * n_samples  # the user's file itself is refined


def test_the_cli_refuses_a_grid_over_an_input_and_refines_the_rest(cli, expert_checkpoints, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    save_png(folder / "photo.png", photo())
    mine = save_png(folder / "photo_t300_s0_grid.png", photo(index=1))
    before = mine.read_bytes()
    capsys.readouterr()
    assert run_cli(cli, ["--input", str(folder), "--grid", *cli_args(expert_checkpoints, folder)]) == 1
    err = capsys.readouterr().err
    assert mine.read_bytes() == before and "would overwrite an input" in err and "Traceback" not in err
    assert (folder / "photo_t300_s0_grid_t300_s0_grid.png").is_file()


def mask_image(height: int = 24, width: int = 32) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[4:12, 6:20] = 255
    return mask


@pytest.mark.parametrize("case", ["mask file = output", "mask file = grid", "mask folder = outdir"])
def test_a_mask_that_is_an_output_path_is_refused_before_any_work(cli, expert_checkpoints, refiner, tmp_path, capsys,
                                                                  monkeypatch, case):  # fmt: skip
    """Issue 25: ``--mask out/a_t300_s0.png --outdir out`` replaced the mask with the refined image, exit 0."""
    src = save_png(tmp_path / "a.png", photo())
    out = tmp_path / "out"
    out.mkdir()
    extra: list[str] = []
    if case == "mask file = output":
        mask = mask_arg = save_png(out / "a_t300_s0.png", mask_image())
    elif case == "mask file = grid":
        mask = mask_arg = save_png(out / "a_t300_s0_grid.png", mask_image())
        extra = ["--grid"]
    else:  # the user's masks folder is also the output folder; a file in it has an output's name
        save_png(out / "a.png", mask_image())
        mask, mask_arg = save_png(out / "a_t300_s0.png", mask_image()), out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls: list[int] = []
    real = Refiner.refine_tensors
    monkeypatch.setattr(Refiner, "refine_tensors", lambda self, x, *a, **k: calls.append(1) or real(self, x, *a, **k))
    capsys.readouterr()
    code = run_cli(cli, ["--input", str(src), "--mask", str(mask_arg), *extra, *cli_args(expert_checkpoints, out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"refine.py: error: output {mask} would overwrite {mask}, ")
    assert err[0].endswith("files the batch reads are never written; choose another --outdir or move the mask")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and calls == []
    options = RegionOptions(mask=Path(mask_arg))
    with pytest.raises(ValueError, match="would overwrite .*files the batch reads are never written"):
        refine_files(refiner, [src], out, regions=options, grid=bool(extra), **STEPS)  # the library refuses it too
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and calls == []


@pytest.mark.parametrize("case", ["mask file", "mask folder = outdir", "input"])
def test_the_clean_up_of_killed_runs_never_removes_an_input_or_mask_named_like_a_temp(refiner, tmp_path, case):
    """Round 4: ``--mask out/.a_t300_s0.png.abcdefgh.tmp --outdir out`` deleted the mask (it has the name of a temp
    of output ``a_t300_s0.png``) before reading it, and so did an --input named so; a real leftover is still removed."""
    out = tmp_path / "out"
    out.mkdir()
    src = save_png(tmp_path / "a.png", photo())
    leftover = out / ".a_t300_s0.png.zzzzzzzz.tmp"  # what a killed run of this batch leaves
    leftover.write_bytes(b"partial")
    named = out / ".a_t300_s0.png.abcdefgh.tmp"
    Image.fromarray(mask_image() if case != "input" else photo()).save(named, format="PNG")
    paths, regions = [src], None
    if case == "mask file":
        regions = RegionOptions(mask=named)
    elif case == "mask folder = outdir":  # the user's masks folder is also the output folder: none of it is removed
        save_png(out / "a.png", mask_image())
        regions = RegionOptions(mask=out)
    else:
        paths = [src, named]
    before = named.read_bytes()
    lines: list[str] = []
    report = refine_files(refiner, paths, out, regions=regions, on_error=lines.append, **STEPS)
    assert lines == [] and report.failed == [] and len(report.done) == len(paths)
    assert named.read_bytes() == before
    assert leftover.exists() == (case == "mask folder = outdir")


def test_remove_stale_temp_files_keeps_the_real_paths_it_is_given(tmp_path):
    read, stale = tmp_path / ".x.png.abcdefgh.tmp", tmp_path / ".x.png.12345678.tmp"
    read.write_bytes(b"a mask")
    stale.write_bytes(b"partial")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)  # the folder named through a link: compared by real path
    keep = {os.path.realpath(read)}
    assert remove_stale_temp_files(link, names=["x.png"], keep=keep) == [link / stale.name]
    assert read.read_bytes() == b"a mask" and not stale.exists()


def test_skip_existing_writes_a_grid_that_a_killed_run_did_not(refiner, tmp_path):
    src = save_png(tmp_path / "in.png", photo())
    out = tmp_path / "out"
    first = refine_files(refiner, [src], out, grid=True, **STEPS)
    assert first.ok
    (out / "in_t300_s0_grid.png").unlink()  # killed after the refined file, before its grid
    again = refine_files(refiner, [src], out, grid=True, skip_existing=True, **STEPS)
    assert again.ok and again.skipped == [] and (out / "in_t300_s0_grid.png").is_file()
    last = refine_files(refiner, [src], out, grid=True, skip_existing=True, **STEPS)
    assert last.written == [] and last.skipped == [out / "in_t300_s0.png"]


# ---------------------------------------------------------------------------------------------------------------------
# recursive globs: links to folders are not followed


@pytest.mark.timeout(60)
def test_recursive_glob_ends_on_folder_link_cycles(tmp_path, monkeypatch):
    loop = tmp_path / "loop"
    (loop / "sub" / ".hidden").mkdir(parents=True)
    for rel in ("a.png", "sub/b.png", "sub/.c.png", "sub/.hidden/d.png", "notes.txt"):
        save_png(loop / rel, photo(4, 4)) if rel.endswith(".png") else (loop / rel).write_text("x")
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
        save_png(tmp_path / rel, photo(4, 4))
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
# long thin images: the tiling's statistics pass keeps the short side


def test_downscaled_statistics_keep_a_thin_side():
    x = torch.zeros(1, 3, 16, 20000)
    assert downscale_to(x, 512).shape[-2:] == (1, 500)  # what broke the encoder's strided convolutions
    assert downscale_to(x, 512, min_size=8).shape[-2:] == (8, 500)
    assert downscale_to(torch.zeros(1, 3, 4, 900), 512, min_size=8).shape[-2:] == (4, 450)  # never enlarged
    assert downscale_to(torch.zeros(1, 3, 96, 96), 40, min_size=8).shape[-2:] == (32, 32)


@pytest.mark.parametrize("height, width", [(8, 112), (112, 8)])
def test_thin_images_tile_like_the_untiled_network(height, width):
    """A thin image whose downscaled statistics pass (to 16 px: 1 pixel across) broke the encoder's strided convolution:
    with exact statistics passes after it, tiling reproduces the untiled network, as test_tiling.py checks on square
    images (the same VQ-f2)."""
    torch.manual_seed(0)
    vq = VQModelInterface(ddconfig={**TINY_DDCONFIG, "ch_mult": [1, 2]}, lossconfig={"target": "torch.nn.Identity"},
                          n_embed=32, embed_dim=3).eval()
    x = torch.from_numpy(np.resize(load_photos()[0][::4, ::4], (height, width, 3)).astype(np.float32) / 127.5 - 1)
    x = x.permute(2, 0, 1)[None].contiguous()
    passes = max(len(GroupNormStatistics(vq.encoder).layers), len(GroupNormStatistics(vq.decoder).layers))
    exact = TilingConfig(min_side=32, tile=48, overlap=32, stat_side=16, stat_passes=passes)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    with torch.no_grad():
        z = vq.encode(x)
        assert rel(tiled_vq_encode(vq, x, exact, 2), z) < 1e-4
        assert rel(tiled_vq_decode(vq, z, exact, 2, force_not_quantize=True), vq.decode(z, force_not_quantize=True)) < 1e-2


def test_a_long_thin_image_is_refined_with_the_others(refiner, tmp_path):
    paths = [save_png(tmp_path / "a.png", photo()), save_png(tmp_path / "thin.png", np.resize(photo(), (1, 3000, 3))),
             save_png(tmp_path / "z.png", photo(index=2))]
    report = refine_files(refiner, paths, tmp_path / "out", **STEPS)
    assert report.ok, report.failed
    assert Image.open(tmp_path / "out" / "thin_t300_s0.png").size == (3000, 1)


# ---------------------------------------------------------------------------------------------------------------------
# whatever the networks raise costs that batch's inputs only


def test_a_batch_the_networks_fail_on_costs_its_inputs_only(refiner, tmp_path, monkeypatch):
    paths = [save_png(tmp_path / "a.png", photo()), save_png(tmp_path / "bad.png", photo(20, 28)),
             save_png(tmp_path / "z.png", photo(index=2))]
    real = refiner.refine_tensors

    def refine_tensors(x, *args, **kwargs):
        if x.shape[-2:] == (20, 28):
            raise RuntimeError("Kernel size can't be greater\nthan actual input size")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(refiner, "refine_tensors", refine_tensors)
    lines: list[str] = []
    report = refine_files(refiner, paths, tmp_path / "out", on_error=lines.append, **STEPS)
    assert lines == [f"cannot refine {tmp_path / 'bad.png'} (28x20): RuntimeError: Kernel size can't be greater than "
                     "actual input size"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_t300_s0.png", "z_t300_s0.png"]
    assert report.done == [str(paths[0]), str(paths[2])]

    def interrupted(x, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refiner, "refine_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl+C still stops the batch (the CLI reports it, exit 130)
        refine_files(refiner, paths, tmp_path / "out2", **STEPS)
