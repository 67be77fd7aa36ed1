"""The service's ASGI middleware: request figures and deadlines, early 503s, body limits.

Each answers its refusals itself (JSON error bodies), before the app reads the body.
"""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batcher import Batcher, Kind
from .errors import error_type
from .metrics import ServeMetrics

#: The routes that put work on the batcher, and of which kind.
EMBEDDING_ROUTES: dict[str, Kind] = {
    "/v1/search/image": "image",
    "/v1/embeddings/images": "image",
    "/v1/search/text": "text",
    "/v1/search": "text",
    "/v1/embeddings": "text",
}


def _json_error(status: int, message: str) -> tuple[Message, Message]:
    body = json.dumps(
        {"error": {"message": message, "type": error_type(status), "code": status}}
    ).encode()
    return (
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        },
        {"type": "http.response.body", "body": body},
    )


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for a request body over its route's limit: at once from Content-Length, before
    any of the body is read, or as soon as a streamed body passes the limit."""

    def __init__(self, app: ASGIApp, limits: dict[str, int], default: int) -> None:
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        message = f"request body exceeds {limit} bytes (CLIP_MAX_IMAGE_BYTES per image)"
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            for part in _json_error(
                413 if declared.isdigit() else 400,
                message if declared.isdigit() else "bad Content-Length",
            ):
                await send(part)
            return None
        seen, too_large, answered = 0, False, False

        async def counted() -> Message:
            nonlocal seen, too_large
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > limit:
                too_large = True
                raise _TooLarge  # the app turns it into an error answer, replaced below
            return msg

        async def replaced(msg: Message) -> None:
            nonlocal answered
            if not too_large:
                await send(msg)
            elif not answered:
                answered = True
                for part in _json_error(413, message):
                    await send(part)

        try:
            await self.app(scope, counted, replaced)
        except _TooLarge:
            if not answered:
                for part in _json_error(413, message):
                    await send(part)
        return None


class Admission:
    """503 + Retry-After for work the batcher would refuse, at once: before the body is
    read (an overloaded service must not spend its time parsing uploads it will refuse)."""

    def __init__(self, app: ASGIApp, batcher: Batcher, timeout_s: float) -> None:
        self.app, self.batcher, self.timeout_s = app, batcher, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = EMBEDDING_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if kind is not None and scope["method"] == "POST":
            deadline = scope.get("state", {}).get("arrived", time.monotonic()) + self.timeout_s
            if (retry_after := self.batcher.refusal(kind, deadline)) is not None:
                self.batcher.metrics.rejected.inc()
                start, body = _json_error(
                    503, f"the service is at capacity; retry after {retry_after} s"
                )
                start["headers"].append((b"retry-after", str(retry_after).encode()))
                await send(start)
                await send(body)
                return None
        return await self.app(scope, receive, send)


class Measured:
    """Prometheus figures of every request: count by route and status, latency by route."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500
        # The request's deadline counts from here (Service.deadline).
        scope.setdefault("state", {})["arrived"] = time.monotonic()

        async def tracked(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, tracked)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
        return None
