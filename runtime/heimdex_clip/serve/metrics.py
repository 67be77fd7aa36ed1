"""The service's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServeMetrics:
    """Requests by route and status, latency, batch sizes, queue depth, inference time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "heimdex_clip_http_requests_total",
            "HTTP requests answered",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "heimdex_clip_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "heimdex_clip_batch_size",
            "inputs per model run",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "heimdex_clip_inference_seconds",
            "time of one model run (a batch)",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "heimdex_clip_queue_depth", "inputs waiting for the model", registry=self.registry
        )
        self.rejected = Counter(
            "heimdex_clip_overload_rejections_total",
            "requests refused with 503 (queue full)",
            registry=self.registry,
        )
