"""Backfill: embed every scene whose CLIP embedding is still NULL, with any number of workers.

Each worker loops: in ONE short transaction it claims a batch with
``FOR UPDATE SKIP LOCKED`` (rows another worker holds are skipped, not waited for), embeds
those frames, writes embeddings and metadata, and commits. Killing a worker (even
``kill -9``) aborts its open transaction, so its batch is neither half-written nor lost:
the row locks vanish and another worker (or the next run) claims the batch again. A
committed row is never claimed again, so every eligible scene is embedded exactly once.

A frame that fails (unreadable, timeout) is written with a NULL embedding and the error
in its metadata; ``attempts`` counts tries, and a scene is given up after MAX_ATTEMPTS.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ..embedder import ClipEmbedder
from ..errors import DimensionError
from .store import SceneStore

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3

_ELIGIBLE = """
    embedding_visual_clip IS NULL AND frame_path IS NOT NULL
    AND COALESCE((visual_clip_metadata->>'attempts')::int, 0) < %(max_attempts)s
    AND (%(owner)s::uuid IS NULL OR owner_id = %(owner)s::uuid)
"""


@dataclass
class BackfillReport:
    embedded: int = 0
    failed: int = 0
    batches: int = 0

    @property
    def processed(self) -> int:
        return self.embedded + self.failed


def count_pending(pool: ConnectionPool, owner_id: uuid.UUID | None = None,
                  max_attempts: int = MAX_ATTEMPTS) -> int:
    """Scenes still waiting for an embedding (and not given up on)."""
    with pool.connection() as conn:
        return conn.execute(f"SELECT count(*) FROM scenes WHERE {_ELIGIBLE}",
                            {"owner": owner_id, "max_attempts": max_attempts}).fetchone()[0]


def run_backfill(pool: ConnectionPool, embedder: ClipEmbedder, *,
                 owner_id: uuid.UUID | None = None, batch_size: int = 16,
                 limit: int | None = None, max_attempts: int = MAX_ATTEMPTS,
                 frame_root: Path | None = None,
                 on_batch: Callable[[int], None] | None = None) -> BackfillReport:
    """Claim and embed batches until nothing is left (or ``limit`` scenes were processed).

    ``frame_root`` resolves relative frame paths. ``on_batch(n)`` is called after each
    committed batch (progress bars).
    """
    column_dim = SceneStore(pool).dimension
    if embedder.embed_dim != column_dim:
        raise DimensionError(f"the model embeds {embedder.embed_dim} dimensions, the "
                             f"embedding_visual_clip column holds vector({column_dim})")
    report = BackfillReport()
    params = {"owner": owner_id, "max_attempts": max_attempts}
    while limit is None or report.processed < limit:
        size = batch_size if limit is None else min(batch_size, limit - report.processed)
        with pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                f"""SELECT id, frame_path, visual_clip_metadata FROM scenes
                    WHERE {_ELIGIBLE}
                    ORDER BY id
                    LIMIT %(size)s
                    FOR UPDATE SKIP LOCKED""", {**params, "size": size}).fetchall()
            if not rows:
                break
            paths = [_resolve(frame_root, path) for _, path, _ in rows]
            results = embedder.embed_frames(paths, frame_paths=[p for _, p, _ in rows])
            for (scene_id, _, old_meta), result in zip(rows, results, strict=True):
                metadata = dict(result.metadata)
                metadata["attempts"] = int((old_meta or {}).get("attempts", 0)) + 1
                conn.execute(
                    "UPDATE scenes SET embedding_visual_clip = %s, visual_clip_metadata = %s "
                    "WHERE id = %s", (result.embedding, Jsonb(metadata), scene_id))
                if result.ok:
                    report.embedded += 1
                else:
                    report.failed += 1
                    log.warning("scene %s: %s", scene_id, result.error)
        report.batches += 1
        if on_batch is not None:
            on_batch(len(rows))
    return report


def _resolve(root: Path | None, frame_path: str) -> str:
    path = Path(frame_path)
    return str(root / path) if root is not None and not path.is_absolute() else frame_path
