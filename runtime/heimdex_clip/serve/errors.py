"""Every failure as a JSON error body (``{"error": {"message", "type", "code"}}``), never a
stack trace: the runtime's and the database's errors mapped to HTTP statuses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..db.errors import InvalidInputError
from ..errors import ClipError, DimensionError, ImageError, QueryError, TextError
from .batcher import DeadlineExceeded, Overloaded
from .schemas import ErrorBody

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found",
    405: "invalid_request_error",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_request_error",
    500: "server_error",
    503: "overloaded",
    504: "timeout",
}


class ApiError(Exception):
    """An answer other than 2xx, with its message (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_type(status: int) -> str:
    """The ``type`` of an error body (OpenAI's names where they exist)."""
    return _TYPES.get(status, "error")


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type(status), "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, {"WWW-Authenticate": "Bearer"})


#: The error answers every route documents (OpenAPI), besides its own: 400 for a body that
#: cannot be parsed, 413 for one over its limit.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 422, 500, 503, 504)
}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into a JSON error body."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc))

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return error_response(503, str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(_: Request, exc: DeadlineExceeded) -> JSONResponse:
        return error_response(504, str(exc))

    @app.exception_handler(ClipError)
    async def _clip(_: Request, exc: ClipError) -> JSONResponse:
        # Bad input (an image, a text, a query) is the caller's; anything else is ours.
        if isinstance(exc, (ImageError, TextError, QueryError, DimensionError, InvalidInputError)):
            return error_response(422, str(exc))
        log.error("service error: %s", exc)
        return error_response(500, f"{type(exc).__name__}: {exc}")

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")  # the traceback goes to the log, never the client
        return error_response(500, "internal error (logged by the service)")
