"""The search index kind as a setting (migration 010, heimdex_clip.db.search_index): a new
deployment starts on halfvec, a populated one keeps vector, switching never blocks writes,
an interrupted switch is finished by running it again, and the search contract (exact
similarities, owner scope, errors) is the same under every kind. Recall per kind:
test_recall.py; at scale: test_search_scale.py."""

from __future__ import annotations

import json
import shutil
import threading
import uuid

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from heimdex_clip.db import search_index
from heimdex_clip.db.connection import open_pool
from heimdex_clip.db.migrate import MIGRATIONS_DIR, migrate
from heimdex_clip.db.store import SceneStore

pytestmark = pytest.mark.db
ARTIFACT = "ViT-B-32:synthetic:0000000000000000"


def _load(pool, vectors: np.ndarray, owners: list[uuid.UUID], prefix: str = "f") -> None:
    with pool.connection() as conn:
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY scenes (owner_id, frame_path, embedding_visual_clip, visual_clip_artifact)"
                " FROM STDIN WITH (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["uuid", "text", "vector", "text"])
            for i, v in enumerate(vectors):
                copy.write_row([owners[i % len(owners)], f"{prefix}{i}.jpg", v, ARTIFACT])
        conn.execute("ANALYZE scenes")


def _unit(rng, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 512)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _present(pool) -> dict[str, bool]:
    with pool.connection() as conn:
        return {i.name: i.valid for i in search_index.search_indexes(conn)}


def test_a_new_deployment_starts_on_halfvec(pool):
    assert search_index.describe_search_index(pool)["kind"] == search_index.DEFAULT_KIND
    assert _present(pool) == {
        "scenes_embedding_visual_clip_halfvec_hnsw": True,
        "scenes_embedding_visual_clip_alt_halfvec_hnsw": True,
    }
    # Built as a switch builds them: the migration and BuildOptions agree on the defaults.
    defaults = search_index.BuildOptions()
    with pool.connection() as conn:
        for info in search_index.search_indexes(conn):
            assert info.options == {
                "m": str(defaults.m),
                "ef_construction": str(defaults.ef_construction),
            }


def test_a_populated_deployment_keeps_its_vector_index_until_switched(db_url, tmp_path):
    before = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, before)
    (before / "010_search_index_kinds.sql").unlink()
    pool = open_pool(db_url)
    try:
        migrate(pool, before)
        _load(pool, _unit(np.random.default_rng(0), 50), [uuid.uuid4()])
        assert migrate(pool) == ["010_search_index_kinds.sql"]
        assert search_index.describe_search_index(pool)["kind"] == "vector"
        assert set(_present(pool)) == {
            "scenes_embedding_visual_clip_hnsw",
            "scenes_embedding_visual_clip_alt_hnsw",
        }
    finally:
        pool.close()


@pytest.fixture()
def loaded(pool):
    rng = np.random.default_rng(3)
    owners = [uuid.uuid4(), uuid.uuid4()]
    vectors = _unit(rng, 1200)
    _load(pool, vectors, owners)
    search_index.set_exact_max_rows(pool, 0)  # every owner walks the index (else exact)
    return SceneStore(pool), vectors, owners


@pytest.fixture()
def bigger(loaded, pool):
    """6,000 more rows (a build that takes a moment), loaded with no search index and the
    halfvec indexes built again afterwards."""
    with pool.connection() as conn:
        for info in search_index.search_indexes(conn):
            conn.execute(f'DROP INDEX "{info.name}"')
    _load(pool, _unit(np.random.default_rng(4), 6000), loaded[2], "g")
    search_index.switch_search_index(pool, "halfvec")
    return loaded


@pytest.mark.parametrize("kind", search_index.KINDS)
def test_every_kind_returns_exact_similarities_of_the_owner_only(loaded, pool, kind):
    store, vectors, owners = loaded
    report = search_index.switch_search_index(pool, kind)
    assert report.kind == kind and set(_present(pool)) == {
        search_index.index_name(kind, slot) for slot in search_index.SLOTS
    }
    query = vectors[7]
    hits = store.search_by_embedding(owners[1], query, artifact=ARTIFACT, threshold=-1, count=10)
    assert len(hits) == 10 and all(h.owner_id == owners[1] for h in hits)
    for hit in hits:  # the float32 cosine, whatever the index compared
        row = int(hit.frame_path[1:-4])
        assert hit.similarity == pytest.approx(float(vectors[row] @ query), abs=1e-5)
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    assert hits[0].frame_path == "f7.jpg"  # the query's own scene (owner 1 holds odd rows)


def test_a_graph_that_outgrows_the_build_memory_is_reported_while_it_builds(loaded, pool):
    """pgvector's notice that the graph no longer fits maintenance_work_mem (the build goes
    on on disk, several times slower) reaches the operator through the switch's progress."""
    said: list[str] = []
    search_index.switch_search_index(
        pool, "vector", search_index.BuildOptions(maintenance_work_mem="1MB"), progress=said.append
    )
    spilled = [m for m in said if m.startswith("server: ")]
    assert spilled and "maintenance_work_mem" in spilled[0], said
    assert search_index.describe_search_index(pool)["kind"] == "vector"  # built all the same


def test_switching_builds_concurrently_while_writes_go_on(bigger, pool):
    """While the new index builds, an INSERT from another session takes its lock at once (a
    plain CREATE INDEX would hold a SHARE lock and make it wait past lock_timeout), and the
    row written during the build is found through the new index afterwards."""
    store, _vectors, owners = bigger
    done: dict = {}
    switch = threading.Thread(
        target=lambda: done.update(report=search_index.switch_search_index(pool, "vector"))
    )
    probe = _unit(np.random.default_rng(5), 1)[0]
    with psycopg.connect(pool.conninfo, autocommit=True) as conn:
        register_vector(conn)
        switch.start()
        for _ in range(600):  # wait for the build to be under way (at most 60 s)
            phase = conn.execute(
                "SELECT phase FROM pg_stat_progress_create_index WHERE relid = 'scenes'::regclass"
            ).fetchone()
            if phase and phase[0].startswith("building index"):
                break
            threading.Event().wait(0.1)
        else:
            pytest.fail("the index build was never seen under way")
        conn.execute("SET lock_timeout = '1s'")
        conn.execute(
            "INSERT INTO scenes (owner_id, frame_path, embedding_visual_clip, "
            "visual_clip_artifact) VALUES (%s, 'during-build.jpg', %s, %s)",
            (owners[0], probe, ARTIFACT),
        )
        still_building = conn.execute(
            "SELECT count(*) FROM pg_stat_progress_create_index"
        ).fetchone()[0]
    switch.join()
    assert still_building == 1  # the insert went through while the build was running
    assert done["report"].kind == "vector"
    hits = store.search_by_embedding(owners[0], probe, artifact=ARTIFACT, threshold=-1, count=1)
    assert hits[0].frame_path == "during-build.jpg" and hits[0].similarity == pytest.approx(1)


def test_an_interrupted_switch_keeps_the_old_kind_and_a_rerun_finishes_it(bigger, pool):
    """A build cancelled mid-way (as a killed command or a crash would) leaves an INVALID
    index; search stays on the old kind; the next switch drops the invalid index and builds
    it again."""
    store, vectors, owners = bigger
    name = search_index.index_name("bit", "embedding_visual_clip")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            search_index.switch_search_index(pool, "bit")
        except BaseException as exc:
            errors.append(exc)

    switch = threading.Thread(target=run)
    with psycopg.connect(pool.conninfo, autocommit=True) as conn:
        switch.start()
        for _ in range(600):
            pid = conn.execute(
                "SELECT pid FROM pg_stat_progress_create_index WHERE relid = "
                "'scenes'::regclass AND phase LIKE 'building index%%'"
            ).fetchone()
            if pid:
                conn.execute("SELECT pg_cancel_backend(%s)", pid)
                break
            threading.Event().wait(0.05)
        else:
            pytest.fail("the index build was never seen under way")
    switch.join()
    assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled)
    assert _present(pool)[name] is False
    assert search_index.describe_search_index(pool)["kind"] == "halfvec"
    hits = store.search_by_embedding(
        owners[1], vectors[9], artifact=ARTIFACT, threshold=-1, count=3
    )
    assert hits[0].frame_path == "f9.jpg"

    report = search_index.switch_search_index(pool, "bit")
    assert name in report.built and all(_present(pool).values())
    assert search_index.describe_search_index(pool)["kind"] == "bit"


def test_keep_old_keeps_the_previous_indexes(loaded, pool):
    search_index.switch_search_index(pool, "bit", keep_old=True)
    present = _present(pool)
    assert search_index.index_name("halfvec", "embedding_visual_clip") in present
    assert search_index.index_name("bit", "embedding_visual_clip") in present
    # switching back reuses the kept index: nothing to build
    report = search_index.switch_search_index(pool, "halfvec")
    assert not report.built and len(report.reused) == 2
    assert search_index.index_name("bit", "embedding_visual_clip") in report.dropped


def test_ef_search_is_a_setting_that_never_leaks_to_the_caller(loaded, pool):
    _store, vectors, owners = loaded
    search_index.set_ef_search(pool, 64)
    assert search_index.describe_search_index(pool)["ef_search"] == 64
    with pool.connection() as conn:
        conn.execute("SET hnsw.ef_search = 17")
        rows = conn.execute(
            "SELECT count(*) FROM search_scenes_by_visual_clip_embedding(%s, -1, 5, %s, %s)",
            (vectors[0], owners[0], ARTIFACT),
        ).fetchone()[0]
        assert rows == 5
        assert conn.execute("SHOW hnsw.ef_search").fetchone()[0] == "17"
    search_index.set_ef_search(pool, None)
    assert search_index.describe_search_index(pool)["ef_search"] == 400
    with pytest.raises(ValueError, match="ef_search"):
        search_index.set_ef_search(pool, 0)


def test_a_damaged_setting_is_a_clear_error(loaded, pool):
    store, vectors, owners = loaded
    with pool.connection() as conn:
        conn.execute(
            "UPDATE heimdex_clip_settings SET value = 'ivfflat' WHERE key = 'search_index_kind'"
        )
    with pytest.raises(Exception, match="unknown search index kind ivfflat"):
        store.search_by_embedding(owners[0], vectors[0], artifact=ARTIFACT, threshold=-1, count=3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"m": 1}, "m must be"),
        ({"m": 16, "ef_construction": 20}, "ef_construction"),
        ({"maintenance_work_mem": "lots"}, "maintenance_work_mem"),
        ({"parallel_workers": -1}, "parallel_workers"),
    ],
)
def test_build_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        search_index.BuildOptions(**options)


def test_an_unknown_kind_is_refused_before_anything_changes(pool):
    with pytest.raises(ValueError, match="unknown search index kind"):
        search_index.switch_search_index(pool, "ivfflat")
    assert search_index.describe_search_index(pool)["kind"] == "halfvec"


def test_the_cli_shows_and_switches_the_index(loaded, pool, artifact_dir):
    from .test_cli import run

    url = pool.conninfo
    shown = run(["db", "search-index", "-q"], url, artifact_dir)
    assert shown.stdout.startswith(
        "search index: halfvec (hnsw.ef_search 400; owners of at most 0 rows searched exactly)"
    )
    switched = run(
        [
            "db",
            "search-index",
            "bit",
            "--m",
            "8",
            "--ef-construction",
            "32",
            "--ef-search",
            "120",
            "--exact-max-rows",
            "5000",
            "--json",
            "-q",
        ],
        url,
        artifact_dir,
    )
    state = json.loads(switched.stdout[switched.stdout.index("{") :])
    assert state["kind"] == "bit" and state["ef_search"] == 120
    assert state["exact_max_rows"] == 5000
    assert {i["name"] for i in state["indexes"]} == {
        search_index.index_name("bit", slot) for slot in search_index.SLOTS
    }
    assert all(i["options"] == {"m": "8", "ef_construction": "32"} for i in state["indexes"])
    assert "dropped scenes_embedding_visual_clip_halfvec_hnsw" in switched.stdout

    refused = run(
        ["db", "search-index", "halfvec", "--m", "40", "--ef-construction", "64", "-q"],
        url,
        artifact_dir,
        check=False,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "heimdex-clip db search-index: error: ef_construction must be in [4, 1000] and "
        ">= 2*m, got 64 (see --help)"
    ]
    assert search_index.describe_search_index(pool)["kind"] == "bit"


@pytest.mark.parametrize("kind", search_index.KINDS)
def test_an_owner_under_the_exact_limit_is_read_exactly_not_through_the_index(loaded, pool, kind):
    """At or under exact_max_rows the function reads the owner's rows and sorts them by
    exact distance (recall 1 by construction), whatever the index kind; above it the planner
    may walk the index (test_recall.py shows it does for a 30% owner of 20,000 rows)."""
    from .test_recall import _explaining_connection

    _, vectors, owners = loaded
    search_index.switch_search_index(pool, kind)
    query = vectors[3] + 0.05 * _unit(np.random.default_rng(9), 1)[0]
    exact = sorted(range(1, 1200, 2), key=lambda i: -float(vectors[i] @ query))[:10]
    search_index.set_exact_max_rows(pool, 600)
    with _explaining_connection(pool) as conn:
        conn.notices.clear()
        rows = conn.execute(
            "SELECT frame_path FROM search_scenes_by_visual_clip_embedding(%s, -1, 10, %s, %s)",
            (query, owners[1], ARTIFACT),
        ).fetchall()
        plan = next(n for n in conn.notices if "CTE main" in n).split("CTE alt")[0]
    assert "+ '0'" in plan or "+ 0" in plan, plan  # the exact path's ORDER BY
    assert search_index.index_name(kind, "embedding_visual_clip") not in plan
    assert [r[0] for r in rows] == [f"f{i}.jpg" for i in exact]
