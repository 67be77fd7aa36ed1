"""The design's four monitoring figures, computed in SQL, plus vectors per artifact.

1. availability: share of scenes with ``embedding_visual_clip IS NOT NULL``
2. inference latency: mean, p50 and p95 of ``visual_clip_metadata->>'inference_time_ms'``
3. failure rate: scenes whose metadata carries an ``error``
4. timeout rate: scenes whose error says ``Timeout``

Per artifact: how many scenes hold a vector of it in each slot (a model upgrade is complete
for an artifact when it covers every scene), and the backfill's queue state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from psycopg_pool import ConnectionPool

from .backfill import Scope
from .connection import DatabaseError

# inference_time_ms as a number, or NULL when a writer stored something else there (a
# string, an object, a huge number): a stray value must not make the figures, or the worker,
# fail
# (jsonb numbers are arbitrary-precision: 1e400 would overflow float8, hence the bound).
_LATENCY = """(CASE WHEN jsonb_typeof(visual_clip_metadata->'inference_time_ms') = 'number'
               AND abs((visual_clip_metadata->'inference_time_ms')::numeric) < 1e15
               THEN (visual_clip_metadata->'inference_time_ms')::numeric::float8 END)"""

STATS_SQL = f"""
SELECT
    count(*)                                                       AS scenes,
    count(*) FILTER (WHERE embedding_visual_clip IS NOT NULL)      AS embedded,
    count(*) FILTER (WHERE visual_clip_metadata IS NOT NULL)       AS attempted,
    avg({_LATENCY})                                                AS latency_mean_ms,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY {_LATENCY})        AS latency_p50_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY {_LATENCY})       AS latency_p95_ms,
    count(*) FILTER (WHERE visual_clip_metadata->>'error' IS NOT NULL) AS failures,
    count(*) FILTER (WHERE visual_clip_metadata->>'error' LIKE '%%Timeout%%') AS timeouts,
    count(*) FILTER (WHERE visual_clip_lease_until IS NOT NULL)    AS leased
FROM scenes WHERE {{scope}}
"""

ARTIFACTS_SQL = """
SELECT COALESCE(artifact, 'unknown (embedded before provenance)') AS artifact,
       count(*) FILTER (WHERE slot = 'main') AS main, count(*) FILTER (WHERE slot = 'alt') AS alt
FROM (SELECT visual_clip_artifact AS artifact, 'main' AS slot FROM scenes
      WHERE {scope} AND embedding_visual_clip IS NOT NULL
      UNION ALL
      SELECT visual_clip_alt_artifact, 'alt' FROM scenes
      WHERE {scope} AND embedding_visual_clip_alt IS NOT NULL) v
GROUP BY 1 ORDER BY 1
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
    leased: int
    #: artifact id -> {"main": n, "alt": n}: scenes holding a vector of it, per slot.
    artifacts: dict[str, dict[str, int]] = field(default_factory=dict)

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

    def coverage(self, artifact: str) -> float | None:
        """Share of all scenes holding a vector of ``artifact`` (in either slot)."""
        counts = self.artifacts.get(artifact, {"main": 0, "alt": 0})
        return (counts["main"] + counts["alt"]) / self.scenes if self.scenes else None

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "availability": self.availability,
            "failure_rate": self.failure_rate,
            "timeout_rate": self.timeout_rate,
        }


def clip_stats(pool: ConnectionPool, scope: Scope) -> ClipStats:
    """The monitoring figures for one owner's scenes, or every owner's."""
    params = {"owner": scope.owner_id}
    with pool.connection() as conn:
        row = conn.execute(STATS_SQL.format(scope=scope.sql()), params).fetchone()
        artifacts = {
            a: {"main": m, "alt": n}
            for a, m, n in conn.execute(ARTIFACTS_SQL.format(scope=scope.sql()), params).fetchall()
        }
    if row is None:  # an aggregate query always returns one row
        raise DatabaseError("the statistics query returned no row")
    # STATS_SQL's columns are ClipStats' fields before ``artifacts``, in order.
    return ClipStats(*row, artifacts=artifacts)  # type: ignore[misc]


def format_stats(stats: ClipStats) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1f} ms"

    lines = [
        f"CLIP availability:  {pct(stats.availability)} "
        f"({stats.embedded} of {stats.scenes} scenes embedded)",
        f"Inference latency:  mean {ms(stats.latency_mean_ms)}, p50 {ms(stats.latency_p50_ms)},"
        f" p95 {ms(stats.latency_p95_ms)}",
        f"Failure rate:       {pct(stats.failure_rate)} ({stats.failures} of "
        f"{stats.attempted} attempted)",
        f"Timeout rate:       {pct(stats.timeout_rate)} ({stats.timeouts})",
        f"Leased now:         {stats.leased} scenes being embedded",
        "Vectors per artifact (first slot + second slot = coverage):",
    ]
    for artifact, counts in stats.artifacts.items():
        lines.append(
            f"  {artifact}: {counts['main']} + {counts['alt']} = {pct(stats.coverage(artifact))}"
        )
    if not stats.artifacts:
        lines.append("  (none)")
    return "\n".join(lines)
