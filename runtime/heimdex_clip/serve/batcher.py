"""Dynamic batching with backpressure: concurrent requests share model runs.

Requests put jobs (one text or one image each) on a bounded queue; one model thread takes
up to CLIP_BATCH_SIZE of them (waiting at most CLIP_SERVE_BATCH_WAIT_MS for more once the
queue runs dry), runs each tower once per batch and resolves each job's future.

Admission is decided at once, never by queueing without end: a request is refused
(:class:`Overloaded`, a 503 with Retry-After) when the queue is full or when the work already
queued, at the measured cost per item, would not be done within the request's deadline.
A request whose deadline passes gets :class:`DeadlineExceeded` (504); its jobs are cancelled
and skipped by the model thread if they have not run yet.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..embedder import ClipEmbedder
from ..errors import ClipError
from .metrics import ServeMetrics

log = logging.getLogger(__name__)

Kind = Literal["text", "image"]
# Work already queued may take at most this share of a request's deadline; the rest is
# left for the request's own run, the database and the network.
_ADMIT_SHARE = 0.5
_EWMA = 0.2  # weight of the newest measurement of the cost per item


class Overloaded(Exception):
    """The service cannot take this work now; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the service is at capacity; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline (CLIP_TIMEOUT_S) passed before its embeddings were done."""


@dataclass
class _Job:
    kind: Kind
    payload: Any
    deadline: float
    cost: float
    future: Future = field(default_factory=Future)


class Batcher:
    """Runs texts and images through ``embedder`` in shared batches, one model thread."""

    def __init__(
        self,
        embedder: ClipEmbedder,
        *,
        batch_size: int,
        wait_ms: float,
        max_queue: int,
        metrics: ServeMetrics,
    ) -> None:
        self.embedder = embedder
        self.batch_size = batch_size
        self.wait_s = wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()  # admission: queued count and cost change together
        self._queued = 0
        self._queued_cost = 0.0
        self._running_cost = 0.0  # the estimated cost of the batch being run
        self._cost = {"text": 0.01, "image": 0.05}  # seconds per item, measured at start
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, warmup_image: Any | None = None) -> None:
        """Measure the cost per item (one run of each tower, also warming them) and start
        the model thread."""
        if warmup_image is not None:
            self._cost["image"] = _timed(lambda: self.embedder.embed_images([warmup_image]))
        if self.embedder.has_text_tower:
            self._cost["text"] = _timed(lambda: self.embedder.embed_texts(["warm up"]))
        self._thread = threading.Thread(target=self._run, name="clip-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the model thread after the batch in progress; queued jobs are cancelled."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def depth(self) -> int:
        """Jobs waiting for the model."""
        return self._queued

    # ------------------------------------------------------------------ requests

    async def embed(self, kind: Kind, payloads: Sequence[Any], deadline: float) -> np.ndarray:
        """Embed every payload (texts or images) before ``deadline`` (time.monotonic());
        float32 [N, D]. Raises Overloaded, DeadlineExceeded, or the runtime's ClipError for
        a bad input (the first bad one)."""
        jobs = self.submit(kind, payloads, deadline)
        waiting = [asyncio.wrap_future(job.future) for job in jobs]
        try:
            vectors = await asyncio.wait_for(
                asyncio.gather(*waiting), timeout=max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed before its embeddings were done (CLIP_TIMEOUT_S)"
            ) from None
        finally:
            for job in jobs:
                job.future.cancel()  # no-op once done; skipped by the model thread if queued
        return np.stack(vectors)

    def refusal(self, kind: Kind, deadline: float, count: int = 1) -> int | None:
        """None if ``count`` inputs of ``kind`` would be admitted now, else the seconds
        to retry after (the queue is full, or its work would not be done in time)."""
        budget = (deadline - time.monotonic()) * _ADMIT_SHARE
        ahead = self._queued_cost + self._running_cost  # work to be done before this
        if self._queued + count > self.max_queue or (
            ahead > 0 and ahead + self._cost[kind] * count > budget
        ):
            return max(1, math.ceil(ahead))
        return None

    def submit(self, kind: Kind, payloads: Sequence[Any], deadline: float) -> list[_Job]:
        """Queue one job per payload, all or none (Overloaded)."""
        with self._lock:
            if (retry_after := self.refusal(kind, deadline, len(payloads))) is not None:
                self.metrics.rejected.inc()
                raise Overloaded(retry_after)
            jobs = [_Job(kind, p, deadline, self._cost[kind]) for p in payloads]
            self._queued += len(jobs)
            self._queued_cost += self._cost[kind] * len(jobs)
        for job in jobs:
            self._queue.put(job)
        self.metrics.queue_depth.set(self._queued)
        return jobs

    # ------------------------------------------------------------------ model thread

    def _take(self) -> list[_Job] | None:
        """The next batch: up to batch_size jobs, waiting at most wait_s for more once the
        queue runs dry; None when stopping."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        fill_until = time.monotonic() + self.wait_s
        while len(batch) < self.batch_size:
            try:
                job = self._queue.get(timeout=max(0.0, fill_until - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(job)
        with self._lock:
            self._queued -= len(batch)
            self._queued_cost = max(0.0, self._queued_cost - sum(j.cost for j in batch))
        self.metrics.queue_depth.set(self._queued)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            now = time.monotonic()
            live = []
            for job in batch:
                if not job.future.set_running_or_notify_cancel():
                    continue  # its request gave up
                if now > job.deadline:
                    job.future.set_exception(DeadlineExceeded("deadline passed in the queue"))
                else:
                    live.append(job)
            self._running_cost = sum(j.cost for j in live)
            for kind in ("text", "image"):
                jobs = [j for j in live if j.kind == kind]
                if jobs:
                    self._run_batch(kind, jobs)
            self._running_cost = 0.0
        while not self._queue.empty():  # stopping: nothing left waits for ever
            leftover = self._queue.get_nowait()
            if leftover is not None:
                leftover.future.cancel()

    def _run_batch(self, kind: Kind, jobs: list[_Job]) -> None:
        embed = self.embedder.embed_texts if kind == "text" else self.embedder.embed_images
        started = time.perf_counter()
        try:
            vectors = embed([j.payload for j in jobs], batch_size=len(jobs))
        except ClipError as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
            else:  # one bad input must not fail the others: each alone, to find it
                for job in jobs:
                    self._run_batch(kind, [job])
            return
        except Exception as exc:  # a bug: fail these jobs, keep the thread
            log.exception("embedding batch failed")
            for job in jobs:
                job.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        self.metrics.batch_size.labels(kind).observe(len(jobs))
        self.metrics.inference_seconds.labels(kind).observe(seconds)
        self._cost[kind] += _EWMA * (seconds / len(jobs) - self._cost[kind])
        for job, vector in zip(jobs, vectors, strict=True):
            job.future.set_result(vector)


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started
