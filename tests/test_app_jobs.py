"""ldm/app/jobs.py: the request queue, in-process: one request at a time in arrival order, failures as messages,
cancel and stop between sampling steps, random ids, out-of-memory in the page's words."""

from __future__ import annotations

import re
import threading
import time

import pytest

from app_support import CLI_WORDS, JOB_ID, small_image

pytest.importorskip("starlette", reason="the web app needs the app extra: pip install -e .[app]")
pytest.importorskip("uvicorn", reason="the web app needs the app extra: pip install -e .[app]")

from ldm.app.handlers import RefineSettings, RequestError, load_upload, prepare  # noqa: E402  (after the skips)
from ldm.app.jobs import JobQueue  # noqa: E402


def test_queue_runs_one_request_at_a_time_and_survives_failures(app_refiner, app_images):
    upload = load_upload(app_images["rgb"][0], "astro.png")
    prepared = prepare(app_refiner, upload, RefineSettings(mode="whole", start_t=100, steps=2, step_mode="exact"), None)
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


def test_cancel_and_stop_end_a_job_between_steps_and_ids_are_random(app_refiner):
    upload = load_upload(small_image(), "photo.png")
    prepared = prepare(app_refiner, upload, RefineSettings(mode="whole", start_t=100, steps=2, step_mode="exact"), None)
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


def test_a_job_out_of_device_memory_says_so_in_the_page_s_words(app_refiner):
    import torch

    upload = load_upload(small_image(), "photo.png")
    prepared = prepare(app_refiner, upload, RefineSettings(mode="whole", start_t=100, steps=2, step_mode="exact"), None)

    def run(_job):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB ... PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
        )

    jobs = JobQueue(run)
    job = jobs.submit(prepared, "key", b"png", None)
    jobs.start()
    deadline = time.monotonic() + 30
    while job.state in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.01)
    jobs.stop(timeout=5)
    assert job.state == "failed" and job.message.startswith("the device ran out of memory refining this image")
    assert not CLI_WORDS.search(job.message)


def test_requests_being_prepared_hold_their_places():
    """Requests that arrived together all passed the "queue full?" check, were all prepared, and the late ones were
    then refused with 400 instead of 503: a held place counts as waiting."""
    jobs = JobQueue(lambda job: None, max_waiting=2)
    assert jobs.hold() is None and jobs.hold() is None
    assert jobs.hold() == "2 requests are already waiting; try again when one has finished" and jobs.full() is not None
    jobs.release()
    assert jobs.full() is None and jobs.hold() is None and jobs.full() is not None
