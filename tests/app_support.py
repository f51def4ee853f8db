"""Helpers shared by the web app's tests (tests/test_app_*.py) and docs/make_screenshot.py: test images, the app
served by scripts/app.py in a subprocess (every non-loopback network access refused), and headless Chromium driven
over the DevTools protocol.  No pytest here: the screenshot script imports it too."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "scripts" / "app.py"
STATIC = REPO / "ldm" / "app" / "static"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "no chromium on PATH (Debian: apt-get install chromium); browser check skipped"
JOB_ID = re.compile(r"^\d{8}-\d{6}-[A-Za-z0-9_-]{16}$")  # a request's id: its date, time and 16 random characters
# words of the CLI (flags, API names) that a message shown on the page must not use: the page has none of them
CLI_WORDS = re.compile(r"--[a-z]|=True|=False|allow_outside|_steps|n_samples|start_t=|mask_blur|mask_dilate|"
                       r"region_padding|step_mode|crop_regions|batch|T-1")  # fmt: skip

# Refuse every connection, name lookup and bind outside the loopback range; log attempts to $NO_NET_LOG.
SITECUSTOMIZE = """
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
"""


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def big_png(width: int, height: int) -> bytes:
    """A valid grayscale PNG of ``width`` x ``height`` black pixels, a few hundred KB whatever its pixel count
    (compressed row by row: the test never holds the pixels)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + the row
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def small_image() -> bytes:
    rng = np.random.default_rng(0)
    return png_bytes(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def dotted_mask(width: int = 48, height: int = 40, every: int = 3) -> bytes:
    mask = np.zeros((height, width), np.uint8)
    mask[::every, ::every] = 255  # one separate region per dot
    return png_bytes(mask)


# ----------------------------------------------------------------------------------------- the server, over HTTP
class Server:
    """A running scripts/app.py: its address, process, output folder and logs, and small HTTP clients for its API."""

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


@contextmanager
def start_server(checkpoints, root: Path, *flags: str, timeout: float = 300.0, outdir: str | None = None) -> Iterator[Server]:
    """scripts/app.py serving ``checkpoints`` (paths, or ``["demo"]``) with ``flags`` on a free port of 127.0.0.1,
    network outside localhost refused, run in ``root`` with ``--outdir outdir`` (default ``root/out``; a relative one is
    relative to ``root``); terminated on exit unless it has already stopped."""
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = root / "net.log"
    path = os.pathsep.join([str(root / "site"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "NO_NET_LOG": str(net_log), "NO_PROXY": "*", "PYTHONUNBUFFERED": "1"}
    ckpts = [word for path in checkpoints for word in ("--ckpt", str(path))]
    cmd = [sys.executable, str(APP), *ckpts, "--device", "cpu", "--port", "0", "--outdir", outdir or str(root / "out"), *flags]
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
        if not serving.wait(timeout=timeout):
            raise AssertionError(f"the server did not start: {''.join(lines)}{(root / 'server.err').read_text()}")
        url = next(line for line in lines if line.startswith("serving on")).split()[2].rstrip("/")
        running = Server(url, int(url.rsplit(":", 1)[1]), proc, root / (outdir or "out"), net_log)
        running.err = root / "server.err"
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


def wait_for(server: Server, job_id: str, condition, timeout: float = 60.0) -> dict:
    """Poll request ``job_id`` until ``condition(job)`` holds; the job's JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, job = server.json(f"/api/jobs/{job_id}")
        if condition(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"request {job_id} never got there: {job}")


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
