"""The web app (scripts/app.py, ldm.app): handlers against the CLI, the real server over HTTP, a real browser.

The server tests share one server started in a subprocess on a free localhost port with every non-loopback network
access refused (a sitecustomize like tests/test_refine_cli.py's); the browser test drives headless Chromium against it
and skips, saying why, where Chromium is not installed.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.imageio import read_png_metadata

from conftest import load_photos

pytest.importorskip("starlette", reason="the web app needs the app extra: pip install -e .[app]")
pytest.importorskip("uvicorn", reason="the web app needs the app extra: pip install -e .[app]")

from ldm.app.handlers import (  # noqa: E402  (after the skips: without the extra there is nothing to import)
    RefineSettings,
    RequestError,
    describe_plan,
    load_painted_mask,
    load_upload,
    prepare,
    refine,
)

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "scripts" / "app.py"
STATIC = REPO / "ldm" / "app" / "static"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Refuse every connection, name lookup and bind outside the loopback range; log attempts to $NO_NET_LOG.
SITECUSTOMIZE = '''
import os
import socket

_LOG = os.environ["NO_NET_LOG"]
_LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def _check(address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host in _LOCAL or host.startswith("127.")):
        return
    with open(_LOG, "a") as fh:
        fh.write(f"attempt {address!r}\\n")
    raise OSError(f"network access outside localhost is disabled in this test: {address!r}")


class _LocalSocket(socket.socket):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return super().connect(address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return super().connect_ex(address)

    def sendto(self, data, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(args[-1])
        return super().sendto(data, *args)


_getaddrinfo = socket.getaddrinfo
_create_connection = socket.create_connection


def _local_getaddrinfo(host, *args, **kwargs):
    _check(host.decode() if isinstance(host, bytes) else (host or "127.0.0.1"))
    return _getaddrinfo(host, *args, **kwargs)


def _local_create_connection(address, *args, **kwargs):
    _check(address)
    return _create_connection(address, *args, **kwargs)


socket.socket = _LocalSocket
socket.getaddrinfo = _local_getaddrinfo
socket.create_connection = _local_create_connection
with open(_LOG, "w") as _fh:  # last: "loaded" means every guard above is in place
    _fh.write("loaded\\n")
'''


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images():
    """An RGB photo crop (48x40), an RGBA one (53x37), their masks (white rectangles) and their PNG bytes."""
    astro, coffee, _ = load_photos()
    rgb = astro[::10, ::10][:40, :48]
    rgba = np.dstack([coffee[::10, ::10][:37, :53], (np.arange(37 * 53).reshape(37, 53) % 251).astype(np.uint8)])
    mask_rgb = np.zeros((40, 48), dtype=np.uint8)
    mask_rgb[8:26, 10:30] = 255
    mask_rgb[30:36, 36:44] = 128  # grey: a proportional start
    mask_rgba = np.zeros((37, 53), dtype=np.uint8)
    mask_rgba[5:20, 30:50] = 255
    return {"rgb": (png_bytes(rgb), png_bytes(mask_rgb)), "rgba": (png_bytes(rgba), png_bytes(mask_rgba))}


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    from ldm.refine import Refiner

    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("refine_script_for_app", REPO / "scripts" / "refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- handlers, no server
CASES = {
    # image, settings of the page, the same as refine.py flags
    "in place, grey mask, 2 samples": (
        "rgb", {"start_t": 400, "steps": 10, "seed": 3, "n_samples": 2, "mask_blur": 2, "mode": "mask"},
        ["--start-t", "400", "--ddim-steps", "10", "--seed", "3", "--n-samples", "2", "--mask-blur", "2"],
    ),
    "crop, box with its own start, exact steps, dpmpp, RGBA": (
        "rgba", {"start_t": 300, "steps": 4, "step_mode": "exact", "sampler": "dpmpp_2m", "mode": "crop",
                 "boxes": "2,2,20,16@200", "region_padding": 4, "mask_dilate": 1},
        ["--start-t", "300", "--tail-steps", "4", "--sampler", "dpmpp_2m", "--crop-regions", "--box", "2,2,20,16@200",
         "--region-padding", "4", "--mask-dilate", "1"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_handlers_give_the_cli_s_pixels_and_metadata(case, cli, refiner, images, expert_checkpoints, tmp_path):
    kind, page_settings, flags = CASES[case]
    image_png, mask_png = images[kind]
    source = tmp_path / f"{kind}.png"
    source.write_bytes(image_png)
    (tmp_path / "mask.png").write_bytes(mask_png)
    argv = ["--input", str(source), "--mask", str(tmp_path / "mask.png"), "--outdir", str(tmp_path / "cli"),
            "--ckpt", str(expert_checkpoints[0]), "--ckpt", str(expert_checkpoints[1]), "--device", "cpu", *flags]
    assert cli.main(argv) == 0

    upload = load_upload(image_png, f"{kind}.png")
    settings = RefineSettings.from_json(page_settings)
    prepared = prepare(refiner, upload, settings, load_painted_mask(mask_png, upload))
    steps = []
    result = refine(refiner, prepared, tmp_path / "app", on_step=lambda: steps.append(1))
    assert len(steps) == prepared.total_steps > 0  # the progress bar reaches its end exactly

    names = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert [s.path.name for s in result.samples] == names
    for sample in result.samples:
        ours, theirs = sample.path, tmp_path / "cli" / sample.path.name
        with Image.open(ours) as a, Image.open(theirs) as b:
            assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
        meta, cli_meta = read_png_metadata(ours), read_png_metadata(theirs)
        assert set(cli_meta) <= set(meta)  # every key the CLI writes (parameters, checkpoints' sha256, regions, ...)
        for key in ("start_t", "effective_start_t", "tail_timesteps", "routing", "seed", "sample_index", "checkpoints",
                    "sampler", "regions", "mask_sha256", "mask_blur", "mask_dilate", "crop_regions", "boxes"):
            assert meta.get(key) == cli_meta.get(key), key
        assert meta["input"] == f"{kind}.png" and meta["Software"] == "latesteps app"
        assert json.loads(meta["parameters"])["mode"] == page_settings["mode"]


def test_handler_messages_for_what_a_user_can_get_wrong(refiner, images):
    image_png, mask_png = images["rgb"]
    for data, expected in [(b"", "empty"), (b"hello, not an image", "not an image"), (image_png[:200], "truncated")]:
        with pytest.raises(RequestError, match="cannot load image") as info:
            load_upload(data, "photo.png")
        assert "photo.png" in str(info.value) and expected in str(info.value) and "\n" not in str(info.value)
    upload = load_upload(image_png, "../../etc/we ird\nname.png")
    assert upload.name == "we ird?name.png" and upload.stem == "we_ird_name"  # no path, no newline in names
    with pytest.raises(RequestError, match="the painted mask is 10x10 but the image is 48x40"):
        load_painted_mask(png_bytes(np.zeros((10, 10), np.uint8)), upload)
    empty = load_painted_mask(png_bytes(np.zeros((40, 48), np.uint8)), upload)
    with pytest.raises(RequestError, match="selects nothing"):
        prepare(refiner, upload, RefineSettings(start_t=300), empty)
    with pytest.raises(RequestError, match="nothing selected: paint"):
        prepare(refiner, upload, RefineSettings(start_t=300), None)
    with pytest.raises(RequestError, match="outside the 48x40 image"):
        prepare(refiner, upload, RefineSettings.from_json({"start_t": 300, "boxes": "0,0,60,10"}), None)
    with pytest.raises(RequestError, match=r"^start t=700 is above the experts' range \(max 499\); move the slider down$"):
        prepare(refiner, upload, RefineSettings(start_t=700), load_painted_mask(mask_png, upload))
    assert prepare(refiner, upload, RefineSettings(start_t=300, mode="whole"), empty).start_map is None
    for bad, expected in [({"start_t": 0}, "Start t must be a whole number from 1 to 999, not 0"),
                          ({"steps": "ten"}, "Steps must be a whole number from 1 to 1000, not 'ten'"),
                          ({"seed": 1.5}, "Seed must be"), ({"n_samples": 9}, "Samples must be a whole number from 1 to 8"),
                          ({"start_t": True}, "Start t must be"), ({"mode": "all"}, "Mode 'all' is not one of"),
                          ({"colour": 1}, "unknown setting(s) 'colour'"),
                          ({"boxes": "1,2,3"}, "is not x0,y0,x1,y1"), ([], "must be a JSON object")]:  # fmt: skip
        with pytest.raises(RequestError) as info:
            RefineSettings.from_json(bad)
        assert expected in str(info.value)
    assert RefineSettings.from_json({"steps": 20.0}).steps == 20  # JSON numbers may arrive as floats


def test_plan_label_names_the_windows_the_steps_cross(refiner):
    cached = len(refiner._plans)
    both = describe_plan(refiner, RefineSettings(start_t=400, steps=10))
    assert both["ok"] and both["windows"] == "steps 500-750 then 750-1000" and both["t_windows"] == "t 250-499 then t 0-249"
    assert both["routing_t"] == "t 301: latesteps_500_750.ckpt; t 201-1: latesteps_750_1000.ckpt"  # t only
    assert both["effective_start_t"] == 301 and both["n_steps"] == 4 and "latesteps_500_750.ckpt" in both["routing"]
    details = describe_plan(refiner, RefineSettings(start_t=200, steps=4, step_mode="exact"))
    assert details["ok"] and details["windows"] == "steps 750-1000" and details["effective_start_t"] == 200
    boxed = describe_plan(refiner, RefineSettings.from_json({"start_t": 100, "boxes": "0,0,4,4@450"}))
    assert boxed["start_t"] == 450 and boxed["windows"] == "steps 500-750 then 750-1000"
    assert describe_plan(refiner, RefineSettings.from_json({"mode": "whole", "start_t": 100, "boxes": "0,0,4,4@450"}))[
        "start_t"] == 100  # fmt: skip
    above = describe_plan(refiner, RefineSettings(start_t=800))
    assert not above["ok"] and above["error"] == "start t=800 is above the experts' range (max 499); move the slider down"
    boxed = describe_plan(refiner, RefineSettings.from_json({"start_t": 100, "boxes": "0,0,4,4@600"}))
    assert boxed["error"] == ("box 0,0,4,4@600 starts at t=600, above the experts' range (max 499); lower its @start_t or "
                              "leave it out")
    assert len(refiner._plans) == cached  # moving the slider builds no plan on the device


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


def test_queue_runs_one_request_at_a_time_and_survives_failures(refiner, images):
    from ldm.app.jobs import JobQueue

    upload = load_upload(images["rgb"][0], "astro.png")
    prepared = prepare(refiner, upload, RefineSettings(mode="whole", start_t=100, steps=2, step_mode="exact"), None)
    running, overlaps, order = [], [], []

    def run(job):
        overlaps.append(len(running))
        running.append(job.id)
        time.sleep(0.05)
        order.append(job.number)
        running.remove(job.id)
        if job.number == 2:
            raise RuntimeError("a bug")
        if job.number == 3:
            raise ValueError("bad\nsetting")
        JobQueue.step(job)
        return "result"

    jobs = JobQueue(run, max_waiting=4)
    submitted = [jobs.submit(prepared, "key", b"png", None) for _ in range(4)]
    with pytest.raises(RequestError, match="4 requests are already waiting"):
        jobs.submit(prepared, "key", b"png", None)
    assert jobs.ahead_of(submitted[3]) == 3
    jobs.start()
    deadline = time.monotonic() + 30
    while any(j.state in ("queued", "running") for j in submitted) and time.monotonic() < deadline:
        time.sleep(0.01)
    jobs.stop(timeout=5)
    assert order == [1, 2, 3, 4] and overlaps == [0, 0, 0, 0]  # in arrival order, never two at once
    assert [j.state for j in submitted] == ["done", "failed", "failed", "done"]
    assert submitted[1].message == "internal error (RuntimeError: a bug); see the server log"
    assert submitted[2].message == "bad setting" and submitted[3].result == "result"
    assert all(j.prepared is None for j in submitted)  # finished requests hold no image
    assert (jobs.status(submitted[0])["done_steps"], jobs.status(submitted[0])["total_steps"]) == (1, 2)


# ----------------------------------------------------------------------------------------- the server, over HTTP
class Server:
    def __init__(self, url: str, port: int, proc: subprocess.Popen, outdir: Path, net_log: Path):
        self.url, self.port, self.proc, self.outdir, self.net_log = url, port, proc, outdir, net_log
        self.err = outdir.parent / "server.err"  # what the server logged (a file: logging can never block it)
        self.stdout: list[str] = []  # its standard output lines so far

    def request(self, path: str, data: bytes | None = None, content_type: str | None = None, headers=None):
        """``(status, headers, body bytes)``; HTTP errors are returned, not raised."""
        request = urllib.request.Request(self.url + path, data=data, headers=dict(headers or {}))
        if content_type:
            request.add_header("Content-Type", content_type)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy from the environment
        try:
            with opener.open(request, timeout=60) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def json(self, path: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        status, _, body = self.request(path, data, "application/json" if data is not None else None)
        return status, json.loads(body)

    def upload(self, data: bytes, name: str):
        status, _, body = self.request(f"/api/upload?name={name}", data, "application/octet-stream")
        return status, json.loads(body)

    def refine(self, upload_id: str, settings: dict, mask: bytes | None, timeout: float = 120.0):
        payload = {"upload": upload_id, "settings": settings,
                   "mask": None if mask is None else base64.b64encode(mask).decode()}  # fmt: skip
        status, job = self.json("/api/refine", payload)
        if status != 200:
            return status, job
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.json(f"/api/jobs/{job['id']}")
            if job["state"] in ("done", "failed"):
                return status, job
            time.sleep(0.1)
        raise AssertionError(f"request not finished after {timeout} s: {job}")


@pytest.fixture(scope="module")
def server(expert_checkpoints, tmp_path_factory):
    """scripts/app.py on a free port of 127.0.0.1, network outside localhost refused; stopped after the module."""
    with start_server(expert_checkpoints, tmp_path_factory.mktemp("app")) as running:
        yield running


@contextmanager
def start_server(expert_checkpoints, root: Path, *flags: str) -> Iterator[Server]:
    """scripts/app.py (with ``flags``) on a free port of 127.0.0.1, network outside localhost refused, files under
    ``root``; terminated on exit unless it has already stopped."""
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = root / "net.log"
    path = os.pathsep.join([str(root / "site"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "NO_NET_LOG": str(net_log), "NO_PROXY": "*", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(APP), "--ckpt", str(expert_checkpoints[0]), "--ckpt", str(expert_checkpoints[1]),
           "--device", "cpu", "--port", "0", "--outdir", str(root / "out"), *flags]  # fmt: skip
    errors = open(root / "server.err", "w")  # a file, not a pipe: nothing the server logs can ever block it
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        lines: list[str] = []
        serving = threading.Event()

        def read_stdout() -> None:  # to the end: a full pipe would block the server
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("serving on http://127.0.0.1:"):
                    serving.set()

        reader = threading.Thread(target=read_stdout, daemon=True)
        reader.start()
        if not serving.wait(timeout=300):
            raise AssertionError(f"the server did not start: {''.join(lines)}{(root / 'server.err').read_text()}")
        url = next(line for line in lines if line.startswith("serving on")).split()[2].rstrip("/")
        running = Server(url, int(url.rsplit(":", 1)[1]), proc, root / "out", net_log)
        running.stdout = lines
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errors.close()


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* write them) with a socket listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as fh:
            for row in fh.readlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                    found.append(local.rsplit(":", 1)[0])
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the listening sockets from Linux's /proc/net/tcp")
def test_server_listens_on_127_0_0_1_only(server):
    assert listening_addresses(server.port) == ["0100007F"]  # 127.0.0.1, nothing on 0.0.0.0 or IPv6


def test_page_is_served_from_the_package_and_loads_nothing_from_elsewhere(server):
    status, headers, body = server.request("/")
    assert status == 200 and body == (STATIC / "index.html").read_bytes()
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    for name in ("app.js", "app.css"):
        status, _, served = server.request(f"/static/{name}")
        assert status == 200 and served == (STATIC / name).read_bytes()
    for path in STATIC.iterdir():  # no CDN, web font or analytics address anywhere in the page
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "@import" not in text and "url(" not in text, path
    status, info = server.json("/api/info")
    assert status == 200 and info["num_timesteps"] == 1000 and len(info["experts"]) == 2
    status, _, _ = server.request("/api/info", headers={"Host": "attacker.example"})
    assert status == 400  # DNS rebinding: only localhost names are served
    status, _, body = server.request("/api/refine", b"{}", "text/plain")
    assert status == 415 and b"application/json" in body  # a cross-site form post cannot reach the API


def test_upload_refine_download_then_errors_and_the_server_goes_on(server, images):
    image_png, mask_png = images["rgb"]
    status, body = server.upload(b"GIF89a but truncated", "broken.gif")
    assert status == 400 and "cannot load image broken.gif" in body["error"]
    status, up = server.upload(image_png, "astro.png")
    assert status == 200 and (up["width"], up["height"]) == (48, 40)
    status, job = server.refine(up["id"], {"start_t": 300, "steps": 50, "seed": 5}, mask_png)
    assert status == 200 and job["state"] == "done", job
    assert job["done_steps"] == job["total_steps"] > 0
    result = job["result"]
    assert result["windows"] == "steps 500-750 then 750-1000" and result["effective_start_t"] == 281
    assert result["seconds"] > 0 and "latesteps_750_1000.ckpt" in result["routing"]
    status, headers, png = server.request(result["samples"][0]["download_url"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert 'attachment; filename="astro_t300_s5.png"' in headers["Content-Disposition"]
    written = Path(result["outdir"]) / "astro_t300_s5.png"
    assert png == written.read_bytes() and Path(result["outdir"]).parent == server.outdir
    meta = read_png_metadata(written)
    assert meta["seed"] == "5" and meta["effective_start_t"] == "281" and meta["mask_sha256"]
    refined = np.asarray(Image.open(io.BytesIO(png)))
    source = np.asarray(Image.open(io.BytesIO(image_png)))
    keep = np.asarray(Image.open(io.BytesIO(mask_png))) == 0  # start 0 there: those pixels come back bit for bit
    assert np.array_equal(refined[keep], source[keep]) and not np.array_equal(refined, source)

    status, body = server.json("/api/refine", {"upload": up["id"], "settings": {"start_t": 300},
                                               "mask": base64.b64encode(png_bytes(np.zeros((40, 48), np.uint8))).decode()})
    assert status == 400 and "selects nothing" in body["error"]
    status, body = server.json("/api/refine", {"upload": up["id"], "settings": {"start_t": 300}, "mask": None})
    assert status == 400 and "nothing selected" in body["error"]
    status, body = server.json("/api/refine", {"upload": up["id"], "settings": {"start_t": 900}, "mask": None})
    assert status == 400 and body["error"] == "start t=900 is above the experts' range (max 499); move the slider down"
    status, body = server.json("/api/refine", {"upload": "nope", "settings": {}})
    assert status == 400 and "upload it again" in body["error"]
    status, body = server.json("/api/plan", {"start_t": 900})
    assert status == 200 and not body["ok"] and "above the experts' range (max 499)" in body["error"]

    status, job = server.refine(up["id"], {"start_t": 200, "steps": 2, "step_mode": "exact", "mode": "whole"}, None)
    assert status == 200 and job["state"] == "done" and job["result"]["windows"] == "steps 750-1000"
    assert server.proc.poll() is None
    assert server.net_log.read_text().splitlines() == ["loaded"]  # the guard was active and nothing went outside
    assert "Traceback" not in (server.outdir.parent / "server.err").read_text()  # every error above was a message


# -------------------------------------------------------------------------------------------------- a real browser
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
                  "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # fmt: skip
UPLOAD_MSG = "document.getElementById('upload-msg')"
RECT = "(r => [r.left, r.top, r.width, r.height])(document.getElementById('{}').getBoundingClientRect())"


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: it reads commands
    on fd 3 and writes replies and events on fd 4, each a JSON message ended by a NUL byte), attached to its page."""

    def __init__(self, profile: Path, width: int, height: int):
        command_read, self._command_write = os.pipe()
        self._reply_read, reply_write = os.pipe()

        def pipes_on_3_and_4():  # dup first: a pipe end may itself be fd 3 or 4
            command, reply = os.dup(command_read), os.dup(reply_write)
            os.dup2(command, 3)
            os.dup2(reply, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "--remote-debugging-pipe"],
            pass_fds=(3, 4), preexec_fn=pipes_on_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(command_read)
        os.close(reply_write)
        self._buffer, self._id, self.session, self.events = b"", 0, None, []
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})  # fmt: skip

    def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        """Run one command (on the page once attached); its result.  Events that arrive meanwhile go to ``events``."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._reply_read], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} in {timeout} s")
                chunk = os.read(self._reply_read, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"still false after {timeout} s: {expression}")

    def mouse(self, kind: str, x: float, y: float, pointer: str = "mouse") -> None:
        """A mouse (or, with ``pointer="pen"``, a pen) event at viewport ``(x, y)``, the left button down until released."""
        pressed = kind != "mouseReleased"
        self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1,
                                               "buttons": 1 if pressed else 0, "pointerType": pointer})  # fmt: skip

    def drag(self, points: list[tuple[float, float]], pointer: str = "mouse") -> None:
        """Press at the first point, move through the others, release at the last: by mouse, pen or touch."""
        if pointer == "touch":
            kinds = ["touchStart"] + ["touchMove"] * (len(points) - 1)
            for kind, (x, y) in zip(kinds, points):
                self.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
            self.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
            return
        self.mouse("mousePressed", *points[0], pointer=pointer)
        for x, y in points[1:]:
            self.mouse("mouseMoved", x, y, pointer=pointer)
        self.mouse("mouseReleased", *points[-1], pointer=pointer)

    def key(self, key: str, code: int) -> None:
        """Press and release a key (``key`` as the DOM names it, ``code`` its Windows virtual key code)."""
        for kind in ("rawKeyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code})

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._command_write)
        os.close(self._reply_read)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); browser check skipped")
def test_headless_chromium_uploads_paints_refines_and_compares(server, images, tmp_path):
    image_png, _ = images["rgb"]
    (tmp_path / "astro.png").write_bytes(image_png)
    (tmp_path / "broken.png").write_bytes(image_png[:300])
    browser = DevTools(tmp_path / "profile", 1280, 1000)
    try:
        browser.send("Page.navigate", {"url": server.url + "/"})
        browser.wait_for("document.body && document.body.dataset.ready === '1'")
        assert "t 0-249" in browser.js("document.getElementById('plan-label').textContent")  # t only; steps in the tooltip
        assert "steps 750-1000" in browser.js("document.getElementById('plan-label').title")
        file_input = browser.send("DOM.querySelector", {"nodeId": browser.send("DOM.getDocument")["root"]["nodeId"],
                                                        "selector": "#file"})["nodeId"]  # fmt: skip
        browser.send("DOM.setFileInputFiles", {"files": [str(tmp_path / "broken.png")], "nodeId": file_input})
        shown = browser.wait_for(f"(m => m.classList.contains('bad') && m.textContent)({UPLOAD_MSG})")
        assert "cannot load image broken.png" in shown and "truncated" in shown  # a bad upload says why
        browser.send("DOM.setFileInputFiles", {"files": [str(tmp_path / "astro.png")], "nodeId": file_input})
        assert "48×40" in browser.wait_for(f"(m => m.textContent.includes('×') && m.textContent)({UPLOAD_MSG})")

        # paint a stroke across the middle of the picture with the mouse, as a person would
        x, y, w, h = browser.js(RECT.format("view"))
        browser.mouse("mousePressed", x + 0.3 * w, y + 0.4 * h)
        for k in range(1, 11):
            browser.mouse("mouseMoved", x + (0.3 + 0.03 * k) * w, y + (0.4 + 0.01 * k) * h)
        browser.mouse("mouseReleased", x + 0.6 * w, y + 0.5 * h)
        browser.js("(s => { s.value = 400; s.dispatchEvent(new Event('input')); })(document.getElementById('start'))")
        browser.wait_for("document.getElementById('plan-label').textContent.includes('t=381')")
        bx, by, bw, bh = browser.js(RECT.format("refine"))
        browser.wait_for("!document.getElementById('refine').disabled")
        browser.mouse("mousePressed", bx + bw / 2, by + bh / 2)
        browser.mouse("mouseReleased", bx + bw / 2, by + bh / 2)
        assert browser.wait_for("document.body.dataset.results", timeout=120) == "1"
        assert browser.js("document.getElementById('progress').value") == 1
        summary = browser.js("document.getElementById('summary').textContent")
        assert "first step t=381," in summary and "t 250-499 then t 0-249" in summary and "step" not in summary.replace(
            "first step", "").replace("steps per sample", "")  # one numbering scheme; the others in the tooltip
        assert "step 619" in browser.js("document.getElementById('summary').title")
        assert "latesteps_500_750.ckpt" in browser.js("document.getElementById('routing').textContent")
        shot = tmp_path / "page.png"
        shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"]))
        job_id = browser.js("new URLSearchParams(location.search).get('job')")

        # the box tool: a drag becomes a line of the boxes field (image pixels), and the plan follows a box's start
        browser.js("document.querySelector('input[name=tool][value=box]').click()")
        browser.mouse("mousePressed", x + 0.25 * w, y + 0.25 * h)
        browser.mouse("mouseMoved", x + 0.5 * w, y + 0.6 * h)
        browser.mouse("mouseReleased", x + 0.75 * w, y + 0.75 * h)
        box = [int(v) for v in browser.js("document.getElementById('boxes').value").split(",")]
        assert all(abs(a - b) <= 1 for a, b in zip(box, [12, 10, 36, 30])), box
        browser.js("(b => { b.value += '@450'; b.dispatchEvent(new Event('input')); })(document.getElementById('boxes'))")
        browser.wait_for("document.getElementById('plan-label').textContent.includes('t=441')")
    finally:
        browser.close()

    # the request the page sent: the painted mask, and only the painted pixels changed
    _, job = server.json(f"/api/jobs/{job_id}")
    assert job["state"] == "done" and job["mask_url"] and job["settings"]["start_t"] == 400
    _, _, mask = server.request(job["mask_url"])
    _, _, out = server.request(job["result"]["samples"][0]["url"])
    painted = np.asarray(Image.open(io.BytesIO(mask)).convert("L"))
    refined, source = np.asarray(Image.open(io.BytesIO(out))), np.asarray(Image.open(io.BytesIO(image_png)))
    assert 0.05 < (painted > 0).mean() < 0.6
    assert np.array_equal(refined[painted == 0], source[painted == 0]) and not np.array_equal(refined, source)
    with Image.open(shot) as image:
        assert image.size == (1280, 1000) and np.asarray(image.convert("RGB")).std() > 10  # a rendered page
    asked = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
    network = [u for u in asked if u.split(":", 1)[0] in ("http", "https", "ws", "wss")]  # not chrome://, data:
    assert {server.url + "/static/app.js", server.url + "/api/info", server.url + "/api/refine"} <= set(network)
    assert all(u.startswith(server.url + "/") for u in network), network  # nothing from anywhere else


SPLIT = "Number(document.querySelector('.compare .divider').getAttribute('aria-valuenow'))"
LABELLED = """[...document.querySelectorAll('input, select, textarea, button, progress, canvas, [role=slider]')]
  .filter(el => !(el.getAttribute('aria-label') || [...(el.labels || [])].some(l => l.textContent.trim())
                  || (el.tagName === 'BUTTON' && el.textContent.trim())))
  .map(el => el.id || el.outerHTML.slice(0, 60))"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); browser check skipped")
def test_headless_chromium_drags_the_divider_by_mouse_pen_touch_and_keys(server, images, tmp_path):
    image_png, _ = images["rgb"]
    (tmp_path / "broken.png").write_bytes(image_png[:300])
    _, up = server.upload(image_png, "astro.png")
    _, job = server.refine(up["id"], {"mode": "whole", "start_t": 200, "steps": 2, "step_mode": "exact"}, None)
    assert job["state"] == "done", job
    browser = DevTools(tmp_path / "profile", 1280, 1000)
    try:
        # a fresh page: the start slider spans the two experts' windows (t < 500) and starts gently, in place
        browser.send("Page.navigate", {"url": server.url + "/"})
        browser.wait_for("document.body && document.body.dataset.ready === '1'")
        slider = browser.js("(s => [s.min, s.max, s.value])(document.getElementById('start'))")
        assert slider == ["1", "499", "125"] and browser.js("document.getElementById('mode').value") == "mask"
        label = browser.js("document.getElementById('start-label').textContent")
        assert "Start t" in label and "125" in label and "step" not in label and "strength" not in label, label
        assert "step 875 of 1000" in browser.js("document.getElementById('start-label').title")
        assert browser.js(LABELLED) == []  # every control has a label (the step-mode dropdown included)

        # a request's page (?job=): its results, each with a before/after comparison
        browser.send("Page.navigate", {"url": f"{server.url}/?job={job['id']}"})
        browser.wait_for("document.body && document.body.dataset.results === '1' "
                         "&& document.querySelector('.compare img.before').complete")
        browser.js("document.querySelector('.compare').scrollIntoView({block: 'center'})")
        x, y, w, h = browser.js("(r => [r.left, r.top, r.width, r.height])"
                                "(document.querySelector('.compare').getBoundingClientRect())")  # fmt: skip
        assert w > 50 and h > 40 and browser.js(SPLIT) == 50
        assert browser.js("[...document.querySelectorAll('.compare img')].every(i => i.draggable === false)")
        along = lambda a, b, n=8: [(x + w * (a + (b - a) * k / n), y + h / 2) for k in range(n + 1)]  # noqa: E731
        browser.drag(along(0.5, 0.15))  # press, several moves, release: the divider follows to the end
        assert abs(browser.js(SPLIT) - 15) < 1.5, browser.js(SPLIT)
        clip = browser.js("document.querySelector('.compare img.after').style.clipPath")
        assert clip == f"inset(0px 0px 0px {browser.js(SPLIT)}%)" or clip == f"inset(0 0 0 {browser.js(SPLIT)}%)", clip
        browser.mouse("mouseMoved", x + 0.9 * w, y + h / 2)  # the button is up: moving does nothing
        assert abs(browser.js(SPLIT) - 15) < 1.5
        browser.drag([*along(0.15, 0.8), (x + w + 200, y + h / 2)], pointer="pen")  # captured beyond the edge: 100 %
        assert browser.js(SPLIT) == 100
        browser.drag(along(0.9, 0.3), pointer="touch")
        assert abs(browser.js(SPLIT) - 30) < 1.5, browser.js(SPLIT)

        # the keyboard: the divider is a focusable slider; the arrows, Home and End move it
        assert browser.js("(d => [d.tabIndex, d.getAttribute('role'), d.getAttribute('aria-label') !== null])"
                          "(document.querySelector('.compare .divider'))") == [0, "slider", True]  # fmt: skip
        browser.js("document.querySelector('.compare .divider').focus()")
        start = browser.js(SPLIT)
        for _ in range(3):
            browser.key("ArrowLeft", 37)
        assert browser.js(SPLIT) == pytest.approx(start - 6, abs=0.11)
        browser.key("ArrowRight", 39)
        assert browser.js(SPLIT) == pytest.approx(start - 4, abs=0.11)
        browser.key("End", 35)
        assert browser.js(SPLIT) == 100
        browser.key("Home", 36)
        assert browser.js(SPLIT) == 0

        # a failed upload clears the canvas and forgets the previous image (Refine is off until a good upload)
        assert browser.js("!document.getElementById('canvas-wrap').classList.contains('empty')")
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        file_input = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#file"})["nodeId"]
        browser.send("DOM.setFileInputFiles", {"files": [str(tmp_path / "broken.png")], "nodeId": file_input})
        shown = browser.wait_for(f"(m => m.classList.contains('bad') && m.textContent)({UPLOAD_MSG})")
        assert "cannot load image broken.png" in shown
        assert browser.js("document.getElementById('canvas-wrap').classList.contains('empty')")
        assert not browser.js("(v => v.getContext('2d').getImageData(0, 0, v.width, v.height).data.some(b => b))"
                              "(document.getElementById('view'))")  # fmt: skip
        assert browser.js("document.getElementById('refine').disabled")
    finally:
        browser.close()
