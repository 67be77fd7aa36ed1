"""Multi-frame pooling for scenes: which frames to use, and how their vectors combine.

Pure functions over :class:`~heimdex_clip.metadata.EmbeddingResult`; the embedder runs the
frames, this module decides and pools. A scene's vector is the mean of its best frames'
vectors, re-normalised; a scene fails only if every chosen frame failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageError
from .images import ImageSource
from .metadata import EmbeddingResult, InvalidArgument, ModelIdentity, failure, success
from .vectors import vector_problem


def as_sequence(images: Any, caller: str, error: type[Exception] = ImageError) -> list:
    """``images`` as a list; a lone path, bytes or image is a mistake, not N characters."""
    if isinstance(images, (str, Path, bytes, bytearray, memoryview, np.ndarray)) or not isinstance(
        images, Sequence
    ):
        raise error(f"{caller} takes a sequence of images, got {type(images).__name__}")
    return list(images)


def best_frames(frames: Any, top_k: Any) -> list[tuple[ImageSource, float | None]]:
    """The ``top_k`` frames to pool, best first, with their scores (validated).

    ``frames`` are images in best-first order, or ``(image, quality_score)`` pairs (then the
    best ``top_k`` by score). Raises InvalidArgument for anything else.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidArgument(f"top_k must be an integer >= 1, got {top_k!r}")
    scored = [
        f if isinstance(f, tuple) else (f, None)
        for f in as_sequence(frames, "embed_scene", error=InvalidArgument)
    ]
    for item in scored:
        if len(item) != 2:
            raise InvalidArgument("embed_scene takes images or (image, quality_score) pairs")
        score = item[1]
        if score is not None and (
            isinstance(score, bool) or not isinstance(score, Real) or not np.isfinite(float(score))
        ):
            raise InvalidArgument(f"a quality_score must be a finite number, got {score!r}")
    if scored and all(q is not None for _, q in scored):
        scored.sort(key=lambda f: f[1], reverse=True)
    return scored[:top_k]


def pool_scene(
    identity: ModelIdentity,
    path: str | None,
    chosen: list[tuple[ImageSource, float | None]],
    results: list[EmbeddingResult],
    *,
    normalize: bool,
) -> EmbeddingResult:
    """One scene's result from its chosen frames' results; its time is theirs summed."""
    good = [
        (r.embedding, q)
        for r, (_, q) in zip(results, chosen, strict=True)
        if r.embedding is not None
    ]  # r.ok, spelled so the type checker sees it
    if not good:
        errors = "; ".join(sorted({r.error or "" for r in results})) or "no frames"
        return failure(
            identity, frame_path=path, error=f"all {len(chosen)} frames failed: {errors}"
        )
    pooled = np.mean([e for e, _ in good], axis=0)
    if problem := vector_problem(pooled):  # e.g. frames whose vectors cancel out
        return failure(
            identity,
            frame_path=path,
            error=f"InvalidVectorError: the mean of {len(good)} frames {problem}",
        )
    if normalize:
        pooled = pooled / float(np.linalg.norm(pooled))
    scores = [q for _, q in good if q is not None]
    quality = {
        "quality_score": float(np.mean(scores)) if scores else None,
        "frames_pooled": len(good),
    }
    time_ms = sum(r.metadata["inference_time_ms"] or 0.0 for r in results if r.ok)
    return success(
        identity, pooled.astype(np.float32), frame_path=path, frame_quality=quality, time_ms=time_ms
    )
