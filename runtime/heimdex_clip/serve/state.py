"""What every request uses: settings, the model, the database, the batcher, the metrics."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

from ..db.api_keys import looks_like_key
from ..db.store import SceneStore
from ..embedder import ClipEmbedder
from .auth import authenticate, owner_from_jwt
from .batcher import Batcher, DeadlineExceeded
from .metrics import ServeMetrics
from .settings import ServeSettings

T = TypeVar("T")
# Declares the scheme in the OpenAPI document; the credential is checked by current_owner.
_bearer = HTTPBearer(auto_error=False, description="an API key (hck_...) or an HS256 JWT")


@dataclass
class Service:
    settings: ServeSettings
    embedder: ClipEmbedder
    pool: ConnectionPool
    store: SceneStore
    batcher: Batcher
    metrics: ServeMetrics

    @property
    def timeout_s(self) -> float:
        return self.embedder.config.timeout_s

    def deadline(self, request: Request) -> float:
        """The request's deadline (time.monotonic()): CLIP_TIMEOUT_S after it arrived
        (time spent waiting for the event loop, reading the body and authenticating counts)."""
        return getattr(request.state, "arrived", time.monotonic()) + self.timeout_s

    async def db(
        self, fn: Callable[..., T], *args: Any, deadline: float | None = None, **kwargs: Any
    ) -> T:
        """Run a blocking database call in a worker thread, within ``deadline``."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed (CLIP_TIMEOUT_S)")
        try:
            with anyio.fail_after(remaining):
                return await anyio.to_thread.run_sync(
                    lambda: fn(*args, **kwargs), abandon_on_cancel=True
                )
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed in the database (CLIP_TIMEOUT_S)"
            ) from None


def service(request: Request) -> Service:
    return request.app.state.service


async def current_owner(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> uuid.UUID:
    """The caller's owner id, from its credential (401 if none or invalid)."""
    svc = service(request)
    header = request.headers.get("authorization")
    scheme, _sep, credential = (header or "").partition(" ")
    if header and scheme.lower() == "bearer" and not looks_like_key(credential.strip()):
        return owner_from_jwt(credential.strip(), svc.settings.jwt_secret)  # no database
    return await svc.db(
        authenticate, header, svc.pool, svc.settings.jwt_secret, deadline=svc.deadline(request)
    )


#: A route parameter: the authenticated caller's owner id.
Owner = Annotated[uuid.UUID, Depends(current_owner)]
