"""Where a scene's vector goes: its two slots, and the one write path every embedding takes.

A vector goes to the slot that already holds its artifact, else to an empty slot (the
first one first), else over the slot that does NOT hold the serving artifact's vector: the
vector search is serving is never overwritten (migration 007's trigger refuses that in SQL
too, for any writer).

Which slot that is depends on the serving artifact, so a writer holds the *serving lock*
(shared) from before it reads the serving artifact until it commits, and ``db promote``
changes the serving artifact only while holding it exclusively: a write is either seen by
promote's final check or made knowing the new serving artifact, never between the two.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from .validate import check_artifact, check_metadata, check_vector

SERVING_KEY = "serving_visual_clip_artifact"
#: Transaction-scoped advisory lock on the serving artifact ("HCSV"); migration 012's trigger
#: takes it too (the same number, spelt out there).
SERVING_LOCK = 0x48435356
# The two vector slots: (vector, artifact, metadata) columns.
_SLOTS = {
    "main": ("embedding_visual_clip", "visual_clip_artifact", "visual_clip_metadata"),
    "alt": ("embedding_visual_clip_alt", "visual_clip_alt_artifact", "visual_clip_alt_metadata"),
}


#: Error prefixes that blame the worker (its state, load or configuration), not the frame:
#: a configuration fault (metadata.CONFIG_FAULT_PREFIX) is never recorded against a frame.
WORKER_FAULTS = ("Timeout", "Model load failed", "MemoryError", "ClipTimeoutError", "ConfigError:")


def classify_fault(error: str | None) -> str:
    """``worker`` or ``frame``: who is to blame for a failed embedding."""
    return "worker" if error and error.startswith(WORKER_FAULTS) else "frame"


def hold_serving_lock(conn: psycopg.Connection, *, exclusive: bool = False) -> None:
    """Keep the serving artifact from changing until the caller's transaction ends.

    Writers take it shared (they do not wait for each other, only for a promotion's final
    transaction); whatever records a new serving artifact takes it ``exclusive``: it waits
    for the writers in flight to commit and holds new ones back until it commits. Take it
    before any scene row lock of the transaction: promote takes the lock, then rows, and
    the other order can deadlock with it.
    """
    if exclusive:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SERVING_LOCK,))
        return
    # A writer waits out a promotion's final check (a table scan: 1.2-1.4 s at 300k scenes
    # on a 2-core Xeon) instead of failing at lock_timeout; statement_timeout still bounds
    # the wait. One round trip (no parameters, so psycopg may send three statements): every
    # write_vector call runs this, again when the transaction already holds the lock.
    conn.execute(
        "SET LOCAL lock_timeout = 0; "
        f"SELECT pg_advisory_xact_lock_shared({int(SERVING_LOCK)}); "
        "SET LOCAL lock_timeout TO DEFAULT"
    )


def choose_slot(
    main_artifact: str | None,
    main_has_vector: bool,
    alt_artifact: str | None,
    alt_has_vector: bool,
    artifact: str,
    serving: str | None = None,
) -> str:
    """Which slot a vector of ``artifact`` goes to (see the module docstring).

    When both slots hold vectors of other artifacts, the one NOT of the serving artifact is
    replaced: a vector search is serving is never overwritten (migration 007's trigger
    refuses it in SQL as well).
    """
    if main_artifact == artifact:
        return "main"
    if alt_artifact == artifact:
        return "alt"
    if not main_has_vector:
        return "main"
    if not alt_has_vector:
        return "alt"
    return "main" if alt_artifact == serving and serving is not None else "alt"


def write_vector(
    conn: psycopg.Connection,
    scene_id: uuid.UUID,
    owner: uuid.UUID,
    artifact: str,
    vector: np.ndarray | None,
    metadata: dict[str, Any],
    *,
    lease: uuid.UUID | None = None,
    fault: str | None = None,
    retry_after_s: float | None = None,
) -> bool:
    """Store one embedding result in the caller's transaction; False if nothing was written.

    Nothing is written if the scene does not belong to ``owner`` or (with ``lease``) if the
    lease is no longer the caller's. Any lease on the row ends here. A failure (``vector``
    None) never erases a stored vector: it is recorded in the job columns (with ``fault``,
    and a retry time ``retry_after_s`` from now) and, if the slot is empty, in its metadata.

    The vector, metadata and artifact are checked before any SQL runs (InvalidInputError),
    so a refused value leaves the caller's transaction usable.
    """
    artifact = check_artifact(artifact)
    vector = check_vector(vector) if vector is not None else None
    metadata = check_metadata(metadata)
    # Before the row lock (promote takes the two in the same order: no deadlock).
    hold_serving_lock(conn)
    row = conn.execute(
        """SELECT visual_clip_artifact, embedding_visual_clip IS NOT NULL,
                  visual_clip_alt_artifact, embedding_visual_clip_alt IS NOT NULL,
                  visual_clip_lease_token
           FROM scenes WHERE id = %s AND owner_id = %s FOR UPDATE""",
        (scene_id, owner),
    ).fetchone()
    if row is None or (lease is not None and row[4] != lease):
        return False
    # Read after both locks, in a statement of its own: a promotion that committed while we
    # waited is seen (READ COMMITTED takes a snapshot per statement), and none can commit
    # before we do.
    serving = conn.execute(
        "SELECT value FROM heimdex_clip_settings WHERE key = %s", (SERVING_KEY,)
    ).fetchone()
    slot = choose_slot(row[0], row[1], row[2], row[3], artifact, serving[0] if serving else None)
    vector_col, artifact_col, meta_col = _SLOTS[slot]
    has_vector = row[1] if slot == "main" else row[3]
    metadata = {**metadata, "artifact_id": artifact}
    sets = [
        "visual_clip_lease_token = NULL",
        "visual_clip_lease_until = NULL",
        "visual_clip_leased_by = NULL",
    ]
    params: list[Any] = []
    if vector is not None:
        sets += [
            f"{vector_col} = %s",
            f"{artifact_col} = %s",
            f"{meta_col} = %s",
            "visual_clip_last_error = NULL",
            "visual_clip_fault = NULL",
            "visual_clip_retry_at = NULL",
        ]
        params += [vector, artifact, Jsonb(metadata)]
    else:
        if not has_vector:
            sets += [f"{artifact_col} = %s", f"{meta_col} = %s"]
            params += [artifact, Jsonb(metadata)]
        sets += [
            "visual_clip_last_error = %s",
            "visual_clip_fault = %s",
            "visual_clip_retry_at = now() + %s * interval '1 second'",
        ]
        params += [
            metadata.get("error"),
            fault or classify_fault(metadata.get("error")),
            retry_after_s or 0.0,
        ]
    conn.execute(
        f"UPDATE scenes SET {', '.join(sets)} WHERE id = %s AND owner_id = %s",
        (*params, scene_id, owner),
    )
    return True
