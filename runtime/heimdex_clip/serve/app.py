"""The FastAPI application: ``create_app(settings, embedder, pool)``.

One process holds one loaded model (behind the batcher's single model thread) and one
connection pool; the routes are in :mod:`.search_routes` and :mod:`.other_routes`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..db.store import SceneStore
from ..embedder import ClipEmbedder
from . import errors, other_routes, search_routes
from .batcher import Batcher
from .metrics import ServeMetrics
from .settings import ServeSettings
from .state import Service

#: Bodies of the JSON routes are small; anything larger is refused unread.
JSON_BODY_LIMIT = 1024 * 1024
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small form fields


def create_app(settings: ServeSettings, embedder: ClipEmbedder,
               pool: ConnectionPool) -> FastAPI:
    """The service over a loaded ``embedder`` and a ``pool`` on a migrated database. The
    batcher's model thread starts and stops with the app (its lifespan)."""
    embedder.load()
    metrics = ServeMetrics()
    batcher = Batcher(embedder, batch_size=embedder.config.batch_size,
                      wait_ms=settings.batch_wait_ms, max_queue=settings.max_queue,
                      metrics=metrics)
    svc = Service(settings, embedder, pool, SceneStore(pool), batcher, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A mid-grey frame measures the image tower's cost (and warms it up).
        batcher.start(warmup_image=np.full((224, 224, 3), 128, dtype=np.uint8))
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="heimdex-clip search service", version=__version__,
                  description="Owner-scoped CLIP scene search (image, scene, text, hybrid, "
                              "composed) and OpenAI-compatible embeddings.",
                  # No Swagger/ReDoc pages: they load scripts from a CDN.
                  docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = svc
    errors.install(app)
    app.include_router(search_routes.router)
    app.include_router(other_routes.router)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(
            encoding="utf-8"))

    upload_limit = embedder.config.max_image_bytes + _FORM_OVERHEAD
    limits = {"/v1/search/image": upload_limit,
              "/v1/embeddings/images": upload_limit * settings.max_inputs}
    app.add_middleware(BodyLimit, limits=limits, default=JSON_BODY_LIMIT)
    app.add_middleware(Measured, metrics=metrics)
    return app


def _json_error(status: int, message: str) -> tuple[Message, Message]:
    body = json.dumps({"error": {"message": message, "type": errors._TYPES.get(status, "error"),
                                 "code": status}}).encode()
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]},
            {"type": "http.response.body", "body": body})


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
            for part in _json_error(413 if declared.isdigit() else 400,
                                    message if declared.isdigit() else "bad Content-Length"):
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


class Measured:
    """Prometheus figures of every request: count by route and status, latency by route."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

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
