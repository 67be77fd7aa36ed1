"""Which pgvector index serves search, and switching kinds without blocking writes.

Three kinds (migration 010; the search function keeps one contract under each: candidates in
the index's order, re-ranked by exact float32 cosine distance, which is the similarity):

- ``vector``: HNSW over the float32 vectors (``vector_cosine_ops``);
- ``halfvec``: HNSW over the vectors cast to ``halfvec(512)`` (an expression index: the
  column stays float32, the index is half the size). The default of a new deployment;
- ``bit``: HNSW over ``binary_quantize(vector)::bit(512)`` (Hamming distance), a 32nd of
  the vectors' size; coarse, so the search re-ranks 40x as many candidates (at least 400).

Whatever the kind, an owner with at most ``exact_max_rows`` rows (the planner's estimate;
default 10,000) is searched exactly: its rows are read through the owner index and sorted.

:func:`switch_search_index` builds the new kind's index on both vector slots with
``CREATE INDEX CONCURRENTLY`` (writes and searches go on, on the old index), records the
kind (searches move over at their next call), then drops the other kinds' indexes with
``DROP INDEX CONCURRENTLY``. An invalid index that an interrupted build left behind is
dropped and built again, so a killed switch is finished by running it again.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from .connection import DatabaseError, one_value

log = logging.getLogger(__name__)

KINDS = ("vector", "halfvec", "bit")
#: What migration 010 gives a new deployment (measured at 1M rows: docs/scale.md).
DEFAULT_KIND = "halfvec"
#: The search function's fallbacks when nothing is recorded (migration 010 holds the same).
DEFAULT_EF_SEARCH, DEFAULT_EXACT_MAX_ROWS = 400, 10_000
SLOTS = ("embedding_visual_clip", "embedding_visual_clip_alt")
DIM = 512

_EXPRESSION = {
    "vector": ("{col}", "vector_cosine_ops"),
    "halfvec": (f"({{col}}::halfvec({DIM}))", "halfvec_cosine_ops"),
    "bit": (f"(binary_quantize({{col}})::bit({DIM}))", "bit_hamming_ops"),
}
_MEMORY = re.compile(r"^\d+\s*(kB|MB|GB|TB)$")


def index_name(kind: str, slot: str) -> str:
    """The index of ``kind`` on vector column ``slot`` (the vector kind keeps 002/005's names)."""
    _check_kind(kind)
    return f"scenes_{slot}_hnsw" if kind == "vector" else f"scenes_{slot}_{kind}_hnsw"


@dataclass(frozen=True)
class BuildOptions:
    """HNSW build parameters and the build session's memory and parallelism (None: the
    server's). ef_construction 200, not pgvector's 64: at a million rows of topics unrelated
    to each other, 64 left ~10% of queries in a part of the graph they could not leave
    (recall@20 0.90-0.95); 200 gave 0.986-1.0 for a build 1.4x as long (docs/scale.md)."""

    m: int = 16
    ef_construction: int = 200
    #: e.g. '2GB'. A graph that outgrows it is finished on disk, several times slower.
    maintenance_work_mem: str | None = None
    #: Workers besides the leader (max_parallel_maintenance_workers).
    parallel_workers: int | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.m <= 100:
            raise ValueError(f"m must be in [2, 100], got {self.m}")
        if not 4 <= self.ef_construction <= 1000 or self.ef_construction < 2 * self.m:
            raise ValueError(
                f"ef_construction must be in [4, 1000] and >= 2*m, got {self.ef_construction}"
            )
        if self.maintenance_work_mem is not None and not _MEMORY.match(self.maintenance_work_mem):
            raise ValueError(
                "maintenance_work_mem must look like 512MB or 2GB, "
                f"got {self.maintenance_work_mem!r}"
            )
        if self.parallel_workers is not None and not 0 <= self.parallel_workers <= 64:
            raise ValueError(f"parallel_workers must be in [0, 64], got {self.parallel_workers}")


@dataclass(frozen=True)
class IndexInfo:
    """One search index as the catalog has it."""

    kind: str
    slot: str
    name: str
    valid: bool
    size_bytes: int
    options: dict[str, str]


@dataclass
class SwitchReport:
    """What :func:`switch_search_index` did."""

    kind: str
    previous: str
    built: dict[str, float] = field(default_factory=dict)  # index name -> seconds
    reused: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown search index kind {kind!r}; choose one of {', '.join(KINDS)}")


def index_definition(kind: str, slot: str, options: BuildOptions) -> sql.Composed:
    """``CREATE INDEX CONCURRENTLY IF NOT EXISTS`` for ``kind`` on ``slot``."""
    expression, opclass = _EXPRESSION[kind]
    return sql.SQL(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON scenes USING hnsw ("
        + expression.format(col="{col}")
        + " {opclass}) WITH (m = {m}, ef_construction = {ef})"
    ).format(
        name=sql.Identifier(index_name(kind, slot)),
        col=sql.Identifier(slot),
        opclass=sql.SQL(opclass),
        m=sql.Literal(options.m),
        ef=sql.Literal(options.ef_construction),
    )


def active_kind(conn: psycopg.Connection) -> str:
    """The kind the search function uses now."""
    return cast(str, one_value(conn.execute("SELECT heimdex_clip_search_index()")))


def search_indexes(conn: psycopg.Connection) -> list[IndexInfo]:
    """Every search index of every kind that exists, valid or not, with its size."""
    names = {index_name(k, s): (k, s) for k in KINDS for s in SLOTS}
    rows = conn.execute(
        "SELECT c.relname, i.indisvalid, pg_relation_size(c.oid), "
        "COALESCE(c.reloptions, '{}') FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'scenes'::regclass AND c.relname = ANY(%s) ORDER BY c.relname",
        (list(names),),
    ).fetchall()
    return [
        IndexInfo(*names[name], name, valid, size, dict(o.split("=", 1) for o in reloptions))
        for name, valid, size, reloptions in rows
    ]


def _admin_connection(pool: ConnectionPool) -> psycopg.Connection:
    """Autocommit (CONCURRENTLY needs it), no statement limit (a build takes minutes)."""
    conninfo, kwargs = cast(str, pool.conninfo), cast(dict[str, Any], pool.kwargs)
    conn = psycopg.connect(conninfo, **{**kwargs, "autocommit": True})
    conn.execute("SET statement_timeout = 0")
    return conn


def switch_search_index(
    pool: ConnectionPool,
    kind: str,
    options: BuildOptions | None = None,
    *,
    keep_old: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SwitchReport:
    """Make ``kind`` the search index without blocking writes (see the module docstring).

    An existing valid index of ``kind`` is reused as it is (its build parameters are not
    compared); ``keep_old`` keeps the other kinds' indexes (a quick way back, at their size).
    """
    _check_kind(kind)
    options = options or BuildOptions()
    say = progress or (lambda message: log.info("%s", message))
    with _admin_connection(pool) as conn:
        # pgvector says when the graph outgrows maintenance_work_mem (the build then goes on
        # on disk, several times slower): the operator hears it while there is time to stop.
        conn.add_notice_handler(lambda notice: _pass_on_notice(notice, say))
        previous = active_kind(conn)
        report = SwitchReport(kind=kind, previous=previous)
        if options.maintenance_work_mem:
            conn.execute(
                sql.SQL("SET maintenance_work_mem = {}").format(
                    sql.Literal(options.maintenance_work_mem)
                )
            )
        if options.parallel_workers is not None:
            conn.execute(
                sql.SQL("SET max_parallel_maintenance_workers = {}").format(
                    sql.Literal(options.parallel_workers)
                )
            )
        present = {i.name: i for i in search_indexes(conn)}
        for slot in SLOTS:
            name = index_name(kind, slot)
            if name in present and present[name].valid:
                report.reused.append(name)
                continue
            if name in present:  # left invalid by an interrupted build
                say(f"dropping {name}, left invalid by an interrupted build")
                conn.execute(
                    sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name))
                )
            say(f"building {name} concurrently (writes and searches go on)")
            started = time.perf_counter()
            conn.execute(index_definition(kind, slot, options))
            report.built[name] = round(time.perf_counter() - started, 3)
        _require_valid(conn, kind)
        conn.execute(
            "INSERT INTO heimdex_clip_settings (key, value) VALUES ('search_index_kind', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (kind,),
        )
        say(f"search now uses the {kind} index (was {previous})")
        if not keep_old:
            for info in search_indexes(conn):
                if info.kind != kind:
                    conn.execute(
                        sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                            sql.Identifier(info.name)
                        )
                    )
                    report.dropped.append(info.name)
    return report


def _pass_on_notice(notice: psycopg.errors.Diagnostic, say: Callable[[str], None]) -> None:
    if notice.message_primary:
        detail = f" ({notice.message_detail})" if notice.message_detail else ""
        say(f"server: {notice.message_primary}{detail}")


def _require_valid(conn: psycopg.Connection, kind: str) -> None:
    valid = {i.name for i in search_indexes(conn) if i.valid}
    missing = [index_name(kind, s) for s in SLOTS if index_name(kind, s) not in valid]
    if missing:
        raise DatabaseError(
            f"the {kind} index {', '.join(missing)} did not build; search still uses "
            f"the previous kind (run the switch again)"
        )


def _record(pool: ConnectionPool, key: str, value: int | None) -> None:
    with pool.connection() as conn:
        if value is None:
            conn.execute("DELETE FROM heimdex_clip_settings WHERE key = %s", (key,))
        else:
            conn.execute(
                "INSERT INTO heimdex_clip_settings (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (key, str(value)),
            )


def set_ef_search(pool: ConnectionPool, ef_search: int | None) -> None:
    """Record the search function's ``hnsw.ef_search`` (None: back to the default, 400)."""
    if ef_search is not None and not 1 <= ef_search <= 1000:
        raise ValueError(f"ef_search must be in [1, 1000], got {ef_search}")
    _record(pool, "search_ef_search", ef_search)


def set_exact_max_rows(pool: ConnectionPool, rows: int | None) -> None:
    """Record the owner size (rows, as the statistics estimate it) up to which search reads
    the owner's rows exactly instead of walking the index (None: DEFAULT_EXACT_MAX_ROWS)."""
    if rows is not None and rows < 0:
        raise ValueError(f"exact_max_rows must be >= 0, got {rows}")
    _record(pool, "search_exact_max_rows", rows)


def describe_search_index(pool: ConnectionPool) -> dict[str, Any]:
    """The active kind, ef_search and every search index present (for ``db search-index``)."""
    with pool.connection() as conn:
        kind = active_kind(conn)
        ef = one_value(
            conn.execute(
                "SELECT heimdex_clip_setting('search_ef_search', %s)", (str(DEFAULT_EF_SEARCH),)
            )
        )
        exact = one_value(
            conn.execute(
                "SELECT heimdex_clip_setting('search_exact_max_rows', %s)",
                (str(DEFAULT_EXACT_MAX_ROWS),),
            )
        )
        indexes = search_indexes(conn)
    return {
        "kind": kind,
        "ef_search": int(ef),
        "exact_max_rows": int(exact),
        "indexes": [
            {
                "name": i.name,
                "kind": i.kind,
                "valid": i.valid,
                "size_bytes": i.size_bytes,
                "options": i.options,
            }
            for i in indexes
        ],
    }
