"""Running work against a deadline, so a caller can stop waiting and the work stops soon.

Python cannot kill a thread, so every job runs on a thread of its own and the caller waits
for it at most until the deadline. At the deadline the job is cancelled: an ONNX Runtime
run in progress is terminated through its ``RunOptions`` (the session stays usable), and
the job's own code checks :meth:`Job.check` between stages. What cannot be interrupted (a
Pillow decode) is bounded in size before it starts, so abandoned work ends soon.

A job never waits for a pool slot held by a stuck job: there is no fixed pool. The number
of live job threads is capped (:data:`MAX_LIVE_JOBS`) to bound memory; past the cap a new
job waits for a slot within its own deadline.

At interpreter exit, every job still running is cancelled and waited for (at most
:data:`EXIT_DRAIN_S`), see :func:`drain`: a job thread is a daemon, and a process that
exits while one is still inside ``InferenceSession.run`` tears ONNX Runtime down under it
and aborts ("terminate called without an active exception", SIGABRT, exit status 134)
instead of exiting with its own status.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import onnxruntime as ort

from .errors import ConfigError

T = TypeVar("T")

#: Live job threads at most (running or abandoned after a timeout, still finishing).
MAX_LIVE_JOBS = 16
#: How long the exit hook waits for cancelled jobs (ONNX Runtime stops a terminated run
#: at its next node, within milliseconds; a decode is bounded in size before it starts).
EXIT_DRAIN_S = 10.0

log = logging.getLogger("heimdex_clip")

# Every job of every runner still running, for the exit hook.
_live: set[Job] = set()
_live_changed = threading.Condition()


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
        """``fn(job)``'s result, or its exception; :class:`JobTimeout` after ``timeout_s``.

        A ``timeout_s`` no wait can take (NaN, infinite, past ``threading.TIMEOUT_MAX``) is
        a fault of the configuration, raised as ConfigError before any work starts.
        """
        if not (
            isinstance(timeout_s, (int, float))
            and math.isfinite(timeout_s)
            and 0 <= timeout_s <= threading.TIMEOUT_MAX
        ):
            raise ConfigError(
                f"a job timeout of {timeout_s!r}s cannot be waited for "
                "(CLIP_TIMEOUT_S is 1e-06..3600)"
            )
        deadline = time.monotonic() + timeout_s
        if not self._slots.acquire(timeout=max(0.0, timeout_s)):
            raise JobTimeout
        job = Job()
        future: cf.Future[T] = cf.Future()
        with self._live_lock:
            self._live += 1
        with _live_changed:
            _live.add(job)
        try:
            threading.Thread(
                target=self._work, args=(fn, job, future), daemon=True, name="heimdex-clip-job"
            ).start()
        except BaseException:
            self._finished(job)
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
            self._finished(job)

    def _finished(self, job: Job) -> None:
        with self._live_lock:
            self._live -= 1
        self._slots.release()
        with _live_changed:
            _live.discard(job)
            _live_changed.notify_all()


def drain(timeout_s: float) -> bool:
    """Cancel every running job (of every runner) and wait until all have ended, at most
    ``timeout_s``; True when none is left. Runs at interpreter exit (see module docs)."""
    deadline = time.monotonic() + timeout_s
    with _live_changed:
        for job in list(_live):
            job.cancel()
        while _live:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            _live_changed.wait(remaining)
    return True


def _drain_at_exit() -> None:
    if not drain(EXIT_DRAIN_S):
        log.warning(
            "%d heimdex-clip job(s) still running at exit after %.0fs", len(_live), EXIT_DRAIN_S
        )


atexit.register(_drain_at_exit)
