"""Embeddings (OpenAI-compatible), scene frames, health, readiness and metrics."""

from __future__ import annotations

import base64
import mimetypes
import uuid
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..db.migrate import pending_migrations
from .errors import COMMON_ERRORS, ApiError
from .schemas import Embedding, EmbeddingsRequest, EmbeddingsResponse, ErrorBody, Health, Usage
from .search_routes import read_upload
from .state import Owner, Service, service

router = APIRouter()


def _embeddings(
    svc: Service, vectors: np.ndarray, encoding: str, tokens: int
) -> EmbeddingsResponse:
    def encode(vector: np.ndarray) -> list[float] | str:
        if encoding == "base64":  # what OpenAI's own client asks for by default
            return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        return [float(x) for x in vector]

    return EmbeddingsResponse(
        data=[Embedding(index=i, embedding=encode(v)) for i, v in enumerate(vectors)],
        model=svc.embedder.artifact_id,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    tags=["embeddings"],
    responses=COMMON_ERRORS,
)
async def embed_texts(
    request: Request, _owner: Owner, body: EmbeddingsRequest
) -> EmbeddingsResponse:
    """Text embeddings in OpenAI's format (``input``: a text or a list of texts)."""
    svc = service(request)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not 1 <= len(texts) <= svc.settings.max_inputs:
        raise ApiError(
            422, f"input must hold 1 to {svc.settings.max_inputs} texts (CLIP_SERVE_MAX_INPUTS)"
        )
    vectors = await svc.batcher.embed("text", texts, svc.deadline(request))
    tokens = int(np.count_nonzero(svc.embedder.tokenize(texts)))  # SOT/EOT included
    return _embeddings(svc, vectors, body.encoding_format, tokens)


@router.post(
    "/v1/embeddings/images",
    response_model=EmbeddingsResponse,
    tags=["embeddings"],
    responses=COMMON_ERRORS,
)
async def embed_images(
    request: Request,
    _owner: Owner,
    image: Annotated[list[UploadFile], File(description="one or more images")],
) -> EmbeddingsResponse:
    """Image embeddings, answered in the same shape as /v1/embeddings."""
    svc = service(request)
    if not 1 <= len(image) <= svc.settings.max_inputs:
        raise ApiError(
            422, f"send 1 to {svc.settings.max_inputs} image files (CLIP_SERVE_MAX_INPUTS)"
        )
    data = [await read_upload(svc, upload) for upload in image]
    vectors = await svc.batcher.embed("image", data, svc.deadline(request))
    return _embeddings(svc, vectors, "float", 0)


@router.get(
    "/v1/scenes/{scene_id}/frame",
    tags=["scenes"],
    response_class=FileResponse,
    responses={
        200: {"content": {"image/*": {}}, "description": "the frame"},
        404: {"model": ErrorBody},
        **COMMON_ERRORS,
    },
)
async def scene_frame(request: Request, owner: Owner, scene_id: uuid.UUID) -> FileResponse:
    """One of the caller's scenes' frame, if it lies under CLIP_SERVE_MEDIA_ROOT."""
    svc = service(request)
    scene = await svc.db(svc.store.get_scene, owner, scene_id, deadline=svc.deadline(request))
    path = frame_file(svc.settings.media_root, (scene or {}).get("frame_path"))
    if scene is None or path is None:
        raise ApiError(404, f"scene {scene_id} has no frame here")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type)


def frame_file(media_root: Path | None, frame_path: str | None) -> Path | None:
    """``frame_path`` resolved (symlinks followed) if it is a file under ``media_root``:
    nothing else on disk is reachable."""
    if media_root is None or not frame_path:
        return None
    root = media_root.resolve()
    try:
        path = (root / frame_path).resolve()  # an absolute frame_path replaces root here
    except (OSError, ValueError):
        return None
    return path if path.is_relative_to(root) and path.is_file() else None


@router.get("/healthz", response_model=Health, tags=["health"])
async def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
async def readyz(request: Request) -> Response:
    """Ready: the model is loaded and the database is reachable and fully migrated."""
    svc = service(request)
    checks = {"model": "ok" if svc.embedder.is_loaded else "not loaded"}
    try:
        missing = await svc.db(pending_migrations, svc.pool, deadline=svc.deadline(request))
        checks["database"] = "ok" if not missing else f"missing migrations {', '.join(missing)}"
    except Exception as exc:  # unreachable, timed out: not ready, and say why
        checks["database"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    body = Health(
        status="ready" if ready else "not ready",
        checks=checks,
        model=svc.embedder.artifact_id if svc.embedder.is_loaded else None,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(
        generate_latest(service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
