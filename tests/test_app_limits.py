"""The web app's bounds (issue 25): upload pixels and decodes, request size and parsing off the event loop, work per
request, cancel, random ids, Ctrl+C during a job, and requests that used to give HTTP 500.  And the page's limits and
words (issue 27): the start slider's range and default from the experts' windows, messages without the CLI's flags,
labels on every control, Ctrl+C on an idle server, ``--ckpt demo``.

Handler and queue checks run in-process; the HTTP checks share one server (scripts/app.py -v) started like
tests/test_app.py's; the Ctrl+C check starts one of its own, since it stops it.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import threading
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the web app needs the app extra: pip install -e .[app]")
pytest.importorskip("uvicorn", reason="the web app needs the app extra: pip install -e .[app]")

from test_app import REPO, STATIC, Server, png_bytes, start_server  # noqa: E402  (after the skips)

import ldm.app.handlers as handlers  # noqa: E402
from ldm.app.handlers import (  # noqa: E402
    MAX_BOXES,
    MAX_PARALLEL_DECODES,
    MAX_REQUEST_STEPS,
    RefineSettings,
    RequestError,
    describe_plan,
    load_painted_mask,
    load_upload,
    prepare,
)
from ldm.app.jobs import JobQueue  # noqa: E402
from ldm.app.page import FIELD_LABELS, page_words, start_range, window_message  # noqa: E402

JOB_ID = re.compile(r"^\d{8}-\d{6}-[A-Za-z0-9_-]{16}$")


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


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    from ldm.refine import Refiner

    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


# ------------------------------------------------------------------------------------------------ handlers, queue
def test_an_81_mp_upload_is_refused_from_its_header_and_uploads_keep_no_decoded_pixels(monkeypatch):
    bomb = big_png(9000, 9000)
    assert len(bomb) < 400_000  # a small file of 81 MP: the 1.3 GB float32 case of issue 25

    def no_decode(*_args, **_kwargs):
        raise AssertionError("decoded an image its header already refuses")

    with monkeypatch.context() as patched:
        patched.setattr(handlers, "decode_image", no_decode)
        patched.setattr(handlers, "decode_mask", no_decode)
        started = time.perf_counter()
        with pytest.raises(RequestError) as info:
            load_upload(bomb, "huge.png")
        assert time.perf_counter() - started < 2.0
        message = str(info.value)
        assert "huge.png is 9000x9000 (81.0 MP)" in message and "up to 33,554,432 pixels" in message
        assert "downscale" in message and "\n" not in message
    upload = load_upload(small_image(), "photo.png")
    kept = [name for name, value in vars(upload).items() if isinstance(value, np.ndarray)]
    assert kept == [] and (upload.width, upload.height, upload.has_alpha) == (48, 40, False)
    assert upload.data == small_image() and upload.png.startswith(b"\x89PNG")
    assert upload.decode().rgb.shape == (40, 48, 3)  # decoded again only when a request runs
    with monkeypatch.context() as patched:  # a 9000x9000 painted mask for a 48x40 image: refused from its header
        patched.setattr(handlers, "decode_mask", no_decode)
        with pytest.raises(RequestError, match="the painted mask is 9000x9000 but the image is 48x40"):
            load_painted_mask(bomb, upload)


def test_at_most_max_parallel_decodes_run_at_once(monkeypatch):
    real, running, peak, lock = handlers.decode_image, [0], [0], threading.Lock()

    def slow_decode(data, source="<bytes>"):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        try:
            return real(data, source=source)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(handlers, "decode_image", slow_decode)
    image = small_image()
    threads = [threading.Thread(target=load_upload, args=(image, f"{k}.png")) for k in range(3 * MAX_PARALLEL_DECODES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert peak[0] == MAX_PARALLEL_DECODES


def test_settings_that_used_to_fail_late_are_one_line_400s():
    from ldm.refine.refiner import MAX_SEED

    with pytest.raises(RequestError, match=r"the last seed \(Seed \+ Samples - 1\) must be at most 9223372036854775807"):
        RefineSettings.from_json({"seed": MAX_SEED, "n_samples": 3})  # wrote sample 0, then failed
    assert RefineSettings.from_json({"seed": MAX_SEED - 2, "n_samples": 3}).seed == MAX_SEED - 2
    with pytest.raises(RequestError) as info:
        RefineSettings.from_json({"seed": 10**4000})
    assert len(str(info.value)) < 120 and "an integer of about 4001 digits" in str(info.value)
    boxes = "\n".join(["0,0,4,4"] * (MAX_BOXES + 1))
    with pytest.raises(RequestError, match=f"{MAX_BOXES + 1} boxes given; at most {MAX_BOXES} are accepted"):
        RefineSettings.from_json({"boxes": boxes})
    assert len(RefineSettings.from_json({"boxes": "\n".join(["0,0,4,4"] * MAX_BOXES)}).boxes) == MAX_BOXES


def test_a_request_above_the_work_bound_is_refused_before_it_is_queued(refiner):
    upload = load_upload(small_image(), "photo.png")
    mask = load_painted_mask(dotted_mask(), upload)  # 16 x 14 dots: 224 regions
    crop = RefineSettings.from_json({"mode": "crop", "n_samples": 8, "start_t": 400, "steps": 20, "step_mode": "exact"})
    started = time.perf_counter()
    with pytest.raises(RequestError) as info:
        prepare(refiner, upload, crop, mask)
    message = str(info.value)
    assert "would run 35,840 sampling steps (224 regions x 20 steps x 8 sample(s))" in message, message
    assert f"at most {MAX_REQUEST_STEPS:,} are allowed" in message and "fewer regions" in message
    assert time.perf_counter() - started < 5.0
    whole = RefineSettings.from_json({"mode": "whole", "n_samples": 8, "start_t": 400, "steps": 400, "step_mode": "exact"})
    assert prepare(refiner, upload, whole, None).total_steps == 3200  # what fits is queued as before
    in_place = prepare(refiner, upload, RefineSettings.from_json({"start_t": 400, "steps": 20, "step_mode": "exact"}), mask)
    assert in_place.total_steps == 20  # in place, the regions run together


def test_cancel_and_stop_end_a_job_between_steps_and_ids_are_random(refiner):
    upload = load_upload(small_image(), "photo.png")
    prepared = prepare(refiner, upload, RefineSettings(mode="whole", start_t=100, steps=2, step_mode="exact"), None)
    started = threading.Event()

    def run(job):
        started.set()
        while True:  # a job of endless steps: only a cancel ends it
            time.sleep(0.01)
            JobQueue.step(job)

    jobs = JobQueue(run)
    first, second, third = (jobs.submit(prepared, "key", b"png", None) for _ in range(3))
    assert all(JOB_ID.match(j.id) for j in (first, second, third)) and len({j.id[-16:] for j in (first, second)}) == 2
    jobs.start()
    assert started.wait(10)
    assert jobs.cancel(second) and second.state == "cancelled" and second.message == "cancelled before it ran"
    assert jobs.cancel(first) and jobs.status(first)["cancelling"]
    deadline = time.monotonic() + 10
    while first.state == "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.state == "cancelled" and re.fullmatch(r"cancelled after \d+ of 2 steps", first.message)
    assert not jobs.cancel(first)  # finished: nothing to cancel
    while third.state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs.stop(timeout=10)  # the worker ended: the running job stopped after its step
    assert third.state == "cancelled" and third.message.startswith("the server stopped during this request")
    assert all(j.prepared is None for j in (first, second, third))


# ----------------------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def server(expert_checkpoints, tmp_path_factory):
    with start_server(expert_checkpoints, tmp_path_factory.mktemp("app_limits"), "-v") as running:
        yield running


def delete(server: Server, path: str):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(server.url + path, method="DELETE")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(server: Server, job_id: str, condition, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, job = server.json(f"/api/jobs/{job_id}")
        if condition(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"request {job_id} never got there: {job}")


def declared_only(server: Server, path: str, length: int) -> tuple[int, dict]:
    """Send a JSON request's headers declaring ``length`` body bytes, and none of the body: the status and the JSON
    the server answers (it must refuse without waiting for the body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_large_or_odd_json_is_a_one_line_400_or_413_and_never_holds_the_server(server):
    status, up = server.upload(small_image(), "photo.png")
    assert status == 200
    status, body = declared_only(server, "/api/refine", 8_600_000)  # issue 25: 1,000,000 boxes in 8.6 MB
    assert status == 413 and body["error"] == "the request is larger than 4 MiB, the most this server accepts here"
    # just under the limit: parsed in a thread while other requests are answered
    payload = json.dumps({"upload": up["id"], "settings": {"boxes": "0,0,1,1\n" * 440_000}}).encode()
    latencies, answers, sent = [], [], threading.Event()

    def big_requests() -> None:
        try:
            for _ in range(3):
                answers.append(server.request("/api/refine", payload, "application/json"))
        finally:
            sent.set()

    thread = threading.Thread(target=big_requests)
    thread.start()
    while not sent.is_set():
        started = time.perf_counter()
        assert server.request("/api/info")[0] == 200
        latencies.append(time.perf_counter() - started)
    thread.join()
    assert [a[0] for a in answers] == [400] * 3 and b"440,000 boxes given; at most 100" in answers[0][2]
    assert max(latencies) < 1.0, latencies

    cases = [
        ("/api/refine", {"upload": up["id"], "settings": {"boxes": "0,0,1,1\n" * 100_000}}, 400, "at most 100 are accepted"),
        ("/api/refine", '{"upload": "x", "settings": {"seed": ' + "7" * 5000 + "}}", 400, "more than 4300 digits"),
        ("/api/refine", "[" * 100_000 + "]" * 100_000, 400, "nested too deeply"),
        ("/api/plan", "[" * 30_000 + "]" * 30_000, 400, "nested too deeply"),
        ("/api/plan", {"boxes": "0,0,1,1\n" * 10_000}, 413, "larger than 64 KiB"),
        ("/api/refine", {"upload": up["id"], "settings": {"seed": 2**63 - 1, "n_samples": 3}}, 400, "lower the seed"),
        ("/api/refine", b"\xff\xfe", 400, "not valid JSON"),
    ]  # fmt: skip
    for path, body, expected_status, expected in cases:
        data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        status, _, answer = server.request(path, data, "application/json")
        error = json.loads(answer)["error"]
        assert status == expected_status and expected in error and "\n" not in error and len(error) < 300, (path, error)

    boxed = "\n".join(f"{k % 40},{k % 30},{k % 40 + 8},{k % 30 + 8}" for k in range(MAX_BOXES))
    status, job = server.refine(up["id"], {"start_t": 200, "steps": 2, "step_mode": "exact", "boxes": boxed}, None)
    assert status == 200 and job["state"] == "done", job
    _, _, polled = server.request(f"/api/jobs/{job['id']}")
    assert len(polled) < 16_384  # a status poll stays small
    assert "Traceback" not in server.err.read_text() and "ERROR" not in server.err.read_text()


def test_every_response_says_nosniff(server):
    status, up = server.upload(small_image(), "photo.png")
    for path, data, content_type, headers in [
        ("/", None, None, None), ("/static/app.js", None, None, None), ("/api/info", None, None, None),
        (f"/api/uploads/{up['id']}/image.png", None, None, None), ("/api/nothing", None, None, None),
        ("/api/refine", b"{}", "text/plain", None), ("/api/plan", b"x" * 70_000, "application/json", None),
        ("/api/refine", b"{", "application/json", None), ("/api/info", None, None, {"Host": "attacker.example"}),
    ]:  # fmt: skip
        status, got, _ = server.request(path, data, content_type, headers)
        assert got.get("X-Content-Type-Options") == "nosniff", (path, status)


def test_cancel_over_http_and_job_ids_cannot_be_guessed(server):
    status, up = server.upload(small_image(), "photo.png")
    long = {"mode": "whole", "start_t": 400, "steps": 400, "step_mode": "exact", "n_samples": 8}  # 3200 steps
    _, running = server.json("/api/refine", {"upload": up["id"], "settings": long})
    _, waiting = server.json("/api/refine", {"upload": up["id"], "settings": long})
    assert JOB_ID.match(running["id"]) and JOB_ID.match(waiting["id"]) and running["id"][:-16] <= waiting["id"][:-16]
    guessed = running["id"][:-1] + ("A" if running["id"][-1] != "A" else "B")
    assert server.request(f"/api/jobs/{guessed}")[0] == 404
    wait_for(server, running["id"], lambda j: j["state"] == "running" and j["done_steps"] > 0)

    status, body = delete(server, f"/api/jobs/{waiting['id']}")
    assert status == 200 and body["state"] == "cancelled" and body["message"] == "cancelled before it ran"
    status, body = delete(server, f"/api/jobs/{running['id']}")
    assert status == 200 and body["state"] in ("running", "cancelled")
    job = wait_for(server, running["id"], lambda j: j["state"] != "running", timeout=20)
    assert job["state"] == "cancelled" and job["done_steps"] < job["total_steps"] == 3200, job
    assert re.fullmatch(r"cancelled after \d+ of 3200 steps", job["message"])
    status, body = delete(server, f"/api/jobs/{running['id']}")
    assert status == 409 and "already finished (cancelled)" in body["error"]
    assert delete(server, f"/api/jobs/{guessed}")[0] == 404
    status, job = server.refine(up["id"], {"mode": "whole", "start_t": 200, "steps": 2, "step_mode": "exact"}, None)
    assert status == 200 and job["state"] == "done"  # the worker goes on
    page = (Path(__file__).resolve().parents[1] / "ldm" / "app" / "static").joinpath
    assert 'id="cancel"' in page("index.html").read_text() and 'method: "DELETE"' in page("app.js").read_text()


def test_a_client_that_disconnects_mid_upload_is_one_info_line(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /api/upload?name=x.png HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n" + bytes(1000))  # fmt: skip
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while "disconnected" not in server.err.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.err.read_text()
    lines = [line for line in log.splitlines() if "disconnected" in line]
    assert len(lines) == 1 and "INFO" in lines[0] and "POST /api/upload" in lines[0], log
    assert "Traceback" not in log and "ERROR" not in log
    assert server.request("/api/info")[0] == 200


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


def test_a_running_request_that_will_not_finish_its_step_is_abandoned_at_shutdown(refiner):
    """Ctrl+C while one sampling step takes minutes (a large image on a CPU): the server leaves after SHUTDOWN_WAIT_S
    through ``abandon(0)`` instead of waiting for ever (it had to be SIGKILLed)."""
    from ldm.app.server import stop_worker

    upload = load_upload(small_image(), "photo.png")
    prepared = prepare(refiner, upload, RefineSettings(mode="whole", start_t=100, steps=2, step_mode="exact"), None)
    running, release = threading.Event(), threading.Event()

    def run(job):  # one endless step: never reaches a point where a cancel is seen
        running.set()
        release.wait(30)

    jobs = JobQueue(run)
    jobs.submit(prepared, "key", b"png", None)
    jobs.start()
    assert running.wait(10)
    exits: list[int] = []
    started = time.monotonic()
    stop_worker(jobs, 0.2, abandon=exits.append)
    assert exits == [0] and time.monotonic() - started < 5
    release.set()
    stop_worker(jobs, 10, abandon=exits.append)  # a worker that ends in time: no abandon
    assert exits == [0]


def test_a_full_queue_is_refused_with_503_before_the_request_is_prepared(refiner, tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    import ldm.app.server as server_module

    app = server_module.create_app(refiner, tmp_path)  # no lifespan: the worker never starts, requests stay queued
    client = TestClient(app, base_url="http://127.0.0.1")
    up = client.post("/api/upload?name=photo.png", content=small_image(),
                     headers={"Content-Type": "application/octet-stream"}).json()
    prepared = []
    real_prepare = server_module.prepare
    monkeypatch.setattr(server_module, "prepare", lambda *a: prepared.append(1) or real_prepare(*a))
    settings = {"mode": "whole", "start_t": 100, "steps": 2, "step_mode": "exact"}
    statuses = [client.post("/api/refine", json={"upload": up["id"], "settings": settings}).status_code
                for _ in range(17)]
    assert statuses == [200] * 16 + [503] and len(prepared) == 16  # the 17th was never prepared
    assert "16 requests are already waiting" in client.post(
        "/api/refine", json={"upload": up["id"], "settings": settings}).json()["error"]


def test_an_upload_body_that_stalls_is_refused_with_408(monkeypatch):
    import asyncio

    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    import ldm.app.server as server_module

    monkeypatch.setattr(server_module, "BODY_IDLE_TIMEOUT_S", 0.2)
    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b"x" * 100, "more_body": True}
        await asyncio.sleep(60)  # the client stops sending

    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/api/upload"}, receive)
    with pytest.raises(HTTPException) as caught:
        asyncio.run(server_module._read_body(request, 1000, "the upload"))
    assert caught.value.status_code == 408 and "stalled" in caught.value.detail


# --------------------------------------------------------------------------------- the page's limits and words
def fake_refiner(*windows: tuple[int, int], allow: bool = False, total: int = 1000) -> SimpleNamespace:
    experts = [SimpleNamespace(window=(lo, hi), name=f"e{lo}_{hi}.ckpt") for lo, hi in windows]
    return SimpleNamespace(num_timesteps=total, experts=experts, router=SimpleNamespace(allow_outside_window=allow))


@pytest.mark.parametrize(
    "windows, allow, expected",
    [
        (((250, 500), (0, 250)), False, (1, 499, 125, True)),  # the quick start's experts: t < 500, details' middle
        (((0, 1000),), False, (1, 999, 250, True)),  # one full-range model: at most a quarter of the noise redone
        (((0, 250), (300, 500)), False, (1, 249, 125, True)),  # a gap: above it, the steps at 250-299 are nobody's
        (((0, 40),), False, (1, 39, 20, True)),
        (((250, 500),), False, (1, 499, 250, False)),  # the last steps are nobody's: no start runs (the label says so)
        (((250, 500), (0, 250)), True, (1, 999, 125, True)),  # --allow-outside-window: the nearest expert runs
    ],
)  # fmt: skip
def test_start_slider_range_and_default_come_from_the_windows(windows, allow, expected):
    rng = start_range(fake_refiner(*windows, allow=allow))
    assert (rng.low, rng.high, rng.default, rng.covered) == expected
    assert rng.low <= rng.default <= rng.high


def test_api_info_gives_the_page_the_windows_and_the_slider(server):
    status, info = server.json("/api/info")
    assert status == 200 and info["start"] == {"min": 1, "max": 499, "default": 125, "covered": True, "num_timesteps": 1000}
    assert [(w["t_min"], w["t_max"], w["steps"], w["text"]) for w in info["windows"]] == [
        (0, 250, [750, 1000], "t 0-249"), (250, 500, [500, 750], "t 250-499")]  # fmt: skip
    assert info["windows"][0]["name"] == "latesteps_750_1000.ckpt"
    assert info["defaults"]["start_t"] == 125 and info["defaults"]["mode"] == "mask"  # gentle, in place
    status, plan = server.json("/api/plan", {})  # a setting left out takes the page's default, not the CLI's 500
    assert status == 200 and plan["ok"] and plan["start_t"] == 125
    for start, ok in [(499, True), (500, False), (1, True)]:  # counted exactly, the first step is the start itself
        status, plan = server.json("/api/plan", {"start_t": start, "steps": 1, "step_mode": "exact"})
        assert status == 200 and plan["ok"] is ok, plan
    assert plan["t_windows"] == "t 0-249"


CLI_WORDS = re.compile(r"--[a-z]|=True|=False|allow_outside|_steps|n_samples|start_t=|mask_blur|mask_dilate|"
                       r"region_padding|step_mode|crop_regions|batch|T-1")  # fmt: skip


def test_every_message_the_page_can_get_speaks_its_words(refiner):
    upload = load_upload(small_image(), "photo.png")
    mask = load_painted_mask(dotted_mask(every=4), upload)
    many = load_painted_mask(dotted_mask(every=2), upload)  # 480 separate regions: more than crop mode refines
    empty = load_painted_mask(png_bytes(np.zeros((40, 48), np.uint8)), upload)
    messages = {}
    for name, (lo, hi) in {"start_t": (1, 999), "steps": (1, 1000), "n_samples": (1, 8), "mask_blur": (0, 256),
                           "mask_dilate": (0, 256), "region_padding": (0, 4096), "seed": (0, 2**63 - 1)}.items():  # fmt: skip
        for bad in (lo - 1, hi + 1, "", 1.5):
            messages[f"{name}={bad!r}"] = error_of(RefineSettings.from_json, {name: bad})
    for name in ("sampler", "step_mode", "mode"):
        messages[name] = error_of(RefineSettings.from_json, {name: "nope"})
    messages["seeds"] = error_of(RefineSettings.from_json, {"seed": 2**63 - 1, "n_samples": 2})
    for box in ("1,2,3", "5,5,2,2", "0,0,4,4@0", "0,0,60,10"):
        messages[box] = error_of(prepare_json, refiner, upload, {"boxes": box, "start_t": 100}, None)
    cases = {
        "start above": ({"start_t": 700}, mask), "box above": ({"start_t": 100, "boxes": "0,0,4,4@600"}, None),
        "exact > start": ({"start_t": 40, "steps": 60, "step_mode": "exact"}, mask), "empty mask": ({}, empty),
        "nothing": ({}, None), "crop regions": ({"mode": "crop", "start_t": 100}, many),
        "work": ({"n_samples": 8, "start_t": 400, "steps": 400, "step_mode": "exact", "mode": "crop"}, mask),
    }  # fmt: skip
    for name, (page, painted) in cases.items():
        messages[name] = error_of(prepare_json, refiner, upload, page, painted)
        plan = describe_plan(refiner, RefineSettings.from_json(page))
        if not plan["ok"]:
            assert plan["error"] == messages[name]  # the live label says what Refine would say
    assert messages["start above"] == "start t=700 is above the experts' range (max 499); move the slider down"
    assert messages["box above"].startswith("box 0,0,4,4@600 starts at t=600, above the experts' range (max 499)")
    assert messages["exact > start"].startswith("Steps 60: counted exactly from start t=40, at most 40 steps fit")
    assert messages["n_samples=9"] == "Samples must be a whole number from 1 to 8, not 9"
    assert "Mask dilate, under 'more'" in messages["crop regions"] and "(Mode: in place)" in messages["crop regions"]
    assert messages["empty mask"].endswith("paint over the region to refine")
    assert "leave out @start_t to use the slider's start" in messages["0,0,4,4@0"]
    for name, message in messages.items():
        assert message and "\n" not in message and not CLI_WORDS.search(message), (name, message)


def prepare_json(refiner, upload, page: dict, mask):
    return prepare(refiner, upload, RefineSettings.from_json(page), mask)


def error_of(function, *args) -> str:
    with pytest.raises(RequestError) as info:
        function(*args)
    return str(info.value)


def test_page_words_rewrites_the_refiner_s_cli_hints():
    from ldm.windows import assign_windows

    with pytest.raises(ValueError) as info:
        assign_windows([(0, 250), (250, 500)], [700, 300, 100], 1000)
    assert "--allow-outside-window" in str(info.value)  # the CLI's message names flags the page does not have ...
    assert not CLI_WORDS.search(page_words(str(info.value)))  # ... and an aside that still names one is dropped
    rng = start_range(fake_refiner((0, 250), (250, 500)))
    assert window_message(rng, 700, [], str(info.value)) == ("start t=700 is above the experts' range (max 499); move "
                                                             "the slider down")  # fmt: skip
    overlap = window_message(rng, 300, [], "... covered by more than one expert window ...")
    assert "do not overlap" in overlap and not CLI_WORDS.search(overlap)
    uncovered = window_message(start_range(fake_refiner((250, 500))), 100, [], "outside every expert window")
    assert "t 0-249" in uncovered and "no start can run" in uncovered


def test_a_job_out_of_device_memory_says_so_in_the_page_s_words(refiner):
    import torch

    upload = load_upload(small_image(), "photo.png")
    prepared = prepare(refiner, upload, RefineSettings(mode="whole", start_t=100, steps=2, step_mode="exact"), None)

    def run(_job):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB ... "
                                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")

    jobs = JobQueue(run)
    job = jobs.submit(prepared, "key", b"png", None)
    jobs.start()
    deadline = time.monotonic() + 30
    while job.state in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.01)
    jobs.stop(timeout=5)
    assert job.state == "failed" and job.message.startswith("the device ran out of memory refining this image")
    assert not CLI_WORDS.search(job.message)


class _Labels(HTMLParser):
    """The page's controls and its labels' ``for`` targets (labels may also wrap their control)."""

    CONTROLS = ("input", "select", "textarea", "progress", "canvas", "button")

    def __init__(self):
        super().__init__()
        self.controls, self.targets, self.texts, self._label = [], set(), {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "label":
            self._label = attrs.get("for")
            self.targets.add(self._label)
            self.texts[self._label] = ""
        elif tag in self.CONTROLS:
            self.controls.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag == "label":
            self._label = None

    def handle_data(self, data):
        if self._label is not None:
            self.texts[self._label] += data


def test_every_control_of_the_page_has_a_label():
    parser = _Labels()
    parser.feed((STATIC / "index.html").read_text())
    unlabelled = [(tag, a.get("id")) for tag, a in parser.controls
                  if tag != "button" and not a.get("aria-label") and a.get("id") not in parser.targets]  # fmt: skip
    assert unlabelled == [] and any(a.get("id") == "step-mode" for _, a in parser.controls)
    assert all(parser.texts[t].strip() for t in parser.targets)
    ids = {"start": "start_t", "steps": "steps", "seed": "seed", "n-samples": "n_samples", "mode": "mode",
           "sampler": "sampler", "boxes": "boxes", "mask-blur": "mask_blur", "mask-dilate": "mask_dilate",
           "region-padding": "region_padding"}  # fmt: skip
    for control, field in ids.items():  # a message names a field as the page labels it
        assert parser.texts[control].strip().startswith(FIELD_LABELS[field]), (control, parser.texts[control])
    assert "step" not in parser.texts["start"] and "strength" not in parser.texts["start"]  # one numbering scheme


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
    import importlib.util

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
