"""Backfill: embed the scenes that lack a vector of the worker's artifact, with leases.

Each round a worker
1. returns expired leases to the pool of work (one short committed statement, recording a
   *worker* fault: the holder died, was killed or overran its lease);
2. claims a batch in ONE short committed statement, ``UPDATE ... WHERE id IN (SELECT ...
   FOR UPDATE SKIP LOCKED) RETURNING``, that counts the attempt and sets a lease expiry;
3. embeds the frames outside any transaction;
4. writes each result owner-scoped, and only if the lease is still its own.

So a worker killed at any point (``kill -9``, the OOM killer) leaves its batch leased until
the lease expires and someone reclaims it; a late writer whose lease was taken over writes
nothing; every scene gets its vector written once. Scenes whose last attempt ended in a
worker fault are retried alone, so a frame that kills its worker cannot take its batch
mates down with it. Failed attempts back off exponentially; after ``max_attempts`` a scene
is given up, its last error and fault kind (``frame``: the image is bad; ``worker``: crash,
lease expiry, timeout or memory exhaustion) kept in ``visual_clip_last_error`` and
``visual_clip_fault``.

Without ``reembed_stale`` the work is the scenes with no vector in their first slot; with
it, also every scene whose vectors were made by other artifacts (a model upgrade: the new
vectors go beside the old ones, see :mod:`.store`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from psycopg_pool import ConnectionPool

from ..embedder import ClipEmbedder, EmbeddingResult
from ..errors import DimensionError
from .connection import one_value
from .errors import InvalidInputError
from .store import SceneStore, classify_fault, write_vector
from .validate import check_metadata, check_vector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scope:
    """Whose scenes: one owner, or every owner, said explicitly."""

    owner_id: uuid.UUID | None = None
    all_owners: bool = False

    def __post_init__(self) -> None:
        if (self.owner_id is None) == (not self.all_owners):
            if self.owner_id is None:
                raise ValueError(
                    "give an owner, or all_owners=True (--all-owners) to work "
                    "on every owner's scenes"
                )
            raise ValueError("give an owner or all_owners=True, not both")

    def sql(self, alias: str = "") -> str:
        return "TRUE" if self.all_owners else f"{alias}owner_id = %(owner)s"


@dataclass(frozen=True)
class Policy:
    """How a worker claims, retries and gives up."""

    batch_size: int = 16
    lease_s: float = 300.0
    max_attempts: int = 3
    retry_base_s: float = 30.0  # first retry delay; doubles with every attempt
    retry_max_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_attempts < 1:
            raise ValueError("batch_size and max_attempts must be >= 1")
        if not self.lease_s > 0 or self.retry_base_s < 0 or self.retry_max_s < 0:
            raise ValueError("lease_s must be > 0, retry delays >= 0")

    def retry_after(self, attempts: int) -> float:
        return min(self.retry_max_s, self.retry_base_s * 2 ** max(attempts - 1, 0))


@dataclass
class BackfillReport:
    embedded: int = 0
    failed: int = 0
    batches: int = 0
    lost_leases: int = 0  # results not written: the lease had been taken over
    scenes: set = field(default_factory=set, repr=False)

    @property
    def processed(self) -> int:
        """Distinct scenes attempted in this run (a retry of one scene counts once)."""
        return len(self.scenes)


def _fault(result: EmbeddingResult, batch_raised: bool) -> str | None:
    if result.ok:
        return None
    return "worker" if batch_raised else classify_fault(result.error)


#: The artifact whose vector the second slot holds; migration 006 indexes this expression.
_ALT_VECTOR_ARTIFACT = """(CASE WHEN embedding_visual_clip_alt IS NOT NULL
                     THEN visual_clip_alt_artifact END)"""


def _work(reembed_stale: bool) -> str:
    """The scenes that still need a vector of %(artifact)s."""
    # "Neither slot holds this artifact's vector", spelt as ranges rather than IS DISTINCT
    # FROM so that the planner can combine index scans (the artifact indexes of both slots,
    # the pending index) instead of reading the table: re-embedding the last few stale rows
    # among millions must not cost a table scan per claim.
    return f"""frame_path IS NOT NULL
        AND (visual_clip_artifact < %(artifact)s OR visual_clip_artifact > %(artifact)s
             OR visual_clip_artifact IS NULL OR embedding_visual_clip IS NULL)
        AND ({_ALT_VECTOR_ARTIFACT} < %(artifact)s OR {_ALT_VECTOR_ARTIFACT} > %(artifact)s
             OR {_ALT_VECTOR_ARTIFACT} IS NULL)
        {"" if reembed_stale else "AND embedding_visual_clip IS NULL"}"""


_NOT_GIVEN_UP = """(visual_clip_job_artifact IS DISTINCT FROM %(artifact)s
                    OR visual_clip_attempts < %(max_attempts)s)"""
_READY = """visual_clip_lease_until IS NULL
        AND (visual_clip_job_artifact IS DISTINCT FROM %(artifact)s
             OR visual_clip_retry_at IS NULL OR visual_clip_retry_at <= now())"""


def count_pending(
    pool: ConnectionPool,
    artifact: str,
    scope: Scope,
    *,
    reembed_stale: bool = False,
    max_attempts: int = 3,
) -> int:
    """Scenes still needing a vector of ``artifact`` (and not given up on)."""
    with pool.connection() as conn:
        return one_value(
            conn.execute(
                f"SELECT count(*) FROM scenes WHERE {scope.sql()} AND {_work(reembed_stale)} "
                f"AND {_NOT_GIVEN_UP}",
                {"owner": scope.owner_id, "artifact": artifact, "max_attempts": max_attempts},
            )
        )


def release_expired(pool: ConnectionPool, scope: Scope, policy: Policy) -> int:
    """End every expired lease in ``scope`` as a worker fault; returns how many."""
    with pool.connection() as conn:
        return conn.execute(
            f"""UPDATE scenes SET visual_clip_lease_token = NULL, visual_clip_lease_until = NULL,
                    visual_clip_leased_by = NULL, visual_clip_fault = 'worker',
                    visual_clip_last_error = format('attempt %%s: lease expired (held by %%s): '
                        'the worker died, was killed or overran its lease',
                        visual_clip_attempts, visual_clip_leased_by),
                    visual_clip_retry_at = now() + least(%(retry_max)s, %(retry_base)s
                        * 2 ^ greatest(visual_clip_attempts - 1, 0)) * interval '1 second'
                WHERE id IN (SELECT id FROM scenes WHERE visual_clip_lease_until < now()
                             AND {scope.sql()} FOR UPDATE SKIP LOCKED)""",
            {
                "owner": scope.owner_id,
                "retry_base": policy.retry_base_s,
                "retry_max": policy.retry_max_s,
            },
        ).rowcount


def eligible_where(scope: Scope, reembed_stale: bool = False) -> str:
    """The ``WHERE`` condition of the scenes a claim may lease now (parameters: ``owner``,
    ``artifact``, ``max_attempts``)."""
    return f"{scope.sql()} AND {_work(reembed_stale)} AND {_NOT_GIVEN_UP} AND {_READY}"


def claim(
    pool: ConnectionPool,
    artifact: str,
    scope: Scope,
    policy: Policy,
    size: int,
    *,
    reembed_stale: bool = False,
    token: uuid.UUID | None = None,
) -> tuple[uuid.UUID, list[tuple[uuid.UUID, uuid.UUID, str, int]]]:
    """Lease up to ``size`` scenes (one at a time if the next is a crash suspect).

    Attempts count only failures in a row: a scene whose last attempt succeeded (its vector
    was later replaced by a third artifact's) starts again at 1, so it is never given up
    for having been embedded several times.

    Returns the lease token and ``(scene id, owner id, frame path, attempt number)`` rows.
    """
    token = token or uuid.uuid4()
    params = {
        "owner": scope.owner_id,
        "artifact": artifact,
        "max_attempts": policy.max_attempts,
        "size": size,
        "token": token,
        "lease": policy.lease_s,
        "by": worker_name(),
    }
    eligible = eligible_where(scope, reembed_stale)
    with pool.connection() as conn:
        # Crash suspects first, alone: what killed a worker must not kill the batch again.
        suspect = f"{eligible} AND visual_clip_fault = 'worker'"
        for where, limit in (
            (suspect, 1),
            (f"{eligible} AND visual_clip_fault IS DISTINCT FROM 'worker'", size),
        ):
            rows = conn.execute(
                f"""UPDATE scenes s SET
                        visual_clip_attempts = CASE WHEN s.visual_clip_job_artifact
                            = %(artifact)s AND s.visual_clip_fault IS NOT NULL
                            THEN s.visual_clip_attempts + 1 ELSE 1 END,
                        visual_clip_job_artifact = %(artifact)s,
                        visual_clip_lease_token = %(token)s,
                        visual_clip_lease_until = now() + %(lease)s * interval '1 second',
                        visual_clip_leased_by = %(by)s
                    WHERE s.id IN (SELECT id FROM scenes WHERE {where}
                                   LIMIT {limit} FOR UPDATE SKIP LOCKED)
                    RETURNING s.id, s.owner_id, s.frame_path, s.visual_clip_attempts""",
                params,
            ).fetchall()
            conn.commit()
            if rows:
                return token, sorted(rows)
    return token, []


def worker_name() -> str:
    """``host:pid`` of this process, recorded with its leases."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_backfill(
    pool: ConnectionPool,
    embedder: ClipEmbedder,
    scope: Scope,
    *,
    policy: Policy | None = None,
    reembed_stale: bool = False,
    limit: int | None = None,
    frame_root: Path | None = None,
    stop: threading.Event | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> BackfillReport:
    """Claim and embed batches until no scene is ready, ``limit`` distinct scenes were
    attempted, or ``stop`` is set (checked between batches).

    ``frame_root`` resolves relative frame paths; ``on_batch(n)`` follows each batch.
    """
    policy = policy or Policy()
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    column_dim = SceneStore(pool).dimension
    embedder.load()  # explicit: the artifact is read and verified here, or ClipError
    if embedder.embed_dim != column_dim:
        raise DimensionError(
            f"the model embeds {embedder.embed_dim} dimensions, the "
            f"embedding_visual_clip column holds vector({column_dim})"
        )
    artifact = embedder.artifact_id
    report = BackfillReport()
    while limit is None or report.processed < limit:
        if stop is not None and stop.is_set():
            break
        release_expired(pool, scope, policy)
        size = (
            policy.batch_size if limit is None else min(policy.batch_size, limit - report.processed)
        )
        token, rows = claim(pool, artifact, scope, policy, size, reembed_stale=reembed_stale)
        if not rows:
            break
        _embed_and_write(pool, embedder, artifact, token, rows, policy, frame_root, report)
        report.batches += 1
        if on_batch is not None:
            on_batch(len(rows))
    return report


def _embed_and_write(
    pool: ConnectionPool,
    embedder: ClipEmbedder,
    artifact: str,
    token: uuid.UUID,
    rows: list,
    policy: Policy,
    frame_root: Path | None,
    report: BackfillReport,
) -> None:
    paths = [resolve_frame(frame_root, path) for _, _, path, _ in rows]
    try:
        results = embedder.embed_frames(paths, frame_paths=[path for _, _, path, _ in rows])
    except Exception as exc:  # the worker path should not raise; if it does, blame the worker
        error = f"{type(exc).__name__}: {exc}"
        log.error("embedding a batch raised %s; its scenes will be retried alone", error)
        results = [EmbeddingResult(None, {"frame_path": p, "error": error}) for p in paths]
        batch_raised = True
    else:
        batch_raised = False
    with pool.connection() as conn, conn.transaction():
        for (scene_id, owner, path, attempt), result in zip(rows, results, strict=True):
            report.scenes.add(scene_id)
            fault = _fault(result, batch_raised)
            vector, metadata = result.embedding, {**result.metadata, "attempts": attempt}
            try:
                check_vector(vector) if vector is not None else None
                check_metadata(metadata)
            except InvalidInputError as exc:  # e.g. a zero vector: never stored, recorded
                vector, fault = None, "frame"
                metadata = {
                    "frame_path": path,
                    "attempts": attempt,
                    "error": f"{type(exc).__name__}: {exc}",
                }
                result = EmbeddingResult(None, metadata)
            written = write_vector(
                conn,
                scene_id,
                owner,
                artifact,
                vector,
                metadata,
                lease=token,
                fault=fault,
                retry_after_s=policy.retry_after(attempt),
            )
            if not written:
                report.lost_leases += 1
                log.warning("scene %s: lease taken over, result discarded", scene_id)
            elif result.ok:
                report.embedded += 1
            else:
                report.failed += 1
                log.warning(
                    "scene %s attempt %d (%s fault): %s", scene_id, attempt, fault, result.error
                )


def resolve_frame(root: Path | None, frame_path: str) -> str:
    """``frame_path``, relative to ``root`` when it is relative and a root is given."""
    path = Path(frame_path)
    return str(root / path) if root is not None and not path.is_absolute() else frame_path
