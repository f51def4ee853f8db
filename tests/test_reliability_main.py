"""main.py reliability, round 2 (issue 13): one process per run folder (lock), and one-line errors without a run folder
left behind for a bad Trainer argument, a data folder of corrupt images and a seed out of range.

Most cases run ``main.main`` in process (fast); the lock's holder and one end-to-end error run in subprocesses.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_main import MAIN, QUICKSTART, TEST_OVERLAY, _env, _load_main_module
from test_reliability import one_error_line

import ldm.train.runlock as runlock
from ldm.checkpoint import load_checkpoint
from ldm.train.runlock import LOCK_NAME, RunFolderBusy, RunFolderLockError, hold_run_folder

STARTUP_TIMEOUT = 600


@pytest.fixture(scope="module")
def main_module():
    return _load_main_module()


def overlay(folder: Path, text: str = TEST_OVERLAY, name: str = "tiny_overlay.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def new_run_args(folder: Path, *extra: str) -> list[str]:
    return ["-b", str(QUICKSTART), str(overlay(folder)), "-t", "-l", str(folder / "logs"), *extra]


def nothing_left(logs: Path) -> bool:
    return not logs.exists() or not any(logs.iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# the run folder's lock


def test_the_lock_is_exclusive_names_its_holder_and_ends_with_its_context(tmp_path):
    with hold_run_folder(tmp_path) as path:
        assert path == tmp_path / LOCK_NAME and path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderBusy, match=rf"is in use by another main.py \(pid {os.getpid()}\)"):
            with hold_run_folder(tmp_path):
                pass
    with hold_run_folder(tmp_path) as again:  # released: the file stays, the lock does not
        assert again == path


def test_an_unwritable_run_folder_or_a_file_system_without_locks(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runlock.os, "open", denied)
    with pytest.raises(RunFolderLockError, match="the run folder must be writable"):
        with hold_run_folder(tmp_path):
            pass
    monkeypatch.setattr(runlock.os, "open", real_open)
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with hold_run_folder(tmp_path) as path:
        assert path is None
    assert "has no file locks" in caplog.text


def test_ranks_other_than_zero_do_not_take_the_lock(main_module, tmp_path, monkeypatch, capsys):
    """Lightning re-launches main.py once per extra rank with the same -r: only rank 0 locks (else rank 1 would find
    the folder busy).  The run's empty last.ckpt is read right after the lock would be taken: that error shows the lock
    was not."""
    from pytorch_lightning.utilities import rank_zero_only

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "configs" / "x-project.yaml").write_text(QUICKSTART.read_text())
    with hold_run_folder(run):
        assert main_module.main(["-t", "-r", str(run)]) == 2
        assert "is in use by another main.py" in one_error_line(capsys.readouterr().err, "main.py: error:")
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        assert main_module.main(["-t", "-r", str(run)]) == 1
        assert "is empty (0 bytes)" in one_error_line(capsys.readouterr().err, "main.py: error:")


def test_a_second_main_py_on_a_running_run_exits_2_and_a_sigkilled_holder_leaves_no_lock(main_module, tmp_path, capsys):
    assert main_module.main(new_run_args(tmp_path, "-n", "locked", "lightning.trainer.max_steps=1")) == 0
    (run,) = (tmp_path / "logs").iterdir()
    assert (run / LOCK_NAME).is_file()
    holder = subprocess.Popen(
        [sys.executable, str(MAIN), "-t", "-r", str(run), "lightning.trainer.max_steps=1000000",
         "lightning.modelcheckpoint.params.every_n_train_steps=1000000"],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while holder.poll() is None and time.monotonic() < deadline:
            if (run / LOCK_NAME).read_text().strip() == str(holder.pid):
                break
            time.sleep(0.05)
        assert holder.poll() is None, "the holder ended before it was checked"
        capsys.readouterr()
        assert main_module.main(["-t", "-r", str(run)]) == 2
        line = one_error_line(capsys.readouterr().err, "main.py: error:")
        assert f"run folder {str(run)!r} is in use by another main.py (pid {holder.pid})" in line
        assert main_module.main(["-t", "-r", str(run / "checkpoints" / "last.ckpt")]) == 2  # a checkpoint in it too
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_NAME).read_text().strip() == str(holder.pid)  # the file stays, but no process holds it
    assert main_module.main(["-t", "-r", str(run), "lightning.trainer.max_steps=2"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# one line, exit 2, no run folder


def model_only_config(folder: Path) -> Path:
    """The quickstart's model and trainer settings without its data section (to give another one)."""
    config = OmegaConf.merge(OmegaConf.load(QUICKSTART), OmegaConf.load(overlay(folder)))
    del config["data"]
    path = folder / "model_only.yaml"
    OmegaConf.save(config, path)
    return path


def corrupt_image_data(folder: Path) -> Path:
    images = folder / "images"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * i)
    path = folder / "corrupt_data.yaml"
    path.write_text(
        "data:\n  target: ldm.data.datamodule.DataModuleFromConfig\n  params:\n    batch_size: 2\n    train:\n"
        "      target: ldm.data.image_folder.ImageFolderDataset\n"
        f"      params: {{root: {images}, size: 32, split: all, val_fraction: 0}}\n"
    )
    return path


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["lightning.trainer.max_steps=-5"], "lightning.trainer: `max_steps` must be a non-negative integer or -1"),
        (["lightning.trainer.max_epochs=-7"], "lightning.trainer: `max_epochs` must be a non-negative integer or -1"),
        (["-s", "99999999999999"], "argument -s/--seed: 99999999999999 is outside the seed range [0, 4294967295]"),
        (["-s", "-1"], "argument -s/--seed: -1 is outside the seed range [0, 4294967295]"),
        (["-s", "4294967296"], "is outside the seed range"),
    ],
)
def test_bad_trainer_values_and_seeds_are_one_line_without_a_run_folder(main_module, extra, expected, tmp_path, capsys):
    assert main_module.main(new_run_args(tmp_path, *extra)) == 2
    assert expected in one_error_line(capsys.readouterr().err, "main.py: error:")
    assert nothing_left(tmp_path / "logs")


def test_a_data_folder_of_corrupt_images_is_one_line_without_a_run_folder(main_module, tmp_path, capsys):
    argv = ["-b", str(model_only_config(tmp_path)), str(corrupt_image_data(tmp_path)), "-t", "-l", str(tmp_path / "logs")]
    assert main_module.main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "main.py: error:")
    assert f"all 5 image(s) of split 'all' under {str(tmp_path / 'images')!r} are unreadable" in line
    assert nothing_left(tmp_path / "logs")


def test_a_bad_trainer_value_from_the_command_line_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, str(MAIN), *new_run_args(tmp_path, "lightning.trainer.max_steps=-5")],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
    assert result.returncode == 2
    assert "max_steps" in one_error_line(result.stderr, "main.py: error:")
    assert nothing_left(tmp_path / "logs")


# ---------------------------------------------------------------------------------------------------------------------
# crafted configs and command lines (the adversarial pass): one line, exit 2, no run folder


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["model=5"], "'model' must be a mapping {target: pkg.Class, params: {...}}, got 5"),
        (["data=5"], "'data' must be a mapping {target: pkg.Class, params: {...}}, got 5"),
        (["data=null"], "training needs a 'data' section"),
        (["model.params.unet_config.params.model_channels=-5"], "cannot build the model of this config: Trying to create"),
        (["model.params.unet_config.params.num_head_channels=0"], "cannot build the model of this config: integer div"),
        (["lightning.trainer.max_steps=1e400"], "lightning.trainer.max_steps=inf must be int"),
        (["lightning.trainer.max_steps=abc"], "lightning.trainer.max_steps='abc' must be int"),
        (["lightning.trainer.max_steps=2.5"], "lightning.trainer.max_steps=2.5 must be int"),
        (["lightning.trainer.max_steps=true"], "lightning.trainer.max_steps=True must be int"),
        (["lightning.trainer.limit_train_batches=.nan"], "limit_train_batches=nan must be float or int or null"),
        (["lightning.trainer.accumulate_grad_batches=0"], "lightning.trainer.accumulate_grad_batches=0 must be >= 1"),
        (["lightning.trainer.check_val_every_n_epoch=0"], "lightning.trainer.check_val_every_n_epoch=0 must be >= 1"),
        (["lightning.trainer.devices=0"], "lightning.trainer: `Trainer(devices=0)` value is not a valid input"),
        (["lightning.trainer.strategy=nonsense"], "lightning.trainer: You selected an invalid strategy name"),
        (["lightning.modelcheckpoint=abc"], "lightning.modelcheckpoint must be {target: ..., params: {...}}, got 'abc'"),
        (["model.base_learning_rate=abc"], "model.base_learning_rate='abc' must be a finite number >= 0"),
        (["model.base_learning_rate=-1"], "model.base_learning_rate=-1 must be a finite number >= 0"),
        (["model.base_learning_rate=.nan"], "model.base_learning_rate=nan must be a finite number >= 0"),
        (["-n", "a/b"], "-n/--name 'a/b' must be a plain file name (no '/')"),
        (["-p", "/../../escaped"], "-p/--postfix '/../../escaped' must be a plain file name"),
        (["data.params.train.params.size=4096"], "size=4096 px is above 2048 px"),
        # issue 27: ~key deletions and target changes on the command line
        (["~model"], "the merged config has no 'model' section"),
        (["~data"], "training needs a 'data' section"),
        (["~data.params.nope"], "cannot delete 'data.params.nope' (~data.params.nope): data.params has no key 'nope'"),
        (["~data.params.batch_size.x"], "cannot delete 'data.params.batch_size.x' (~data.params.batch_size.x): "
                                        "data.params.batch_size is a value"),
        (["~data.params.train=1"], "a deletion is ~key alone (no '='); to set a key write key=value"),
        (["~"], "a deletion names a key"),
        (["data.params.train.target=ldm.data.cached_latents.CachedLatents"], "missing 1 required positional argument: 'root'"),
        (["data.params.train.target=ldm.data.cached_latents.CachedLatents", "data.params.train.params.size=32"],
         "ldm.data.cached_latents.CachedLatents takes no argument 'size'"),
    ],
)
def test_crafted_configs_are_one_line_without_a_run_folder(main_module, extra, expected, tmp_path, capsys):
    assert main_module.main(new_run_args(tmp_path, *extra)) == 2
    assert expected in one_error_line(capsys.readouterr().err, "main.py: error:")
    assert nothing_left(tmp_path / "logs") and not (tmp_path / "escaped").exists()


def test_ctrl_c_before_training_is_one_line_and_leaves_no_run_folder(main_module, tmp_path, monkeypatch, capsys):
    import ldm.train.trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ldm.train.trainer, "build_trainer", interrupted)  # after the run folder is made and locked
    try:
        code = main_module.main(new_run_args(tmp_path))
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail("main() let KeyboardInterrupt escape")
    assert code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "main.py: interrupted" and "Traceback" not in err
    assert nothing_left(tmp_path / "logs")


def test_a_checkpoint_storing_an_invalid_seed_resumes_with_a_warning(tmp_path):
    from ldm.checkpoint import save_checkpoint
    from ldm.train.callbacks import StepSeeding
    from ldm.train.cli import DEFAULT_SEED, resume_seed

    for stored in (2**40, -3, "23", True):
        path = tmp_path / "last.ckpt"
        save_checkpoint({"state_dict": {}, "callbacks": {StepSeeding.STATE_KEY: {"seed": stored}}}, path)
        seed, note = resume_seed(path, None)
        assert seed == DEFAULT_SEED and note.startswith("warning:") and "stores an invalid seed" in note, note
        assert resume_seed(path, 7)[0] == 7


def test_ctrl_c_while_main_py_starts_is_one_line(tmp_path):
    """SIGINT while main.py imports Lightning and builds the model: no traceback, exit 130."""
    proc = subprocess.Popen([sys.executable, str(MAIN), *new_run_args(tmp_path)], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.0)  # inside the imports (they take seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=STARTUP_TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "main.py: interrupted" and "Traceback" not in err
    assert nothing_left(tmp_path / "logs")


@pytest.mark.timeout(60)
def test_a_fifo_or_a_postscript_file_in_an_image_folder_is_skipped_without_blocking_or_running_anything(tmp_path,
                                                                                                     monkeypatch):
    """A FIFO named x.png blocked the data loader's open forever; an EPS file named x.png reached Pillow's EPS plugin,
    which runs Ghostscript.  Both are now unreadable files: skipped with a warning, the good image is used."""
    from PIL import EpsImagePlugin, Image

    from ldm.data.image_folder import ImageFolderDataset

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "b_good.png")
    os.mkfifo(tmp_path / "a_fifo.png")
    (tmp_path / "a_postscript.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    ran: list[object] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append(args) or None)
    dataset = ImageFolderDataset(tmp_path, size=32, split="all", val_fraction=0.0, flip=False)
    assert len(dataset) == 3
    for index in range(3):
        assert dataset[index]["file_path_"] == str(tmp_path / "b_good.png")
    assert sorted(Path(p).name for p in dataset.skipped_files) == ["a_fifo.png", "a_postscript.png"] and ran == []
