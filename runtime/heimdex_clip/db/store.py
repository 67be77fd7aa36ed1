"""Scene embeddings in PostgreSQL: write them and search them, always owner-scoped, and
never comparing vectors of different artifacts.

Every vector is stored with the artifact id of the model that made it. A scene has two
vector slots (see db/migrations/004 and :mod:`.slots`, which decides where a vector goes).
Search passes the querying model's artifact and reads whichever slot holds it.

Vectors travel through pgvector's psycopg adapter (numpy <-> ``vector``), never through
formatted strings. Every value is checked before it reaches SQL (:mod:`.validate`): a
vector of the wrong dimension, non-finite or without a usable norm, a text PostgreSQL
cannot hold, an out-of-range count, all raise a one-line InvalidInputError.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool

from ..embedder import ClipEmbedder
from ..errors import QueryError
from ..images import ImageSource
from ..query import QueryPart, combine
from .connection import DatabaseError, one_value
from .errors import InvalidInputError, refused_values
from .slots import (
    SERVING_KEY,
    WORKER_FAULTS,
    choose_slot,
    classify_fault,
    hold_serving_lock,
    write_vector,
)
from .validate import (
    MAX_COUNT,
    check_artifact,
    check_int4,
    check_metadata,
    check_search_args,
    check_text,
    check_vector,
)

__all__ = [
    "SERVING_KEY",
    "WORKER_FAULTS",
    "SceneStore",
    "SearchHit",
    "choose_slot",
    "classify_fault",
    "owner_uuid",
    "write_vector",
]

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
    #: Where in its video the scene is (seconds), for scenes cut from a video.
    start_s: float | None = None
    end_s: float | None = None


def owner_uuid(owner_id: uuid.UUID | str | None) -> uuid.UUID:
    """``owner_id`` as a UUID; ValueError for None (nothing is ever done for "any owner")."""
    if owner_id is None:
        raise InvalidInputError(
            "owner_id is required: every scene read, write and search is owner-scoped"
        )
    return as_uuid(owner_id, "owner_id")


def as_uuid(value: uuid.UUID | str, what: str) -> uuid.UUID:
    """``value`` as a UUID, or InvalidInputError naming ``what``."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidInputError(f"{what} is not a UUID: {value!r:.60}") from None


_artifact = check_artifact


class SceneStore:
    """Scenes and their CLIP embeddings in the ``scenes`` table (see db/migrations/)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self._dimension: int | None = None
        self._serving_known: set[str] = set()  # artifacts whose serving row was ensured

    @property
    def dimension(self) -> int:
        """The ``embedding_visual_clip`` column's dimension, read from the catalog."""
        if self._dimension is None:
            with self.pool.connection() as conn:
                row = conn.execute(
                    "SELECT atttypmod FROM pg_attribute WHERE attrelid = "
                    "to_regclass('scenes') AND attname = 'embedding_visual_clip'"
                ).fetchone()
            if row is None:
                raise DatabaseError(
                    "scenes.embedding_visual_clip does not exist: run "
                    "`heimdex-clip db migrate` first"
                )
            self._dimension = int(row[0])
        return self._dimension

    def check_vector(self, vector: np.ndarray | list[float]) -> np.ndarray:
        """``vector`` as float32 1-D of the column's dimension, finite, with a norm in
        [MIN_NORM, MAX_NORM]; else InvalidVectorError (a DimensionError)."""
        return check_vector(vector, self.dimension)

    # ------------------------------------------------------------------ writes

    def add_scene(
        self,
        owner_id: uuid.UUID | str,
        frame_path: str | None,
        *,
        video_id: uuid.UUID | None = None,
        scene_index: int | None = None,
    ) -> uuid.UUID:
        """Insert a scene (or find the owner's scene with that frame path); returns its id."""
        owner = owner_uuid(owner_id)
        with refused_values(), self.pool.connection() as conn:
            return self._add(conn, owner, frame_path, video_id, scene_index)

    @staticmethod
    def _add(
        conn: psycopg.Connection,
        owner: uuid.UUID,
        frame_path: str | None,
        video_id: uuid.UUID | None,
        scene_index: int | None,
    ) -> uuid.UUID:
        frame_path = check_text(frame_path, "frame_path")
        scene_index = check_int4(scene_index, "scene_index")
        video_id = as_uuid(video_id, "video_id") if video_id is not None else None
        return one_value(
            conn.execute(
                """INSERT INTO scenes (owner_id, frame_path, video_id, scene_index)
               VALUES (%s, %s, %s, %s)
               ON CONFLICT (owner_id, frame_path) WHERE frame_path IS NOT NULL
               DO UPDATE SET video_id = COALESCE(EXCLUDED.video_id, scenes.video_id),
                             scene_index = COALESCE(EXCLUDED.scene_index, scenes.scene_index)
               RETURNING id""",
                (owner, frame_path, video_id, scene_index),
            )
        )

    def save_embedding(
        self,
        scene_id: uuid.UUID,
        owner_id: uuid.UUID | str,
        embedding: np.ndarray | None,
        metadata: dict[str, Any],
        *,
        artifact: str,
    ) -> None:
        """Store a scene's embedding of ``artifact`` (None for a failed frame), atomically.

        Raises DatabaseError if the scene does not exist for that owner.
        """
        owner, artifact = owner_uuid(owner_id), _artifact(artifact)
        vector = self.check_vector(embedding) if embedding is not None else None
        metadata = check_metadata(metadata)
        with refused_values(), self.pool.connection() as conn, conn.transaction():
            if not write_vector(
                conn, as_uuid(scene_id, "scene_id"), owner, artifact, vector, metadata
            ):
                raise DatabaseError(f"scene {scene_id} does not exist for owner {owner}")
            self._record_serving(conn, artifact, vector)

    def upsert_scene(
        self,
        owner_id: uuid.UUID | str,
        frame_path: str,
        embedding: np.ndarray | None,
        metadata: dict[str, Any],
        *,
        artifact: str,
        video_id: uuid.UUID | None = None,
        scene_index: int | None = None,
    ) -> uuid.UUID:
        """Insert or update the owner's scene for ``frame_path`` with its embedding, in one
        transaction (no scene row without its embedding and metadata)."""
        owner, artifact = owner_uuid(owner_id), _artifact(artifact)
        vector = self.check_vector(embedding) if embedding is not None else None
        metadata = check_metadata(metadata)
        with refused_values(), self.pool.connection() as conn, conn.transaction():
            hold_serving_lock(conn)  # before _add's row lock: the order promote takes them in
            scene_id = self._add(conn, owner, frame_path, video_id, scene_index)
            write_vector(conn, scene_id, owner, artifact, vector, metadata)
            self._record_serving(conn, artifact, vector)
        return scene_id

    def _record_serving(
        self, conn: psycopg.Connection, artifact: str, vector: np.ndarray | None
    ) -> None:
        # The first model to store a vector serves the four-argument SQL search until
        # `db promote` names another (once per store and artifact: it never changes back).
        if vector is not None and artifact not in self._serving_known:
            conn.execute(
                "INSERT INTO heimdex_clip_settings (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO NOTHING",
                (SERVING_KEY, artifact),
            )
            self._serving_known.add(artifact)  # a rollback raises to the caller anyway

    # ------------------------------------------------------------------ search

    def search_by_embedding(
        self,
        owner_id: uuid.UUID | str,
        embedding: np.ndarray,
        *,
        artifact: str,
        threshold: float = 0.0,
        count: int = 20,
    ) -> list[SearchHit]:
        """The owner's scenes most similar to ``embedding`` (similarity > threshold), among
        vectors made by ``artifact`` (the artifact that made ``embedding``).

        Every search goes through here (and the SQL function it calls).
        """
        owner, vector = owner_uuid(owner_id), self.check_vector(embedding)
        threshold, count = check_search_args(threshold, count)
        return self._hits(
            f"SELECT {SEARCH_COLUMNS} FROM search_scenes_by_visual_clip_embedding"
            "(%s, %s, %s, %s, %s)",
            (vector, threshold, count, owner, _artifact(artifact)),
        )

    def search_by_image(
        self,
        owner_id: uuid.UUID | str,
        embedder: ClipEmbedder,
        image: ImageSource,
        *,
        threshold: float = 0.0,
        count: int = 20,
    ) -> list[SearchHit]:
        """Embed ``image`` (strictly: a bad image raises) and search the owner's scenes."""
        vector = embedder.embed_images([image])[0]
        return self.search_by_embedding(
            owner_id, vector, artifact=embedder.artifact_id, threshold=threshold, count=count
        )

    def search_by_text(
        self,
        owner_id: uuid.UUID | str,
        embedder: ClipEmbedder,
        text: str,
        *,
        threshold: float = 0.0,
        count: int = 20,
    ) -> list[SearchHit]:
        """Embed ``text`` with the text tower (strictly: raises TextError for a bad text or an
        artifact without text tower) and search the owner's scenes with it, through the
        same SQL function as image search."""
        vector = embedder.embed_texts([text])[0]
        # The text tower ships with the image tower it was trained with: the query compares
        # with the vectors that artifact's image tower made.
        return self.search_by_embedding(
            owner_id, vector, artifact=embedder.artifact_id, threshold=threshold, count=count
        )

    def search_similar(
        self,
        owner_id: uuid.UUID | str,
        scene_id: uuid.UUID | str,
        *,
        artifact: str,
        threshold: float = 0.0,
        count: int = 20,
    ) -> list[SearchHit]:
        """Scenes of the owner similar to one of the owner's scenes (itself excluded), using
        the scene's vector of ``artifact``."""
        owner = owner_uuid(owner_id)
        threshold, count = check_search_args(threshold, count)
        return self._hits(
            f"SELECT {SEARCH_COLUMNS} FROM search_similar_scenes_by_visual_clip"
            "(%s, %s, %s, %s, %s)",
            (as_uuid(scene_id, "scene_id"), threshold, count, owner, _artifact(artifact)),
        )

    def search_composed(
        self,
        owner_id: uuid.UUID | str,
        embedder: ClipEmbedder,
        parts: Sequence[QueryPart],
        *,
        threshold: float = 0.0,
        count: int = 20,
    ) -> list[SearchHit]:
        """Search with the unit-length weighted sum of several parts (``heimdex_clip.query``):
        texts through the text tower, images through the image tower, and the owner's own
        scenes by their stored vector of the embedder's artifact. The scenes named in the
        query are left out of the hits, as :meth:`search_similar` leaves out its scene.

        Strict like the single-part searches: a bad image or text raises, and so does a
        scene that is not the owner's or has no vector of this artifact yet.
        """
        owner = owner_uuid(owner_id)
        threshold, count = check_search_args(threshold, count)
        parts = list(parts)
        if not parts or not all(isinstance(p, QueryPart) for p in parts):
            raise QueryError("search_composed needs one or more QueryPart")
        artifact = embedder.load().artifact_id
        # Scenes first: a foreign or pending scene fails before any model runs.
        vectors = [
            self.scene_vector(owner, p.value, artifact=artifact) if p.kind == "scene" else None
            for p in parts
        ]
        for kind, embed in (("text", embedder.embed_texts), ("image", embedder.embed_images)):
            chosen = [i for i, p in enumerate(parts) if p.kind == kind]
            if chosen:  # one batch per tower
                for i, vector in zip(chosen, embed([parts[i].value for i in chosen]), strict=True):
                    vectors[i] = vector
        scene_ids = {p.value for p in parts if p.kind == "scene"}
        # Every slot is filled by now: scene parts above, then one batch per tower.
        query = combine(np.stack(vectors), [p.weight for p in parts])  # type: ignore[arg-type]
        hits = self.search_by_embedding(
            owner,
            query,
            artifact=artifact,
            threshold=threshold,
            count=min(count + len(scene_ids), MAX_COUNT),
        )
        return [h for h in hits if h.id not in scene_ids][:count]

    def scene_vector(
        self, owner_id: uuid.UUID | str, scene_id: uuid.UUID | str, *, artifact: str
    ) -> np.ndarray:
        """One of the owner's scenes' vector made by ``artifact`` (float32). Raises
        DatabaseError, with the SQL search's words, when there is none."""
        owner, scene = owner_uuid(owner_id), as_uuid(scene_id, "scene_id")
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT CASE WHEN visual_clip_artifact = %(a)s THEN embedding_visual_clip "
                "            WHEN visual_clip_alt_artifact = %(a)s "
                "                THEN embedding_visual_clip_alt END "
                "FROM scenes WHERE id = %(id)s AND owner_id = %(owner)s",
                {"a": _artifact(artifact), "id": scene, "owner": owner},
            ).fetchone()
        if row is None:
            raise DatabaseError(f"scene {scene} not found for this owner")
        if row[0] is None:
            raise DatabaseError(
                f"scene {scene} has no CLIP embedding of artifact {_artifact(artifact)} yet"
            )
        return row[0].to_numpy().astype(np.float32)  # pgvector's Vector

    def _hits(self, sql: str, params: tuple) -> list[SearchHit]:
        try:
            with refused_values(), self.pool.connection() as conn:
                rows = conn.execute(sql, params).fetchall()
                # Where in its video each hit is: the search functions return no times, so
                # a video's hits are looked up by id (only when there are any).
                in_video = [row[0] for row in rows if row[2] is not None]
                times: dict = {}
                if in_video:
                    times.update(
                        (r[0], (r[1], r[2]))
                        for r in conn.execute(
                            "SELECT id, start_s, end_s FROM scenes WHERE id = ANY(%s)", (in_video,)
                        ).fetchall()
                    )
        except psycopg.errors.NoDataFound as exc:
            raise DatabaseError(str(exc.diag.message_primary)) from None
        return [SearchHit(*row, *times.get(row[0], (None, None))) for row in rows]

    def get_scene(
        self, owner_id: uuid.UUID | str, scene_id: uuid.UUID | str
    ) -> dict[str, Any] | None:
        """One of the owner's scenes (vectors as numpy arrays), or None."""
        owner = owner_uuid(owner_id)
        with self.pool.connection() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            return cur.execute(
                "SELECT * FROM scenes WHERE id = %s AND owner_id = %s",
                (as_uuid(scene_id, "scene_id"), owner),
            ).fetchone()
