"""scripts/refine.py: end to end in a subprocess (no network), outputs/metadata/exit codes, bad inputs and arguments."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_checkpoint import crafted_checkpoint
from test_cli import ckpt_args, run

from ldm.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from ldm.imageio import ImageSaveError, read_png_metadata

from conftest import load_photos, tiny_expert_config, tiny_first_stage_config
from warm_python import run_python

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "refine.py"

SITECUSTOMIZE = '''
"""Test harness: refuse every IP socket, name lookup and connection; log attempts to $NO_NET_LOG."""
import os
import socket

_LOG = os.environ["NO_NET_LOG"]
with open(_LOG, "w") as _fh:
    _fh.write("loaded\\n")


def _refuse(*args, **kwargs):
    with open(_LOG, "a") as fh:
        fh.write(f"attempt {args!r}\\n")
    raise OSError("network access is disabled in this test")


class _NoInetSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
            _refuse("socket", family)
        super().__init__(family, type, proto, fileno)


socket.socket = _NoInetSocket
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
'''


@pytest.fixture(scope="module")
def cli():
    """scripts/refine.py imported as a module (for in-process runs of ``main``)."""
    spec = importlib.util.spec_from_file_location("refine_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(cli, argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse errors
        return int(exc.code)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def photos_small():
    astro, coffee, _ = load_photos()
    return astro[::10, ::10][:40, :48], coffee[::10, ::10][:37, :53]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, photos_small):
    """Two good images (RGB 48x40, RGBA 53x37) and a truncated PNG."""
    folder = tmp_path_factory.mktemp("inputs")
    astro, coffee = photos_small
    save_png(folder / "astro.png", astro)
    alpha = (np.arange(37 * 53).reshape(37, 53) % 251).astype(np.uint8)
    save_png(folder / "coffee_rgba.png", np.dstack([coffee, alpha]))
    data = (folder / "astro.png").read_bytes()
    (folder / "corrupt.png").write_bytes(data[: len(data) // 2])
    return folder


def base_args(expert_checkpoints, outdir) -> list[str]:
    return [
        "--ckpt",
        str(expert_checkpoints[0]),
        "--ckpt",
        str(expert_checkpoints[1]),
        "--outdir",
        str(outdir),
        "--start-t",
        "400",
        "--ddim-steps",
        "10",
        "--device",
        "cpu",
    ]


# ------------------------------------------------------------------------------------------------------- end to end
def test_cli_end_to_end_in_a_subprocess_without_network(expert_checkpoints, image_folder, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / "net.log"
    env = {**os.environ, "PYTHONPATH": str(site), "NO_NET_LOG": str(net_log)}
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "scripts/refine.py",
        "--input",
        str(image_folder),
        *base_args(expert_checkpoints, out),
        "--seed",
        "3",
        "--batch-size",
        "2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    assert net_log.read_text().splitlines() == ["loaded"]  # the guard was active and nothing tried the network
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    corrupt = [line for line in error_lines(proc.stderr) if line.startswith("refine.py: cannot load image")]
    assert len(corrupt) == 1 and "corrupt.png" in corrupt[0] and "truncated" in corrupt[0]
    assert "1 image(s) failed" in proc.stderr
    assert "first DDIM grid step at t=301" in proc.stdout and "2 of 3 images done" in proc.stdout

    assert sorted(p.name for p in out.iterdir()) == ["astro_t400_s3.png", "coffee_rgba_t400_s3.png"]
    astro = Image.open(out / "astro_t400_s3.png")
    assert astro.mode == "RGB" and astro.size == (48, 40)
    coffee = Image.open(out / "coffee_rgba_t400_s3.png")
    source = Image.open(image_folder / "coffee_rgba.png")
    assert coffee.mode == "RGBA" and coffee.size == (53, 37)
    assert np.array_equal(np.asarray(coffee)[..., 3], np.asarray(source)[..., 3])

    meta = read_png_metadata(out / "astro_t400_s3.png")
    for i, ckpt in enumerate(expert_checkpoints):
        assert meta[f"checkpoint_{i}_sha256"] == sha256_file(ckpt)
    assert meta["checkpoint_0_window"] == "[250, 500)" and meta["checkpoint_1_window"] == "[0, 250)"
    assert (meta["start_t"], meta["effective_start_t"], meta["ddim_steps"], meta["seed"]) == ("400", "301", "10", "3")
    assert meta["eta"] == "0" and meta["tail_timesteps"] == "301,201,101,1"
    assert meta["routing"] == "t 301 (step 699): latesteps_500_750.ckpt; t 201-1 (steps 799-999): latesteps_750_1000.ckpt"
    assert meta["input"].endswith("astro.png")
    params = json.loads(meta["parameters"])
    assert params["batch_size"] == 2 and params["precision"] == "fp32" and params["ema"] is True
    assert "input" not in params  # the whole --input list in every output outgrew PNG readers' text limit at 25,000
    assert [c["steps"] for c in json.loads(meta["checkpoints"])] == ["500-750", "750-1000"]


def test_bad_argument_exits_in_one_line_from_a_subprocess(tmp_path):
    argv = [SCRIPT, "--input", "x.png", "--ckpt", "a.ckpt", "--start-t", "abc", "--outdir", tmp_path / "out"]
    proc = run_python(argv, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["refine.py: error: argument --start-t: 'abc' is not an integer (see --help)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--box", "0,0,8,8@0", "box '0,0,8,8@0' starts at t=0: a box's own start_t must be in [1, T-1]"),
        ("--region-padding", "999999999", "999999999 must be <= 4096 (px of context around a region"),
    ],
)
def test_region_arguments_out_of_bounds_exit_2_at_parsing_from_a_subprocess(tmp_path, flag, value, message):
    """Refused at parsing, exit 2: not on every image after it is loaded (exit 1), even with no region given."""
    argv = [SCRIPT, "--input", "x.png", "--ckpt", "a.ckpt", flag, value, "--outdir", tmp_path / "out"]
    proc = run_python(argv, cwd=tmp_path, timeout=120)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"refine.py: error: argument {flag}: ")
    assert message in lines[0] and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- outputs, skip
def test_skip_existing_finishes_only_what_is_missing(cli, expert_checkpoints, photos_small, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    save_png(inputs / "astro.png", photos_small[0])
    out = tmp_path / "out"
    argv = ["--input", str(inputs), *base_args(expert_checkpoints, out), "--n-samples", "2", "--grid"]
    assert run_main(cli, argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["astro_t400_s0_0.png", "astro_t400_s0_0_grid.png", "astro_t400_s0_1.png", "astro_t400_s0_1_grid.png"]
    first, second = (np.asarray(Image.open(out / f"astro_t400_s0_{k}.png")) for k in (0, 1))
    assert not np.array_equal(first, second)  # sample k uses seed + k
    assert read_png_metadata(out / "astro_t400_s0_1.png")["seed"] == "1"
    assert Image.open(out / "astro_t400_s0_0_grid.png").size == (8 * 3 + 48 * 2, 40 + 16)

    kept = (out / "astro_t400_s0_0.png").stat()
    (out / "astro_t400_s0_1.png").unlink()
    capsys.readouterr()
    assert run_main(cli, [*argv, "--skip-existing"]) == 0
    assert "1 skipped as existing" in capsys.readouterr().out
    again = (out / "astro_t400_s0_0.png").stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert np.array_equal(np.asarray(Image.open(out / "astro_t400_s0_1.png")), second)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_outputs_never_overwrite_inputs_and_names_stay_unique(cli, expert_checkpoints, photos_small, tmp_path, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        save_png(tmp_path / sub / "img.png", photos_small[0])
    save_png(tmp_path / "a" / "photo.png", photos_small[0])
    save_png(tmp_path / "a" / "photo_t400_s0.png", photos_small[1])  # the name refining a/photo.png would write
    before = (tmp_path / "a" / "photo_t400_s0.png").read_bytes()
    argv = ["--input", str(tmp_path / "a"), str(tmp_path / "b"), *base_args(expert_checkpoints, tmp_path / "a")]
    capsys.readouterr()
    assert run_main(cli, argv) == 1
    lines = error_lines(capsys.readouterr().err)
    refused = [line for line in lines if "would overwrite an input" in line]
    assert len(refused) == 1 and "photo.png" in refused[0]
    assert (tmp_path / "a" / "photo_t400_s0.png").read_bytes() == before
    new = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "photo_t400_s0_t400_s0.png" in new
    assert len([n for n in new if n.startswith("img-") and n.endswith("_t400_s0.png")]) == 2  # a/img, b/img


def test_earlier_outputs_below_an_input_folder_are_not_refined_again(cli, expert_checkpoints, photos_small, tmp_path):
    save_png(tmp_path / "img.png", photos_small[0])
    out = tmp_path / "outputs" / "refine"
    argv = ["--input", str(tmp_path), *base_args(expert_checkpoints, out)]
    assert run_main(cli, argv) == 0
    assert run_main(cli, argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img_t400_s0.png"]


@pytest.mark.slow
def test_killed_batch_leaves_only_complete_outputs_and_skip_existing_finishes_it(
    cli, expert_checkpoints, photos_small, tmp_path
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        save_png(inputs / f"img{i}.png", np.roll(photos_small[0], 7 * i, axis=1))
    out = tmp_path / "out"
    argv = ["--input", str(inputs), *base_args(expert_checkpoints, out)]
    argv[argv.index("--ddim-steps") + 1] = "20"
    argv[argv.index("--start-t") + 1] = "999"
    argv.append("--allow-outside-window")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and any(p.suffix == ".png" and not p.name.startswith(".") for p in out.iterdir()):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    finished = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert 1 <= len(finished) < 4, finished  # killed midway
    for name in finished:
        Image.open(out / name).load()  # every visible output is a complete image
    before = {name: (out / name).stat().st_mtime_ns for name in finished}
    stale = out / ".img3_t999_s0.png.a1b2c3d4.tmp"  # what a kill during a write leaves
    foreign = out / ".notes.txt.a1b2c3d4.tmp"  # another program's temp in the same folder
    stale.write_bytes(b"partial")
    foreign.write_bytes(b"theirs")
    assert run_main(cli, [*argv, "--skip-existing"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"img{i}_t999_s0.png" for i in range(4)]
    assert not stale.exists() and foreign.read_bytes() == b"theirs"
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in before.items())


# ------------------------------------------------------------------------------------------------------ bad inputs
def write_bad_and_odd_inputs(folder: Path, photos_small) -> tuple[list[str], list[str]]:
    """Files that must be refined (good, odd modes/sizes) and files that must fail, each named by its problem."""
    astro, coffee = photos_small
    save_png(folder / "good.png", astro)
    save_png(folder / "one_by_one.png", astro[:1, :1])
    save_png(folder / "smaller_than_factor.png", astro[:3, :5])
    Image.fromarray((np.linspace(0, 65535, 30 * 20).reshape(30, 20)).astype(np.uint16)).save(folder / "sixteen_bit.png")
    Image.fromarray(coffee).convert("CMYK").save(folder / "cmyk.jpg")
    palette = Image.fromarray(coffee).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette_transparency.png", transparency=0)
    frames = [Image.fromarray(astro), Image.fromarray(astro[::-1].copy())]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9_latin1.png"), "wb") as fh:
        Image.fromarray(astro).save(fh, format="PNG")
    (folder / "zero_byte.png").write_bytes(b"")
    png = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    buf = io.BytesIO()
    Image.fromarray(astro).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "text_named.png").write_text("this is not an image\n")
    save_png(folder / "bomb.png", np.zeros((200, 200, 3), np.uint8))  # over the lowered MAX_IMAGE_PIXELS below
    refined = [
        "good",
        "one_by_one",
        "smaller_than_factor",
        "sixteen_bit",
        "cmyk",
        "palette_transparency",
        "animated",
        "caf\udce9_latin1",
    ]
    failing = ["zero_byte.png", "truncated.png", "truncated.jpg", "text_named.png", "bomb.png"]
    return refined, failing


def test_every_bad_input_gets_one_line_and_the_batch_goes_on(
    cli, expert_checkpoints, photos_small, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the 200x200 file is a "decompression bomb" here
    folder = tmp_path / "in"
    folder.mkdir()
    refined, failing = write_bad_and_odd_inputs(folder, photos_small)
    (tmp_path / "folder.png").mkdir()
    out = tmp_path / "out"
    capsys.readouterr()
    code = run_main(cli, ["--input", str(folder), str(tmp_path / "folder.png"), *base_args(expert_checkpoints, out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err
    lines = error_lines(captured.err)
    for name in [*failing, "folder.png"]:
        mine = [line for line in lines if name in line and "image(s) failed" not in line]
        assert len(mine) == 1, (name, lines)
    assert any("decompression bomb" in line or "pixels" in line for line in lines if "bomb.png" in line)
    written = {os.fsdecode(n) for n in os.listdir(os.fsencode(out))}
    assert written == {f"{stem}_t400_s0.png" for stem in refined}
    assert Image.open(out / "palette_transparency_t400_s0.png").mode == "RGBA"
    assert Image.open(out / "one_by_one_t400_s0.png").size == (1, 1)
    assert Image.open(out / "smaller_than_factor_t400_s0.png").size == (5, 3)
    assert "8 of 13 images done" in captured.out


def test_unreadable_file_is_one_line(cli, expert_checkpoints, photos_small, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    save_png(folder / "good.png", photos_small[0])
    locked = save_png(folder / "locked.png", photos_small[0])
    locked.chmod(0)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root reads any file: make the read fail as it would for others
        import ldm.imageio.load as load

        real_read = load._read_bytes

        def read(path):
            if os.fsdecode(path).endswith("locked.png"):
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_read(path)

        monkeypatch.setattr(load, "_read_bytes", read)
    capsys.readouterr()
    assert run_main(cli, ["--input", str(folder), *base_args(expert_checkpoints, tmp_path / "out")]) == 1
    lines = [line for line in error_lines(capsys.readouterr().err) if "locked.png" in line and "image(s) failed" not in line]
    assert len(lines) == 1 and "permission denied" in lines[0]
    assert (tmp_path / "out" / "good_t400_s0.png").exists()


# --------------------------------------------------------------------------------------------------- bad arguments
@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, expert_checkpoints):
    root = tmp_path_factory.mktemp("bad_ckpts")
    data = expert_checkpoints[0].read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    shapes = load_checkpoint(expert_checkpoints[0])
    first = {k[len("first_stage_model.") :]: v for k, v in shapes["state_dict"].items() if k.startswith("first_stage")}
    save_checkpoint({"state_dict": first, "config": {"model": tiny_first_stage_config()}}, root / "vq.ckpt")
    cfg = tiny_expert_config(250, 500)
    cfg["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    save_checkpoint({**shapes, "config": cfg}, root / "mismatch.ckpt")
    cfg = tiny_expert_config(250, 500)
    cfg["model"]["target"] = "os.system"
    save_checkpoint({**shapes, "config": cfg}, root / "forbidden.ckpt")
    (root / "not_a_checkpoint.ckpt").write_text("hello")
    return root


@pytest.mark.parametrize(
    "change, message",
    [
        (["--start-t", "0"], "--start-t: 0 must be >= 1"),
        (["--start-t", "-5"], "--start-t: -5 must be >= 1"),
        (["--start-t", "2.5"], "--start-t: '2.5' is not an integer"),
        (["--start-t", "\uff15\uff10"], "--start-t: '\uff15\uff10' is not an integer"),  # full-width digits: not 50
        (["--seed", "1_0"], "--seed: '1_0' is not an integer"),
        (["--eta", "\u0660.5"], "--eta: '\u0660.5' is not a number"),  # an Arabic-Indic zero
        (["--box", "\uff11,0,8,8"], "is not x0,y0,x1,y1"),
        (["--start-t", "1000"], "start_t=1000 is outside [1, 999]"),
        (["--start-t", "800"], "outside every expert window"),
        (["--ddim-steps", "0"], "--ddim-steps: 0 must be >= 1"),
        (["--ddim-steps", "1001"], "ddim_steps=1001 must be an integer in [1, 1000]"),
        (["--eta", "-0.1"], "--eta: -0.1 must be a number in [0, 1]"),
        (["--eta", "1.5"], "--eta: 1.5 must be a number in [0, 1]"),
        (["--eta", "nan"], "--eta: nan must be a number in [0, 1]"),
        (["--precision", "fp16"], "fp16"),
        (["--ckpt", "{root}/missing.ckpt"], "does not exist"),
        (["--ckpt", "{root}/truncated.ckpt"], "truncated or corrupt"),
        (["--ckpt", "{root}/not_a_checkpoint.ckpt"], "cannot be read"),
        (["--ckpt", "{root}/vq.ckpt"], "wrong kind"),
        (["--ckpt", "{root}/mismatch.ckpt"], "config and checkpoint disagree"),
        (["--ckpt", "{root}/forbidden.ckpt"], "allow-list"),
    ],
)
def test_bad_arguments_exit_before_any_work(
    cli, expert_checkpoints, image_folder, bad_checkpoints, tmp_path, capsys, change, message
):
    out = tmp_path / "out"
    argv = ["--input", str(image_folder), *base_args(expert_checkpoints, out)]
    flag, value = change[0], change[1].format(root=bad_checkpoints)
    if flag == "--ckpt":
        argv = ["--input", str(image_folder), "--ckpt", value, "--outdir", str(out), "--device", "cpu"]
    else:
        argv += [flag, value]
    capsys.readouterr()
    assert run_main(cli, argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith("refine.py: error:")
    assert not out.exists()


def test_output_folder_errors_are_one_line(cli, expert_checkpoints, image_folder, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "occupied"
    blocker.write_text("a file where the output folder should be")
    for outdir in (blocker, blocker / "sub"):
        capsys.readouterr()
        assert run_main(cli, ["--input", str(image_folder), *base_args(expert_checkpoints, outdir)]) == 3
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and str(outdir) in lines[0] and "a file is in the way" in lines[0]

    import ldm.refine.batch as batch

    def disk_full(path, *args, **kwargs):
        raise ImageSaveError(path, "no space left on device", errno.ENOSPC)

    monkeypatch.setattr(batch, "save_image_atomic", disk_full)
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_main(cli, ["--input", str(image_folder / "astro.png"), *base_args(expert_checkpoints, out)]) == 3
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no space left on device" in lines[0] and str(out / "astro_t400_s0.png") in lines[0]
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------------------------- argument fuzzing
@settings(max_examples=80, deadline=None)
@given(
    start=st.one_of(st.integers(-3, 1200).map(str), st.text(max_size=5)),
    steps=st.one_of(st.integers(-3, 1200).map(str), st.text(max_size=5)),
    eta=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=5)),
)
def test_fuzzed_arguments_parse_or_fail_in_one_line(cli, start, steps, eta):
    stderr = io.StringIO()
    argv = ["--input", "x.png", "--ckpt", "a.ckpt", f"--start-t={start}", f"--ddim-steps={steps}", f"--eta={eta}"]
    with contextlib.redirect_stderr(stderr):
        try:
            args = cli.build_parser().parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 2
            assert len(error_lines(stderr.getvalue())) == 1
            return
    assert args.start_t >= 1 and args.ddim_steps >= 1 and 0 <= args.eta <= 1


# ---------------------------------------------------------------------------------------------------------------------
# a crafted pickle, permission errors on the output folder, the seed and --box flags


def one_error_line(text: str, prefix: str) -> str:
    lines = [line for line in error_lines(text) if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one_image")
    Image.fromarray(load_photos()[0][::12, ::12][:32, :40]).save(folder / "astro.png")
    return folder


def refine_args(checkpoints, outdir: Path) -> list[str]:
    args = [a for path in checkpoints for a in ("--ckpt", str(path))]
    return [*args, "--outdir", str(outdir), "--start-t", "300", "--ddim-steps", "10", "--device", "cpu"]


def test_crafted_pickle_given_to_the_refine_cli_is_refused(cli, one_image, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_main(cli, ["--input", str(one_image), *refine_args([evil], out)]) == 2
    line = one_error_line(capsys.readouterr().err, "refine.py: error:")
    assert "builtins.exec" in line and "--unsafe-load" in line
    assert not marker.exists() and not out.exists()


def test_refine_output_folder_without_write_permission(cli, expert_checkpoints, one_image, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    capsys.readouterr()
    assert run_main(cli, ["--input", str(one_image), *refine_args(expert_checkpoints, locked / "out")]) == 3
    line = one_error_line(capsys.readouterr().err, "refine.py: error:")
    assert str(locked / "out") in line and "permission denied" in line
    assert list(locked.iterdir()) == []


def test_refine_permission_denied_while_writing_is_one_line(cli, expert_checkpoints, one_image, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == out:  # what a folder made read-only during the run gives a non-root user
            raise PermissionError(errno.EACCES, "Permission denied", str(out / ".x.png.abcdefgh.tmp"))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    capsys.readouterr()
    assert run_main(cli, ["--input", str(one_image), *refine_args(expert_checkpoints, out)]) == 3
    lines = error_lines(capsys.readouterr().err)
    (line,) = [line for line in lines if "permission denied" in line]
    assert str(out / "astro_t300_s0.png") in line
    assert list(out.iterdir()) == []


def test_refine_seed_beyond_the_largest_is_a_usage_error(cli, expert_checkpoints, tmp_path, capsys):
    from ldm.refine.refiner import MAX_SEED

    base = ["--input", str(tmp_path), *ckpt_args(expert_checkpoints), "--outdir", str(tmp_path / "o")]
    code, lines = run(cli, [*base, "--seed", str(MAX_SEED + 1)], capsys)
    assert code == 2 and len(lines) == 1 and f"is above the largest seed {MAX_SEED}" in lines[0]
    code, lines = run(cli, [*base, "--seed", str(MAX_SEED), "--n-samples", "2"], capsys)
    assert code == 2 and len(lines) == 1 and "(--n-samples - 1)" in lines[0]


def test_a_box_that_starts_with_a_minus_says_how_to_pass_it(cli, capsys):
    code, lines = run(cli, ["--input", "a.png", "--ckpt", "a.ckpt", "--box", "-1,0,8,8"], capsys)
    assert code == 2 and lines == [
        "refine.py: error: argument --box: expected one argument; to give a value that "
        "starts with '-', attach it with '=': --box=<value> (see --help)"
    ]
    code, lines = run(cli, ["--input", "a.png", "--ckpt", "a.ckpt", "--box=-1,0,8,8"], capsys)
    assert code == 2 and len(lines) == 1 and "box '-1,0,8,8' must have 0 <= x0 < x1" in lines[0]


INTERRUPT_WHILE_LOADING = """
import runpy, sys
import ldm.refine

def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

ldm.refine.Refiner.from_checkpoints = interrupted
sys.argv = [sys.argv[1], "--input", "x.png", "--ckpt", "a.ckpt", "--outdir", "out"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_while_checkpoints_load_is_one_line(tmp_path):
    """Ctrl+C before refine_files (imports, checkpoint loading) printed a traceback."""
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_WHILE_LOADING, str(SCRIPT)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 130 and proc.stderr.strip() == "refine.py: interrupted", proc.stderr
    assert not (tmp_path / "out").exists()
