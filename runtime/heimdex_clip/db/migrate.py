"""Apply the numbered SQL migrations once each, tracked in ``heimdex_clip_migrations``.

The SQL files live in this package's ``migrations/`` folder (package data, so every wheel and
checkout carries them; no symlink). A migrator takes a session advisory lock (waiting at most
``lock_timeout_s``), creates the ``vector`` extension and checks its version under that
lock, then applies each pending file, so concurrent migrators (several workers starting at
once) apply each file exactly once and never race on ``CREATE EXTENSION``. Running
``migrate`` again changes nothing; a file edited after it was applied is an error.

A file whose first line is ``-- heimdex-clip: no-transaction`` runs statement by statement
outside a transaction block (``CREATE INDEX CONCURRENTLY`` on a populated table); an invalid
index left by an interrupted concurrent build of that file is dropped and built again.

Data commands never migrate: they call :func:`require_schema`, which names the fix.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psycopg
from psycopg_pool import ConnectionPool

from .connection import DatabaseError, one_value

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
MIN_PGVECTOR = (0, 8)  # iterative index scans (hnsw.iterative_scan)
_LOCK_KEY = 0x4845494D  # "HEIM": serialises migrators across processes
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_NO_TRANSACTION = "-- heimdex-clip: no-transaction"
_FIX = "run `heimdex-clip db migrate`"


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        return not self.sql.startswith(_NO_TRANSACTION)

    def statements(self) -> list[str]:
        """The file's statements (no-transaction files: one per ``;`` at a line's end)."""
        body = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        )
        return [s.strip() for s in re.split(r";\s*$", body, flags=re.M) if s.strip()]


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in ``directory``, by number."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise DatabaseError(f"migration file {path.name} is not named NNN_name.sql")
        found.append(Migration(match.group(1), path.name, path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError(f"duplicate migration numbers in {directory}")
    return found


def _lock(conn: psycopg.Connection, timeout_s: float) -> None:
    """The migrators' advisory lock, or DatabaseError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not one_value(conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,))):
        if time.monotonic() > deadline:
            raise DatabaseError(
                f"another migrator has held the migration lock for over "
                f"{timeout_s:g}s; try again when it has finished"
            )
        time.sleep(0.1)


def _ensure_pgvector(conn: psycopg.Connection) -> bool:
    """Create the extension if missing (True if created now); refuse pgvector < 0.8."""
    created = one_value(
        conn.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')")
    )
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.errors.FeatureNotSupported as exc:  # extension files not installed
        raise DatabaseError(f"pgvector is not available on this server: {exc}") from None
    version = one_value(
        conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    )
    numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if numbers < MIN_PGVECTOR:
        raise DatabaseError(
            f"pgvector {version} is installed; heimdex-clip needs >= 0.8 "
            "(iterative index scans): run ALTER EXTENSION vector UPDATE"
        )
    return created


def _drop_invalid_indexes(conn: psycopg.Connection, migration: Migration) -> None:
    """Drop indexes named in ``migration`` that an interrupted concurrent build left invalid."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = "
        "i.indexrelid WHERE NOT i.indisvalid"
    ).fetchall()
    for (name,) in rows:
        if re.search(rf"\b{re.escape(name)}\b", migration.sql):
            log.warning("dropping invalid index %s left by an interrupted build", name)
            conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')


def migrate(
    pool: ConnectionPool, directory: Path = MIGRATIONS_DIR, *, lock_timeout_s: float = 60.0
) -> list[str]:
    """Apply pending migrations; returns the names of those applied now."""
    applied_now: list[str] = []
    # A dedicated connection: migrations may run longer than the pool's statement_timeout.
    # open_pool makes every pool from a URL and a dict (psycopg_pool also allows callables).
    conninfo, kwargs = cast(str, pool.conninfo), cast(dict[str, Any], pool.kwargs)
    with psycopg.connect(conninfo, **{**kwargs, "autocommit": True}) as conn:
        # No statement limit (index builds), and table locks waited for as long as the
        # migrators' lock: a busy table delays a migration, it does not fail it at once.
        conn.execute("SET statement_timeout = 0")
        conn.execute(f"SET lock_timeout = {int(lock_timeout_s * 1000)}")
        _lock(conn, lock_timeout_s)
        try:
            created = _ensure_pgvector(conn)
            conn.execute("""
                CREATE TABLE IF NOT EXISTS heimdex_clip_migrations (
                    version    text PRIMARY KEY,
                    name       text NOT NULL,
                    checksum   text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )""")
            done = dict(
                conn.execute("SELECT version, checksum FROM heimdex_clip_migrations").fetchall()
            )
            for migration in discover(directory):
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        raise DatabaseError(
                            f"migration {migration.name} changed after it was applied; add "
                            "a new numbered migration instead of editing an applied one"
                        )
                    continue
                _apply(conn, migration)
                applied_now.append(migration.name)
                log.info("applied migration %s", migration.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    if created:
        pool.drain()  # the pool's connections predate the vector type: renew them
    return applied_now


def _apply(conn: psycopg.Connection, migration: Migration) -> None:
    record = (
        "INSERT INTO heimdex_clip_migrations (version, name, checksum) VALUES (%s, %s, %s)",
        (migration.version, migration.name, migration.checksum),
    )
    if migration.transactional:
        with conn.transaction():
            conn.execute(migration.sql)
            conn.execute(*record)
        return
    _drop_invalid_indexes(conn, migration)
    for statement in migration.statements():  # each idempotent: a re-run resumes
        conn.execute(statement)
    conn.execute(*record)


def pending_migrations(pool: ConnectionPool, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Names of the migrations not yet applied to this database."""
    with pool.connection() as conn:
        exists = one_value(
            conn.execute("SELECT to_regclass('heimdex_clip_migrations') IS NOT NULL")
        )
        done = (
            {r[0] for r in conn.execute("SELECT version FROM heimdex_clip_migrations")}
            if exists
            else set()
        )
    return [m.name for m in discover(directory) if m.version not in done]


def require_schema(pool: ConnectionPool) -> None:
    """DatabaseError naming the fix unless every migration has been applied."""
    missing = pending_migrations(pool)
    if missing:
        what = (
            "never migrated"
            if len(missing) == len(discover())
            else f"missing migration {', '.join(missing)}"
        )
        raise DatabaseError(f"the database schema is not up to date ({what}): {_FIX}")
