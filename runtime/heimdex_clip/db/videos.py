"""Videos in the database: index a file's scenes, replace them, delete them.

A video is ``(owner_id, video_id)`` in the ``videos`` table (migrations/009) and its scenes
are ``scenes`` rows with that ``video_id``. The id is derived from the file's content
(``uuid5`` of its SHA-256) unless the caller gives one, so:

* indexing the same file with the same settings again finds the ``videos`` row and adds
  nothing (nothing is decoded);
* indexing it with other settings writes the new scenes, deletes the old ones and updates
  the ``videos`` row in ONE transaction: a search sees the old scenes or the new ones,
  never half a video; the old frames directory is removed after the commit;
* a file that cannot be indexed writes nothing (its frames are removed).

Vectors are written with :func:`~heimdex_clip.db.store.write_vector`, the provenance rules of
every other vector (artifact id, slots, the serving artifact).
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ..embedder import ClipEmbedder
from ..video import VideoAnalysis, VideoSettings, analyze_video, content_hash, video_id_for
from .connection import one_value
from .slots import hold_serving_lock
from .store import SceneStore, owner_uuid, write_vector


@dataclass(frozen=True)
class VideoIndexed:
    """What :func:`index_video` did."""

    video_id: uuid.UUID
    status: str  # indexed | replaced | unchanged
    scenes: int
    report: dict[str, Any]


def index_video(
    pool: ConnectionPool,
    embedder: ClipEmbedder,
    path: str | Path,
    owner_id: uuid.UUID | str,
    *,
    media_dir: str | Path,
    settings: VideoSettings | None = None,
    video_id: uuid.UUID | None = None,
) -> VideoIndexed:
    """Index one video for ``owner_id``: its scenes, best frames (under ``media_dir``) and
    pooled vectors. Raises VideoError (one line) for a file that cannot be indexed."""
    owner, settings = owner_uuid(owner_id), settings or VideoSettings()
    path = Path(path)
    sha = content_hash(path) if path.is_file() else None
    vid = video_id or (video_id_for(sha) if sha else None)
    if vid is not None:
        existing = video_row(pool, owner, vid)
        if (
            existing
            and existing["settings_key"] == settings.key
            and existing["content_sha256"] == sha
        ):
            return VideoIndexed(vid, "unchanged", existing["scene_count"], existing["report"] or {})
    analysis = analyze_video(
        path,
        embedder,
        owner=owner,
        media_dir=Path(media_dir),
        settings=settings,
        video_id=vid,
        sha256=sha,
    )
    try:
        old_dir = _replace(SceneStore(pool), embedder.artifact_id, owner, analysis, settings)
    except BaseException:
        shutil.rmtree(analysis.frames_dir, ignore_errors=True)
        raise
    if old_dir is not None and Path(old_dir) != analysis.frames_dir:
        shutil.rmtree(old_dir, ignore_errors=True)
    status = "indexed" if old_dir is None else "replaced"
    return VideoIndexed(analysis.video_id, status, len(analysis.scenes), analysis.report())


def _replace(
    store: SceneStore,
    artifact: str,
    owner: uuid.UUID,
    analysis: VideoAnalysis,
    settings: VideoSettings,
) -> str | None:
    """Write the analysis as the video's only scenes, in one transaction; returns the frames
    directory of the scenes it replaced (None when the video is new)."""
    vectors = [
        store.check_vector(s.embedding) if s.embedding is not None else None
        for s in analysis.scenes
    ]
    vid = analysis.video_id
    with store.pool.connection() as conn, conn.transaction():
        # Before any row lock (the order promote takes them in), for write_vector below.
        hold_serving_lock(conn)
        # The videos row is the video's lock: two indexers of one video take turns.
        conn.execute(
            "INSERT INTO videos (owner_id, video_id, content_sha256, settings_key, "
            "settings, scene_count) VALUES (%s, %s, %s, '', '{}', 0) "
            "ON CONFLICT DO NOTHING",
            (owner, vid, analysis.sha256),
        )
        old = conn.execute(
            "SELECT frames_dir, scene_count, settings_key FROM videos "
            "WHERE owner_id = %s AND video_id = %s FOR UPDATE",
            (owner, vid),
        ).fetchone()
        conn.execute("DELETE FROM scenes WHERE owner_id = %s AND video_id = %s", (owner, vid))
        for scene, vector in zip(analysis.scenes, vectors, strict=True):
            scene_id = one_value(
                conn.execute(
                    "INSERT INTO scenes (owner_id, video_id, scene_index, start_s, end_s, "
                    "frame_path) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                    (owner, vid, scene.scene_index, scene.start_s, scene.end_s, scene.frame_path),
                )
            )
            write_vector(conn, scene_id, owner, artifact, vector, scene.metadata)
            store._record_serving(conn, artifact, vector)
        conn.execute(
            "UPDATE videos SET content_sha256 = %s, source_path = %s, settings_key = %s, "
            "settings = %s, frames_dir = %s, duration_s = %s, scene_count = %s, report = %s, "
            "indexed_at = now() WHERE owner_id = %s AND video_id = %s",
            (
                analysis.sha256,
                str(analysis.info.path.resolve()),
                settings.key,
                Jsonb(settings.as_dict()),
                str(analysis.frames_dir),
                analysis.scenes[-1].end_s if analysis.scenes else None,
                len(analysis.scenes),
                Jsonb(analysis.report()),
                owner,
                vid,
            ),
        )
    if old is None or old[2] == "":  # a new video: no earlier frames to remove
        return None
    return old[0]


def video_row(
    pool: ConnectionPool, owner_id: uuid.UUID | str, video_id: uuid.UUID | str
) -> dict[str, Any] | None:
    """The owner's ``videos`` row, or None."""
    import psycopg.rows

    with pool.connection() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "SELECT * FROM videos WHERE owner_id = %s AND video_id = %s",
            (owner_uuid(owner_id), uuid.UUID(str(video_id))),
        ).fetchone()


def delete_video(pool: ConnectionPool, owner_id: uuid.UUID | str, video_id: uuid.UUID | str) -> int:
    """Delete one of the owner's videos: its scenes, its row, then its frames directory.
    Returns the number of scenes deleted; LookupError if the owner has no such video."""
    owner, vid = owner_uuid(owner_id), uuid.UUID(str(video_id))
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "DELETE FROM videos WHERE owner_id = %s AND video_id = %s RETURNING frames_dir",
            (owner, vid),
        ).fetchone()
        deleted = conn.execute(
            "DELETE FROM scenes WHERE owner_id = %s AND video_id = %s", (owner, vid)
        ).rowcount
    if row is None and not deleted:
        raise LookupError(f"owner {owner} has no video {vid}")
    if row is not None and row[0]:
        frames = Path(row[0])
        shutil.rmtree(frames, ignore_errors=True)
        with contextlib.suppress(OSError):  # the video's directory, if now empty
            frames.parent.rmdir()
    return deleted
