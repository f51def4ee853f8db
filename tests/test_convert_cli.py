"""scripts/convert_diffusers.py in both directions and its refusals, and scripts/refine.py taking a diffusers folder
as ``--ckpt``; the round trips and refusals themselves are tested through the library in test_diffusers_convert.py.

Tiny random folders are built with diffusers' classes (test_diffusers_convert.py's builders); nothing downloads.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from warm_python import run_python

pytest.importorskip("diffusers", reason="diffusers is the optional extra pip install -e .[diffusers]")

from safetensors.torch import load_file  # noqa: E402
from test_diffusers_convert import damaged_copies, save_ldm  # noqa: E402

from ldm.convert.diffusers import load_diffusers_expert  # noqa: E402
from ldm.imageio import read_png_metadata  # noqa: E402

from conftest import photo_crops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory) -> Path:
    """test_diffusers_convert.py's default tiny LDM folder: UNet 32/64, VQ f2 with 16 codes."""
    return save_ldm(tmp_path_factory.mktemp("diffusers") / "ldm")


@pytest.fixture(scope="module")
def refused_folders(ldm_folder, tmp_path_factory) -> dict[str, Path]:
    """The one refused folder the CLI cases name, damaged as test_diffusers_convert.REFUSED says."""
    return damaged_copies(ldm_folder, tmp_path_factory.mktemp("refused"), ["conditional_unet"])


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_python([f"scripts/{script}", *args], cwd=REPO, timeout=600)


def test_convert_cli_both_directions_in_subprocesses(ldm_folder, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    proc = run("convert_diffusers.py", "--from-diffusers", str(ldm_folder), "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    assert "window t in [0, 1000)" in proc.stdout and "scale_factor 0.5" in proc.stdout
    exported = tmp_path / "exported"
    proc = run("convert_diffusers.py", "--to-diffusers", str(ckpt), "--out", str(exported))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "model.ckpt"]  # no temp folder left
    for part in ("unet", "vqvae"):
        a = load_file(ldm_folder / part / "diffusion_pytorch_model.safetensors")
        b = load_file(exported / part / "diffusion_pytorch_model.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.fixture(scope="module")
def convert_cli():
    spec = importlib.util.spec_from_file_location("convert_script", REPO / "scripts" / "convert_diffusers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--from-diffusers", "{conditional}", "--out", "{tmp}/x.ckpt"], "is a conditional UNet"),
        (["--from-diffusers", "{tmp}", "--out", "{tmp}/x.ckpt"], "has no unet/ sub-folder"),
        (["--from-diffusers", "{folder}", "--out", "{tmp}/x.safetensors"], "must end with one of .ckpt, .pt, .pth"),
        (["--from-diffusers", "{folder}", "--out", "{folder}"], "already exists"),
        (["--from-diffusers", "{folder}", "--out", "{tmp}/x.ckpt", "--scale-factor", "-1"], "must be a finite number > 0"),
        (["--to-diffusers", "{tmp}/missing.ckpt", "--out", "{tmp}/out"], "does not exist"),
        (["--to-diffusers", "{folder}", "--out", "{tmp}/out", "--scale-factor", "2"], "applies to --from-diffusers only"),
        (["--to-diffusers", "{folder}", "--out", ""], "--out: the path is empty"),  # "error: already exists", no path
        (["--from-diffusers", "", "--out", "{tmp}/x.ckpt"], "--from-diffusers: the path is empty"),
    ],
)
def test_convert_cli_refuses_in_one_line_with_exit_2(
    convert_cli, args, expected, ldm_folder, refused_folders, tmp_path, capsys
):
    names = {"conditional": refused_folders["conditional_unet"], "folder": ldm_folder, "tmp": tmp_path}
    argv = [a.format(**names) for a in args]
    try:
        code = convert_cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convert_diffusers.py: error:") and expected in lines[0], err
    assert not (tmp_path / "x.ckpt").exists() and not (tmp_path / "out").exists()


def test_refine_cli_takes_a_diffusers_folder_end_to_end(ldm_folder, tmp_path):
    image = tmp_path / "face.png"
    Image.fromarray(((photo_crops(1, 20, seed=1)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(image)
    out = tmp_path / "out"
    proc = run(
        "refine.py",
        "--ckpt",
        str(ldm_folder),
        "--start-t",
        "400",
        "--input",
        str(image),
        "--outdir",
        str(out),
        "--ddim-steps",
        "10",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    result = out / "face_t400_s0.png"
    assert Image.open(result).size == (20, 20)
    _, info = load_diffusers_expert(ldm_folder)
    assert read_png_metadata(result)["checkpoint_0_sha256"] == info.sha256
