"""scripts/degrade.py: the folder CLI equals ldm.eval.degrade_files.degrade_folder, is seeded, and fails in one line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import interrupt, photo, run, script

from ldm.eval.degrade import DEGRADATIONS
from ldm.eval.degrade_files import degrade_folder, file_seed
from ldm.imageio import read_png_metadata

from conftest import load_photos

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "degrade.py"


def _script():
    spec = importlib.util.spec_from_file_location("degrade_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def degrade():
    return _script().main


@pytest.fixture
def clean(tmp_path) -> Path:
    """Two small photographs: ``a.jpg`` at the top and ``sub/b.png`` one folder down."""
    src = tmp_path / "clean"
    (src / "sub").mkdir(parents=True)
    astronaut, coffee = load_photos()[:2]
    Image.fromarray(astronaut[::8, ::8]).save(src / "a.jpg", quality=95)
    Image.fromarray(coffee[::8, ::8]).save(src / "sub" / "b.png")
    return src


def _exit_code(main, argv: list[str]) -> int:
    """``main(argv)``'s return value, or the code of the SystemExit that argparse raises for bad flags."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_list_names_every_degradation_with_its_parameters(degrade, capsys):
    assert degrade(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("(")[0] for line in lines] == sorted(DEGRADATIONS)
    assert "jpeg(quality=20)" in lines


def test_folder_outputs_equal_the_library_keep_the_layout_and_carry_their_seed(degrade, clean, tmp_path, capsys):
    out = tmp_path / "noisy"
    spec = "blur_noise:sigma=1.0,noise_std=0.1"
    assert degrade(["--input", str(clean), "--output", str(out), "--degradation", spec, "--seed", "3"]) == 0
    assert f"wrote 2 images to {out}" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["a.png", "sub/b.png"]
    library = tmp_path / "library"
    degrade_folder(clean, library, "blur_noise", seed=3, sigma=1.0, noise_std=0.1)
    for rel in ("a.png", "sub/b.png"):
        np.testing.assert_array_equal(_pixels(out / rel), _pixels(library / rel))
        metadata = read_png_metadata(out / rel)
        assert metadata["degradation"] == "blur_noise:sigma=1.0,noise_std=0.1"
        assert metadata["degradation_seed"] == str(file_seed(3, rel.replace(".png", ".jpg") if rel == "a.png" else rel))
    clean_a = np.asarray(Image.open(clean / "a.jpg").convert("RGB"))
    assert np.abs(_pixels(out / "a.png").astype(int) - clean_a).mean() > 2  # the noise is there

    again, other = tmp_path / "again", tmp_path / "other"
    assert degrade(["--input", str(clean), "--output", str(again), "--degradation", spec, "--seed", "3"]) == 0
    assert degrade(["--input", str(clean), "--output", str(other), "--degradation", spec, "--seed", "4"]) == 0
    np.testing.assert_array_equal(_pixels(again / "a.png"), _pixels(out / "a.png"))
    assert not np.array_equal(_pixels(other / "a.png"), _pixels(out / "a.png"))


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--degradation", "jpg:quality=10"], 2, "unknown degradation 'jpg'; valid: blur_noise("),
        (["--degradation", "jpeg:qualty=10"], 2, "unknown parameters ['qualty']; it takes jpeg(quality=20)"),
        (["--degradation", "jpeg:quality"], 2, "'quality' is not key=value"),
        (["--degradation", "vq_roundtrip:first_stage=missing.yaml"], 2, "first_stage='missing.yaml' is not a file"),
        (["--degradation", "jpeg", "--seed", "-1"], 2, "argument --seed: -1 must be >= 0"),
        (["--degradation", "jpeg", "--output", None], 2, "must not be the source folder"),
        (["--degradation", "jpeg", "--input", "missing"], 1, "does not exist or is not a folder"),
        (["--output", "x"], 2, "the following arguments are required: --degradation"),
    ],
)
def test_bad_arguments_and_inputs_fail_in_one_line(degrade, clean, tmp_path, monkeypatch, capsys, args, code, expected):
    monkeypatch.chdir(tmp_path)
    given = {"--input": str(clean), "--output": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2]):
        given[flag] = str(clean / "inside") if value is None else value
    assert _exit_code(degrade, [item for pair in given.items() for item in pair]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("degrade.py: error:") and expected in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("colour_blotches:n_blobs=1000000", "n_blobs must be an integer in [1, 256]"),  # took 18 GB on 32 px images
        ("patch_shuffle:n_patches=1000000000", "n_patches must be an integer in [1, 256]"),  # ran for hours
    ],
)
def test_unbounded_counts_exit_2_before_any_image_is_read(clean, tmp_path, spec, expected):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(clean), "--output", str(tmp_path / "out"), "--degradation", spec],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"degrade.py: error: --degradation {spec!r}: ") and expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_is_named_and_exits_1(degrade, clean, tmp_path, capsys):
    (clean / "sub" / "broken.png").write_bytes(b"not a png at all")
    code = degrade(["--input", str(clean), "--output", str(tmp_path / "out"), "--degradation", "jpeg"])
    captured = capsys.readouterr()
    assert code == 1 and "broken.png" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "wrote 2 images" in captured.out and "1 image(s) failed" in captured.out  # the others go on (it stopped)


def test_an_image_the_degradation_refuses_is_named_with_what_was_written(degrade, clean, tmp_path, capsys):
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(clean / "sub" / "zz_tiny.png")  # sorted last
    code = degrade(["--input", str(clean), "--output", str(tmp_path / "out"), "--degradation", "patch_shuffle"])
    captured = capsys.readouterr()
    assert code == 1 and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "zz_tiny.png" in captured.err and "(1x1 px)" in captured.err
    assert "wrote 2 images" in captured.out and len(list((tmp_path / "out").rglob("*.png"))) == 2


def test_a_first_stage_yaml_that_does_not_parse_is_a_one_line_usage_error(degrade, clean, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    spec = f"vq_roundtrip:first_stage={bad}"
    code = degrade(["--input", str(clean), "--output", str(tmp_path / "out"), "--degradation", spec])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot be read as YAML" in err and str(bad) in err


def test_runs_as_a_script(clean, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--input",
            str(clean),
            "--output",
            str(tmp_path / "out"),
            "--degradation",
            "jpeg:quality=10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "sub" / "b.png").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# one-line errors found before any image is read, and Ctrl+C


@pytest.fixture(scope="module")
def scripts():
    return {"degrade": script("degrade")}


@pytest.fixture
def one_png(tmp_path) -> Path:
    (tmp_path / "clean").mkdir()
    Image.fromarray(photo()).save(tmp_path / "clean" / "a.png")
    return tmp_path / "clean"


def test_degrade_a_blur_wider_than_the_image_and_a_repeated_key(scripts, one_png, tmp_path, capsys):
    degrade = scripts["degrade"]
    out = str(tmp_path / "out")
    code, lines = run(degrade, ["--input", str(one_png), "--output", out, "--degradation", "blur_noise:sigma=100"], capsys)
    assert code == 1 and len(lines) == 1
    assert "blur sigma=100 px is larger than the 32x24 image" in lines[0] and "a.png" in lines[0]
    code, lines = run(degrade, ["--input", str(one_png), "--output", out, "--degradation", "jpeg:quality=5,quality=50"], capsys)
    assert code == 2 and len(lines) == 1 and "'quality' is given twice" in lines[0]
    assert not (tmp_path / "out").exists()


def test_degrade_output_in_a_file_and_ctrl_c(scripts, one_png, tmp_path, capsys, monkeypatch):
    degrade = scripts["degrade"]
    (tmp_path / "a_file").write_text("x")
    argv = ["--input", str(one_png), "--output", str(tmp_path / "a_file"), "--degradation", "jpeg"]
    code, lines = run(degrade, argv, capsys)  # found before any image is read, like every script's output folder
    assert code == 2 and len(lines) == 1 and "a file is in the way" in lines[0]
    monkeypatch.setattr("ldm.eval.degrade_files.degrade_folder", interrupt)
    code, lines = run(degrade, ["--input", str(one_png), "--output", str(tmp_path / "o"), "--degradation", "jpeg"], capsys)
    assert code == 130 and len(lines) == 1 and lines[0].startswith("degrade.py: interrupted")


def test_degrade_refuses_an_output_over_an_input_before_writing(scripts, tmp_path, capsys):
    """``--input dsrc/clean --output dsrc`` with dsrc/clean/x.png and dsrc/clean/clean/x.png overwrote the input
    dsrc/clean/x.png with the degraded dsrc/clean/clean/x.png (exit 0)."""
    src = tmp_path / "dsrc" / "clean"
    (src / "clean").mkdir(parents=True)
    Image.fromarray(photo()).save(src / "x.png")
    Image.fromarray(photo(16, 16)).save(src / "clean" / "x.png")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = ["--input", str(src), "--output", str(tmp_path / "dsrc"), "--degradation", "jpeg:quality=15"]
    code, lines = run(scripts["degrade"], argv, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert (
        lines[0].startswith("degrade.py: error: the output of ") and f"over the input image {str(src / 'x.png')!r}" in lines[0]
    )
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
