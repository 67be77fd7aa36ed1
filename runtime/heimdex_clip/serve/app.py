"""The FastAPI application: ``create_app(settings, embedder, pool)``.

One process holds one loaded model (behind the batcher's single model thread) and one
connection pool; the routes are in :mod:`.search_routes` and :mod:`.other_routes`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from psycopg_pool import ConnectionPool

from .. import __version__
from ..db.store import SceneStore
from ..embedder import ClipEmbedder
from . import errors, other_routes, search_routes
from .batcher import Batcher
from .metrics import ServeMetrics
from .middleware import Admission, BodyLimit, Measured
from .settings import ServeSettings
from .state import Service

#: Bodies of the JSON routes are small; anything larger is refused unread.
JSON_BODY_LIMIT = 1024 * 1024
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small form fields


def create_app(settings: ServeSettings, embedder: ClipEmbedder, pool: ConnectionPool) -> FastAPI:
    """The service over a loaded ``embedder`` and a ``pool`` on a migrated database. The
    batcher's model thread starts and stops with the app (its lifespan)."""
    embedder.load()
    metrics = ServeMetrics()
    batcher = Batcher(
        embedder,
        batch_size=embedder.config.batch_size,
        wait_ms=settings.batch_wait_ms,
        max_queue=settings.max_queue,
        metrics=metrics,
    )
    svc = Service(settings, embedder, pool, SceneStore(pool), batcher, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A mid-grey frame measures the image tower's cost (and warms it up).
        batcher.start(warmup_image=np.full((224, 224, 3), 128, dtype=np.uint8))
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(
        title="heimdex-clip search service",
        version=__version__,
        description="Owner-scoped CLIP scene search (image, scene, text, hybrid, "
        "composed) and OpenAI-compatible embeddings.",
        # No Swagger/ReDoc pages: they load scripts from a CDN.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = svc
    errors.install(app)
    app.include_router(search_routes.router)
    app.include_router(other_routes.router)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(
            resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
        )

    upload_limit = embedder.config.max_image_bytes + _FORM_OVERHEAD
    limits = {
        "/v1/search/image": upload_limit,
        "/v1/embeddings/images": upload_limit * settings.max_inputs,
    }
    app.add_middleware(BodyLimit, limits=limits, default=JSON_BODY_LIMIT)
    app.add_middleware(Admission, batcher=batcher, timeout_s=embedder.config.timeout_s)
    app.add_middleware(Measured, metrics=metrics)
    return app
