"""ldm.cli's checks shared by every script (evaluate.py, degrade.py, quickstart.py, refine.py): an unusable output
folder (a link loop, a link to nothing, a name longer than the file system allows) or an empty path is one line and
the script's exit code, found before any work.

The scripts' ``main`` run in process (fast); Ctrl+C is a KeyboardInterrupt raised where the work would be.  The helpers
that load and run a script here are also used by the scripts' own test files.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import EXIT_INTERRUPTED, check_outdir, run_script

from conftest import load_photos

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script_in_process", REPO / "scripts" / f"{name}.py")
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


@pytest.fixture
def clean(tmp_path) -> Path:
    (tmp_path / "clean").mkdir()
    Image.fromarray(photo()).save(tmp_path / "clean" / "a.png")
    return tmp_path / "clean"


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
        "link to nothing": (
            dangling,
            f"{dangling} is a symbolic link to {tmp_path / 'missing' / 'target'}, which does not exist",
        ),
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
    """Without the check, a link-loop --outdir made quickstart's resolve() raise RuntimeError, evaluate run the whole
    sweep and then fail, degrade raise in resolve(); a 300-character name was a traceback in refine and quickstart."""
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
    """Without the check, ``quickstart.py --outdir ""`` would train into the current folder and ``refine.py --input ""``
    search it."""
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
    assert lines[0] == (
        f"{name}.py: error: argument {flag}: the path is empty; give a file or folder name ('.' for the "
        "current folder) (see --help)"
    )
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_outside_a_scripts_own_handlers_is_one_line(capsys):
    """Ctrl+C while a script imported its modules or loaded models printed a traceback (refine.py, degrade.py,
    evaluate.py, convert_diffusers.py, export_weights.py)."""

    def main() -> int:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run_script(main, "tool.py")
    assert info.value.code == EXIT_INTERRUPTED and capsys.readouterr().err == "tool.py: interrupted\n"
    with pytest.raises(SystemExit) as info:
        run_script(lambda: 3, "tool.py")
    assert info.value.code == 3
    own_handling = {"app.py"}  # uvicorn's signal handling; main.py defers Ctrl+C around Lightning's import itself
    for script in sorted((REPO / "scripts").glob("*.py")):
        text = script.read_text()
        if "def main(" in text and script.name not in own_handling:
            assert "run_script(main, " in text, script.name
