"""Request and response bodies of the service (they make its OpenAPI document)."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Bounds shared by every search (CLIP_SERVE_MAX_COUNT caps match_count further).
Threshold = Field(
    0.0, ge=-1.0, le=1.0, allow_inf_nan=False, description="minimum cosine similarity, in [-1, 1]"
)
Count = Field(20, ge=1, le=200, description="at most this many results (1..200)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SceneSearch(_Strict):
    scene_id: uuid.UUID = Field(description="one of the caller's scenes")
    match_threshold: float = Threshold
    match_count: int = Count


class TextSearch(_Strict):
    query: str = Field(min_length=1, max_length=1000)
    match_threshold: float = Threshold
    match_count: int = Count
    mode: Literal["clip", "hybrid"] = Field(
        "clip",
        description="clip: the text tower only; hybrid: fused with full-text search "
        "of scene transcripts (reciprocal rank fusion)",
    )


class QueryPartIn(_Strict):
    text: str | None = Field(None, min_length=1, max_length=1000)
    scene_id: uuid.UUID | None = None
    weight: float = Field(
        1.0,
        ge=-100,
        le=100,
        allow_inf_nan=False,
        description="non-zero; negative steers away from the part",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> QueryPartIn:
        if (self.text is None) == (self.scene_id is None):
            raise ValueError("a part has exactly one of text and scene_id")
        if self.weight == 0:
            raise ValueError("a part's weight must not be 0 (drop the part instead)")
        return self


class ComposedSearch(_Strict):
    parts: list[QueryPartIn] = Field(min_length=1, max_length=16)
    match_threshold: float = Threshold
    match_count: int = Count


class SceneHit(BaseModel):
    scene_id: uuid.UUID
    video_id: uuid.UUID | None
    scene_index: int | None
    start_s: float | None
    end_s: float | None
    frame_path: str | None
    similarity: float | None = Field(
        description="cosine similarity to the query (hybrid: null for a scene found by its "
        "words that has no vector of this model)"
    )
    score: float | None = Field(None, description="hybrid only: the fused (RRF) score")


class SearchResponse(BaseModel):
    results: list[SceneHit] = Field(description="best first")
    model: str = Field(description="the artifact that embedded the query")
    took_ms: float


class EmbeddingsRequest(BaseModel):
    input: str | list[str] = Field(description="a text or a list of texts")
    model: str | None = Field(
        None,
        description="accepted for OpenAI compatibility; the service answers with its own model",
    )
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(
        description="floats, or base64 of little-endian float32 when encoding_format is base64"
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorBody(BaseModel):
    """Every error answer (OpenAI's shape, so its clients show the message)."""

    error: ErrorDetail


class Health(BaseModel):
    status: str
    model: str | None = None
    checks: dict[str, str] = Field(default_factory=dict)
