"""Scene embeddings in PostgreSQL: write them and search them, always owner-scoped, and
never comparing vectors of different artifacts.

Every vector is stored with the artifact id of the model that made it. A scene has two
vector slots (see migrations/004): a vector goes to the slot that already holds its
artifact, else to an empty first slot, else beside the first slot's vector in the second
one. Search passes the querying model's artifact and reads whichever slot holds it.

Vectors travel through pgvector's psycopg adapter (numpy <-> ``vector``), never through
formatted strings. A vector whose dimension differs from the column's is refused before
it reaches SQL.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ..embedder import ClipEmbedder
from ..errors import DimensionError, QueryError
from ..images import ImageSource
from ..query import QueryPart, combine
from .connection import DatabaseError

SEARCH_COLUMNS = "id, owner_id, video_id, scene_index, frame_path, visual_clip_metadata, similarity"
SERVING_KEY = "serving_visual_clip_artifact"
# The two vector slots: (vector, artifact, metadata) columns.
_SLOTS = {
    "main": ("embedding_visual_clip", "visual_clip_artifact", "visual_clip_metadata"),
    "alt": ("embedding_visual_clip_alt", "visual_clip_alt_artifact", "visual_clip_alt_metadata"),
}


#: Error prefixes that blame the worker (its state or load), not the frame.
WORKER_FAULTS = ("Timeout", "Model load failed", "MemoryError", "ClipTimeoutError")


def classify_fault(error: str | None) -> str:
    """``worker`` or ``frame``: who is to blame for a failed embedding."""
    return "worker" if error and error.startswith(WORKER_FAULTS) else "frame"


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
        raise ValueError("owner_id is required: every scene read, write and search is "
                         "owner-scoped")
    return owner_id if isinstance(owner_id, uuid.UUID) else uuid.UUID(str(owner_id))


def _artifact(artifact: str | None) -> str:
    if not artifact:
        raise ValueError("artifact is required: vectors of different models are not "
                         "comparable (use ClipEmbedder.artifact_id)")
    return artifact


def choose_slot(main_artifact: str | None, main_has_vector: bool,
                alt_artifact: str | None, artifact: str) -> str:
    """Which slot a vector of ``artifact`` goes to (see the module docstring)."""
    if main_artifact == artifact:
        return "main"
    if alt_artifact == artifact:
        return "alt"
    return "main" if not main_has_vector else "alt"


def write_vector(conn: psycopg.Connection, scene_id: uuid.UUID, owner: uuid.UUID,
                 artifact: str, vector: np.ndarray | None, metadata: dict[str, Any], *,
                 lease: uuid.UUID | None = None, fault: str | None = None,
                 retry_after_s: float | None = None) -> bool:
    """Store one embedding result in the caller's transaction; False if nothing was written.

    Nothing is written if the scene does not belong to ``owner`` or (with ``lease``) if the
    lease is no longer the caller's. Any lease on the row ends here. A failure (``vector``
    None) never erases a stored vector: it is recorded in the job columns (with ``fault``,
    and a retry time ``retry_after_s`` from now) and, if the slot is empty, in its metadata.
    """
    row = conn.execute(
        """SELECT visual_clip_artifact, embedding_visual_clip IS NOT NULL,
                  visual_clip_alt_artifact, embedding_visual_clip_alt IS NOT NULL,
                  visual_clip_lease_token
           FROM scenes WHERE id = %s AND owner_id = %s FOR UPDATE""",
        (scene_id, owner)).fetchone()
    if row is None or (lease is not None and row[4] != lease):
        return False
    slot = choose_slot(row[0], row[1], row[2], artifact)
    vector_col, artifact_col, meta_col = _SLOTS[slot]
    has_vector = row[1] if slot == "main" else row[3]
    metadata = {**metadata, "artifact_id": artifact}
    sets = ["visual_clip_lease_token = NULL", "visual_clip_lease_until = NULL",
            "visual_clip_leased_by = NULL"]
    params: list[Any] = []
    if vector is not None:
        sets += [f"{vector_col} = %s", f"{artifact_col} = %s", f"{meta_col} = %s",
                 "visual_clip_last_error = NULL", "visual_clip_fault = NULL",
                 "visual_clip_retry_at = NULL"]
        params += [vector, artifact, Jsonb(metadata)]
    else:
        if not has_vector:
            sets += [f"{artifact_col} = %s", f"{meta_col} = %s"]
            params += [artifact, Jsonb(metadata)]
        sets += ["visual_clip_last_error = %s", "visual_clip_fault = %s",
                 "visual_clip_retry_at = now() + %s * interval '1 second'"]
        params += [metadata.get("error"), fault or classify_fault(metadata.get("error")),
                   retry_after_s or 0.0]
    conn.execute(f"UPDATE scenes SET {', '.join(sets)} WHERE id = %s AND owner_id = %s",
                 (*params, scene_id, owner))
    return True


class SceneStore:
    """Scenes and their CLIP embeddings in the ``scenes`` table (see migrations/)."""

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
                    "to_regclass('scenes') AND attname = 'embedding_visual_clip'").fetchone()
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
        owner = owner_uuid(owner_id)
        with self.pool.connection() as conn:
            return self._add(conn, owner, frame_path, video_id, scene_index)

    @staticmethod
    def _add(conn: psycopg.Connection, owner: uuid.UUID, frame_path: str | None,
             video_id: uuid.UUID | None, scene_index: int | None) -> uuid.UUID:
        return conn.execute(
            """INSERT INTO scenes (owner_id, frame_path, video_id, scene_index)
               VALUES (%s, %s, %s, %s)
               ON CONFLICT (owner_id, frame_path) WHERE frame_path IS NOT NULL
               DO UPDATE SET video_id = COALESCE(EXCLUDED.video_id, scenes.video_id),
                             scene_index = COALESCE(EXCLUDED.scene_index, scenes.scene_index)
               RETURNING id""",
            (owner, frame_path, video_id, scene_index)).fetchone()[0]

    def save_embedding(self, scene_id: uuid.UUID, owner_id: uuid.UUID | str,
                       embedding: np.ndarray | None, metadata: dict[str, Any], *,
                       artifact: str) -> None:
        """Store a scene's embedding of ``artifact`` (None for a failed frame), atomically.

        Raises DatabaseError if the scene does not exist for that owner.
        """
        owner, artifact = owner_uuid(owner_id), _artifact(artifact)
        vector = self.check_vector(embedding) if embedding is not None else None
        with self.pool.connection() as conn, conn.transaction():
            if not write_vector(conn, uuid.UUID(str(scene_id)), owner, artifact, vector,
                                metadata):
                raise DatabaseError(f"scene {scene_id} does not exist for owner {owner}")
            self._record_serving(conn, artifact, vector)

    def upsert_scene(self, owner_id: uuid.UUID | str, frame_path: str,
                     embedding: np.ndarray | None, metadata: dict[str, Any], *, artifact: str,
                     video_id: uuid.UUID | None = None,
                     scene_index: int | None = None) -> uuid.UUID:
        """Insert or update the owner's scene for ``frame_path`` with its embedding, in one
        transaction (no scene row without its embedding and metadata)."""
        owner, artifact = owner_uuid(owner_id), _artifact(artifact)
        vector = self.check_vector(embedding) if embedding is not None else None
        with self.pool.connection() as conn, conn.transaction():
            scene_id = self._add(conn, owner, frame_path, video_id, scene_index)
            write_vector(conn, scene_id, owner, artifact, vector, metadata)
            self._record_serving(conn, artifact, vector)
        return scene_id

    def _record_serving(self, conn: psycopg.Connection, artifact: str,
                        vector: np.ndarray | None) -> None:
        # The first model to store a vector serves the four-argument SQL search until
        # `db promote` names another (once per store and artifact: it never changes back).
        if vector is not None and artifact not in self._serving_known:
            conn.execute("INSERT INTO heimdex_clip_settings (key, value) VALUES (%s, %s) "
                         "ON CONFLICT (key) DO NOTHING", (SERVING_KEY, artifact))
            self._serving_known.add(artifact)  # a rollback raises to the caller anyway

    # ------------------------------------------------------------------ search

    def search_by_embedding(self, owner_id: uuid.UUID | str, embedding: np.ndarray, *,
                            artifact: str, threshold: float = 0.0,
                            count: int = 20) -> list[SearchHit]:
        """The owner's scenes most similar to ``embedding`` (similarity > threshold), among
        vectors made by ``artifact`` (the artifact that made ``embedding``).

        Every search goes through here (and the SQL function it calls).
        """
        owner, vector = owner_uuid(owner_id), self.check_vector(embedding)
        _check_search_args(threshold, count)
        return self._hits(
            f"SELECT {SEARCH_COLUMNS} FROM search_scenes_by_visual_clip_embedding"
            "(%s, %s, %s, %s, %s)", (vector, threshold, count, owner, _artifact(artifact)))

    def search_by_image(self, owner_id: uuid.UUID | str, embedder: ClipEmbedder,
                        image: ImageSource, *, threshold: float = 0.0,
                        count: int = 20) -> list[SearchHit]:
        """Embed ``image`` (strictly: a bad image raises) and search the owner's scenes."""
        vector = embedder.embed_images([image])[0]
        return self.search_by_embedding(owner_id, vector, artifact=embedder.artifact_id,
                                        threshold=threshold, count=count)

    def search_by_text(self, owner_id: uuid.UUID | str, embedder: ClipEmbedder, text: str, *,
                       threshold: float = 0.0, count: int = 20) -> list[SearchHit]:
        """Embed ``text`` with the text tower (strictly: raises TextError for a bad text or an
        artifact without text tower) and search the owner's scenes with it, through the
        same SQL function as image search."""
        vector = embedder.embed_texts([text])[0]
        # The text tower ships with the image tower it was trained with: the query compares
        # with the vectors that artifact's image tower made.
        return self.search_by_embedding(owner_id, vector, artifact=embedder.artifact_id,
                                        threshold=threshold, count=count)

    def search_similar(self, owner_id: uuid.UUID | str, scene_id: uuid.UUID | str, *,
                       artifact: str, threshold: float = 0.0,
                       count: int = 20) -> list[SearchHit]:
        """Scenes of the owner similar to one of the owner's scenes (itself excluded), using
        the scene's vector of ``artifact``."""
        owner = owner_uuid(owner_id)
        _check_search_args(threshold, count)
        return self._hits(
            f"SELECT {SEARCH_COLUMNS} FROM search_similar_scenes_by_visual_clip"
            "(%s, %s, %s, %s, %s)",
            (uuid.UUID(str(scene_id)), threshold, count, owner, _artifact(artifact)))

    def search_composed(self, owner_id: uuid.UUID | str, embedder: ClipEmbedder,
                        parts: Sequence[QueryPart], *, threshold: float = 0.0,
                        count: int = 20) -> list[SearchHit]:
        """Search with the unit-length weighted sum of several parts (``heimdex_clip.query``):
        texts through the text tower, images through the image tower, and the owner's own
        scenes by their stored vector of the embedder's artifact. The scenes named in the
        query are left out of the hits, as :meth:`search_similar` leaves out its scene.

        Strict like the single-part searches: a bad image or text raises, and so does a
        scene that is not the owner's or has no vector of this artifact yet.
        """
        owner = owner_uuid(owner_id)
        _check_search_args(threshold, count)
        parts = list(parts)
        if not parts or not all(isinstance(p, QueryPart) for p in parts):
            raise QueryError("search_composed needs one or more QueryPart")
        artifact = embedder.artifact_id
        # Scenes first: a foreign or pending scene fails before any model runs.
        vectors = [self.scene_vector(owner, p.value, artifact=artifact)
                   if p.kind == "scene" else None for p in parts]
        for kind, embed in (("text", embedder.embed_texts), ("image", embedder.embed_images)):
            chosen = [i for i, p in enumerate(parts) if p.kind == kind]
            if chosen:  # one batch per tower
                for i, vector in zip(chosen, embed([parts[i].value for i in chosen]), strict=True):
                    vectors[i] = vector
        scene_ids = {p.value for p in parts if p.kind == "scene"}
        query = combine(np.stack(vectors), [p.weight for p in parts])
        hits = self.search_by_embedding(owner, query, artifact=artifact,
                                        threshold=threshold, count=count + len(scene_ids))
        return [h for h in hits if h.id not in scene_ids][:count]

    def scene_vector(self, owner_id: uuid.UUID | str, scene_id: uuid.UUID | str, *,
                     artifact: str) -> np.ndarray:
        """One of the owner's scenes' vector made by ``artifact`` (float32). Raises
        DatabaseError, with the SQL search's words, when there is none."""
        owner, scene = owner_uuid(owner_id), uuid.UUID(str(scene_id))
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT CASE WHEN visual_clip_artifact = %(a)s THEN embedding_visual_clip "
                "            WHEN visual_clip_alt_artifact = %(a)s "
                "                THEN embedding_visual_clip_alt END "
                "FROM scenes WHERE id = %(id)s AND owner_id = %(owner)s",
                {"a": _artifact(artifact), "id": scene, "owner": owner}).fetchone()
        if row is None:
            raise DatabaseError(f"scene {scene} not found for this owner")
        if row[0] is None:
            raise DatabaseError(f"scene {scene} has no CLIP embedding of artifact "
                                f"{_artifact(artifact)} yet")
        return row[0].to_numpy().astype(np.float32)  # pgvector's Vector

    def _hits(self, sql: str, params: tuple) -> list[SearchHit]:
        try:
            with self.pool.connection() as conn:
                rows = conn.execute(sql, params).fetchall()
                # Where in its video each hit is: the search functions return no times, so
                # a video's hits are looked up by id (only when there are any).
                in_video = [row[0] for row in rows if row[2] is not None]
                times: dict = {}
                if in_video:
                    times.update((r[0], (r[1], r[2])) for r in conn.execute(
                        "SELECT id, start_s, end_s FROM scenes WHERE id = ANY(%s)",
                        (in_video,)).fetchall())
        except psycopg.errors.NoDataFound as exc:
            raise DatabaseError(str(exc.diag.message_primary)) from None
        return [SearchHit(*row, *times.get(row[0], (None, None))) for row in rows]

    def get_scene(self, owner_id: uuid.UUID | str,
                  scene_id: uuid.UUID | str) -> dict[str, Any] | None:
        """One of the owner's scenes (vectors as numpy arrays), or None."""
        owner = owner_uuid(owner_id)
        with self.pool.connection() as conn, conn.cursor(
                row_factory=psycopg.rows.dict_row) as cur:
            return cur.execute("SELECT * FROM scenes WHERE id = %s AND owner_id = %s",
                               (uuid.UUID(str(scene_id)), owner)).fetchone()


def _check_search_args(threshold: float, count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [-1, 1], got {threshold!r}")
