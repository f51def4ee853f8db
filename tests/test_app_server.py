"""ldm.app.guards and the server's limits on time: the Host check's refusal (JSON, nosniff), the deadline for request
headers (a client trickling header bytes is cut off), and the estimated time of one sampling step (a request whose
single step would hold the worker past MAX_STEP_SECONDS is refused before it is queued, since Cancel waits for it)."""

from __future__ import annotations

import dataclasses
import io
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="the web app needs the app extra: pip install -e .[app]")
uvicorn = pytest.importorskip("uvicorn", reason="the web app needs the app extra: pip install -e .[app]")

from starlette.testclient import TestClient  # noqa: E402

from ldm.app.guards import LocalHostOnly, header_timeout_protocol, host_name  # noqa: E402
from ldm.app.handlers import (  # noqa: E402
    MAX_STEP_SECONDS,
    RefineSettings,
    RequestError,
    StepCost,
    load_upload,
    measure_step_cost,
    prepare,
)
from ldm.app.server import create_app  # noqa: E402
from ldm.models.tiling import downscale_to  # noqa: E402


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    from ldm.refine import Refiner

    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


# ------------------------------------------------------------------------------------------------------- Host check
@pytest.mark.parametrize(
    "header, name",
    [("localhost", "localhost"), ("localhost:8000", "localhost"), ("127.0.0.1:80", "127.0.0.1"), ("[::1]:8080", "::1"),
     ("[::1]", "::1"), ("", ""), ("evil.example:80", "evil.example"), ("localhost.", "localhost"),
     ("localhost:7861@evil.example", "localhost:7861@evil.example"), ("127.0.0.1:abc", "127.0.0.1:abc"),
     ("[127.0.0.1]x", "[127.0.0.1]x")],
)  # fmt: skip
def test_host_name_drops_the_port(header, name):
    assert host_name(header) == name


def test_a_foreign_host_is_a_json_400_with_nosniff_and_local_names_are_served(refiner, tmp_path):
    app = create_app(refiner, tmp_path)
    refused = TestClient(app, base_url="http://evil.example:8000").get("/api/info")
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["x-content-type-options"] == "nosniff"
    error = refused.json()["error"]
    assert "'evil.example:8000'" in error and "--listen" in error and "\n" not in error
    long_host = TestClient(app, base_url="http://" + "a" * 300 + ".example").get("/api/info").json()["error"]
    assert len(long_host) < 300  # the echoed Host is shortened
    for base in ("http://localhost:8000", "http://127.0.0.1", "http://LOCALHOST"):
        assert TestClient(app, base_url=base).get("/api/info").status_code == 200, base
    listening = create_app(refiner, tmp_path, listen=True)
    assert TestClient(listening, base_url="http://evil.example").get("/api/info").status_code == 200


def test_an_internal_error_carries_the_security_headers_too(refiner, tmp_path, monkeypatch):
    """A 500 is sent outside the middleware: it adds nosniff and the CSP itself."""
    import ldm.app.server as server

    def broken(*_args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server, "describe_plan", broken)
    client = TestClient(create_app(refiner, tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False)
    answer = client.post("/api/plan", json={})
    assert answer.status_code == 500 and answer.json()["error"] == "internal error (RuntimeError); see the server log"
    assert answer.headers["content-security-policy"] == server.CSP and answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"


# ---------------------------------------------------------------------------------------------------- header deadline
async def hello(scope, receive, send):
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):  # read the whole body, however slowly it comes
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture()
def quick_deadline_server():
    """A uvicorn server of a trivial app with a 1 s header deadline, on a free port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(hello, http=header_timeout_protocol(1.0), log_level="warning", lifespan="off",
                            timeout_keep_alive=30)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def _closed_within(conn: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Send ``trickle`` a byte every 0.1 s until the server closes the connection; the seconds that took, or None."""
    started = time.monotonic()
    conn.settimeout(0.1)
    sent = 0
    while time.monotonic() - started < seconds:
        try:
            if conn.recv(1024) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        try:
            conn.sendall(trickle[sent % max(len(trickle), 1) :][:1] if trickle else b"")
        except OSError:
            return time.monotonic() - started
        sent += 1
    return None


def test_a_client_trickling_its_headers_is_cut_off_and_prompt_ones_are_served(quick_deadline_server):
    port = quick_deadline_server
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        took = _closed_within(slow, 6.0, trickle=b"X-Slow: " + b"a" * 100)  # a byte every 0.1 s keeps it "active"
    assert took is not None and took < 3.0, took
    with socket.create_connection(("127.0.0.1", port)) as idle:
        took = _closed_within(idle, 6.0)  # nothing at all
    assert took is not None and took < 3.0, took
    with socket.create_connection(("127.0.0.1", port)) as prompt:
        for _ in range(2):  # a kept-alive connection gets a fresh deadline for each request
            prompt.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            reply = b""
            prompt.settimeout(5)
            while not reply.endswith(b"ok"):
                reply += prompt.recv(1024)
            assert reply.startswith(b"HTTP/1.1 200")
            time.sleep(0.6)  # well within the deadline each time, though 1.2 s in all
        prompt.sendall(b"GET / HTTP/1.1\r\n")
        assert _closed_within(prompt, 6.0, trickle=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaa") is not None


# ---------------------------------------------------------------------------------------------------- one step's time
def test_measured_step_cost_is_positive_and_finite(refiner):
    cost = measure_step_cost(refiner, repeats=1)
    for fit in (cost, cost.first_stage):
        assert 0 < fit.step_seconds(64 * 64) < 60 and fit.seconds_per_pixel >= 0 and fit.seconds_per_pixel2 >= 0


def test_a_request_whose_one_step_would_take_too_long_is_refused_before_it_is_queued(refiner):
    upload = load_upload(png(96, 64), "wide.png")
    latent_pixels = (96 // 4) * (64 // 4)  # the tiny experts: f4 first stage, sides already multiples of the factor
    slow = StepCost(seconds_per_pixel=2 * MAX_STEP_SECONDS / latent_pixels)  # one whole-image step: 2 x the limit
    whole = RefineSettings.from_json({"mode": "whole", "start_t": 100, "steps": 2, "step_mode": "exact"})
    with pytest.raises(RequestError) as info:
        prepare(refiner, upload, whole, None, slow)
    message = str(info.value)
    assert "96x64 image would take about 40 s" in message and f"over {MAX_STEP_SECONDS:.0f} s" in message
    assert "crop mode" in message and "\n" not in message
    in_place = RefineSettings.from_json({"mode": "mask", "boxes": "0,0,8,8", "start_t": 100, "steps": 2,
                                         "step_mode": "exact"})  # fmt: skip
    with pytest.raises(RequestError):
        prepare(refiner, upload, in_place, None, slow)  # in place, every step still runs over the whole image
    crop = RefineSettings.from_json({"mode": "crop", "boxes": "0,0,8,8", "start_t": 100, "steps": 2, "step_mode": "exact"})
    assert prepare(refiner, upload, crop, None, slow).total_steps == 2  # a crop runs at the experts' size
    assert prepare(refiner, upload, whole, None, StepCost(0.5 * MAX_STEP_SECONDS / latent_pixels)).total_steps == 2
    assert prepare(refiner, upload, whole, None, None).total_steps == 2  # no estimate: not limited


def test_a_pipelined_request_with_a_slow_body_is_not_cut_off(quick_deadline_server):
    """The second request's headers arrive with the first (pipelining); its body then takes longer than the header
    deadline. uvicorn parses the buffered request while finishing the first response: that must count as in time."""
    with socket.create_connection(("127.0.0.1", quick_deadline_server)) as conn:
        conn.sendall(
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\nPOST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\n\r\n"
        )
        for byte in b"abcdef":  # 1.8 s in all, against a 1 s header deadline
            time.sleep(0.3)
            conn.sendall(bytes([byte]))
        conn.settimeout(5)
        replies = b""
        while replies.count(b"HTTP/1.1 200") < 2:
            chunk = conn.recv(1024)
            assert chunk, f"the connection was closed after {replies!r}"
            replies += chunk


def test_step_cost_separates_the_fixed_cost_of_a_call_from_its_cost_per_pixel():
    from types import SimpleNamespace

    import torch

    def denoiser(z, t, cond=None):  # 20 ms per call plus 10 us per latent pixel
        time.sleep(0.02 + 1e-5 * z.shape[-1] * z.shape[-2])
        return z

    @dataclasses.dataclass
    class QuadraticFirstStage:  # attention makes it quadratic: 1e-8 s per latent pixel squared
        tiling: Any = None
        factor: int = 1

        def encode(self, x):
            return x

        def decode(self, z):
            time.sleep(1e-8 * (z.shape[-1] * z.shape[-2]) ** 2)
            return z

    model = SimpleNamespace(image_size=16, channels=3)
    first_stage = QuadraticFirstStage(tiling="timed untiled, so never used")
    fake = SimpleNamespace(model=model, experts=[SimpleNamespace(model=model)], denoisers=[denoiser],
                           device=torch.device("cpu"), first_stage=first_stage)  # fmt: skip
    cost = measure_step_cost(fake, repeats=3)
    assert cost.fixed_seconds == pytest.approx(0.02, abs=0.01)
    assert cost.seconds_per_pixel == pytest.approx(1e-5, rel=0.3)
    assert cost.step_seconds(10_000) == pytest.approx(0.02 + 0.1, rel=0.3)
    # encode + decode grew 16x for 4x the pixels: a linear fit said 4x less at 4x the pixels (the cancel of a large
    # image waited for minutes of decoding)
    assert cost.first_stage.step_seconds(128 * 128) == pytest.approx(1e-8 * (128 * 128) ** 2, rel=0.3)


def test_a_tiled_image_is_estimated_tile_by_tile():
    """Timed untiled at the native side and twice it (the reviewer's 1024 px SD timing was tiled, and read as
    attention: 3-17x too high); a tiled image costs its tiles' convolutions, the attention once, the statistics pass."""
    from ldm.refine.first_stage import AUTO_TILING

    fit = StepCost(seconds_per_pixel=1e-4, fixed_seconds=0.5, seconds_per_pixel2=1e-9)
    cost = StepCost(1e-6, first_stage=fit)
    assert cost.first_stage_seconds(512, 768, 8, AUTO_TILING) == fit.step_seconds(64 * 96)  # not above min_side 768
    tiles = 5 * 5  # 2048 px: tiles start at 0, 384, 768, 1152 and 1536
    expected = tiles * (0.5 + 1e-4 * 64 * 64) + 1e-9 * (256 * 256) ** 2 + fit.step_seconds(64 * 64)
    assert cost.first_stage_seconds(2048, 2048, 8, AUTO_TILING) == pytest.approx(expected)
    assert StepCost(1e-6).first_stage_seconds(2048, 2048, 8, AUTO_TILING) == 0.0  # not measured: not limited
    # a long thin image: its 11 tiles are 512x64 (clipped to the image) and its statistics pass 500x16; every tile was
    # charged as 512x512 and the statistics pass as 512x512, so a 4000x64 image refine.py finishes in 7.5 s was refused
    tiles = 11  # 4000 px: tiles start at 0, 384, ..., 3456 and 3488
    expected = tiles * (0.5 + 1e-4 * 64 * 8) + 1e-9 * (500 * 8) ** 2 + fit.step_seconds(62 * 2)
    assert cost.first_stage_seconds(4000, 64, 8, AUTO_TILING) == pytest.approx(expected)
    assert cost.first_stage_seconds(64, 4000, 8, AUTO_TILING) == pytest.approx(expected)
    assert tuple(downscale_to(torch.zeros(1, 1, 4000, 64), 512, 2 * 8).shape[-2:]) == (500, 16)  # tiled_encode's


@pytest.mark.parametrize("size", [(4000, 64), (20000, 8), (1000, 1000), (2048, 300), (520, 1200)])
def test_the_estimate_charges_the_tiles_tiled_apply_cuts(size):
    """Linear cost only, factor 1, no statistics pass: the estimate is the pixels of the tiles tiled_apply runs."""
    from ldm.models.tiling import TilingConfig, tiled_apply

    seen = []

    def record(tile: torch.Tensor) -> torch.Tensor:
        seen.append(tile.shape[-2] * tile.shape[-1])
        return tile

    tiling = TilingConfig(min_side=768, tile=512, overlap=128, stat_side=None)
    tiled_apply(record, torch.zeros(1, 1, *size), tiling.tile, tiling.overlap, 1, 1)
    assert StepCost(1.0, first_stage=StepCost(1.0)).first_stage_seconds(*size, 1, tiling) == sum(seen)


def test_a_request_whose_encode_and_decode_would_take_too_long_is_refused(refiner):
    upload = load_upload(png(96, 64), "wide.png")
    latent_pixels = (96 // 4) * (64 // 4)
    slow = StepCost(1e-9, first_stage=StepCost(0.0, 0.0, 3 * MAX_STEP_SECONDS / latent_pixels**2))
    whole = RefineSettings.from_json({"mode": "whole", "start_t": 100, "steps": 2, "step_mode": "exact"})
    with pytest.raises(RequestError, match=r"^encoding and decoding on this 96x64 image would take about 60 s here"):
        prepare(refiner, upload, whole, None, slow)
    crop = RefineSettings.from_json({"mode": "crop", "boxes": "0,0,8,8", "start_t": 100, "steps": 2, "step_mode": "exact"})
    assert prepare(refiner, upload, crop, None, slow).total_steps == 2  # a crop is encoded at the experts' size


def test_the_host_check_passes_non_http_scopes_without_reading_their_headers():
    """A websocket scope with a malformed header list raised in dict() once the headers were read before the type."""
    import asyncio

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    guard = LocalHostOnly(app, ["127.0.0.1"])
    for scope in [{"type": "lifespan"}, {"type": "websocket", "headers": [(b"host", b"evil.com", b"x")]}]:
        asyncio.run(guard(scope, None, None))
    assert seen == ["lifespan", "websocket"]
