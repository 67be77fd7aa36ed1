"""Hybrid search (CLIP ranking + full-text ranking of scene transcripts, fused by reciprocal
rank fusion) and the scene details a search answer shows beside each hit.

The fusion itself is the SQL function ``search_scenes_hybrid`` (migrations/008), so any SQL
client gets the same ranking; this module calls it, owner-scoped like every search.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from psycopg_pool import ConnectionPool

from .store import SceneStore, SearchHit, owner_uuid
from .validate import check_artifact, check_search_args, check_text

#: The usual reciprocal rank fusion constant (Cormack et al. 2009).
RRF_K = 60


@dataclass(frozen=True)
class HybridHit(SearchHit):
    """A hybrid search hit: a SearchHit (similarity None without a vector of the artifact)
    with its rank in each ranking (None where absent) and its fused score."""

    clip_rank: int | None = None
    text_rank: int | None = None
    score: float = 0.0


def search_hybrid(
    store: SceneStore,
    owner_id: uuid.UUID | str,
    embedding: np.ndarray,
    text: str,
    *,
    artifact: str,
    threshold: float = 0.0,
    count: int = 20,
    rrf_k: int = RRF_K,
) -> list[HybridHit]:
    """The owner's scenes by the fused ranking of ``embedding`` (the CLIP vector of
    ``text``, made by ``artifact``) and of ``text`` against their transcripts."""
    owner, vector = owner_uuid(owner_id), store.check_vector(embedding)
    threshold, count = check_search_args(threshold, count)
    artifact = check_artifact(artifact)
    check_text(text, "text")  # NUL or lone surrogates: a one-line error, not psycopg's
    with store.pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, owner_id, video_id, scene_index, frame_path, visual_clip_metadata, "
            "similarity, clip_rank, text_rank, score "
            "FROM search_scenes_hybrid(%s, %s, %s, %s, %s, %s, %s)",
            (vector, text, threshold, count, owner, artifact, rrf_k),
        ).fetchall()
    # By name: SearchHit's own optional fields (start_s, end_s) come before HybridHit's.
    return [
        HybridHit(
            id=row[0],
            owner_id=row[1],
            video_id=row[2],
            scene_index=row[3],
            frame_path=row[4],
            metadata=row[5],
            similarity=row[6],
            clip_rank=row[7],
            text_rank=row[8],
            score=row[9],
        )
        for row in rows
    ]


Span = tuple[float | None, float | None]


def scene_spans(
    pool: ConnectionPool, owner_id: uuid.UUID | str, scene_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, Span]:
    """``{scene id: (start_s, end_s)}`` for those of ``scene_ids`` that are the owner's."""
    ids = list(scene_ids)
    if not ids:
        return {}
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, start_s, end_s FROM scenes WHERE owner_id = %s AND id = ANY(%s)",
            (owner_uuid(owner_id), ids),
        ).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def owned_scenes(
    pool: ConnectionPool, owner_id: uuid.UUID | str, scene_ids: Iterable[uuid.UUID]
) -> set[uuid.UUID]:
    """Those of ``scene_ids`` that exist and belong to the owner."""
    return set(scene_spans(pool, owner_id, scene_ids))
