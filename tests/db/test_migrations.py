"""Migrations: idempotent, exactly once under concurrency, edits to applied files refused."""

from __future__ import annotations

import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from heimdex_clip.db.connection import DatabaseError, open_pool
from heimdex_clip.db.migrate import MIGRATIONS_DIR, discover, migrate
from heimdex_clip.db.store import SceneStore

pytestmark = pytest.mark.db


def _schema(pool) -> list[tuple]:
    with pool.connection() as conn:
        return (
            conn.execute("""
            SELECT table_name, column_name, data_type, udt_name FROM information_schema.columns
            WHERE table_schema = 'public' ORDER BY table_name, column_name""").fetchall()
            + conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
                " ORDER BY indexname"
            ).fetchall()
            + conn.execute(
                "SELECT proname, prosrc FROM pg_proc WHERE proname LIKE 'search_%' ORDER BY proname"
            ).fetchall()
        )


def test_migrate_twice_changes_nothing(db_url):
    pool = open_pool(db_url)
    try:
        first = migrate(pool)
        assert first == [m.name for m in discover()]
        schema = _schema(pool)
        assert migrate(pool) == []
        assert _schema(pool) == schema
        with pool.connection() as conn:
            cols = dict(
                conn.execute(
                    "SELECT column_name, udt_name FROM information_schema.columns "
                    "WHERE table_name = 'scenes'"
                ).fetchall()
            )
            assert cols["embedding_visual_clip"] == "vector"
            assert cols["visual_clip_metadata"] == "jsonb"
            assert cols["owner_id"] == "uuid" and cols["id"] == "uuid"
            indexes = {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'scenes'"
                )
            }
            # A new deployment's search index (010): HNSW over the vectors cast to halfvec.
            halfvec = indexes["scenes_embedding_visual_clip_halfvec_hnsw"]
            assert "hnsw" in halfvec and "halfvec_cosine_ops" in halfvec
            assert "scenes_embedding_visual_clip_hnsw" not in indexes
            assert "owner_id" in indexes["scenes_owner_id_idx"]
            dim = conn.execute(
                "SELECT atttypmod FROM pg_attribute WHERE attrelid = "
                "'scenes'::regclass AND attname = 'embedding_visual_clip'"
            ).fetchone()[0]
            assert dim == 512
    finally:
        pool.close()


def test_concurrent_migrators_apply_each_file_once(db_url):
    pool = open_pool(db_url, max_size=6)
    try:
        with ThreadPoolExecutor(6) as ex:
            results = list(ex.map(lambda _: migrate(pool), range(6)))
        applied = [name for r in results for name in r]
        assert sorted(applied) == sorted(m.name for m in discover())
        with pool.connection() as conn:
            assert conn.execute("SELECT count(*) FROM heimdex_clip_migrations").fetchone()[
                0
            ] == len(discover())
    finally:
        pool.close()


def test_editing_an_applied_migration_is_refused(db_url, tmp_path):
    edited = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, edited)
    pool = open_pool(db_url)
    try:
        migrate(pool, edited)
        path = edited / "001_scenes.sql"
        path.write_text(path.read_text() + "\n-- edited\n")
        with pytest.raises(DatabaseError, match="changed after it was applied"):
            migrate(pool, edited)
    finally:
        pool.close()


def test_migrations_ship_inside_the_package():
    names = [m.name for m in discover()]
    assert names[:2] == ["001_scenes.sql", "002_clip_visual_embeddings.sql"]
    assert not next(m for m in discover() if m.name.startswith("005")).transactional
    assert (MIGRATIONS_DIR / "002_clip_visual_embeddings.sql").read_text().count(
        "search_scenes_by_visual_clip_embedding"
    ) >= 2


def test_vectors_are_stored_inline_not_in_toast(pool):
    """A vector(512) is over the 2 kB TOAST threshold: migration 003 keeps it in the row."""
    store = SceneStore(pool)
    vector = np.random.default_rng(0).standard_normal(store.dimension).astype(np.float32)
    scene_id = store.upsert_scene(
        uuid.uuid4(),
        "inline.jpg",
        vector / np.linalg.norm(vector),
        {"model": "test"},
        artifact="test:none:0",
    )
    with pool.connection() as conn:
        storage = conn.execute(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = 'scenes'::regclass "
            "AND attname = 'embedding_visual_clip'"
        ).fetchone()[0]
        chunk, size = conn.execute(
            "SELECT pg_column_toast_chunk_id(embedding_visual_clip), "
            "pg_column_size(embedding_visual_clip) FROM scenes WHERE id = %s",
            (scene_id,),
        ).fetchone()
    assert storage == "m"
    assert size == 8 + 4 * store.dimension  # stored whole: neither compressed nor a pointer
    assert chunk is None  # no TOAST chunk: the vector lives in the heap row


def test_five_processes_migrating_a_fresh_database_all_succeed(db_url):
    """CREATE EXTENSION runs under the migration lock: no unique violation on pg_extension."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DATABASE_URL": db_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "heimdex_clip.cli", "db", "migrate", "-q"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, outputs
    assert sum(out.startswith("applied: 001_scenes.sql") for out, _ in outputs) == 1
    assert sum("up to date" in out for out, _ in outputs) == 4


def test_migrate_lock_wait_is_bounded(db_url):
    import psycopg

    from heimdex_clip.db import migrate as migrate_module

    pool = open_pool(db_url)
    try:
        with psycopg.connect(db_url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (migrate_module._LOCK_KEY,))
            with pytest.raises(DatabaseError, match="held the migration lock"):
                migrate(pool, lock_timeout_s=0.5)
        assert migrate(pool) == [m.name for m in discover()]  # lock released: it proceeds
    finally:
        pool.close()


def test_opening_a_pool_changes_nothing_and_sets_timeouts(db_url):
    pool = open_pool(db_url)
    try:
        with pool.connection() as conn:
            assert (
                conn.execute(
                    "SELECT count(*) FROM pg_extension WHERE extname = 'vector'"
                ).fetchone()[0]
                == 0
            )
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "30s"
            assert conn.execute("SHOW lock_timeout").fetchone()[0] == "5s"
    finally:
        pool.close()


def test_search_functions_pin_search_path_and_plan_cache_mode(pool):
    with pool.connection() as conn:
        configs = dict(
            conn.execute(
                "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p WHERE proname IN "
                "('search_scenes_by_visual_clip_embedding', 'search_similar_scenes_by_visual_clip')"
            ).fetchall()
        )
    assert len(configs) == 4
    assert all(any(c.startswith("search_path=") for c in cfg) for cfg in configs.values())
    five = next(
        cfg
        for sig, cfg in configs.items()
        if sig.startswith("search_scenes") and sig.count(",") == 4
    )
    assert "plan_cache_mode=force_custom_plan" in five


def test_library_code_never_starts_an_embedded_server(monkeypatch):
    from heimdex_clip.db.connection import resolve_url

    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(DatabaseError, match="set DATABASE_URL"):
        resolve_url()


def test_an_interrupted_concurrent_index_build_is_rebuilt_by_the_next_migrate(pool):
    """A CREATE INDEX CONCURRENTLY cut short (here by a statement timeout, as a crash or a
    cancel would) leaves an INVALID index that IF NOT EXISTS would keep for ever: the
    runner drops it and builds it again."""
    import psycopg
    from pgvector.psycopg import register_vector

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((3000, 512)).astype(np.float32)
    name = "scenes_embedding_visual_clip_alt_hnsw"
    with psycopg.connect(pool.conninfo, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"DROP INDEX IF EXISTS {name}")  # 010 dropped it on a new database
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY scenes (owner_id, frame_path, embedding_visual_clip_alt, "
                "visual_clip_alt_artifact) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["uuid", "text", "vector", "text"])
            owner = uuid.uuid4()
            for i, v in enumerate(vectors):
                copy.write_row([owner, f"f{i}.jpg", v, "x:y:z"])
        conn.execute("DELETE FROM heimdex_clip_migrations WHERE version = '005'")
        conn.execute("SET statement_timeout = 50")
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(
                f"CREATE INDEX CONCURRENTLY {name} ON scenes USING hnsw "
                "(embedding_visual_clip_alt vector_cosine_ops)"
            )
        valid = (
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = "
            "i.indexrelid WHERE c.relname = %s"
        )
        assert conn.execute(valid, (name,)).fetchone() == (False,)
        assert migrate(pool) == ["005_upgrade_indexes_concurrently.sql"]
        assert conn.execute(valid, (name,)).fetchone() == (True,)


def test_pgvector_older_than_0_8_is_refused_by_runner_and_sql(db_url):
    """The catalog made to report pgvector 0.7.4 (as on a server not yet upgraded)."""
    import psycopg

    pool = open_pool(db_url)
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
            conn.execute("UPDATE pg_extension SET extversion = '0.7.4' WHERE extname = 'vector'")
            with pytest.raises(psycopg.errors.FeatureNotSupported, match=r"needs >= 0\.8"):
                conn.execute(next(m for m in discover() if m.version == "004").sql)
        with pytest.raises(DatabaseError, match=r"pgvector 0\.7\.4 is installed.*>= 0\.8"):
            migrate(pool)
        with pool.connection() as conn:  # refused before any migration ran
            assert conn.execute("SELECT to_regclass('scenes')").fetchone()[0] is None
    finally:
        pool.close()
