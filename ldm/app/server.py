"""The web app's HTTP side: a Starlette application serving the page and a small JSON API over :mod:`ldm.app.handlers`
(routes: :func:`create_app`).  Errors are JSON ``{"error": "<one line>"}``, 4xx for what the user can fix, 500 for bugs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import secrets
import sys
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ldm.app.guards import AddHeaders, LocalHostOnly, NoSniff
from ldm.app.handlers import (
    MAX_BOXES,
    MAX_PARALLEL_DECODES,
    MAX_REQUEST_STEPS,
    MAX_SAMPLES,
    MAX_STEP_SECONDS,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    MODES,
    STEP_MODES,
    RefineResult,
    RefineSettings,
    RequestError,
    StepCost,
    Upload,
    describe_plan,
    load_painted_mask,
    load_upload,
    plan_facts,
    prepare,
    refine,
)
from ldm.app.jobs import DONE, KEEP_JOBS, Job, JobQueue
from ldm.app.page import json_kind, start_range
from ldm.imageio.errors import short_repr
from ldm.refine.conditioning import is_text_conditioned
from ldm.refine.refiner import Refiner
from ldm.sampling import SAMPLERS
from ldm.util import one_line

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
LOCAL_HOSTS = ["127.0.0.1", "localhost"]
MAX_PLAN_JSON_BYTES = 64 * 2**10  # the settings alone (the boxes text included) are a few KiB
MAX_PARALLEL_READS = 4  # upload bodies read at once (each held in memory, up to MAX_UPLOAD_BYTES, while it arrives)
BODY_IDLE_TIMEOUT_S = 30  # a body that sends nothing for this long is refused (408)
BODY_DEADLINE_S = 300  # ... and one that trickles (a byte every few seconds), when it is not whole after this long (408)
READ_SLOT_WAIT_S = 10  # an upload that finds every read slot taken this long is refused (503), not queued for ever
SHUTDOWN_WAIT_S = 10  # on Ctrl+C, how long the running request may take to finish its sampling step
MAX_REFINE_JSON_BYTES = 4 * 2**20  # settings and the painted mask, a base64 PNG: strokes on black compress ~1000:1
KEEP_UPLOADS = 8  # uploads kept for painting and refining: their files' bytes and the PNG shown, never decoded arrays
KEEP_UPLOAD_BYTES = 256 * 2**20  # ... and the oldest are forgotten sooner when they hold more than this (the newest stays)
# The page may load only what this server serves: no CDN, font service or analytics can be reached even by mistake.
CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
# Sent with every response (the page at / and at /static/index.html, its assets, the API, errors): X-Frame-Options is
# frame-ancestors 'none' for browsers without CSP level 2
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY"}
UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # secrets.token_urlsafe(16), as AppState.add_upload makes them


class AppState:
    """What the routes share: the refiner, the output folder, recent uploads and the job queue."""

    def __init__(self, refiner: Refiner, outdir: Path, step_cost: StepCost | None):
        self.refiner = refiner
        self.outdir = outdir
        self.step_cost = step_cost  # one step's estimated time per latent pixel (None: not limited)
        self.start = start_range(refiner)  # the start slider's range and default, from the experts' windows
        self.defaults = RefineSettings(start_t=self.start.default)  # what a setting the page leaves out takes
        self.uploads: OrderedDict[str, Upload] = OrderedDict()  # id -> upload (read and written on the event loop only)
        self.jobs = JobQueue(self._run)
        self.decodes = asyncio.Semaphore(MAX_PARALLEL_DECODES)  # uploads waiting to decode wait here, not in threads
        self.reads = asyncio.Semaphore(MAX_PARALLEL_READS)

    def _run(self, job: Job) -> RefineResult:
        return refine(self.refiner, job.prepared, self.outdir / job.id, on_step=lambda: JobQueue.step(job))

    def add_upload(self, upload: Upload) -> str:
        key = secrets.token_urlsafe(16)
        self.uploads[key] = upload
        held = sum(len(u.data) + len(u.png) for u in self.uploads.values())
        while len(self.uploads) > KEEP_UPLOADS or (held > KEEP_UPLOAD_BYTES and len(self.uploads) > 1):
            _, old = self.uploads.popitem(last=False)
            held -= len(old.data) + len(old.png)
        return key

    def upload(self, key: Any) -> Upload:
        """The upload ``key`` names; RequestError saying what is wrong with ``key`` (missing, not an id) or that the
        upload was forgotten."""
        if key is None:
            raise RequestError('the refine request has no "upload": send the "id" that /api/upload returned for the image')
        if not isinstance(key, str):
            raise RequestError(f'"upload" must be the text id that /api/upload returned, got {json_kind(key)}')
        if not UPLOAD_ID.fullmatch(key):
            raise RequestError(f'"upload" {short_repr(key)} is not an upload id; send the "id" that /api/upload returned')
        if key not in self.uploads:
            raise RequestError(
                f"the uploaded image is no longer on the server (it keeps the last {KEEP_UPLOADS}, less "
                "when they are large); upload it again"
            )
        self.uploads.move_to_end(key)
        return self.uploads[key]


def create_app(refiner: Refiner, outdir: str | Path, listen: bool = False, step_cost: StepCost | None = None) -> Starlette:
    """The ASGI application serving ``refiner``; outputs go to ``outdir/<job id>/``.  ``listen``: any Host header is
    accepted (else only localhost names).  ``step_cost``: :func:`ldm.app.handlers.measure_step_cost`'s fit (None: one
    step's time is not limited)."""
    state = AppState(refiner, Path(outdir), step_cost)

    @asynccontextmanager
    async def lifespan(_app: Starlette):
        state.jobs.start()
        try:
            yield
        finally:
            # waited for in a thread (the event loop stays free): the process must not exit inside torch (stop_worker)
            if state.jobs.running() is not None:
                logger.warning("stopping: the running request ends after its current sampling step")
            await run_in_threadpool(stop_worker, state.jobs, SHUTDOWN_WAIT_S)

    async def index(_request: Request) -> Response:
        html = (STATIC_DIR / "index.html").read_bytes()
        return Response(html, media_type="text/html; charset=utf-8")  # the middleware adds the CSP

    async def info(_request: Request) -> Response:
        return JSONResponse(
            {
                "device": str(refiner.device),
                "describe": refiner.describe(),
                "num_timesteps": refiner.num_timesteps,
                "experts": [e.describe(refiner.num_timesteps) for e in refiner.experts],
                "windows": state.start.windows_json(),
                "start": state.start.as_json(),
                "defaults": state.defaults.parameters(),
                "samplers": list(SAMPLERS),
                "modes": list(MODES),
                "step_modes": list(STEP_MODES),
                "max_samples": MAX_SAMPLES,
                "max_upload_bytes": MAX_UPLOAD_BYTES,
                "max_upload_pixels": MAX_UPLOAD_PIXELS,
                "max_boxes": MAX_BOXES,
                "max_request_steps": MAX_REQUEST_STEPS,
                "max_step_seconds": MAX_STEP_SECONDS if state.step_cost is not None else None,
                # the page shows the prompt fields only for experts that read a prompt
                "text_conditioned": any(is_text_conditioned(e.model) for e in refiner.experts),
                "max_refine_json_bytes": MAX_REFINE_JSON_BYTES,
                "outdir": str(state.outdir),
            }
        )

    async def plan(request: Request) -> Response:
        body = await _json_body(request, MAX_PLAN_JSON_BYTES)
        settings = await run_in_threadpool(RefineSettings.from_json, body, state.defaults)
        return JSONResponse(describe_plan(refiner, settings))

    async def upload(request: Request) -> Response:
        _require_type(request, "application/octet-stream")
        try:  # bodies are held in memory while read: at most MAX_PARALLEL_READS at once
            await asyncio.wait_for(state.reads.acquire(), READ_SLOT_WAIT_S)
        except TimeoutError:
            raise HTTPException(503, f"{MAX_PARALLEL_READS} uploads are being received; try again shortly") from None
        try:
            data = await _read_body(request, MAX_UPLOAD_BYTES, "the upload")
        finally:
            state.reads.release()
        async with state.decodes:
            loaded = await run_in_threadpool(load_upload, data, request.query_params.get("name", "upload"))
        return JSONResponse(_upload_json(state.add_upload(loaded), loaded))

    async def upload_image(request: Request) -> Response:
        try:
            upload = state.upload(request.path_params["key"])
        except RequestError as exc:  # a resource that is not (or no longer) there
            raise HTTPException(404, str(exc)) from None
        return Response(upload.png, media_type="image/png")

    async def submit(request: Request) -> Response:
        body = await _json_body(request, MAX_REFINE_JSON_BYTES)
        if not isinstance(body, dict) or set(body) - {"upload", "settings", "mask"}:
            raise RequestError('a refine request is a JSON object {"upload": id, "settings": {...}, "mask": base64 PNG}')
        loaded = state.upload(body.get("upload"))
        full = state.jobs.hold()
        if full is not None:  # before the request is prepared: a full queue costs no decode or start map
            raise HTTPException(503, full)
        try:
            settings = await run_in_threadpool(RefineSettings.from_json, body.get("settings", {}), state.defaults)
            mask_data = await run_in_threadpool(_base64, body.get("mask"))
            async with state.decodes:
                mask = None if mask_data is None else await run_in_threadpool(load_painted_mask, mask_data, loaded)
            prepared = await run_in_threadpool(prepare, refiner, loaded, settings, mask, state.step_cost)
        except BaseException:  # a bad request, a disconnect: its place is given back
            state.jobs.release()
            raise
        job = state.jobs.submit(prepared, body["upload"], loaded.png, mask_data, held=True)
        return JSONResponse(state.jobs.status(job))

    async def job_cancel(request: Request) -> Response:
        job = _job(state, request)
        if not state.jobs.cancel(job):
            raise HTTPException(409, f"request {job.id} has already finished ({job.state}); there is nothing to cancel")
        return JSONResponse(state.jobs.status(job))

    async def job_status(request: Request) -> Response:
        job = _job(state, request)
        status = state.jobs.status(job)
        status.update(name=job.name, settings=job.settings, upload=None, mask_url=None)
        if job.upload_key in state.uploads:
            status["upload"] = _upload_json(job.upload_key, state.uploads[job.upload_key])
        if job.mask_png is not None:
            status["mask_url"] = f"/api/jobs/{job.id}/mask.png"
        if job.state == DONE and job.result is not None:
            status["result"] = _result_json(refiner, job)
        return JSONResponse(status)

    async def job_before(request: Request) -> Response:
        return Response(_job(state, request).before_png, media_type="image/png")

    async def job_mask(request: Request) -> Response:
        job = _job(state, request)
        if job.mask_png is None:
            raise HTTPException(404, f"request {job.id} had no painted mask")
        return Response(job.mask_png, media_type="image/png")

    async def job_file(request: Request) -> Response:
        job = _job(state, request)
        k = request.path_params["k"]
        if job.result is None or not 0 <= k < len(job.result.samples):
            raise HTTPException(404, f"request {job.id} has no output {k}")
        path = job.result.samples[k].path
        if not path.is_file():
            raise HTTPException(404, f"{path.name} is no longer in {path.parent} (moved or deleted)")
        disposition = "attachment" if request.query_params.get("download") == "1" else "inline"
        return FileResponse(path, media_type="image/png", filename=path.name, content_disposition_type=disposition)

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/plan", plan, methods=["POST"]),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/uploads/{key}/image.png", upload_image),
        Route("/api/refine", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", job_status, methods=["GET"]),
        Route("/api/jobs/{job_id}", job_cancel, methods=["DELETE"]),
        Route("/api/jobs/{job_id}/before.png", job_before),
        Route("/api/jobs/{job_id}/mask.png", job_mask),
        Route("/api/jobs/{job_id}/files/{k:int}", job_file),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    # outermost: the Host check's refusals carry them
    middleware = [Middleware(NoSniff), Middleware(AddHeaders, headers=SECURITY_HEADERS)]
    if not listen:
        middleware.append(Middleware(LocalHostOnly, allowed_hosts=LOCAL_HOSTS))
    handlers = {RequestError: _user_error, HTTPException: _user_error, ClientDisconnect: _client_gone, Exception: _server_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)


def stop_worker(jobs: JobQueue, wait_s: float, abandon: Callable[[int], Any] = os._exit) -> None:
    """Stop ``jobs``' worker; when its running request does not finish its step within ``wait_s`` seconds, leave at once
    with ``abandon(0)``: the interpreter's own exit would end the worker inside torch (exit 134).  Outputs are written
    atomically, so nothing half-written is left."""
    if jobs.stop(wait_s):
        return
    logger.warning("stopped: the running request did not finish its sampling step within %s s and was abandoned", wait_s)
    for stream in [*logging.getLogger().handlers, sys.stdout, sys.stderr]:
        stream.flush()
    abandon(0)


def _upload_json(key: str, upload: Upload) -> dict[str, Any]:
    return {"id": key, "name": upload.name, "width": upload.width, "height": upload.height, "format": upload.format,
            "has_alpha": upload.has_alpha, "image_url": f"/api/uploads/{key}/image.png"}  # fmt: skip


def _result_json(refiner: Refiner, job: Job) -> dict[str, Any]:
    result = job.result
    samples = [
        {"name": s.path.name, "seed": s.seed, "sample": s.sample, "url": f"/api/jobs/{job.id}/files/{s.sample}",
         "download_url": f"/api/jobs/{job.id}/files/{s.sample}?download=1"}
        for s in result.samples
    ]  # fmt: skip
    outdir = str(result.samples[0].path.parent) if result.samples else ""
    return {"samples": samples, "before_url": f"/api/jobs/{job.id}/before.png", "seconds": round(result.seconds, 3),
            "outdir": outdir, **plan_facts(refiner, result.plan)}  # fmt: skip


def _job(state: AppState, request: Request) -> Job:
    job = state.jobs.get(request.path_params["job_id"])
    if job is None:
        raise HTTPException(404, f"no request {request.path_params['job_id']!r} on this server (it keeps the last {KEEP_JOBS})")
    return job


def _require_type(request: Request, expected: str) -> None:
    """415 unless the body is ``expected``: another origin's page cannot send JSON or octet-stream (DELETE neither)
    without a CORS preflight, which this server never grants."""
    got = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if got != expected:
        raise HTTPException(415, f"send {expected}, not {got or 'no content type'}")


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused (413) beyond ``limit`` bytes before more than that is read."""
    size_text = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit // 2**10} KiB"
    too_large = HTTPException(413, f"{what} is larger than {size_text}, the most this server accepts here")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    stream = request.stream()
    deadline = asyncio.get_running_loop().time() + BODY_DEADLINE_S
    while True:
        left = deadline - asyncio.get_running_loop().time()
        try:  # a client that stops sending (or trickles) would hold its part of the body and a read slot for ever
            chunk = await asyncio.wait_for(anext(stream), min(BODY_IDLE_TIMEOUT_S, max(left, 0)))
        except StopAsyncIteration:
            break
        except TimeoutError:
            if left <= BODY_IDLE_TIMEOUT_S:
                raise HTTPException(408, f"{what} took over {BODY_DEADLINE_S} s to arrive; send it again") from None
            raise HTTPException(408, f"{what} stalled: no data for {BODY_IDLE_TIMEOUT_S} s; send it again") from None
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request, limit: int) -> Any:
    """The JSON body (at most ``limit`` bytes), parsed in a worker thread."""
    _require_type(request, "application/json")
    data = await _read_body(request, limit, "the request")
    return await run_in_threadpool(_parse_json, data)


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request is not valid JSON ({one_line(exc)[:200]})") from None
    except RecursionError:
        raise RequestError(
            "the request's JSON is nested too deeply to parse; send the page's settings object, "
            "whose values are numbers and strings"
        ) from None
    except ValueError:  # an integer beyond Python's digit limit for str -> int
        raise RequestError(
            f"the request holds a number of more than {sys.get_int_max_str_digits()} digits; no setting "
            "takes one that long (seeds are integers up to 2**32 - 1)"
        ) from None


def _base64(value: Any) -> bytes | None:
    """A base64 field (a ``data:`` URL prefix allowed) as bytes; None for null or an empty string."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestError(f"mask must be a base64 PNG string or null, got {json_kind(value)}")
    try:
        return base64.b64decode(value.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("mask is not valid base64") from None


async def _user_error(_request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
    return JSONResponse({"error": str(exc)}, status_code=400)


async def _client_gone(request: Request, _exc: Exception) -> Response:
    """The client closed the connection before its request was read (a closed tab): logged at info level."""
    logger.info("%s %s: the client disconnected before sending the whole request", request.method, request.url.path)
    return Response(status_code=400)


async def _server_error(_request: Request, exc: Exception) -> Response:
    logger.error("request failed", exc_info=exc)
    return JSONResponse(
        {"error": f"internal error ({type(exc).__name__}); see the server log"},
        status_code=500,
        headers={"X-Content-Type-Options": "nosniff", **SECURITY_HEADERS},
    )  # sent outside the middleware
