"""``db promote`` and ``db prune``: the two steps of a model upgrade that move or free vectors.

What they guarantee (docs/reliability.md has the whole protocol):

* :func:`promote` refuses, changing nothing, unless the new artifact holds a vector for
  every scene in scope that holds any vector: the old model's scenes, the pre-provenance
  ones, everything a search could find today. It never skips a locked row: it waits for
  the lock (the connection's lock_timeout) and retries the whole transaction a few times,
  then fails with :class:`~.errors.LockedRowsError`. The serving artifact is recorded
  only in the final transaction, after it has swapped the remaining rows and verified
  that every scene with a vector now has the new artifact's vector first; that transaction
  commits all of it or none of it. It holds the serving lock (:mod:`.slots`) exclusively,
  so no write made under the old serving artifact lands between its check and its commit.
* The bulk of the swap is done before, one transaction per owner (so no statement holds
  every row of a large deployment locked at once). If promote stops between owners, both
  artifacts stay findable everywhere: search reads both slots. Re-running continues.
* :func:`prune` never removes a vector of the serving artifact (checked in the statement
  itself, and by migration 007's trigger for any other writer), and also waits for locks.

Promote and prune of one database are serialised by a transaction-scoped advisory lock.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from .backfill import Scope
from .connection import DatabaseError
from .errors import LockedRowsError
from .slots import hold_serving_lock
from .store import SERVING_KEY
from .validate import check_artifact

log = logging.getLogger(__name__)
T = TypeVar("T")

_UPGRADE_LOCK = 0x48435550  # "HCUP": one promote or prune at a time
_HAS_VECTOR = "(embedding_visual_clip IS NOT NULL OR embedding_visual_clip_alt IS NOT NULL)"
_HOLDS = """((visual_clip_artifact IS NOT DISTINCT FROM %(artifact)s
              AND embedding_visual_clip IS NOT NULL)
             OR (visual_clip_alt_artifact IS NOT DISTINCT FROM %(artifact)s
                 AND embedding_visual_clip_alt IS NOT NULL))"""
_FIRST = """(visual_clip_artifact IS NOT DISTINCT FROM %(artifact)s
             AND embedding_visual_clip IS NOT NULL)"""
_SWAP = """
UPDATE scenes SET
    embedding_visual_clip = embedding_visual_clip_alt,
    visual_clip_artifact = visual_clip_alt_artifact,
    visual_clip_metadata = visual_clip_alt_metadata,
    embedding_visual_clip_alt = embedding_visual_clip,
    visual_clip_alt_artifact = visual_clip_artifact,
    visual_clip_alt_metadata = visual_clip_metadata
WHERE {scope} AND visual_clip_alt_artifact = %(artifact)s AND embedding_visual_clip_alt IS NOT NULL
"""


def locked_transaction(
    pool: ConnectionPool,
    work: Callable[[psycopg.Connection], T],
    what: str,
    retries: int = 5,
    backoff_s: float = 0.5,
) -> T:
    """``work(conn)`` in one transaction under the upgrade lock; retried whole when a row
    lock was not granted within lock_timeout (or a deadlock was broken)."""
    for attempt in range(1, retries + 1):
        try:
            with pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
                return work(conn)
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            log.warning(
                "%s: rows locked by another session (attempt %d of %d): %s",
                what,
                attempt,
                retries,
                str(exc).splitlines()[0],
            )
            if attempt < retries:
                time.sleep(backoff_s * 2 ** (attempt - 1))
    raise LockedRowsError(
        f"{what}: rows stayed locked by other sessions through {retries} "
        "attempts; this step changed nothing (re-run it when they are "
        "released)"
    )


def uncovered(conn: psycopg.Connection, artifact: str, scope: Scope) -> tuple[int, list]:
    """Scenes in ``scope`` holding some vector but none of ``artifact``: (count, first ids)."""
    row = conn.execute(
        f"SELECT count(*), (array_agg(id ORDER BY id))[1:3] FROM scenes WHERE {scope.sql()} "
        f"AND {_HAS_VECTOR} AND NOT {_HOLDS}",
        {"owner": scope.owner_id, "artifact": artifact},
    ).fetchone()
    return (row[0], row[1] or []) if row else (0, [])


def promote(
    pool: ConnectionPool,
    artifact: str,
    scope: Scope,
    *,
    lock_retries: int = 5,
    backoff_s: float = 0.5,
) -> int:
    """Make ``artifact``'s vectors the first slot's in ``scope`` (and, for every owner, the
    serving artifact); returns how many rows were swapped. See the module docstring."""
    artifact = check_artifact(artifact)
    params = {"owner": scope.owner_id, "artifact": artifact}
    with pool.connection() as conn:
        missing, examples = uncovered(conn, artifact, scope)
    _refuse_uncovered(artifact, missing, examples)
    swapped = 0
    if scope.all_owners:
        with pool.connection() as conn:
            owners = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT owner_id FROM scenes WHERE visual_clip_alt_artifact = "
                    "%(artifact)s AND embedding_visual_clip_alt IS NOT NULL",
                    params,
                ).fetchall()
            ]
        for owner in owners:
            one = Scope(owner_id=owner)
            swapped += locked_transaction(
                pool,
                functools.partial(_swap, artifact=artifact, scope=one),
                f"promote {artifact} for owner {owner}",
                lock_retries,
                backoff_s,
            )

    def finish(conn: psycopg.Connection) -> int:
        # Exclusive: wait for every writer that read the old serving artifact to commit (its
        # write is then seen below), and hold new ones back until this commits.
        hold_serving_lock(conn, exclusive=True)
        n = _swap(conn, artifact, scope)
        # Both counts in one scan (writers wait for this transaction: 1.24-1.41 s against
        # 1.83-1.88 s for two at 300k scenes here); the examples only when refusing.
        counted = conn.execute(
            f"""SELECT count(*) FILTER (WHERE NOT {_HOLDS}), count(*) FILTER (WHERE NOT {_FIRST})
                FROM scenes WHERE {scope.sql()} AND {_HAS_VECTOR}""",
            params,
        ).fetchone()
        missing, behind = counted or (0, 0)  # an aggregate: always one row
        if missing:  # a writer raced us: roll back (the ids are only for the message)
            _refuse_uncovered(artifact, missing, uncovered(conn, artifact, scope)[1])
        if behind:
            raise DatabaseError(
                f"{behind} scenes still hold another artifact's vector first "
                f"after the swap; {artifact} was not promoted"
            )
        if scope.all_owners:
            conn.execute(
                "INSERT INTO heimdex_clip_settings (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (SERVING_KEY, artifact),
            )
        return n

    return swapped + locked_transaction(
        pool, finish, f"promote {artifact}", lock_retries, backoff_s
    )


def _swap(conn: psycopg.Connection, artifact: str, scope: Scope) -> int:
    return conn.execute(
        _SWAP.format(scope=scope.sql()), {"owner": scope.owner_id, "artifact": artifact}
    ).rowcount


def _refuse_uncovered(artifact: str, missing: int, examples: list | None) -> None:
    if missing:
        shown = ", ".join(str(uuid.UUID(str(e))) for e in examples or [])
        raise DatabaseError(
            f"{missing} scenes with a vector have none of {artifact} (e.g. {shown}); nothing "
            "was promoted: run `heimdex-clip backfill --reembed-stale` with it (scenes it gave "
            "up on keep their last error in visual_clip_last_error; fix or delete them)"
        )


def prune(
    pool: ConnectionPool,
    artifact: str,
    scope: Scope,
    *,
    batch: int = 1000,
    lock_retries: int = 5,
    backoff_s: float = 0.5,
) -> int:
    """Delete the second-slot vectors of a retired ``artifact``; returns how many.

    Refused for the serving artifact. Each batch waits for locked rows (never skips them),
    so a return means none of its second-slot vectors is left in scope.
    """
    artifact = check_artifact(artifact)
    params = {"owner": scope.owner_id, "artifact": artifact, "batch": batch, "key": SERVING_KEY}
    with pool.connection() as conn:
        serving = conn.execute(
            "SELECT value FROM heimdex_clip_settings WHERE key = %s", (SERVING_KEY,)
        ).fetchone()
    if serving and serving[0] == artifact:
        raise DatabaseError(f"{artifact} is the serving artifact: promote another first")

    def one_batch(conn: psycopg.Connection) -> int:
        # The serving check is repeated in the statement, under the upgrade lock: a
        # promotion between the check above and here cannot make us delete served vectors.
        return conn.execute(
            f"""UPDATE scenes SET embedding_visual_clip_alt = NULL,
                    visual_clip_alt_artifact = NULL, visual_clip_alt_metadata = NULL
                WHERE id IN (SELECT id FROM scenes WHERE {scope.sql()}
                             AND visual_clip_alt_artifact = %(artifact)s
                             AND %(artifact)s IS DISTINCT FROM (SELECT value FROM
                                 heimdex_clip_settings WHERE key = %(key)s)
                             LIMIT %(batch)s FOR UPDATE)""",
            params,
        ).rowcount

    pruned = 0
    while n := locked_transaction(pool, one_batch, f"prune {artifact}", lock_retries, backoff_s):
        pruned += n
    return pruned
