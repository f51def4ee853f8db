"""ldm.train.runlock: one main.py per run folder.  The lock is exclusive and names its holder, an unwritable run
folder is one error and a file system without locks a warning, only rank 0 takes the lock, a second main.py on a
running run exits 2, and a SIGKILLed holder leaves no lock.

The lock's holder runs in a subprocess; the second main.py runs ``main.main`` in process.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from test_main import MAIN, QUICKSTART, _env, _load_main_module
from test_main_errors import STARTUP_TIMEOUT, new_run_args, one_error_line

import ldm.train.runlock as runlock
from ldm.checkpoint import load_checkpoint
from ldm.train.runlock import LOCK_NAME, RunFolderBusy, RunFolderLockError, hold_run_folder


@pytest.fixture(scope="module")
def main_module():
    return _load_main_module()


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
        [
            sys.executable,
            str(MAIN),
            "-t",
            "-r",
            str(run),
            "lightning.trainer.max_steps=1000000",
            "lightning.modelcheckpoint.params.every_n_train_steps=1000000",
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
