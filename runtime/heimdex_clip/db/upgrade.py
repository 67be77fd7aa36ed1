"""Model upgrades without a window where search is empty or mixed.

1. ``backfill --reembed-stale`` with the new model writes its vectors beside the old ones
   (the scene's second slot); searches by the old model keep reading the old vectors.
2. :func:`promote` (``heimdex-clip db promote``), once the new artifact covers every scene
   not given up, swaps the slots so the new vectors are first and records the new artifact
   as the serving one. Both models keep finding all of their own vectors throughout.
3. Search services switch to the new model whenever convenient.
4. :func:`prune` (``heimdex-clip db prune``) frees the old vectors once nothing queries
   with the old model any more.
"""

from __future__ import annotations

from psycopg_pool import ConnectionPool

from .backfill import Scope, count_pending
from .connection import DatabaseError
from .store import SERVING_KEY

_SWAP = """
UPDATE scenes SET
    embedding_visual_clip = embedding_visual_clip_alt,
    visual_clip_artifact = visual_clip_alt_artifact,
    visual_clip_metadata = visual_clip_alt_metadata,
    embedding_visual_clip_alt = embedding_visual_clip,
    visual_clip_alt_artifact = visual_clip_artifact,
    visual_clip_alt_metadata = visual_clip_metadata
WHERE id IN (SELECT id FROM scenes WHERE {scope} AND visual_clip_alt_artifact = %(artifact)s
             AND embedding_visual_clip_alt IS NOT NULL LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
"""


def promote(pool: ConnectionPool, artifact: str, scope: Scope, *, force: bool = False,
            max_attempts: int = 3, batch: int = 1000) -> int:
    """Make ``artifact``'s vectors the first slot's; returns how many rows were swapped.

    Refuses while scenes still wait for a vector of ``artifact`` (``force`` overrides). The
    swap runs in batches: a row holds both vectors throughout, so no search sees a gap.
    """
    pending = count_pending(pool, artifact, scope, reembed_stale=True,
                            max_attempts=max_attempts)
    if pending and not force:
        raise DatabaseError(f"{pending} scenes still wait for a vector of {artifact}: run "
                            "`heimdex-clip backfill --reembed-stale` until none is left")
    params = {"owner": scope.owner_id, "artifact": artifact, "batch": batch}
    swapped = 0
    while True:
        with pool.connection() as conn:
            n = conn.execute(_SWAP.format(scope=scope.sql()), params).rowcount
            conn.commit()
        swapped += n
        if n == 0:
            break
    if scope.all_owners:
        with pool.connection() as conn:
            conn.execute("INSERT INTO heimdex_clip_settings (key, value) VALUES (%s, %s) "
                         "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                         (SERVING_KEY, artifact))
    return swapped


def prune(pool: ConnectionPool, artifact: str, scope: Scope, *, batch: int = 1000) -> int:
    """Delete the second-slot vectors of a retired ``artifact``; returns how many."""
    with pool.connection() as conn:
        serving = conn.execute("SELECT value FROM heimdex_clip_settings WHERE key = %s",
                               (SERVING_KEY,)).fetchone()
    if serving and serving[0] == artifact:
        raise DatabaseError(f"{artifact} is the serving artifact: promote another first")
    params = {"owner": scope.owner_id, "artifact": artifact, "batch": batch}
    pruned = 0
    while True:
        with pool.connection() as conn:
            n = conn.execute(
                f"""UPDATE scenes SET embedding_visual_clip_alt = NULL,
                        visual_clip_alt_artifact = NULL, visual_clip_alt_metadata = NULL
                    WHERE id IN (SELECT id FROM scenes WHERE {scope.sql()}
                                 AND visual_clip_alt_artifact = %(artifact)s
                                 LIMIT %(batch)s FOR UPDATE SKIP LOCKED)""", params).rowcount
            conn.commit()
        pruned += n
        if n == 0:
            return pruned
