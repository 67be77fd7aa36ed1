"""Apply the numbered SQL migrations once each, tracked in ``heimdex_clip_migrations``.

The SQL lives in the repository's top-level ``migrations/`` (shipped inside the package as
``heimdex_clip/db/migrations``). Each file runs in its own transaction under an advisory
lock, so concurrent migrators (several workers starting at once) apply each file exactly
once; running ``migrate`` again changes nothing. A file edited after it was applied is an
error, not a silent divergence.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from psycopg_pool import ConnectionPool

from .connection import DatabaseError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_LOCK_KEY = 0x4845494D  # "HEIM": serialises migrators across processes
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


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


def migrate(pool: ConnectionPool, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; returns the names of those applied now."""
    applied_now = []
    with pool.connection() as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute("""
                CREATE TABLE IF NOT EXISTS heimdex_clip_migrations (
                    version    text PRIMARY KEY,
                    name       text NOT NULL,
                    checksum   text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )""")
        for migration in discover(directory):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                row = conn.execute(
                    "SELECT checksum FROM heimdex_clip_migrations WHERE version = %s",
                    (migration.version,)).fetchone()
                if row is not None:
                    if row[0] != migration.checksum:
                        raise DatabaseError(
                            f"migration {migration.name} changed after it was applied; add a "
                            "new numbered migration instead of editing an applied one")
                    continue
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO heimdex_clip_migrations (version, name, checksum) "
                    "VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum))
                applied_now.append(migration.name)
                log.info("applied migration %s", migration.name)
    return applied_now
