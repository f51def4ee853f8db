"""ldm/app/server.py: the HTTP API as scripts/app.py serves it (one server for the session, tests/conftest.py's
``app_server``: 127.0.0.1 only, network outside localhost refused): the page from the package and nothing from
elsewhere, upload -> refine -> download, errors as one-line 4xx while the server goes on, body and request bounds,
cancel, nosniff, /api/info's windows and slider; and in-process: a full queue, a stalled upload, shutdown while a
step will not finish."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from ldm.imageio import read_png_metadata

from app_support import JOB_ID, STATIC, Server, listening_addresses, png_bytes, small_image, wait_for

pytest.importorskip("starlette", reason="the web app needs the app extra: pip install -e .[app]")
pytest.importorskip("uvicorn", reason="the web app needs the app extra: pip install -e .[app]")

from ldm.app.handlers import MAX_BOXES, RefineSettings, load_upload, prepare  # noqa: E402  (after the skips)
from ldm.app.jobs import JobQueue  # noqa: E402


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the listening sockets from Linux's /proc/net/tcp")
def test_server_listens_on_127_0_0_1_only(app_server):
    assert listening_addresses(app_server.port) == ["0100007F"]  # 127.0.0.1, nothing on 0.0.0.0 or IPv6


def test_page_is_served_from_the_package_and_loads_nothing_from_elsewhere(app_server):
    status, headers, body = app_server.request("/")
    assert status == 200 and body == (STATIC / "index.html").read_bytes()
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    for name in ("app.js", "app.css"):
        status, _, served = app_server.request(f"/static/{name}")
        assert status == 200 and served == (STATIC / name).read_bytes()
    for path in STATIC.iterdir():  # no CDN, web font or analytics address anywhere in the page
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "@import" not in text and "url(" not in text, path
    status, info = app_server.json("/api/info")
    assert status == 200 and info["num_timesteps"] == 1000 and len(info["experts"]) == 2
    status, _, _ = app_server.request("/api/info", headers={"Host": "attacker.example"})
    assert status == 400  # DNS rebinding: only localhost names are served
    status, _, body = app_server.request("/api/refine", b"{}", "text/plain")
    assert status == 415 and b"application/json" in body  # a cross-site form post cannot reach the API


def test_upload_refine_download_then_errors_and_the_server_goes_on(app_server, app_images):
    image_png, mask_png = app_images["rgb"]
    status, body = app_server.upload(b"GIF89a but truncated", "broken.gif")
    assert status == 400 and "cannot load image broken.gif" in body["error"]
    status, up = app_server.upload(image_png, "astro.png")
    assert status == 200 and (up["width"], up["height"]) == (48, 40)
    status, job = app_server.refine(up["id"], {"start_t": 300, "steps": 50, "seed": 5}, mask_png)
    assert status == 200 and job["state"] == "done", job
    assert job["done_steps"] == job["total_steps"] > 0
    result = job["result"]
    assert result["windows"] == "steps 500-750 then 750-1000" and result["effective_start_t"] == 281
    assert result["seconds"] > 0 and "latesteps_750_1000.ckpt" in result["routing"]
    status, headers, png = app_server.request(result["samples"][0]["download_url"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert 'attachment; filename="astro_t300_s5.png"' in headers["Content-Disposition"]
    written = Path(result["outdir"]) / "astro_t300_s5.png"
    assert png == written.read_bytes() and Path(result["outdir"]).parent == app_server.outdir
    meta = read_png_metadata(written)
    assert meta["seed"] == "5" and meta["effective_start_t"] == "281" and meta["mask_sha256"]
    refined = np.asarray(Image.open(io.BytesIO(png)))
    source = np.asarray(Image.open(io.BytesIO(image_png)))
    keep = np.asarray(Image.open(io.BytesIO(mask_png))) == 0  # start 0 there: those pixels come back bit for bit
    assert np.array_equal(refined[keep], source[keep]) and not np.array_equal(refined, source)

    status, body = app_server.json(
        "/api/refine",
        {
            "upload": up["id"],
            "settings": {"start_t": 300},
            "mask": base64.b64encode(png_bytes(np.zeros((40, 48), np.uint8))).decode(),
        },
    )
    assert status == 400 and "selects nothing" in body["error"]
    status, body = app_server.json("/api/refine", {"upload": up["id"], "settings": {"start_t": 300}, "mask": None})
    assert status == 400 and "nothing selected" in body["error"]
    status, body = app_server.json("/api/refine", {"upload": up["id"], "settings": {"start_t": 900}, "mask": None})
    assert status == 400 and body["error"] == "start t=900 is above the experts' range (max 499); move the slider down"
    status, body = app_server.json("/api/refine", {"upload": "nope", "settings": {}})
    assert status == 400 and body["error"] == '"upload" \'nope\' is not an upload id; send the "id" that /api/upload returned'
    status, body = app_server.json("/api/plan", {"start_t": 900})
    assert status == 200 and not body["ok"] and "above the experts' range (max 499)" in body["error"]

    status, job = app_server.refine(up["id"], {"start_t": 200, "steps": 2, "step_mode": "exact", "mode": "whole"}, None)
    assert status == 200 and job["state"] == "done" and job["result"]["windows"] == "steps 750-1000"
    assert app_server.proc.poll() is None
    assert app_server.net_log.read_text().splitlines() == ["loaded"]  # the guard was active and nothing went outside
    assert "Traceback" not in (app_server.outdir.parent / "server.err").read_text()  # every error above was a message


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


def test_large_or_odd_json_is_a_one_line_400_or_413_and_never_holds_the_server(app_server):
    status, up = app_server.upload(small_image(), "photo.png")
    assert status == 200
    status, body = declared_only(app_server, "/api/refine", 8_600_000)  # 1,000,000 boxes take 8.6 MB
    assert status == 413 and body["error"] == "the request is larger than 4 MiB, the most this server accepts here"
    # just under the limit: parsed in a thread while other requests are answered
    payload = json.dumps({"upload": up["id"], "settings": {"boxes": "0,0,1,1\n" * 440_000}}).encode()
    latencies, answers, sent = [], [], threading.Event()

    def big_requests() -> None:
        try:
            for _ in range(3):
                answers.append(app_server.request("/api/refine", payload, "application/json"))
        finally:
            sent.set()

    thread = threading.Thread(target=big_requests)
    thread.start()
    while not sent.is_set():
        started = time.perf_counter()
        assert app_server.request("/api/info")[0] == 200
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
        ("/api/refine", {"upload": up["id"], "settings": {"seed": 2**32 - 1, "n_samples": 3}}, 400, "lower the seed"),
        ("/api/refine", b"\xff\xfe", 400, "not valid JSON"),
    ]  # fmt: skip
    for path, body, expected_status, expected in cases:
        data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        status, _, answer = app_server.request(path, data, "application/json")
        error = json.loads(answer)["error"]
        assert status == expected_status and expected in error and "\n" not in error and len(error) < 300, (path, error)

    boxed = "\n".join(f"{k % 40},{k % 30},{k % 40 + 8},{k % 30 + 8}" for k in range(MAX_BOXES))
    status, job = app_server.refine(up["id"], {"start_t": 200, "steps": 2, "step_mode": "exact", "boxes": boxed}, None)
    assert status == 200 and job["state"] == "done", job
    _, _, polled = app_server.request(f"/api/jobs/{job['id']}")
    assert len(polled) < 16_384  # a status poll stays small
    assert "Traceback" not in app_server.err.read_text() and "ERROR" not in app_server.err.read_text()


def test_every_response_says_nosniff(app_server):
    status, up = app_server.upload(small_image(), "photo.png")
    for path, data, content_type, headers in [
        ("/", None, None, None), ("/static/app.js", None, None, None), ("/api/info", None, None, None),
        (f"/api/uploads/{up['id']}/image.png", None, None, None), ("/api/nothing", None, None, None),
        ("/api/refine", b"{}", "text/plain", None), ("/api/plan", b"x" * 70_000, "application/json", None),
        ("/api/refine", b"{", "application/json", None), ("/api/info", None, None, {"Host": "attacker.example"}),
    ]:  # fmt: skip
        status, got, _ = app_server.request(path, data, content_type, headers)
        assert got.get("X-Content-Type-Options") == "nosniff", (path, status)


def test_the_page_and_every_other_response_carry_the_same_security_headers(app_server):
    """/static/index.html served the page without the Content-Security-Policy of / (so another site could frame it)."""
    status, page_headers, _ = app_server.request("/")
    csp = page_headers["Content-Security-Policy"]
    assert status == 200 and "frame-ancestors 'none'" in csp and page_headers["X-Frame-Options"] == "DENY"
    status, _, body = app_server.request("/static/index.html")
    assert status == 200 and body == (STATIC / "index.html").read_bytes()
    status, up = app_server.upload(small_image(), "photo.png")
    for path, data, content_type, headers in [
        ("/static/index.html", None, None, None), ("/static/app.css", None, None, None),
        ("/static/app.js", None, None, None), ("/static/nothing.js", None, None, None), ("/api/info", None, None, None),
        (f"/api/uploads/{up['id']}/image.png", None, None, None), ("/api/nothing", None, None, None),
        ("/api/refine", b"{}", "text/plain", None), ("/api/refine", b"{", "application/json", None),
        ("/api/info", None, None, {"Host": "attacker.example"}),
    ]:  # fmt: skip
        status, got, _ = app_server.request(path, data, content_type, headers)
        assert got.get("Content-Security-Policy") == csp and got.get("X-Frame-Options") == "DENY", (path, status)
        assert got.get_all("Content-Security-Policy") == [csp], (path, status)  # one policy, not two


def test_a_refine_request_without_a_usable_upload_id_says_what_is_wrong(app_server):
    """Every one of these was told "the uploaded image is no longer on the server ...; upload it again"."""
    status, up = app_server.upload(small_image(), "photo.png")
    for body, expected in [
        ({"settings": {}}, 'the refine request has no "upload": send the "id" that /api/upload returned'),
        ({"upload": None}, 'the refine request has no "upload"'),
        ({"upload": 5}, '"upload" must be the text id that /api/upload returned, got a number'),
        ({"upload": [up["id"]]}, '"upload" must be the text id that /api/upload returned, got an array'),
        ({"upload": {"id": up["id"]}}, "got an object"),
        ({"upload": ""}, "\"upload\" '' is not an upload id; send the \"id\" that /api/upload returned"),
        ({"upload": "a" * 100_000}, "is not an upload id"),
        ({"upload": "A" * 22}, "the uploaded image is no longer on the server (it keeps the last 8"),  # an id's form
    ]:  # fmt: skip
        status, answer = app_server.json("/api/refine", {**body, "settings": {"mode": "whole"}})
        error = answer["error"]
        assert status == 400 and expected in error and "\n" not in error and len(error) < 200, (body, error)
    status, job = app_server.refine(up["id"], {"mode": "whole", "start_t": 200, "steps": 1, "step_mode": "exact"}, None)
    assert status == 200 and job["state"] == "done"  # the server goes on


def test_outputs_over_http_are_named_as_refine_py_names_them(app_server):
    """The app wrote upload_t125_s0.png for é漢字.png and my_photo_1_... for "my photo (1).png"."""
    settings = {"mode": "whole", "start_t": 200, "steps": 1, "step_mode": "exact"}
    for name, expected in [("é漢字.png", "é漢字_t200_s0.png"), ("my photo (1).png", "my photo (1)_t200_s0.png"),
                           (".hidden.png", "hidden_t200_s0.png")]:  # fmt: skip
        status, up = app_server.upload(small_image(), quote(name))
        assert status == 200 and up["name"] == name
        status, job = app_server.refine(up["id"], settings, None)
        assert status == 200 and job["state"] == "done", job
        sample = job["result"]["samples"][0]
        assert sample["name"] == expected and (Path(job["result"]["outdir"]) / expected).is_file()


def test_cancel_over_http_and_job_ids_cannot_be_guessed(app_server):
    status, up = app_server.upload(small_image(), "photo.png")
    long = {"mode": "whole", "start_t": 400, "steps": 400, "step_mode": "exact", "n_samples": 8}  # 3200 steps
    _, running = app_server.json("/api/refine", {"upload": up["id"], "settings": long})
    _, waiting = app_server.json("/api/refine", {"upload": up["id"], "settings": long})
    assert JOB_ID.match(running["id"]) and JOB_ID.match(waiting["id"]) and running["id"][:-16] <= waiting["id"][:-16]
    guessed = running["id"][:-1] + ("A" if running["id"][-1] != "A" else "B")
    assert app_server.request(f"/api/jobs/{guessed}")[0] == 404
    assert app_server.request("/api/uploads/not-an-upload/image.png")[0] == 404  # was 400
    wait_for(app_server, running["id"], lambda j: j["state"] == "running" and j["done_steps"] > 0)

    status, body = delete(app_server, f"/api/jobs/{waiting['id']}")
    assert status == 200 and body["state"] == "cancelled" and body["message"] == "cancelled before it ran"
    status, body = delete(app_server, f"/api/jobs/{running['id']}")
    assert status == 200 and body["state"] in ("running", "cancelled")
    job = wait_for(app_server, running["id"], lambda j: j["state"] != "running", timeout=20)
    assert job["state"] == "cancelled" and job["done_steps"] < job["total_steps"] == 3200, job
    assert re.fullmatch(r"cancelled after \d+ of 3200 steps", job["message"])
    status, body = delete(app_server, f"/api/jobs/{running['id']}")
    assert status == 409 and "already finished (cancelled)" in body["error"]
    assert delete(app_server, f"/api/jobs/{guessed}")[0] == 404
    status, job = app_server.refine(up["id"], {"mode": "whole", "start_t": 200, "steps": 2, "step_mode": "exact"}, None)
    assert status == 200 and job["state"] == "done"  # the worker goes on
    page = (Path(__file__).resolve().parents[1] / "ldm" / "app" / "static").joinpath
    assert 'id="cancel"' in page("index.html").read_text() and 'method: "DELETE"' in page("app.js").read_text()


def test_a_client_that_disconnects_mid_upload_is_one_info_line(app_server):
    with socket.create_connection(("127.0.0.1", app_server.port)) as sock:
        sock.sendall(b"POST /api/upload?name=x.png HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n" + bytes(1000))  # fmt: skip
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while "disconnected" not in app_server.err.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = app_server.err.read_text()
    lines = [line for line in log.splitlines() if "disconnected" in line]
    assert len(lines) == 1 and "INFO" in lines[0] and "POST /api/upload" in lines[0], log
    assert "Traceback" not in log and "ERROR" not in log
    assert app_server.request("/api/info")[0] == 200


def test_api_info_gives_the_page_the_windows_and_the_slider(app_server):
    status, info = app_server.json("/api/info")
    assert status == 200 and info["start"] == {"min": 1, "max": 499, "default": 125, "covered": True, "num_timesteps": 1000}
    assert [(w["t_min"], w["t_max"], w["steps"], w["text"]) for w in info["windows"]] == [
        (0, 250, [750, 1000], "t 0-249"), (250, 500, [500, 750], "t 250-499")]  # fmt: skip
    assert info["windows"][0]["name"] == "latesteps_750_1000.ckpt"
    assert info["defaults"]["start_t"] == 125 and info["defaults"]["mode"] == "mask"  # gentle, in place
    status, plan = app_server.json("/api/plan", {})  # a setting left out takes the page's default, not the CLI's 500
    assert status == 200 and plan["ok"] and plan["start_t"] == 125
    for start, ok in [(499, True), (500, False), (1, True)]:  # counted exactly, the first step is the start itself
        status, plan = app_server.json("/api/plan", {"start_t": start, "steps": 1, "step_mode": "exact"})
        assert status == 200 and plan["ok"] is ok, plan
    assert plan["t_windows"] == "t 0-249"


def test_a_running_request_that_will_not_finish_its_step_is_abandoned_at_shutdown(app_refiner):
    """Ctrl+C while one sampling step takes minutes (a large image on a CPU): the server leaves after SHUTDOWN_WAIT_S
    through ``abandon(0)`` instead of waiting for ever (it had to be SIGKILLed)."""
    from ldm.app.server import stop_worker

    upload = load_upload(small_image(), "photo.png")
    prepared = prepare(app_refiner, upload, RefineSettings(mode="whole", start_t=100, steps=2, step_mode="exact"), None)
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


def test_a_full_queue_is_refused_with_503_before_the_request_is_prepared(app_refiner, tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    import ldm.app.server as server_module

    app = server_module.create_app(app_refiner, tmp_path)  # no lifespan: the worker never starts, requests stay queued
    client = TestClient(app, base_url="http://127.0.0.1")
    up = client.post(
        "/api/upload?name=photo.png", content=small_image(), headers={"Content-Type": "application/octet-stream"}
    ).json()
    prepared = []
    real_prepare = server_module.prepare
    monkeypatch.setattr(server_module, "prepare", lambda *a: prepared.append(1) or real_prepare(*a))
    settings = {"mode": "whole", "start_t": 100, "steps": 2, "step_mode": "exact"}
    bad = [client.post("/api/refine", json={"upload": up["id"], "settings": {**settings, "steps": -1}}) for _ in range(20)]
    assert {r.status_code for r in bad} == {400}  # each gave its held place back
    statuses = [client.post("/api/refine", json={"upload": up["id"], "settings": settings}).status_code for _ in range(17)]
    assert statuses == [200] * 16 + [503] and len(prepared) == 16  # the 17th was never prepared
    assert (
        "16 requests are already waiting"
        in client.post("/api/refine", json={"upload": up["id"], "settings": settings}).json()["error"]
    )


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


def test_a_trickling_body_is_refused_at_its_deadline_and_uploads_never_wait_for_ever_for_a_slot(app_refiner, tmp_path,
                                                                                               monkeypatch):  # fmt: skip
    """Four connections sending a byte every 10 s held every read slot for ever: the idle timeout alone never fired,
    and other uploads waited for a slot without end."""
    import asyncio

    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.testclient import TestClient

    import ldm.app.server as server_module

    monkeypatch.setattr(server_module, "BODY_IDLE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(server_module, "BODY_DEADLINE_S", 0.5)

    async def receive():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/api/upload"}, receive)
    with pytest.raises(HTTPException) as caught:
        asyncio.run(server_module._read_body(request, 10**6, "the upload"))
    assert caught.value.status_code == 408 and "the upload took over 0.5 s to arrive" in caught.value.detail

    monkeypatch.setattr(server_module, "MAX_PARALLEL_READS", 0)  # every slot taken
    monkeypatch.setattr(server_module, "READ_SLOT_WAIT_S", 0.1)
    client = TestClient(server_module.create_app(app_refiner, tmp_path), base_url="http://127.0.0.1")
    reply = client.post("/api/upload?name=a.png", content=small_image(), headers={"Content-Type": "application/octet-stream"})
    assert reply.status_code == 503 and "uploads are being received; try again shortly" in reply.json()["error"]
    assert client.get("/api/info").status_code == 200
