"""Running work against a deadline, so a caller can stop waiting and the work stops soon.

Python cannot kill a thread, so every job runs on a thread of its own and the caller waits
for it at most until the deadline. At the deadline the job is cancelled: an ONNX Runtime
run in progress is terminated through its ``RunOptions`` (the session stays usable), and
the job's own code checks :meth:`Job.check` between stages. What cannot be interrupted (a
Pillow decode) is bounded in size before it starts, so abandoned work ends soon.

A job never waits for a pool slot held by a stuck job: there is no fixed pool. The number
of live job threads is capped (:data:`MAX_LIVE_JOBS`) to bound memory; past the cap a new
job waits for a slot within its own deadline.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import onnxruntime as ort

T = TypeVar("T")

#: Live job threads at most (running or abandoned after a timeout, still finishing).
MAX_LIVE_JOBS = 16


class Cancelled(Exception):
    """Raised inside a job once its caller stopped waiting; the job abandons its stages."""


class JobTimeout(Exception):
    """The job did not finish before its deadline (it was cancelled)."""


class Job:
    """Cancellation state of one job, shared by the caller and the thread running it."""

    def __init__(self) -> None:
        self.run_options = ort.RunOptions()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the caller has stopped waiting."""
        if self._cancelled.is_set():
            raise Cancelled

    def cancel(self) -> None:
        # One lock so the flag and the ORT terminate request are set together.
        with self._lock:
            self._cancelled.set()
            self.run_options.terminate = True


class DeadlineRunner:
    """Runs ``fn(job)`` on its own daemon thread and waits for it until a deadline."""

    def __init__(self, max_live: int = MAX_LIVE_JOBS) -> None:
        self._slots = threading.BoundedSemaphore(max_live)
        self._live = 0
        self._live_lock = threading.Lock()

    @property
    def live_jobs(self) -> int:
        """Job threads still running, including abandoned ones that are finishing."""
        return self._live

    def run(self, fn: Callable[[Job], T], timeout_s: float) -> T:
        """``fn(job)``'s result, or its exception; :class:`JobTimeout` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if not self._slots.acquire(timeout=max(0.0, timeout_s)):
            raise JobTimeout
        job = Job()
        future: cf.Future[T] = cf.Future()
        with self._live_lock:
            self._live += 1
        try:
            threading.Thread(target=self._work, args=(fn, job, future), daemon=True,
                             name="heimdex-clip-job").start()
        except BaseException:
            self._finished()
            raise
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except cf.TimeoutError:
            job.cancel()
            raise JobTimeout from None

    def _work(self, fn: Callable[[Job], T], job: Job, future: cf.Future[T]) -> None:
        try:
            future.set_result(fn(job))
        except BaseException as exc:  # handed to the caller, who decides what is fatal
            future.set_exception(exc)
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._live_lock:
            self._live -= 1
        self._slots.release()
