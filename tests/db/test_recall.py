"""Filtered HNSW recall: owner-scoped top-20 against an exact scan, 20k scenes."""

from __future__ import annotations

import time
import uuid

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgvector.psycopg import register_vector

from heimdex_clip.db.store import SceneStore

pytestmark = [pytest.mark.db, pytest.mark.slow]
ROWS, DIM, K = 20_000, 512, 20
ARTIFACT = "ViT-B-32:synthetic:0000000000000000"


def bulk_load(pool, owners: np.ndarray, vectors: np.ndarray, owner_ids: list[uuid.UUID]):
    """COPY in binary through pgvector's adapter, then build the HNSW index once."""
    with pool.connection() as conn:
        conn.execute("SET statement_timeout = 0")  # the index build outlasts the pool's limit
        conn.execute("DROP INDEX IF EXISTS scenes_embedding_visual_clip_hnsw")
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY scenes (owner_id, frame_path, embedding_visual_clip, visual_clip_artifact)"
                " FROM STDIN WITH (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["uuid", "text", "vector", "text"])
            for i, (o, v) in enumerate(zip(owners, vectors, strict=True)):
                copy.write_row([owner_ids[o], f"s{i}.jpg", v, ARTIFACT])
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute(
            "CREATE INDEX scenes_embedding_visual_clip_hnsw ON scenes "
            "USING hnsw (embedding_visual_clip vector_cosine_ops)"
        )
        conn.execute("ANALYZE scenes")
        conn.execute("RESET statement_timeout")
        conn.commit()
        ids = conn.execute("SELECT frame_path, id FROM scenes").fetchall()
    by_path = dict(ids)
    return [by_path[f"s{i}.jpg"] for i in range(len(vectors))]


@pytest.fixture(scope="module")
def corpus(module_pool):
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((400, DIM)).astype(np.float32)
    vectors = centers[rng.integers(0, 400, ROWS)] + 0.6 * rng.standard_normal((ROWS, DIM)).astype(
        np.float32
    )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # owner 0: 1% of rows; owner 1: 30%; the rest spread over 50 owners.
    owners = np.where(
        rng.random(ROWS) < 0.01, 0, np.where(rng.random(ROWS) < 0.30, 1, rng.integers(2, 52, ROWS))
    )
    owner_ids = [uuid.uuid4() for _ in range(52)]
    ids = bulk_load(module_pool, owners, vectors, owner_ids)
    return SceneStore(module_pool), vectors, owners, owner_ids, np.array(ids, dtype=object), rng


@pytest.mark.parametrize("owner", [0, 1], ids=["owner-1pct", "owner-30pct"])
def test_owner_filtered_recall_at_20(corpus, owner):
    store, vectors, owners, owner_ids, ids, rng = corpus
    mine = np.flatnonzero(owners == owner)
    if owner == 0:
        assert 0.005 * ROWS < len(mine) < 0.02 * ROWS
    recalls, latencies = [], []
    for _ in range(40):
        query = vectors[rng.choice(mine)] + 0.5 * rng.standard_normal(DIM).astype(np.float32)
        query /= np.linalg.norm(query)
        exact = mine[np.argsort(-(vectors[mine] @ query), kind="stable")[:K]]
        started = time.perf_counter()
        hits = store.search_by_embedding(
            owner_ids[owner], query, artifact=ARTIFACT, threshold=-1.0, count=K
        )
        latencies.append(time.perf_counter() - started)
        assert len(hits) == K
        assert all(h.owner_id == owner_ids[owner] for h in hits)
        recalls.append(len({h.id for h in hits} & set(ids[exact])) / K)
    recall = float(np.mean(recalls))
    print(
        f"owner {owner}: {len(mine)} rows, recall@20 {recall:.3f}, "
        f"p50 {1000 * np.median(latencies):.1f} ms"
    )
    # The target is for small owners (1.0 measured). A 30% owner walks the HNSW graph, whose
    # build is randomised: its recall measured 0.944-0.961 across builds (ef_search 400).
    assert recall >= (0.95 if owner == 0 else 0.92)


def test_iterative_scan_is_what_keeps_small_owners_whole(corpus, module_pool):
    """Forced onto the HNSW index, a 1% owner gets too few rows without iterative scans
    (the filter prunes the ef_search candidates) and all 20 with the function's setting."""
    _, vectors, owners, owner_ids, _, _ = corpus
    query = vectors[np.flatnonzero(owners == 0)[0]]
    sql = (
        "SELECT id FROM scenes WHERE owner_id = %s AND embedding_visual_clip IS NOT NULL "
        "ORDER BY embedding_visual_clip <=> %s LIMIT 20"
    )
    counts = {}
    with module_pool.connection() as conn:
        conn.execute("SET enable_sort = off")  # make the planner walk the HNSW index
        conn.execute("SET enable_seqscan = off")
        for mode in ("off", "relaxed_order"):
            conn.execute(f"SET hnsw.iterative_scan = '{mode}'")
            plan = " ".join(
                r[0] for r in conn.execute("EXPLAIN " + sql, (owner_ids[0], query)).fetchall()
            )
            assert "scenes_embedding_visual_clip_hnsw" in plan
            counts[mode] = len(conn.execute(sql, (owner_ids[0], query)).fetchall())
        conn.rollback()
    assert counts["off"] < 20 and counts["relaxed_order"] == 20


FUNCTION = "search_scenes_by_visual_clip_embedding(vector, float, int, uuid, text)"


def _explaining_connection(pool) -> psycopg.Connection:
    """A connection on which auto_explain sends the plans of the statements inside the
    search function back as notices: the function's real plans, not a hand-written query's."""
    conn = psycopg.connect(pool.conninfo, **pool.kwargs)
    register_vector(conn)
    conn.notices = []
    conn.add_notice_handler(lambda diag: conn.notices.append(diag.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for name, value in (
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_nested_statements", "on"),
        ("auto_explain.log_level", "notice"),
        ("client_min_messages", "notice"),
    ):
        conn.execute(f"SET {name} = '{value}'")
    return conn


def _search_path_taken(conn, owner, query) -> tuple[str, int]:
    """('hnsw' | 'exact', rows) of one call of the search function: walks the HNSW index,
    or reads the owner's rows (through a b-tree on owner_id) and sorts them."""
    conn.notices.clear()
    rows = conn.execute(
        f"SELECT id FROM search_scenes_by_visual_clip_embedding(%s, -1, {K}, %s, %s)",
        (query, owner, ARTIFACT),
    ).fetchall()
    plan = next(n for n in conn.notices if "CTE main" in n).split("CTE alt")[0]
    return ("hnsw" if "scenes_embedding_visual_clip_hnsw" in plan else "exact"), len(rows)


def test_one_connection_plans_each_owner_for_its_size(corpus, module_pool):
    """Same function, a 1% and a 30% owner, alternating on one connection: every call is
    planned for its owner (plan_cache_mode=force_custom_plan). With a generic plan forced
    instead, the plans freeze after a few calls: both owners then share one access path."""
    _, vectors, owners, owner_ids, _, _ = corpus
    small, large = owner_ids[0], owner_ids[1]
    queries = vectors[np.flatnonzero(owners == 1)[:12]]
    with _explaining_connection(module_pool) as conn:
        shipped = [
            (_search_path_taken(conn, large, q), _search_path_taken(conn, small, q))
            for q in queries
        ]
        conn.execute(f"ALTER FUNCTION {FUNCTION} SET plan_cache_mode = 'force_generic_plan'")
        generic = [
            (_search_path_taken(conn, large, q), _search_path_taken(conn, small, q))
            for q in queries
        ]
        conn.rollback()  # the ALTER is undone
    assert all(big == ("hnsw", K) and little == ("exact", K) for big, little in shipped), shipped
    assert all(big[0] == little[0] for big, little in generic), generic
    assert all(big[1] == little[1] == K for big, little in generic)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    owner_index=st.integers(0, 52),
    seed=st.integers(0, 2**32 - 1),
    threshold=st.floats(-1.0, 1.0),
    count=st.integers(1, 100),
)
def test_tenant_isolation_on_the_hnsw_path(corpus, owner_index, seed, threshold, count):
    """The isolation property on 20k rows, where the large owners' searches walk the HNSW
    index (the test above proves which path the function takes); 52 = an unknown owner."""
    store, vectors, owners, owner_ids, ids, _ = corpus
    owner = owner_ids[owner_index] if owner_index < 52 else uuid.uuid4()
    rng = np.random.default_rng(seed)
    query = vectors[rng.integers(0, ROWS)] + 0.3 * rng.standard_normal(DIM).astype(np.float32)
    query /= np.linalg.norm(query)
    hits = store.search_by_embedding(
        owner, query, artifact=ARTIFACT, threshold=threshold, count=count
    )
    mine = np.flatnonzero(owners == owner_index)
    assert all(h.owner_id == owner for h in hits) and {h.id for h in hits} <= set(ids[mine])
    assert len(hits) <= count and all(h.similarity > threshold for h in hits)
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    above = int(np.sum(vectors[mine] @ query > threshold + 1e-4))
    assert len(hits) >= min(count, above) * 0.9  # the filter never starves the result
