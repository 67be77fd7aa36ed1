"""The worker service (``heimdex-clip backfill --follow``): embed pending scenes for ever.

It backs off while there is nothing to do (``idle_min_s`` doubling up to ``idle_max_s``),
stops after its current batch when ``stop`` is set (the CLI sets it on SIGTERM/SIGINT), and
every ``stats_interval_s`` logs the four monitoring figures (a failing stats query, e.g.
one past the statement timeout on a large table, is logged and the worker goes on); with
the optional ``prometheus-client`` package (extra ``metrics``) it also serves them on
``metrics_port``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..embedder import ClipEmbedder
from .backfill import BackfillReport, Policy, Scope, run_backfill
from .connection import DatabaseError, one_line
from .stats import ClipStats, clip_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FollowOptions:
    idle_min_s: float = 1.0
    idle_max_s: float = 30.0
    stats_interval_s: float = 60.0
    metrics_port: int | None = None


class Metrics:
    """The four figures (and this worker's counters) as Prometheus metrics, if available."""

    def __init__(self, port: int | None) -> None:
        self.enabled = False
        if port is None:
            return
        try:
            import prometheus_client as prom
        except ImportError:
            raise DatabaseError(
                "--metrics-port needs the prometheus-client package: "
                "pip install 'heimdex-clip[metrics]'"
            ) from None
        registry = prom.CollectorRegistry()
        gauge = lambda name, doc: prom.Gauge(name, doc, registry=registry)  # noqa: E731
        self.availability = gauge(
            "heimdex_clip_availability_ratio", "Share of scenes with a CLIP embedding"
        )
        self.latency = gauge(
            "heimdex_clip_inference_time_ms_avg", "Mean inference_time_ms of embedded scenes"
        )
        self.failure_rate = gauge(
            "heimdex_clip_failure_ratio", "Share of attempted scenes whose embedding failed"
        )
        self.timeout_rate = gauge(
            "heimdex_clip_timeout_ratio", "Share of attempted scenes that timed out"
        )
        self.embedded = prom.Counter(
            "heimdex_clip_worker_embedded", "Scenes this worker embedded", registry=registry
        )
        self.failed = prom.Counter(
            "heimdex_clip_worker_failed", "Scenes this worker failed to embed", registry=registry
        )
        prom.start_http_server(port, registry=registry)
        self.enabled = True
        log.info("serving Prometheus metrics on port %d", port)

    def count(self, report: BackfillReport) -> None:
        if self.enabled:
            self.embedded.inc(report.embedded)
            self.failed.inc(report.failed)

    def update(self, stats: ClipStats) -> None:
        if not self.enabled:
            return
        for gauge, value in (
            (self.availability, stats.availability),
            (self.latency, stats.latency_mean_ms),
            (self.failure_rate, stats.failure_rate),
            (self.timeout_rate, stats.timeout_rate),
        ):
            gauge.set(float("nan") if value is None else value)


def log_figures(stats: ClipStats) -> None:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    log.info(
        "figures: availability %s, avg inference_time_ms %s, failure rate %s, "
        "timeout rate %s (%d scenes)",
        pct(stats.availability),
        "n/a" if stats.latency_mean_ms is None else f"{stats.latency_mean_ms:.1f}",
        pct(stats.failure_rate),
        pct(stats.timeout_rate),
        stats.scenes,
    )


def report_figures(pool: ConnectionPool, scope: Scope, metrics: Metrics) -> bool:
    """Log (and export) the figures; False if the query failed. Never raises for the
    database: monitoring is bookkeeping, and must never end the worker it watches."""
    try:
        stats = clip_stats(pool, scope)
    except (psycopg.Error, PoolTimeout, DatabaseError) as exc:
        log.warning(
            "monitoring query failed, the worker goes on: %s: %s", type(exc).__name__, one_line(exc)
        )
        return False
    log_figures(stats)
    metrics.update(stats)
    return True


def follow(
    pool: ConnectionPool,
    embedder: ClipEmbedder,
    scope: Scope,
    stop: threading.Event,
    *,
    policy: Policy | None = None,
    reembed_stale: bool = False,
    options: FollowOptions | None = None,
) -> BackfillReport:
    """Embed pending scenes until ``stop`` is set; returns the totals."""
    options = options or FollowOptions()
    metrics = Metrics(options.metrics_port)
    total = BackfillReport()
    idle = options.idle_min_s
    next_stats = 0.0
    log.info(
        "worker started: artifact %s, %s",
        embedder.load().artifact_id,
        "all owners" if scope.all_owners else f"owner {scope.owner_id}",
    )
    while not stop.is_set():
        # One batch per pass, so the figures are logged on time while busy.
        try:
            report = _one_batch(pool, embedder, scope, policy, reembed_stale, stop)
        except (psycopg.OperationalError, PoolTimeout) as exc:  # database restarting
            log.error(
                "database unavailable (%s); retrying in %.0f s",
                str(exc).strip().splitlines()[0],
                idle,
            )
            stop.wait(idle)
            idle = min(idle * 2, options.idle_max_s)
            continue
        total.embedded += report.embedded
        total.failed += report.failed
        total.batches += report.batches
        total.scenes |= report.scenes
        metrics.count(report)
        if time.monotonic() >= next_stats:
            report_figures(pool, scope, metrics)
            next_stats = time.monotonic() + options.stats_interval_s
        if report.batches:
            idle = options.idle_min_s
            continue
        stop.wait(idle)  # nothing ready: back off, but wake at once on SIGTERM
        idle = min(idle * 2, options.idle_max_s)
    log.info(
        "worker stopping: %d embedded, %d failed in %d batches",
        total.embedded,
        total.failed,
        total.batches,
    )
    return total


def _one_batch(
    pool: ConnectionPool,
    embedder: ClipEmbedder,
    scope: Scope,
    policy: Policy | None,
    reembed_stale: bool,
    stop: threading.Event,
) -> BackfillReport:
    policy = policy or Policy()
    return run_backfill(
        pool,
        embedder,
        scope,
        policy=policy,
        limit=policy.batch_size,
        reembed_stale=reembed_stale,
        stop=stop,
    )
