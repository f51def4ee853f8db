"""The web app's request queue: one worker thread, the only one touching the models, runs refinements one at a time in
arrival order."""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch

from ldm.app.handlers import Prepared, RefineResult, RequestError
from ldm.app.page import page_words
from ldm.util import one_line

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
KEEP_JOBS = 32  # finished jobs remembered for their status and downloads (the oldest forgotten first; files stay)


class JobCancelled(Exception):
    """Raised in the worker between sampling steps of a job whose cancel was asked for; ends that job only."""


@dataclass
class Job:
    """One refinement request and what became of it. ``id``: ``<YYYYmmdd-HHMMSS>-<random>``, also its output folder's
    name (random: one id cannot be guessed from another); ``prepared``: dropped once it has run (finished jobs hold no
    image tensors); ``cancel``: why the running job must stop after its current step ("": it need not)."""

    id: str
    number: int
    prepared: Prepared | None
    name: str
    upload_key: str
    settings: dict[str, Any]
    before_png: bytes
    mask_png: bytes | None
    state: str = QUEUED
    done_steps: int = 0
    total_steps: int = 0
    message: str = ""
    result: RefineResult | None = None
    cancel: str = ""


class JobQueue:
    """A FIFO of :class:`Job` served by one worker thread calling ``run(job)`` (which may call ``JobQueue.step(job)``
    after each sampling step); at most ``max_waiting`` jobs wait, one more is refused (RequestError), not queued for
    hours."""

    def __init__(self, run: Callable[[Job], RefineResult], max_waiting: int = 16):
        self._run = run
        self._max_waiting = max_waiting
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.RLock()  # submit() asks full() while holding it
        self._held = 0  # places held by requests being prepared (hold), counted as waiting
        self._counter = itertools.count(1)
        self._thread = threading.Thread(target=self._work, name="latesteps-app-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Drop the waiting jobs, stop the running one after its current sampling step, end the worker; True once it
        has ended (False: still inside a step after ``timeout`` seconds), so the process never exits inside torch."""
        with self._lock:
            for job in self._jobs.values():
                if job.state == QUEUED:
                    job.state, job.message, job.prepared = FAILED, "the server stopped before this request ran", None
                elif job.state == RUNNING:
                    job.cancel = "the server stopped during this request"
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def cancel(self, job: Job) -> bool:
        """Cancel ``job`` (a running one after its current sampling step); False when it had already finished."""
        with self._lock:
            if job.state == QUEUED:
                job.state, job.message, job.prepared = CANCELLED, "cancelled before it ran", None  # its image is freed
            elif job.state == RUNNING:
                job.cancel = "cancelled"
            else:
                return False
        logger.info("request %s: cancel asked (%s)", job.id, job.state)
        return True

    def full(self) -> str | None:
        """Why a new request cannot be queued now (``max_waiting`` requests wait), or None: asked before a request is
        prepared, so a full queue costs no decode or start map."""
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if j.state == QUEUED) + self._held
        if waiting >= self._max_waiting:
            return f"{waiting} requests are already waiting; try again when one has finished"
        return None

    def hold(self) -> str | None:
        """Hold a place for a request about to be prepared, or say why the queue is full: requests that arrive
        together count each other, so a full queue refuses them before any is prepared.  The place is taken by
        ``submit(..., held=True)`` or given back by :meth:`release`."""
        with self._lock:
            full = self.full()
            if full is None:
                self._held += 1
            return full

    def release(self) -> None:
        """Give back a place :meth:`hold` gave (the request failed before it was submitted)."""
        with self._lock:
            self._held -= 1

    def submit(self, prepared: Prepared, upload_key: str, before_png: bytes, mask_png: bytes | None, held: bool = False) -> Job:
        """Queue a prepared request in the place :meth:`hold` gave (``held``), or in a free one; RequestError when
        ``max_waiting`` requests already wait."""
        with self._lock:
            if held:
                self._held -= 1
            else:
                full = self.full()
                if full is not None:
                    raise RequestError(full)
            number = next(self._counter)
            job_id = f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_urlsafe(12)}"
            job = Job(job_id, number, prepared, prepared.upload.name, upload_key, prepared.settings.parameters(), before_png,
                      mask_png, total_steps=prepared.total_steps)  # fmt: skip
            self._jobs[job_id] = job
            self._forget_old()
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def running(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.state == RUNNING), None)

    def ahead_of(self, job: Job) -> int:
        """How many jobs run before ``job`` starts (the running one included); 0 once it runs."""
        if job.state != QUEUED:
            return 0
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.state in (QUEUED, RUNNING) and j.number < job.number)

    def status(self, job: Job) -> dict[str, Any]:
        """The job's state for the page: ``id, state, done_steps, total_steps, ahead, message, cancelling``."""
        return {"id": job.id, "state": job.state, "done_steps": job.done_steps, "total_steps": job.total_steps,
                "ahead": self.ahead_of(job), "message": job.message,
                "cancelling": job.state == RUNNING and bool(job.cancel)}  # fmt: skip

    @staticmethod
    def step(job: Job) -> None:
        """Count one finished sampling step of ``job`` (the progress callback); JobCancelled ends a cancelled job."""
        job.done_steps = min(job.done_steps + 1, job.total_steps)
        if job.cancel:
            raise JobCancelled(job.cancel)

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.state in FINISHED]
        for key in finished[: max(0, len(self._jobs) - KEEP_JOBS)]:
            del self._jobs[key]

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.state != QUEUED:
                    continue
                job.state = RUNNING
            try:
                job.result = self._run(job)
                job.state = DONE
            except JobCancelled as exc:
                job.message = f"{exc} after {job.done_steps} of {job.total_steps} steps"
                job.state = CANCELLED
                logger.info("request %s: %s", job.id, job.message)
            except torch.OutOfMemoryError:
                logger.warning("request %s failed: out of device memory", job.id, exc_info=True)
                job.message = (
                    "the device ran out of memory refining this image; try a smaller image, Mode 'crop', or "
                    "fewer samples (the server log has the details)"
                )
                job.state = FAILED
            except (ValueError, OSError) as exc:
                job.message = page_words(str(exc)) or type(exc).__name__
                job.state = FAILED
                logger.warning("request %s failed: %s", job.id, job.message)
            except Exception as exc:  # a bug must cost this request only: the server keeps serving the next ones
                logger.exception("request %s failed", job.id)
                job.message = f"internal error ({type(exc).__name__}: {one_line(exc)}); see the server log"
                job.state = FAILED
            finally:
                job.prepared = None  # the result keeps what the page needs; free the image and its start map
