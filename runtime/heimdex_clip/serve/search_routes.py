"""The search routes: a thin layer over SceneStore and the hybrid search of the db layer.

Query vectors come from the batcher (shared model runs); the searching itself is the db
layer's (``SceneStore.search_by_embedding``, ``search_similar``, ``search_composed``,
``db.hybrid.search_hybrid``), run in worker threads within the request's deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile

from ..db.connection import DatabaseError
from ..db.hybrid import HybridHit, owned_scenes, scene_spans, search_hybrid
from ..db.store import SearchHit
from ..query import QueryPart
from .errors import COMMON_ERRORS, ApiError
from .schemas import (
    ComposedSearch,
    ErrorBody,
    SceneHit,
    SceneSearch,
    SearchResponse,
    TextSearch,
)
from .state import Owner, Service, service

router = APIRouter(prefix="/v1", tags=["search"])
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}, 409: {"model": ErrorBody}}


async def answer(
    svc: Service, owner: uuid.UUID, hits: Sequence[SearchHit], started: float, deadline: float
) -> SearchResponse:
    """The response body: the hits with their scene's time range, best first."""
    spans = await svc.db(scene_spans, svc.pool, owner, [h.id for h in hits], deadline=deadline)
    results = [
        SceneHit(
            scene_id=h.id,
            video_id=h.video_id,
            scene_index=h.scene_index,
            start_s=spans.get(h.id, (None, None))[0],
            end_s=spans.get(h.id, (None, None))[1],
            frame_path=h.frame_path,
            similarity=h.similarity,
            score=getattr(h, "score", None),
        )
        for h in hits
    ]
    return SearchResponse(
        results=results,
        model=svc.embedder.artifact_id,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )


def check_count(svc: Service, count: int) -> None:
    if count > svc.settings.max_count:
        raise ApiError(
            422, f"match_count must be <= {svc.settings.max_count} (CLIP_SERVE_MAX_COUNT)"
        )


async def require_scenes(
    svc: Service, owner: uuid.UUID, scene_ids: set[uuid.UUID], deadline: float
) -> None:
    """404 unless every scene is the caller's: another owner's scene id answers exactly as
    one that does not exist, so ids leak nothing."""
    missing = scene_ids - await svc.db(owned_scenes, svc.pool, owner, scene_ids, deadline=deadline)
    if missing:
        raise ApiError(404, f"scene {sorted(map(str, missing))[0]} not found")


@router.post("/search/image", response_model=SearchResponse, responses=COMMON_ERRORS)
async def search_image(
    request: Request,
    owner: Owner,
    image: Annotated[UploadFile, File(description="the query image")],
    match_threshold: Annotated[float, Form(ge=-1, le=1, allow_inf_nan=False)] = 0.0,
    match_count: Annotated[int, Form(ge=1, le=200)] = 20,
) -> SearchResponse:
    """The caller's scenes most similar to an uploaded image."""
    svc, started = service(request), time.perf_counter()
    check_count(svc, match_count)
    data = await read_upload(svc, image)
    deadline = svc.deadline(request)
    vector = (await svc.batcher.embed("image", [data], deadline))[0]
    hits = await svc.db(
        svc.store.search_by_embedding,
        owner,
        vector,
        artifact=svc.embedder.artifact_id,
        threshold=match_threshold,
        count=match_count,
        deadline=deadline,
    )
    return await answer(svc, owner, hits, started, deadline)


async def read_upload(svc: Service, upload: UploadFile) -> bytes:
    """An uploaded file's bytes; 413 past CLIP_MAX_IMAGE_BYTES. (The body limit already
    refused an oversized request from its Content-Length, before reading it.)"""
    limit = svc.embedder.config.max_image_bytes
    if upload.size is not None and upload.size > limit:
        raise ApiError(413, f"image of {upload.size} bytes exceeds CLIP_MAX_IMAGE_BYTES={limit}")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"image exceeds CLIP_MAX_IMAGE_BYTES={limit}")
    return data


@router.post(
    "/search/scene", response_model=SearchResponse, responses={**COMMON_ERRORS, **_NOT_FOUND}
)
async def search_scene(request: Request, owner: Owner, body: SceneSearch) -> SearchResponse:
    """The caller's scenes most similar to one of the caller's scenes (itself excluded)."""
    svc, started = service(request), time.perf_counter()
    check_count(svc, body.match_count)
    deadline = svc.deadline(request)
    await require_scenes(svc, owner, {body.scene_id}, deadline)
    try:
        hits = await svc.db(
            svc.store.search_similar,
            owner,
            body.scene_id,
            artifact=svc.embedder.artifact_id,
            threshold=body.match_threshold,
            count=body.match_count,
            deadline=deadline,
        )
    except DatabaseError as exc:  # the scene is the caller's: it has no vector yet
        raise ApiError(409, str(exc)) from None
    return await answer(svc, owner, hits, started, deadline)


@router.post("/search/text", response_model=SearchResponse, responses=COMMON_ERRORS)
async def search_text(request: Request, owner: Owner, body: TextSearch) -> SearchResponse:
    """The caller's scenes matching words: by the text tower (clip), or fused with
    full-text search of their transcripts (hybrid)."""
    svc, started = service(request), time.perf_counter()
    check_count(svc, body.match_count)
    deadline = svc.deadline(request)
    vector = (await svc.batcher.embed("text", [body.query], deadline))[0]
    hits: Sequence[SearchHit | HybridHit]
    if body.mode == "hybrid":
        hits = await svc.db(
            search_hybrid,
            svc.store,
            owner,
            vector,
            body.query,
            artifact=svc.embedder.artifact_id,
            threshold=body.match_threshold,
            count=body.match_count,
            deadline=deadline,
        )
    else:
        hits = await svc.db(
            svc.store.search_by_embedding,
            owner,
            vector,
            artifact=svc.embedder.artifact_id,
            threshold=body.match_threshold,
            count=body.match_count,
            deadline=deadline,
        )
    return await answer(svc, owner, hits, started, deadline)


class _Prepared:
    """An embedder stand-in for ``SceneStore.search_composed`` whose texts were embedded
    beforehand by the batcher (so they shared model runs with other requests)."""

    def __init__(self, artifact_id: str, texts: dict[str, np.ndarray]) -> None:
        self.artifact_id, self._texts = artifact_id, texts

    def load(self) -> _Prepared:
        return self  # the service's embedder is loaded at start-up

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._texts[t] for t in texts])

    def embed_images(self, images: Sequence[object]) -> np.ndarray:
        raise ApiError(422, "a composed query over HTTP has text and scene_id parts only")


@router.post("/search", response_model=SearchResponse, responses={**COMMON_ERRORS, **_NOT_FOUND})
async def search_composed(request: Request, owner: Owner, body: ComposedSearch) -> SearchResponse:
    """A composed query: the unit-length weighted sum of texts and scenes (as
    ``heimdex-clip search --text ... --scene ... --weight ...``)."""
    svc, started = service(request), time.perf_counter()
    check_count(svc, body.match_count)
    deadline = svc.deadline(request)
    parts = [
        QueryPart("text", p.text, p.weight)
        if p.text is not None
        else QueryPart("scene", p.scene_id, p.weight)
        for p in body.parts
    ]
    await require_scenes(svc, owner, {p.value for p in parts if p.kind == "scene"}, deadline)
    texts = sorted({p.value for p in parts if p.kind == "text"})
    vectors = list(await svc.batcher.embed("text", texts, deadline)) if texts else []
    prepared = _Prepared(svc.embedder.artifact_id, dict(zip(texts, vectors, strict=True)))
    try:
        hits = await svc.db(
            svc.store.search_composed,
            owner,
            prepared,
            parts,
            threshold=body.match_threshold,
            count=body.match_count,
            deadline=deadline,
        )
    except DatabaseError as exc:  # the scenes are the caller's: one has no vector yet
        raise ApiError(409, str(exc)) from None
    return await answer(svc, owner, hits, started, deadline)
