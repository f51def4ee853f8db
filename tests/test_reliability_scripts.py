"""The adversarial pass of issue 13 on the scripts and the image loader: evaluate.py, degrade.py, quickstart.py,
refine.py's existing flags, ``ldm.imageio``.  Each case is one line and the right exit code, found before any work.

The scripts' ``main`` run in process (fast); Ctrl+C is a KeyboardInterrupt raised where the work would be.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ldm.imageio.load as load
from ldm.cli import check_outdir
from ldm.imageio import ImageLoadError, load_image
from ldm.refine import Refiner
from ldm.refine.batch import refine_files

from conftest import load_photos

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script_adversarial", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # quickstart.py's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {name: script(name) for name in ("evaluate", "degrade", "quickstart", "refine")}


def run(module, argv: list[str], capsys) -> tuple[int, list[str]]:
    """``module.main(argv)``: exit code and the non-empty stderr lines (argparse's SystemExit is an exit code)."""
    capsys.readouterr()
    try:
        code = module.main(argv)
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail(f"{module.__name__}.main let KeyboardInterrupt escape")
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def photo(height: int = 24, width: int = 32) -> np.ndarray:
    return np.ascontiguousarray(load_photos()[0][::8, ::8][:height, :width])


def ckpt_args(expert_checkpoints) -> list[str]:
    return [a for p in expert_checkpoints for a in ("--ckpt", str(p))]


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_refuses_an_unusable_outdir_and_a_huge_size_before_the_sweep(scripts, expert_checkpoints, tmp_path,
                                                                              capsys, monkeypatch):
    evaluate = scripts["evaluate"]
    monkeypatch.setattr("ldm.refine.Refiner.from_checkpoints", interrupt)  # proves the outdir check comes first
    (tmp_path / "a_file").write_text("x")
    code, lines = run(evaluate, [*ckpt_args(expert_checkpoints), "--outdir", str(tmp_path / "a_file" / "o")], capsys)
    assert code == 2 and len(lines) == 1 and "a file is in the way" in lines[0]
    monkeypatch.undo()
    argv = [*ckpt_args(expert_checkpoints), "--size", "4096", "--n-images", "1", "--outdir", str(tmp_path / "o")]
    code, lines = run(evaluate, argv, capsys)  # 100000 asked for 30 GB per crop
    assert code == 2 and len(lines) == 1 and "--size: size=4096 px is above 2048 px" in lines[0]
    assert not (tmp_path / "o").exists()


def test_evaluate_bad_lpips_weights_and_ctrl_c_are_one_line(scripts, expert_checkpoints, tmp_path, capsys, monkeypatch):
    evaluate = scripts["evaluate"]
    garbage = tmp_path / "vgg.pth"
    garbage.write_bytes(b"garbage" * 10)
    base = [*ckpt_args(expert_checkpoints), "--n-images", "1", "--degradations", "jpeg", "--start-t", "100",
            "--ddim-steps", "4", "--outdir", str(tmp_path / "o")]
    code, lines = run(evaluate, [*base, "--lpips-weights", str(garbage)], capsys)
    assert code == 2 and len(lines) == 1 and "cannot be read (truncated or corrupt)" in lines[0] and "vgg.pth" in lines[0]
    monkeypatch.setattr("ldm.eval.sweep.run_sweep", interrupt)
    assert run(evaluate, base, capsys) == (130, ["evaluate.py: interrupted"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--realism-images", "{tmp}/empty"], "--realism-images: {tmp}/empty: folder holds no images"),
        (["--realism-images", "{tmp}/missing"], "--realism-images: image folder {tmp}/missing does not exist or is not"),
        (["--images", "{tmp}/empty"], "--images: {tmp}/empty: folder holds no images"),
        (["--no-reference", "{tmp}/missing"], "--no-reference: image folder {tmp}/missing does not exist"),
        (["--lpips-weights", "{tmp}/vgg.pth"], "--lpips-weights {tmp}/vgg.pth does not exist; pass the path of the file"),
        (["--inception-weights", "{tmp}/empty"], "--inception-weights {tmp}/empty is a folder"),
        (["--config", "{tmp}/model.yaml"], "--config {tmp}/model.yaml does not exist"),
        (["--start-t", "100", "5000"], "--start-t: start_t=5000 must be an integer in [1, 999]"),
        (["--ddim-steps", "1001"], "--ddim-steps: ddim_steps=1001 must be an integer in [1, 1000]"),
        (["--seeds", "0", str(2**63)], f"--seeds: seed={2**63} must be an integer in [0, {2**63 - 1}]"),
        (["--n-images", "100000000"], "--n-images 100000000: at most 4096 held-out crops"),
        (["--size", "4096"], "--size: size=4096 px is above 2048 px"),
        (["--degradations", "jpeg", "colour_blotches:n_blobs=1000000"],
         "--degradations 'colour_blotches:n_blobs=1000000': n_blobs must be an integer in [1, 256]"),
        (["--degradations", "local_vq:box_size=3"], "--degradations 'local_vq:box_size=3': box_size must be in (0, 1]"),
    ],
)
def test_evaluate_refuses_bad_paths_and_numbers_before_loading(scripts, expert_checkpoints, tmp_path, capsys,
                                                               monkeypatch, args, expected):
    """Issue 25: these failed after both models had loaded (a missing or empty --realism-images with exit 1), or in
    the sweep; now each is one line, exit 2, before any checkpoint is opened."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr("ldm.refine.Refiner.from_checkpoints", interrupt)  # loading would exit 130
    argv = [*ckpt_args(expert_checkpoints), *[a.format(tmp=tmp_path) for a in args], "--outdir", str(tmp_path / "o")]
    code, lines = run(scripts["evaluate"], argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evaluate.py: error: ")
    assert expected.format(tmp=tmp_path) in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def pixel_space_checkpoint(path: Path) -> Path:
    """A tiny late-steps expert on IdentityFirstStage (a pixel-space model), as test_latesteps.py builds one."""
    import torch

    from ldm.checkpoint import save_checkpoint
    from ldm.util import instantiate_from_config

    from conftest import LATESTEPS_TARGET, tiny_ldm_params

    params = tiny_ldm_params(t_min=0, t_max=500, image_size=16, scale_factor=1.0,
                             first_stage_config={"target": "ldm.models.autoencoder.IdentityFirstStage"})
    params["unet_config"] = {**params["unet_config"], "params": {**params["unet_config"]["params"], "image_size": 16}}
    config = {"model": {"target": LATESTEPS_TARGET, "params": params}}
    torch.manual_seed(0)
    model = instantiate_from_config(config["model"])
    save_checkpoint({"state_dict": model.state_dict(), "config": config, "window": [0, 500], "global_step": 0}, path)
    return path


def test_evaluate_cli_empty_realism_folder_and_a_pixel_space_model_with_a_vq_degradation(expert_checkpoints, tmp_path):
    """In subprocesses, as a user runs it: an empty --realism-images folder (exit 1 after both models loaded), and
    local_vq / the default vq_roundtrip on a pixel-space checkpoint (a message about a missing quantize.embedding)."""
    (tmp_path / "empty").mkdir()
    pixel = pixel_space_checkpoint(tmp_path / "pixel.ckpt")

    def evaluate(*args: str) -> tuple[int, list[str]]:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *args, "--outdir",
                               str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]

    code, lines = evaluate("--ckpt", str(tmp_path / "missing.ckpt"), "--realism-images", str(tmp_path / "empty"))
    assert code == 2 and len(lines) == 1 and f"--realism-images: {tmp_path / 'empty'}: folder holds no images" in lines[0]
    code, lines = evaluate("--ckpt", str(pixel), "--degradations", "jpeg", "local_vq:codebook_fraction=0.5")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (
        "evaluate.py: error: --degradations 'local_vq:codebook_fraction=0.5' round-trips through the refiner's own VQ "
        f"first stage, but {pixel} is a pixel-space model (its first stage is IdentityFirstStage, no VQ); pass "
        "--degradations without vq_roundtrip and local_vq, or give them a VQ with first_stage=<VQ config.yaml>"
    )
    code, lines = evaluate("--ckpt", str(pixel))  # the default degradations hold vq_roundtrip
    assert code == 2 and len(lines) == 1 and "(one of the default --degradations)" in lines[0]
    assert "is a pixel-space model" in lines[0]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------------
# degrade.py


@pytest.fixture
def clean(tmp_path) -> Path:
    (tmp_path / "clean").mkdir()
    Image.fromarray(photo()).save(tmp_path / "clean" / "a.png")
    return tmp_path / "clean"


def test_degrade_a_blur_wider_than_the_image_and_a_repeated_key(scripts, clean, tmp_path, capsys):
    degrade = scripts["degrade"]
    out = str(tmp_path / "out")
    code, lines = run(degrade, ["--input", str(clean), "--output", out, "--degradation", "blur_noise:sigma=100"], capsys)
    assert code == 1 and len(lines) == 1
    assert "blur sigma=100 px is larger than the 32x24 image" in lines[0] and "a.png" in lines[0]
    code, lines = run(degrade, ["--input", str(clean), "--output", out, "--degradation", "jpeg:quality=5,quality=50"],
                      capsys)
    assert code == 2 and len(lines) == 1 and "'quality' is given twice" in lines[0]
    assert not (tmp_path / "out").exists()


def test_degrade_output_in_a_file_and_ctrl_c(scripts, clean, tmp_path, capsys, monkeypatch):
    degrade = scripts["degrade"]
    (tmp_path / "a_file").write_text("x")
    argv = ["--input", str(clean), "--output", str(tmp_path / "a_file"), "--degradation", "jpeg"]
    code, lines = run(degrade, argv, capsys)  # found before any image is read, like every script's output folder
    assert code == 2 and len(lines) == 1 and "a file is in the way" in lines[0]
    monkeypatch.setattr("ldm.eval.degrade_files.degrade_folder", interrupt)
    code, lines = run(degrade, ["--input", str(clean), "--output", str(tmp_path / "o"), "--degradation", "jpeg"], capsys)
    assert code == 130 and len(lines) == 1 and lines[0].startswith("degrade.py: interrupted")


# ---------------------------------------------------------------------------------------------------------------------
# quickstart.py


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--seed", "-1"], "--seed -1 is outside the seed range [0, 4294967295]"),
        (["--seed", "4294967296"], "--seed 4294967296 is outside the seed range"),
        (["--outdir", "{tmp}/a_file/out"], "a file is in the way"),
    ],
)
def test_quickstart_refuses_bad_seeds_and_outdirs_before_training(scripts, tmp_path, capsys, args, expected):
    (tmp_path / "a_file").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    code, lines = run(scripts["quickstart"], ["--smoke", "--outdir", str(tmp_path / "q"), *args], capsys)
    assert code == 2 and len(lines) == 1 and expected in lines[0]
    assert not (tmp_path / "q").exists()


def test_quickstart_with_corrupt_stage_checkpoints_and_ctrl_c(scripts, tmp_path, capsys, monkeypatch):
    quickstart = scripts["quickstart"]
    out = tmp_path / "q"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("vq_f4", "latesteps_500_750", "latesteps_750_1000"):  # every stage is skipped: its file exists
        (out / "checkpoints" / f"{name}.ckpt").write_bytes(b"\x80\x02 not a checkpoint")
    code, lines = run(quickstart, ["--smoke", "--outdir", str(out)], capsys)
    assert code == 1 and len(lines) == 1 and "cannot be read" in lines[0] and "--force retrains every stage" in lines[0]
    monkeypatch.setattr(quickstart, "run_stage", interrupt)
    code, lines = run(quickstart, ["--smoke", "--outdir", str(out), "--force"], capsys)
    assert code == 130 and len(lines) == 1 and lines[0].startswith("quickstart.py: interrupted")


# ---------------------------------------------------------------------------------------------------------------------
# refine.py's existing flags and the batch


def test_refine_seed_beyond_the_largest_is_a_usage_error(scripts, expert_checkpoints, tmp_path, capsys):
    from ldm.refine.refiner import MAX_SEED

    base = ["--input", str(tmp_path), *ckpt_args(expert_checkpoints), "--outdir", str(tmp_path / "o")]
    code, lines = run(scripts["refine"], [*base, "--seed", str(MAX_SEED + 1)], capsys)
    assert code == 2 and len(lines) == 1 and f"is above the largest seed {MAX_SEED}" in lines[0]
    code, lines = run(scripts["refine"], [*base, "--seed", str(MAX_SEED), "--n-samples", "2"], capsys)
    assert code == 2 and len(lines) == 1 and "(--n-samples - 1)" in lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# output folders every script refuses before any work, and empty paths


def unusable_outdirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Output folders that cannot be used, with what the error says: a link loop (os.path.exists() calls it missing),
    a path below one, a link to nothing, and a 300-character name (exists() raised ENAMETOOLONG)."""
    loop, dangling = tmp_path / "loop", tmp_path / "dangling"
    loop.symlink_to(loop)
    dangling.symlink_to(tmp_path / "missing" / "target")
    return {
        "link loop": (loop, f"{loop} is a symbolic link loop"),
        "below a link loop": (loop / "sub", f"{loop} is a symbolic link loop"),
        "link to nothing": (dangling, f"{dangling} is a symbolic link to {tmp_path / 'missing' / 'target'}, which does "
                                      "not exist"),
        "long name": (tmp_path / ("x" * 300), "is 300 bytes long, more than the 255 the file system allows"),
        "long name below a new folder": (tmp_path / "new" / ("x" * 300), "is 300 bytes long"),
    }


def test_check_outdir_names_link_loops_links_to_nothing_long_names_and_empty_paths(tmp_path):
    for case, (outdir, expected) in unusable_outdirs(tmp_path).items():
        problem = check_outdir(outdir)
        assert problem is not None and problem.startswith("output folder ") and expected in problem, (case, problem)
        assert "\n" not in problem and len(problem) < 400, case
    assert check_outdir("") == "output folder '': the path is empty; give a folder name ('.' for the current folder)"
    assert check_outdir(tmp_path / "new" / "sub") is None and not (tmp_path / "new").exists()


@pytest.mark.parametrize("name, expected_code", [("refine", 3), ("evaluate", 2), ("degrade", 2), ("quickstart", 2)])
def test_every_script_refuses_an_unusable_outdir_with_its_code_before_any_work(
    scripts, expert_checkpoints, clean, tmp_path, capsys, monkeypatch, name, expected_code
):
    """A link-loop --outdir passed the check: quickstart's resolve() raised RuntimeError, evaluate ran the whole sweep
    and then failed, degrade raised in resolve(); a 300-character name was a traceback in refine and quickstart."""
    monkeypatch.setattr("ldm.refine.Refiner.from_checkpoints", interrupt)  # no work: would end the run with 130
    monkeypatch.setattr("ldm.eval.degrade_files.degrade_folder", interrupt)
    monkeypatch.setattr(scripts["quickstart"], "run_stage", interrupt)
    for case, (outdir, expected) in unusable_outdirs(tmp_path).items():
        argv = {
            "refine": ["--input", str(clean), *ckpt_args(expert_checkpoints), "--outdir", str(outdir)],
            "evaluate": [*ckpt_args(expert_checkpoints), "--outdir", str(outdir)],
            "degrade": ["--input", str(clean), "--output", str(outdir), "--degradation", "jpeg"],
            "quickstart": ["--smoke", "--outdir", str(outdir)],
        }[name]
        code, lines = run(scripts[name], argv, capsys)
        assert code == expected_code and len(lines) == 1, (case, code, lines)
        assert lines[0].startswith(f"{name}.py: error: ") and expected in lines[0], (case, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "dangling", "loop"]


@pytest.mark.parametrize("name, flag", [("refine", "--outdir"), ("refine", "--input"), ("refine", "--mask"),
                                        ("refine", "--ckpt"), ("evaluate", "--outdir"), ("evaluate", "--images"),
                                        ("evaluate", "--ckpt"), ("degrade", "--output"), ("degrade", "--input"),
                                        ("quickstart", "--outdir")])  # fmt: skip
def test_an_empty_path_is_one_line_exit_2(scripts, tmp_path, capsys, monkeypatch, name, flag):
    """``quickstart.py --outdir ""`` trained into the current folder; ``refine.py --input ""`` searched it."""
    monkeypatch.chdir(tmp_path)  # what an empty path would have meant
    monkeypatch.setattr(scripts["quickstart"], "run_stage", interrupt)  # were it accepted: no training here
    argv = {
        "refine": ["--input", "a.png", "--ckpt", "a.ckpt", "--outdir", "o"],
        "evaluate": ["--ckpt", "a.ckpt", "--outdir", "o"],
        "degrade": ["--input", "in", "--output", "o", "--degradation", "jpeg"],
        "quickstart": ["--smoke"],
    }[name]
    code, lines = run(scripts[name], [*argv, flag, ""], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (f"{name}.py: error: argument {flag}: the path is empty; give a file or folder name ('.' for the "
                        "current folder) (see --help)")
    assert list(tmp_path.iterdir()) == []


def test_a_box_that_starts_with_a_minus_says_how_to_pass_it(scripts, capsys):
    code, lines = run(scripts["refine"], ["--input", "a.png", "--ckpt", "a.ckpt", "--box", "-1,0,8,8"], capsys)
    assert code == 2 and lines == ["refine.py: error: argument --box: expected one argument; to give a value that "
                                   "starts with '-', attach it with '=': --box=<value> (see --help)"]
    code, lines = run(scripts["refine"], ["--input", "a.png", "--ckpt", "a.ckpt", "--box=-1,0,8,8"], capsys)
    assert code == 2 and len(lines) == 1 and "box '-1,0,8,8' must have 0 <= x0 < x1" in lines[0]


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


def test_odd_file_names_and_an_output_name_taken_by_a_folder(refiner, tmp_path):
    """Spaces, a newline and non-ASCII letters in names: outputs keep them, error lines stay one line.  A folder where
    one input's output goes costs that input only (it stopped the whole batch with exit 3)."""
    names = ["with space.png", "new\nline.png", "ünïcödé.png", "blocked.png"]
    for name in names:
        Image.fromarray(photo()).save(tmp_path / name)
    (tmp_path / "bad\nname.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    (out / "blocked_t300_s0.png").mkdir(parents=True)
    lines: list[str] = []
    report = refine_files(refiner, [tmp_path / n for n in [*names, "bad\nname.png"]], out, start_t=300, ddim_steps=4,
                          progress=False, on_error=lines.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["with space_t300_s0.png", "new\nline_t300_s0.png", "ünïcödé_t300_s0.png", "blocked_t300_s0.png"]
    )
    assert report.fatal is None and len(lines) == 2 and all("\n" not in line for line in lines)
    assert "bad\\x0aname.png" in lines[1] and "blocked_t300_s0.png is a folder" in lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# the image loader


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
    with pytest.raises(ImageLoadError, match=r"file is 5,368,709,120 bytes, more than an image within Pillow's "
                                             r"decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS=1,000 pixels"):
        load_image(big)
    assert read == []
    monkeypatch.undo()
    assert load_image(tmp_path / "tiny.png").rgb.shape == (1, 1, 3)
    assert os.path.getsize(big) == 5 * 2**30
