"""Bulk embedding of a back catalogue on Ray Data, written back to PostgreSQL in batches.

The steady trickle of new scenes is the ``backfill`` workers' job; a bulk pass (switching
CLIP on for an existing catalogue, a model upgrade) runs here, on Ray Data, so it scales to
a cluster without more copies of our own loop. It shares the workers' bookkeeping, which is
what makes the two safe side by side:

1. a *chunk* of scenes is claimed with the workers' own lease statement (``FOR UPDATE SKIP
   LOCKED``), so a scene is never embedded by a worker and by this pass at once, and a
   killed bulk pass only leaves leases that expire and are taken up again;
2. the chunk goes through :func:`heimdex_clip.ray.embed_dataset` (one model per actor; a
   dead actor is restarted and its batch retried);
3. results are written ``write_batch`` rows at a time: ``COPY`` into a temporary staging
   table, then ONE ``UPDATE ... FROM`` that applies exactly the rules of
   :func:`.store.write_vector` (slot choice, provenance, a failure never erasing a vector,
   only rows whose lease is still ours).

A re-run finds nothing to claim for scenes that already hold the artifact's vector, so it
writes nothing.
"""

from __future__ import annotations

import csv
import json
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from psycopg_pool import ConnectionPool

from ..artifact import load_manifest
from ..errors import DimensionError
from .backfill import Policy, Scope, claim, release_expired
from .connection import DatabaseError
from .errors import InvalidInputError
from .slots import hold_serving_lock
from .store import WORKER_FAULTS, SceneStore, owner_uuid
from .validate import check_metadata, check_vector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BulkOptions:
    """How a bulk pass runs."""

    actors: int = 1  # Ray actors, one model each
    cpus_per_actor: float = 1.0  # ONNX Runtime threads (and Ray CPUs) per actor
    batch_size: int = 32  # frames per model call inside an actor
    chunk: int = 2048  # scenes leased per Ray run
    write_batch: int = 256  # rows per COPY + UPDATE
    lease_s: float = 3600.0  # a chunk's lease: longer than the chunk takes to embed
    max_attempts: int = 3
    reembed_stale: bool = False
    frame_root: Path | None = None
    #: ClipConfig fields for every actor (e.g. ``{"timeout_s": 5.0}``), over its CLIP_* env.
    settings: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.actors < 1 or self.batch_size < 1 or self.chunk < 1 or self.write_batch < 1:
            raise ValueError("actors, batch_size, chunk and write_batch must be >= 1")
        if not self.cpus_per_actor > 0 or not self.lease_s > 0:
            raise ValueError("cpus_per_actor and lease_s must be > 0")


@dataclass
class BulkReport:
    embedded: int = 0
    failed: int = 0
    lost_leases: int = 0  # results not written: the lease was no longer ours
    chunks: int = 0
    seconds: float = 0.0


def _policy(options: BulkOptions) -> Policy:
    return Policy(
        batch_size=options.chunk, lease_s=options.lease_s, max_attempts=options.max_attempts
    )


def bulk_embed(
    pool: ConnectionPool, model_dir: Path, scope: Scope, options: BulkOptions | None = None
) -> BulkReport:
    """Embed every scene in ``scope`` that lacks a vector of ``model_dir``'s artifact."""
    import ray.data

    from ..ray import embed_dataset, init_ray  # the ray extra, only when used

    options = options or BulkOptions()
    manifest = load_manifest(model_dir)
    artifact = manifest.artifact_id
    column_dim = SceneStore(pool).dimension
    if manifest.model.embed_dim != column_dim:
        raise DimensionError(
            f"the model embeds {manifest.model.embed_dim} dimensions, the "
            f"embedding_visual_clip column holds vector({column_dim})"
        )
    init_ray()
    policy, report, started = _policy(options), BulkReport(), time.perf_counter()
    while True:
        release_expired(pool, scope, policy)
        token, rows = claim(
            pool, artifact, scope, policy, options.chunk, reembed_stale=options.reembed_stale
        )
        if not rows:
            break
        report.chunks += 1
        items = [
            {"scene_id": str(sid), "owner_id": str(owner), "frame_path": path, "attempt": attempt}
            for sid, owner, path, attempt in rows
        ]
        results = embed_dataset(
            ray.data.from_items(items),
            model_dir,
            actors=options.actors,
            batch_size=options.batch_size,
            cpus_per_actor=options.cpus_per_actor,
            settings=options.settings,
            frame_root=options.frame_root,
        )
        written: set[str] = set()
        for batch in results.iter_batches(batch_size=options.write_batch, batch_format="numpy"):
            written.update(write_results(pool, artifact, column_dim, token, batch, policy, report))
        missing = len(rows) - len(written)
        if missing:  # not returned by Ray (never expected): give them back to the pool now
            log.warning("%d scenes of a chunk came back without a result; released", missing)
        release_lease(pool, token)
        log.info(
            "chunk %d: %d embedded, %d failed so far", report.chunks, report.embedded, report.failed
        )
    report.seconds = time.perf_counter() - started
    return report


def release_lease(pool: ConnectionPool, token: uuid.UUID) -> int:
    """End the leases ``token`` still holds (scenes it leased but did not write)."""
    with pool.connection() as conn:
        return conn.execute(
            """UPDATE scenes SET visual_clip_lease_token = NULL, visual_clip_lease_until = NULL,
                   visual_clip_leased_by = NULL WHERE visual_clip_lease_token = %s""",
            (token,),
        ).rowcount


#: One staged result per row; ``embedding`` NULL for a failed frame.
_STAGING = """CREATE TEMP TABLE IF NOT EXISTS heimdex_clip_bulk_results (
    id uuid, owner_id uuid, embedding vector({dim}), metadata jsonb, error text,
    fault text, retry_s float8) ON COMMIT DELETE ROWS"""

# The rules of slots.write_vector, as one statement over the staged rows. A vector goes to
# the slot that holds its artifact, else to an empty slot (the first one first), else over
# the slot that does not hold the serving artifact's vector; a failure never erases a vector
# (it marks the slot only when the slot is empty). Every expression in SET reads the row as
# it was before the UPDATE; the row locks are taken before the serving artifact is read.
_APPLY = """
WITH serving AS (
    SELECT (SELECT value FROM heimdex_clip_settings
            WHERE key = 'serving_visual_clip_artifact') AS artifact
), staged AS (
    SELECT t.*, (s.visual_clip_artifact IS NOT DISTINCT FROM %(artifact)s
                 OR (s.visual_clip_alt_artifact IS DISTINCT FROM %(artifact)s
                     AND (s.embedding_visual_clip IS NULL
                          OR (s.embedding_visual_clip_alt IS NOT NULL
                              AND s.visual_clip_alt_artifact = serving.artifact)))) AS main
    FROM heimdex_clip_bulk_results t CROSS JOIN serving
    JOIN scenes s ON s.id = t.id AND s.owner_id = t.owner_id
    WHERE s.visual_clip_lease_token = %(token)s
    FOR UPDATE OF s
)
UPDATE scenes s SET
    embedding_visual_clip = CASE WHEN r.main AND r.embedding IS NOT NULL
        THEN r.embedding ELSE s.embedding_visual_clip END,
    visual_clip_artifact = CASE WHEN r.main AND (r.embedding IS NOT NULL
        OR s.embedding_visual_clip IS NULL) THEN %(artifact)s ELSE s.visual_clip_artifact END,
    visual_clip_metadata = CASE WHEN r.main AND (r.embedding IS NOT NULL
        OR s.embedding_visual_clip IS NULL) THEN r.metadata ELSE s.visual_clip_metadata END,
    embedding_visual_clip_alt = CASE WHEN NOT r.main AND r.embedding IS NOT NULL
        THEN r.embedding ELSE s.embedding_visual_clip_alt END,
    visual_clip_alt_artifact = CASE WHEN NOT r.main AND (r.embedding IS NOT NULL
        OR s.embedding_visual_clip_alt IS NULL) THEN %(artifact)s
        ELSE s.visual_clip_alt_artifact END,
    visual_clip_alt_metadata = CASE WHEN NOT r.main AND (r.embedding IS NOT NULL
        OR s.embedding_visual_clip_alt IS NULL) THEN r.metadata
        ELSE s.visual_clip_alt_metadata END,
    visual_clip_last_error = r.error,
    visual_clip_fault = r.fault,
    visual_clip_retry_at = CASE WHEN r.embedding IS NULL
        THEN now() + r.retry_s * interval '1 second' END,
    visual_clip_lease_token = NULL, visual_clip_lease_until = NULL,
    visual_clip_leased_by = NULL
FROM staged r WHERE s.id = r.id
RETURNING s.id, r.embedding IS NOT NULL"""


def _fault(error: str) -> str:
    return "worker" if error.startswith(WORKER_FAULTS) else "frame"


def write_results(
    pool: ConnectionPool,
    artifact: str,
    dim: int,
    token: uuid.UUID,
    batch: dict[str, np.ndarray],
    policy: Policy,
    report: BulkReport,
) -> list[str]:
    """Write one batch of :class:`~heimdex_clip.ray.ClipBatchEmbedder` output; returns the
    scene ids it was given (written or not)."""
    foreign = {str(a) for a in batch["artifact_id"]} - {artifact}
    if foreign:  # an actor loaded another model (a node with a different artifact)
        raise DatabaseError(
            f"Ray actors embedded with artifact(s) {sorted(foreign)}, "
            f"expected {artifact}: every node must have the same artifact"
        )
    ids = [str(s) for s in batch["scene_id"]]
    with pool.connection() as conn, conn.transaction():
        conn.execute(_STAGING.format(dim=dim))
        with conn.cursor().copy(
            "COPY heimdex_clip_bulk_results (id, owner_id, embedding, metadata, error, "
            "fault, retry_s) FROM STDIN"
        ) as copy:
            for row in _staged_rows(batch, artifact, policy):
                copy.write_row(row)
        hold_serving_lock(conn)  # _APPLY's slot choice depends on the serving artifact
        applied = conn.execute(_APPLY, {"artifact": artifact, "token": token}).fetchall()
    report.embedded += sum(1 for _, ok in applied if ok)
    report.failed += sum(1 for _, ok in applied if not ok)
    report.lost_leases += len(ids) - len(applied)
    return ids


def _staged_rows(
    batch: dict[str, np.ndarray], artifact: str, policy: Policy
) -> Iterable[Sequence[Any]]:
    for i, scene_id in enumerate(batch["scene_id"]):
        attempt = int(batch["attempt"][i])
        vector = batch["embedding"][i] if bool(batch["ok"][i]) else None
        error = None if vector is not None else str(batch["error"][i]) or "embedding failed"
        metadata = {
            **json.loads(str(batch["metadata"][i])),
            "artifact_id": artifact,
            "attempts": attempt,
        }
        try:  # what the store refuses is stored as a failure, never as a vector
            vector = check_vector(vector) if vector is not None else None
            metadata = check_metadata(metadata)
        except InvalidInputError as exc:
            vector, error = None, f"{type(exc).__name__}: {exc}"
            metadata = {
                "frame_path": metadata.get("frame_path"),
                "artifact_id": artifact,
                "attempts": attempt,
                "error": error,
            }
        yield (
            scene_id,
            batch["owner_id"][i],
            vector,
            json.dumps(metadata, allow_nan=False),
            error,
            None if error is None else _fault(error),
            None if error is None else policy.retry_after(attempt),
        )


def register_frames(pool: ConnectionPool, listing: Path) -> tuple[int, set[uuid.UUID]]:
    """Add the scenes a Parquet or CSV list names (columns ``owner_id``, ``frame_path``),
    skipping those already present; returns (rows added, owners named)."""
    rows = _read_listing(listing)
    owners = {owner for owner, _ in rows}
    with pool.connection() as conn, conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE heimdex_clip_bulk_frames (owner_id uuid, "
            "frame_path text) ON COMMIT DROP"
        )
        with conn.cursor().copy(
            "COPY heimdex_clip_bulk_frames (owner_id, frame_path) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        added = conn.execute(
            """INSERT INTO scenes (owner_id, frame_path)
               SELECT DISTINCT owner_id, frame_path FROM heimdex_clip_bulk_frames
               ON CONFLICT (owner_id, frame_path) WHERE frame_path IS NOT NULL
               DO NOTHING"""
        ).rowcount
    return added, owners


def _read_listing(listing: Path) -> list[tuple[uuid.UUID, str]]:
    suffix = listing.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(listing, columns=["owner_id", "frame_path"]).to_pydict()
            pairs = list(zip(table["owner_id"], table["frame_path"], strict=True))
        elif suffix == ".csv":
            with listing.open(newline="", encoding="utf-8") as f:
                pairs = [(r["owner_id"], r["frame_path"]) for r in csv.DictReader(f)]
        else:
            raise DatabaseError(f"{listing}: a frame list is a .parquet or .csv file")
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise DatabaseError(
            f"cannot read the frame list {listing}: {exc} (it needs columns "
            "owner_id and frame_path)"
        ) from None
    out = []
    for n, (owner, path) in enumerate(pairs, start=2):
        try:
            owner_id = owner_uuid(owner)
        except ValueError:
            raise DatabaseError(f"{listing}: row {n}: owner_id {owner!r} is not a UUID") from None
        if not path or "\x00" in str(path):
            raise DatabaseError(f"{listing}: row {n}: frame_path must be non-empty text")
        out.append((owner_id, str(path)))
    return out
