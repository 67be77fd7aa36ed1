"""Model upgrades without a window where search is empty or mixed.

1. ``backfill --reembed-stale`` with the new model writes its vectors beside the old ones
   (the scene's second slot); searches by the old model keep reading the old vectors.
2. :func:`promote` (``heimdex-clip db promote``), only once the new artifact covers every
   scene that holds any vector, swaps the slots so the new vectors are first and records
   the new artifact as the serving one, all or nothing (see :mod:`.promotion`). Both
   models keep finding all of their own vectors throughout.
3. Search services switch to the new model whenever convenient.
4. :func:`prune` (``heimdex-clip db prune``) frees the old vectors once nothing queries
   with the old model any more.

Rows embedded before provenance existed carry no artifact and match no search.
:func:`attribute_legacy` (``heimdex-clip db attribute``) attributes them to the loaded
model, but only on evidence: a sample of their frames, embedded again, must reproduce the
stored vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ..embedder import ClipEmbedder
from .backfill import Scope, resolve_frame
from .connection import DatabaseError
from .promotion import locked_transaction, promote, prune
from .slots import hold_serving_lock
from .store import SERVING_KEY

__all__ = ["attribute_legacy", "promote", "prune"]

_LEGACY = """{scope} AND visual_clip_artifact IS NULL AND embedding_visual_clip IS NOT NULL
    AND visual_clip_metadata->>'model_name' = %(model)s
    AND visual_clip_metadata->>'pretrained' = %(pretrained)s
    AND visual_clip_alt_artifact IS DISTINCT FROM %(artifact)s"""


def attribute_legacy(
    pool: ConnectionPool,
    embedder: ClipEmbedder,
    scope: Scope,
    *,
    sample: int = 16,
    min_cosine: float = 0.99,
    frame_root: Path | None = None,
) -> tuple[int, int]:
    """Attribute pre-provenance vectors of this model's name and weights tag to its artifact.

    Embeds up to ``sample`` of their frames again; every reproduced vector must have cosine
    >= ``min_cosine`` with the stored one (INT8 results vary slightly with the batch), else
    DatabaseError and nothing changes. The attribution is one transaction that waits for
    locked rows (never skips one). Returns (frames compared, rows attributed).
    """
    model = embedder.load().manifest.model
    params = {
        "owner": scope.owner_id,
        "model": model.name,
        "pretrained": model.pretrained,
        "artifact": embedder.artifact_id,
        "sample": sample,
    }
    where = _LEGACY.format(scope=scope.sql())
    with pool.connection() as conn:
        rows = conn.execute(
            f"SELECT frame_path, embedding_visual_clip FROM scenes WHERE "
            f"{where} AND frame_path IS NOT NULL ORDER BY random() "
            "LIMIT %(sample)s",
            params,
        ).fetchall()
    if not rows:
        return 0, 0
    results = embedder.embed_frames(
        [resolve_frame(frame_root, path) for path, _ in rows],
        frame_paths=[path for path, _ in rows],
    )
    cosines = [
        float(np.dot(stored.to_numpy(), result.embedding))
        for (_, stored), result in zip(rows, results, strict=True)
        if result.embedding is not None
    ]  # result.ok
    if not cosines or min(cosines) < min_cosine:
        lowest = f"lowest cosine {min(cosines):.4f}" if cosines else "no frame readable"
        raise DatabaseError(
            f"the sampled vectors were not made by {embedder.artifact_id} "
            f"({lowest}): re-embed them with `heimdex-clip backfill "
            "--reembed-stale` instead"
        )
    evidence = Jsonb(
        {
            "artifact_id": embedder.artifact_id,
            "attributed": {"frames": len(cosines), "min_cosine": min(cosines)},
        }
    )

    def attribute(conn: psycopg.Connection) -> int:
        # One transaction, waiting for locked rows: a row skipped here would be hidden from
        # the four-argument search (which serves unattributed rows only until a serving
        # artifact is recorded, and records it in this same transaction).
        hold_serving_lock(conn, exclusive=True)
        n = conn.execute(
            f"""UPDATE scenes SET visual_clip_artifact = %(artifact)s,
                    visual_clip_metadata = visual_clip_metadata || %(evidence)s
                WHERE {where}""",
            {**params, "evidence": evidence},
        ).rowcount
        conn.execute(
            "INSERT INTO heimdex_clip_settings (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO NOTHING",
            (SERVING_KEY, embedder.artifact_id),
        )
        return n

    attributed = locked_transaction(pool, attribute, f"attribute {embedder.artifact_id}")
    return len(cosines), attributed
