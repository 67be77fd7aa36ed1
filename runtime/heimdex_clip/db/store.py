"""Scene embeddings in PostgreSQL: write them, and search them, always owner-scoped.

Vectors travel through pgvector's psycopg adapter (numpy <-> ``vector``), never through
formatted strings. A vector whose dimension differs from the column's is refused before
it reaches SQL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ..embedder import ClipEmbedder
from ..errors import DimensionError
from ..images import ImageSource
from .connection import DatabaseError

SEARCH_COLUMNS = "id, owner_id, video_id, scene_index, frame_path, visual_clip_metadata, similarity"


@dataclass(frozen=True)
class SearchHit:
    """One search result: the scene and its cosine similarity to the query."""

    id: uuid.UUID
    owner_id: uuid.UUID
    video_id: uuid.UUID | None
    scene_index: int | None
    frame_path: str | None
    metadata: dict[str, Any] | None
    similarity: float


def _owner(owner_id: uuid.UUID | str | None) -> uuid.UUID:
    if owner_id is None:
        raise ValueError("owner_id is required: every search and write is owner-scoped")
    return owner_id if isinstance(owner_id, uuid.UUID) else uuid.UUID(str(owner_id))


class SceneStore:
    """Scenes and their CLIP embeddings in the ``scenes`` table (see migrations/)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self._dimension: int | None = None

    @property
    def dimension(self) -> int:
        """The ``embedding_visual_clip`` column's dimension, read from the catalog."""
        if self._dimension is None:
            with self.pool.connection() as conn:
                row = conn.execute(
                    "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'scenes'::regclass "
                    "AND attname = 'embedding_visual_clip'").fetchone()
            if row is None:
                raise DatabaseError("scenes.embedding_visual_clip does not exist: run "
                                    "`heimdex-clip db migrate` first")
            self._dimension = int(row[0])
        return self._dimension

    def check_vector(self, vector: np.ndarray | list[float]) -> np.ndarray:
        """``vector`` as float32 1-D of the column's dimension and finite, or DimensionError."""
        arr = np.asarray(vector, dtype=np.float32)
        if arr.ndim != 1 or arr.shape[0] != self.dimension:
            raise DimensionError(f"vector has shape {arr.shape}; the embedding_visual_clip "
                                 f"column holds vector({self.dimension})")
        if not np.all(np.isfinite(arr)):
            raise DimensionError("vector contains NaN or infinity")
        return arr

    # ------------------------------------------------------------------ writes

    def add_scene(self, owner_id: uuid.UUID | str, frame_path: str | None, *,
                  video_id: uuid.UUID | None = None, scene_index: int | None = None) -> uuid.UUID:
        """Insert a scene (or find the owner's scene with that frame path); returns its id."""
        owner = _owner(owner_id)
        with self.pool.connection() as conn:
            row = conn.execute(
                """INSERT INTO scenes (owner_id, frame_path, video_id, scene_index)
                   VALUES (%s, %s, %s, %s)
                   ON CONFLICT (owner_id, frame_path) WHERE frame_path IS NOT NULL
                   DO UPDATE SET video_id = COALESCE(EXCLUDED.video_id, scenes.video_id)
                   RETURNING id""",
                (owner, frame_path, video_id, scene_index)).fetchone()
        return row[0]

    def save_embedding(self, scene_id: uuid.UUID, owner_id: uuid.UUID | str,
                       embedding: np.ndarray | None, metadata: dict[str, Any]) -> None:
        """Store a scene's embedding (None for a failed frame) and metadata, atomically.

        Raises DatabaseError if the scene does not exist for that owner.
        """
        owner = _owner(owner_id)
        vector = self.check_vector(embedding) if embedding is not None else None
        with self.pool.connection() as conn, conn.transaction():
            updated = conn.execute(
                """UPDATE scenes SET embedding_visual_clip = %s, visual_clip_metadata = %s
                   WHERE id = %s AND owner_id = %s""",
                (vector, Jsonb(metadata), scene_id, owner)).rowcount
            if updated != 1:
                raise DatabaseError(f"scene {scene_id} does not exist for owner {owner}")

    def upsert_scene(self, owner_id: uuid.UUID | str, frame_path: str,
                     embedding: np.ndarray | None, metadata: dict[str, Any], *,
                     video_id: uuid.UUID | None = None,
                     scene_index: int | None = None) -> uuid.UUID:
        """Insert or update the owner's scene for ``frame_path`` with its embedding, in one
        transaction (no scene row without its embedding and metadata)."""
        owner = _owner(owner_id)
        vector = self.check_vector(embedding) if embedding is not None else None
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(
                """INSERT INTO scenes (owner_id, frame_path, video_id, scene_index,
                                       embedding_visual_clip, visual_clip_metadata)
                   VALUES (%s, %s, %s, %s, %s, %s)
                   ON CONFLICT (owner_id, frame_path) WHERE frame_path IS NOT NULL
                   DO UPDATE SET embedding_visual_clip = EXCLUDED.embedding_visual_clip,
                                 visual_clip_metadata = EXCLUDED.visual_clip_metadata,
                                 video_id = COALESCE(EXCLUDED.video_id, scenes.video_id),
                                 scene_index = COALESCE(EXCLUDED.scene_index,
                                                        scenes.scene_index)
                   RETURNING id""",
                (owner, frame_path, video_id, scene_index, vector, Jsonb(metadata))).fetchone()
        return row[0]

    # ------------------------------------------------------------------ search

    def search_by_embedding(self, owner_id: uuid.UUID | str, embedding: np.ndarray, *,
                            threshold: float = 0.0, count: int = 20) -> list[SearchHit]:
        """The owner's scenes most similar to ``embedding`` (similarity > threshold)."""
        owner, vector = _owner(owner_id), self.check_vector(embedding)
        if count < 1:
            raise ValueError("count must be >= 1")
        return self._hits(
            f"SELECT {SEARCH_COLUMNS} FROM search_scenes_by_visual_clip_embedding"
            "(%s, %s, %s, %s)", (vector, threshold, count, owner))

    def search_by_image(self, owner_id: uuid.UUID | str, embedder: ClipEmbedder,
                        image: ImageSource, *, threshold: float = 0.0,
                        count: int = 20) -> list[SearchHit]:
        """Embed ``image`` (strictly: a bad image raises) and search the owner's scenes."""
        vector = embedder.embed_images([image])[0]
        return self.search_by_embedding(owner_id, vector, threshold=threshold, count=count)

    def search_by_text(self, owner_id: uuid.UUID | str, embedder: ClipEmbedder, text: str, *,
                       threshold: float = 0.0, count: int = 20) -> list[SearchHit]:
        """Embed ``text`` with the text tower (strictly: raises TextError for a bad text or an
        artifact without text tower) and search the owner's scenes with it, through the
        same SQL function as image search."""
        vector = embedder.embed_texts([text])[0]
        return self.search_by_embedding(owner_id, vector, threshold=threshold, count=count)

    def search_similar(self, owner_id: uuid.UUID | str, scene_id: uuid.UUID | str, *,
                       threshold: float = 0.0, count: int = 20) -> list[SearchHit]:
        """Scenes of the owner similar to one of the owner's scenes (itself excluded)."""
        owner = _owner(owner_id)
        if count < 1:
            raise ValueError("count must be >= 1")
        return self._hits(
            f"SELECT {SEARCH_COLUMNS} FROM search_similar_scenes_by_visual_clip"
            "(%s, %s, %s, %s)", (uuid.UUID(str(scene_id)), threshold, count, owner))

    def _hits(self, sql: str, params: tuple) -> list[SearchHit]:
        try:
            with self.pool.connection() as conn:
                rows = conn.execute(sql, params).fetchall()
        except psycopg.errors.NoDataFound as exc:
            raise DatabaseError(str(exc.diag.message_primary)) from None
        return [SearchHit(*row) for row in rows]

    def get_scene(self, scene_id: uuid.UUID | str) -> dict[str, Any] | None:
        """One scene's row (embedding as a numpy array), or None."""
        with self.pool.connection() as conn, conn.cursor(
                row_factory=psycopg.rows.dict_row) as cur:
            return cur.execute("SELECT * FROM scenes WHERE id = %s",
                               (uuid.UUID(str(scene_id)),)).fetchone()
