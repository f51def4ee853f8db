"""scripts/app.py, the command: one-line errors for command-line mistakes, Ctrl+C (idle, twice, during a request)
exits 0 without a traceback, ``--ckpt demo`` and its help.  The Ctrl+C checks start servers of their own (they stop
them); the HTTP checks of a running server are in tests/test_app_server_http.py."""

from __future__ import annotations

import importlib.util
import signal
import socket
import time

import pytest

from app_support import APP, REPO, small_image, start_server, wait_for

pytest.importorskip("starlette", reason="the web app needs the app extra: pip install -e .[app]")
pytest.importorskip("uvicorn", reason="the web app needs the app extra: pip install -e .[app]")


@pytest.fixture(scope="module")
def app_script():
    spec = importlib.util.spec_from_file_location("app_script", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_mistakes_are_one_line_errors(app_script, expert_checkpoints, tmp_path, capsys):
    def run(*argv: str) -> tuple[int, list[str]]:
        try:
            code = app_script.main(list(argv))
        except SystemExit as exc:  # argparse
            code = int(exc.code)
        return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    ckpts = ["--ckpt", str(expert_checkpoints[0]), "--ckpt", str(expert_checkpoints[1]), "--device", "cpu"]
    code, err = run(*ckpts, "--port", "70000")
    assert code == 2 and len(err) == 1 and "70000 is not a port number" in err[0]
    code, err = run("--port", "0")
    assert code == 2 and len(err) == 1 and "--ckpt" in err[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, err = run(*ckpts, "--port", str(port), "--outdir", str(tmp_path / "out"))
    assert code == 2 and err == [f"app.py: error: port {port} on 127.0.0.1 is in use; pass another --port (0 picks a free one)"]
    code, err = run("--ckpt", str(tmp_path / "missing.ckpt"), "--port", "0", "--outdir", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and "missing.ckpt" in err[0] and err[0].startswith("app.py: error:")
    assert not (tmp_path / "out").exists()  # the output folder is made only once the experts load
    (tmp_path / "file").write_text("in the way")
    code, err = run(*ckpts, "--port", "0", "--outdir", str(tmp_path / "file" / "out"))
    assert code == 3 and len(err) == 1 and "output folder" in err[0]


def test_ctrl_c_during_a_job_stops_it_and_exits_0(expert_checkpoints, tmp_path):
    with start_server(expert_checkpoints, tmp_path) as own:
        _, up = own.upload(small_image(), "photo.png")
        long = {"mode": "whole", "start_t": 400, "steps": 400, "step_mode": "exact", "n_samples": 8}
        _, job = own.json("/api/refine", {"upload": up["id"], "settings": long})
        wait_for(own, job["id"], lambda j: j["state"] == "running" and j["done_steps"] > 0)
        started = time.monotonic()
        own.proc.send_signal(signal.SIGINT)
        code = own.proc.wait(timeout=60)
        seconds = time.monotonic() - started
    log = own.err.read_text()
    assert code == 0 and seconds < 30, (code, seconds, log)  # was 134: "terminate called without an active exception"
    assert "Traceback" not in log and "terminate called" not in log
    assert "the running request ends after its current sampling step" in log
    time.sleep(0.2)  # the stdout reader thread takes the last line
    assert own.stdout[-1].strip() == "stopped"
    written = list((own.outdir / job["id"]).glob("*")) if (own.outdir / job["id"]).exists() else []
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in written)  # no half-written file left


def test_ctrl_c_on_an_idle_server_exits_0_without_a_traceback(expert_checkpoints, tmp_path):
    for presses in (1, 2):  # pressed twice, the second arrives while it stops
        (tmp_path / f"run{presses}").mkdir()
        with start_server(expert_checkpoints, tmp_path / f"run{presses}") as own:
            assert own.request("/api/info")[0] == 200
            for _ in range(presses):
                own.proc.send_signal(signal.SIGINT)
                time.sleep(0.05)
            code = own.proc.wait(timeout=60)
        log = own.err.read_text()
        assert code == 0 and "Traceback" not in log and "KeyboardInterrupt" not in log, (code, log)
        time.sleep(0.2)  # the stdout reader thread takes the last line
        assert own.stdout[-1].strip() == "stopped"


def test_ckpt_demo_is_passed_to_the_refiner_and_the_help_says_so(monkeypatch, tmp_path, capsys):
    from ldm.refine import Refiner

    spec = importlib.util.spec_from_file_location("app_script_demo", REPO / "scripts" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    help_text = " ".join(app.build_parser().format_help().split())
    assert "expert checkpoint, or 'demo' for the shipped demo experts; repeat once per expert" in help_text
    assert "0 stopped with Ctrl+C" in help_text and "130 Ctrl+C before serving" in help_text
    asked = []

    def from_checkpoints(paths, **_kwargs):
        asked.append(list(paths))
        raise KeyboardInterrupt  # as Ctrl+C while the models load: nothing is served

    monkeypatch.setattr(Refiner, "from_checkpoints", from_checkpoints)
    code = app.main(["--ckpt", "demo", "--port", "0", "--outdir", str(tmp_path / "out"), "--device", "cpu"])
    assert asked == [["demo"]] and code == 130 and capsys.readouterr().err.strip() == "app.py: interrupted"
