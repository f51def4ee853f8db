"""ldm.refine.batch: every file a batch writes is checked against the files it reads (inputs, grids, masks), the
clean-up of a killed run's temps removes only its own leftovers, ``--skip-existing`` finishes what a killed run left,
long thin images and odd file names are refined like any other, and whatever the networks raise for one batch costs
that batch's inputs only.

In process (``refine_files`` / ``scripts/refine.py``'s ``main``) with the tiny experts of conftest; the image sizes are
the smallest that show each defect.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.refine import Refiner
from ldm.refine.batch import collect_inputs, refine_files
from ldm.refine.regions import RegionOptions
from ldm.refine.request import RefineRequest

from conftest import load_photos

REPO = Path(__file__).resolve().parents[1]
REQUEST = RefineRequest(start_t=300, ddim_steps=10)


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
    return [
        *(a for p in expert_checkpoints for a in ("--ckpt", str(p))),
        "--outdir",
        str(outdir),
        "--start-t",
        "300",
        "--ddim-steps",
        "10",
        "--device",
        "cpu",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# data loss: every file the batch writes is checked against the inputs


@pytest.mark.parametrize("n_samples, user_file", [(1, "photo_t300_s0_grid.png"), (2, "photo_t300_s0_1_grid.png")])
def test_a_grid_never_replaces_an_input(refiner, tmp_path, n_samples, user_file):
    save_png(tmp_path / "photo.png", photo())
    mine = save_png(tmp_path / user_file, photo(index=1))
    before = mine.read_bytes()
    paths = [tmp_path / "photo.png", mine]
    lines: list[str] = []
    report = refine_files(
        refiner, paths, tmp_path, REQUEST.replace(n_samples=n_samples), grid=True, on_error=lines.append, progress=False
    )
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
    """``--mask out/a_t300_s0.png --outdir out`` must not replace the mask with the refined image: a mask that is also
    an output path (or a grid's, or a mask folder that is the output folder) is refused before any work."""
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
    real = Refiner.refine
    monkeypatch.setattr(Refiner, "refine", lambda self, x, *a, **k: calls.append(1) or real(self, x, *a, **k))
    capsys.readouterr()
    code = run_cli(cli, ["--input", str(src), "--mask", str(mask_arg), *extra, *cli_args(expert_checkpoints, out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"refine.py: error: output {mask} would overwrite {mask}, ")
    assert err[0].endswith("files the batch reads are never written; choose another --outdir or move the mask")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and calls == []
    options = RegionOptions(mask=Path(mask_arg))
    with pytest.raises(ValueError, match="would overwrite .*files the batch reads are never written"):
        # the library refuses it too
        refine_files(refiner, [src], out, REQUEST.replace(regions=options), grid=bool(extra), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and calls == []


@pytest.mark.parametrize("case", ["mask file", "mask folder = outdir", "input"])
def test_the_clean_up_of_killed_runs_never_removes_an_input_or_mask_named_like_a_temp(refiner, tmp_path, case):
    """``--mask out/.a_t300_s0.png.abcdefgh.tmp --outdir out`` names a mask with the name of a temp of output
    ``a_t300_s0.png``: the clean-up of a killed run's temps must not delete it (nor an --input so named) before it is
    read; a real leftover is still removed."""
    out = tmp_path / "out"
    out.mkdir()
    src = save_png(tmp_path / "a.png", photo())
    leftover = out / ".a_t300_s0.png.zzzzzzzz.tmp"  # what a killed run of this batch leaves
    leftover.write_bytes(b"partial")
    named = out / ".a_t300_s0.png.abcdefgh.tmp"
    Image.fromarray(mask_image() if case != "input" else photo()).save(named, format="PNG")
    paths, regions = [src], RegionOptions()
    if case == "mask file":
        regions = RegionOptions(mask=named)
    elif case == "mask folder = outdir":  # the user's masks folder is also the output folder: none of it is removed
        save_png(out / "a.png", mask_image())
        regions = RegionOptions(mask=out)
    else:
        paths = [src, named]
    before = named.read_bytes()
    lines: list[str] = []
    report = refine_files(refiner, paths, out, REQUEST.replace(regions=regions), on_error=lines.append, progress=False)
    assert lines == [] and report.failed == [] and len(report.done) == len(paths)
    assert named.read_bytes() == before
    assert leftover.exists() == (case == "mask folder = outdir")


def test_skip_existing_writes_a_grid_that_a_killed_run_did_not(refiner, tmp_path):
    src = save_png(tmp_path / "in.png", photo())
    out = tmp_path / "out"
    first = refine_files(refiner, [src], out, REQUEST, grid=True, progress=False)
    assert first.ok
    (out / "in_t300_s0_grid.png").unlink()  # killed after the refined file, before its grid
    again = refine_files(refiner, [src], out, REQUEST, grid=True, skip_existing=True, progress=False)
    assert again.ok and again.skipped == [] and (out / "in_t300_s0_grid.png").is_file()
    last = refine_files(refiner, [src], out, REQUEST, grid=True, skip_existing=True, progress=False)
    assert last.written == [] and last.skipped == [out / "in_t300_s0.png"]


# ---------------------------------------------------------------------------------------------------------------------
# long thin images


def test_a_long_thin_image_is_refined_with_the_others(refiner, tmp_path):
    paths = [
        save_png(tmp_path / "a.png", photo()),
        save_png(tmp_path / "thin.png", np.resize(photo(), (1, 3000, 3))),
        save_png(tmp_path / "z.png", photo(index=2)),
    ]
    report = refine_files(refiner, paths, tmp_path / "out", REQUEST, progress=False)
    assert report.ok, report.failed
    assert Image.open(tmp_path / "out" / "thin_t300_s0.png").size == (3000, 1)


# ---------------------------------------------------------------------------------------------------------------------
# whatever the networks raise costs that batch's inputs only


def test_a_batch_the_networks_fail_on_costs_its_inputs_only(refiner, tmp_path, monkeypatch):
    paths = [
        save_png(tmp_path / "a.png", photo()),
        save_png(tmp_path / "bad.png", photo(20, 28)),
        save_png(tmp_path / "z.png", photo(index=2)),
    ]
    real = refiner.refine

    def refine(x, *args, **kwargs):
        if x.shape[-2:] == (20, 28):
            raise RuntimeError("Kernel size can't be greater\nthan actual input size")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(refiner, "refine", refine)
    lines: list[str] = []
    report = refine_files(refiner, paths, tmp_path / "out", REQUEST, on_error=lines.append, progress=False)
    assert lines == [
        f"cannot refine {tmp_path / 'bad.png'} (28x20): RuntimeError: Kernel size can't be greater than actual input size"
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_t300_s0.png", "z_t300_s0.png"]
    assert report.done == [str(paths[0]), str(paths[2])]

    def interrupted(x, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refiner, "refine", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl+C still stops the batch (the CLI reports it, exit 130)
        refine_files(refiner, paths, tmp_path / "out2", REQUEST, progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# odd names


def test_odd_file_names_and_an_output_name_taken_by_a_folder(refiner, tmp_path):
    """Spaces, a newline and non-ASCII letters in names: outputs keep them, error lines stay one line.  A folder where
    one input's output goes costs that input only, not the whole batch."""
    names = ["with space.png", "new\nline.png", "ünïcödé.png", "blocked.png"]
    for name in names:
        Image.fromarray(photo()).save(tmp_path / name)
    (tmp_path / "bad\nname.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    (out / "blocked_t300_s0.png").mkdir(parents=True)
    lines: list[str] = []
    inputs = [tmp_path / n for n in [*names, "bad\nname.png"]]
    report = refine_files(refiner, inputs, out, RefineRequest(start_t=300, ddim_steps=4), progress=False, on_error=lines.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["with space_t300_s0.png", "new\nline_t300_s0.png", "ünïcödé_t300_s0.png", "blocked_t300_s0.png"]
    )
    assert report.fatal is None and len(lines) == 2 and all("\n" not in line for line in lines)
    assert "bad\\x0aname.png" in lines[1] and "blocked_t300_s0.png is a folder" in lines[0]


def test_an_input_whose_output_name_is_too_long_fails_alone(refiner, tmp_path):
    """Output names add ``_t<start>_s<seed>`` and temp files ``.<name>.<8>.tmp``: a name the file system takes as an
    input may not fit as an output (ENAMETOOLONG crashed the batch, or ended it as an unwritable output folder).  The
    inputs are given as ``str`` (an AttributeError for the Python API before)."""
    names = ["a" * 234 + ".png", "b" * 251 + ".png", "short.png"]  # outputs of 246 (its temp 260) and 263 bytes
    for name in names:
        Image.fromarray(photo()).save(tmp_path / name)
    out, lines = tmp_path / "out", []
    report = refine_files(refiner, [str(tmp_path / n) for n in names], out, RefineRequest(start_t=300, ddim_steps=4), grid=True,
                          skip_existing=True, progress=False, on_error=lines.append)  # fmt: skip
    assert report.fatal is None and sorted(p.name for p in out.iterdir()) == ["short_t300_s0.png", "short_t300_s0_grid.png"]
    assert len(lines) == 2 and all("rename the input to a shorter name" in line for line in lines), lines
    assert "is 246 bytes, above the 241" in lines[0] and "is 263 bytes" in lines[1]


def test_earlier_outputs_are_left_out_but_an_input_folder_inside_the_output_folder_is_read(tmp_path):
    out = tmp_path / "out"
    (out / "batch1").mkdir(parents=True)
    for path in (tmp_path / "a.png", out / "old_t300_s0.png", out / "batch1" / "b.png"):
        save_png(path, photo(8, 8))

    def found(*inputs: Path) -> list[str]:
        paths, problems = collect_inputs(inputs, out)
        assert not problems
        return sorted(p.relative_to(tmp_path).as_posix() for p in paths)

    assert found(tmp_path) == ["a.png"]  # --input . --outdir out: earlier outputs are not refined again
    assert found(out / "batch1") == ["out/batch1/b.png"]  # every input was refused as "inside the output folder"
    assert found(tmp_path, out / "batch1") == ["a.png", "out/batch1/b.png"]
    assert found(out) == ["out/batch1/b.png", "out/old_t300_s0.png"]  # the output folder named as the input
    assert found(out / "old_t300_s0.png") == ["out/old_t300_s0.png"]  # a file named explicitly
    paths, problems = collect_inputs([tmp_path / "out"], tmp_path / "out" / "..")
    assert len(paths) == 2 and not problems


def test_a_second_run_into_its_input_folder_does_not_refine_its_first_outputs(refiner, tmp_path):
    """``refine.py --input d --outdir d`` run twice: the first run's outputs (PNG ``Software: latesteps refine``) are
    not inputs of the second (they were refined again into ``a_t300_s0_t300_s0.png``); named explicitly, they are."""
    folder = tmp_path / "d"
    folder.mkdir()
    save_png(folder / "a.png", photo(16, 16))
    refine_files(refiner, collect_inputs([folder], folder)[0], folder, RefineRequest(start_t=300, ddim_steps=2), progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_t300_s0.png"]
    paths, problems = collect_inputs([folder], folder)
    assert [p.name for p in paths] == ["a.png"] and not problems
    assert [p.name for p in collect_inputs([folder / "a_t300_s0.png"], folder)[0]] == ["a_t300_s0.png"]
    (folder / "a.png").unlink()
    paths, problems = collect_inputs([folder], folder)
    assert paths == [] and problems == [f"every image found is an earlier output in the output folder {folder} (name a "
                                        "file to refine it again)"]  # fmt: skip
