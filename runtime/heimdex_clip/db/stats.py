"""The design document's four monitoring figures, computed in SQL.

1. availability: share of scenes with ``embedding_visual_clip IS NOT NULL``
2. inference latency: mean, p50 and p95 of ``visual_clip_metadata->>'inference_time_ms'``
3. failure rate: scenes whose metadata carries an ``error``
4. timeout rate: scenes whose error says ``Timeout``
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass

from psycopg_pool import ConnectionPool

STATS_SQL = """
SELECT
    count(*)                                                       AS scenes,
    count(*) FILTER (WHERE embedding_visual_clip IS NOT NULL)      AS embedded,
    count(*) FILTER (WHERE visual_clip_metadata IS NOT NULL)       AS attempted,
    avg((visual_clip_metadata->>'inference_time_ms')::float8)      AS latency_mean_ms,
    percentile_cont(0.5) WITHIN GROUP
        (ORDER BY (visual_clip_metadata->>'inference_time_ms')::float8) AS latency_p50_ms,
    percentile_cont(0.95) WITHIN GROUP
        (ORDER BY (visual_clip_metadata->>'inference_time_ms')::float8) AS latency_p95_ms,
    count(*) FILTER (WHERE visual_clip_metadata->>'error' IS NOT NULL) AS failures,
    count(*) FILTER (WHERE visual_clip_metadata->>'error' LIKE '%%Timeout%%') AS timeouts
FROM scenes
WHERE %(owner)s::uuid IS NULL OR owner_id = %(owner)s::uuid
"""


@dataclass(frozen=True)
class ClipStats:
    scenes: int
    embedded: int
    attempted: int
    latency_mean_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    failures: int
    timeouts: int

    @property
    def availability(self) -> float | None:
        """Share of all scenes that have a CLIP embedding."""
        return self.embedded / self.scenes if self.scenes else None

    @property
    def failure_rate(self) -> float | None:
        """Share of attempted scenes whose embedding failed."""
        return self.failures / self.attempted if self.attempted else None

    @property
    def timeout_rate(self) -> float | None:
        """Share of attempted scenes that timed out."""
        return self.timeouts / self.attempted if self.attempted else None

    def to_dict(self) -> dict:
        return {**asdict(self), "availability": self.availability,
                "failure_rate": self.failure_rate, "timeout_rate": self.timeout_rate}


def clip_stats(pool: ConnectionPool, owner_id: uuid.UUID | None = None) -> ClipStats:
    """The monitoring figures for all scenes, or one owner's."""
    with pool.connection() as conn:
        row = conn.execute(STATS_SQL, {"owner": owner_id}).fetchone()
    return ClipStats(*row)


def format_stats(stats: ClipStats) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1f} ms"

    return "\n".join([
        f"CLIP availability:  {pct(stats.availability)} "
        f"({stats.embedded} of {stats.scenes} scenes embedded)",
        f"Inference latency:  mean {ms(stats.latency_mean_ms)}, p50 {ms(stats.latency_p50_ms)},"
        f" p95 {ms(stats.latency_p95_ms)}",
        f"Failure rate:       {pct(stats.failure_rate)} ({stats.failures} of "
        f"{stats.attempted} attempted)",
        f"Timeout rate:       {pct(stats.timeout_rate)} ({stats.timeouts})",
    ])
