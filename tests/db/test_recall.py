"""Filtered HNSW recall: owner-scoped top-20 against an exact scan, 20k scenes, for each
search index kind (vector, halfvec, bit)."""

from __future__ import annotations

import time
import uuid

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgvector.psycopg import register_vector
from test_benchmark_tools import load_benchmark_module

from heimdex_clip.db import search_index
from heimdex_clip.db.store import SceneStore

pytestmark = [pytest.mark.db, pytest.mark.slow]
ROWS, DIM, K = 20_000, 512, 20
ARTIFACT = "ViT-B-32:synthetic:0000000000000000"
bulk_copy_scenes = load_benchmark_module("bench_utils").bulk_copy_scenes


def bulk_load(pool, owners: np.ndarray, vectors: np.ndarray, owner_ids: list[uuid.UUID]):
    """COPY in binary through pgvector's adapter with no search index (each kind's index is
    built once afterwards, by the switch itself)."""
    with pool.connection() as conn:
        bulk_copy_scenes(
            conn,
            (
                (owner_ids[o], f"s{i}.jpg", v, ARTIFACT)
                for i, (o, v) in enumerate(zip(owners, vectors, strict=True))
            ),
        )
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
    # The same share of the table as the default (20,000 of a million): the 1% owner (~200
    # rows) is read exactly, the 30% owner walks the index.
    search_index.set_exact_max_rows(module_pool, ROWS // 50)
    return SceneStore(module_pool), vectors, owners, owner_ids, np.array(ids, dtype=object), rng


@pytest.fixture(scope="module", params=search_index.KINDS)
def kind(request, corpus, module_pool) -> str:
    """Each search index kind in turn, switched to as an operator does (the others dropped)."""
    search_index.switch_search_index(
        module_pool, request.param, search_index.BuildOptions(maintenance_work_mem="512MB")
    )
    return request.param


@pytest.mark.parametrize("owner", [0, 1], ids=["owner-1pct", "owner-30pct"])
def test_owner_filtered_recall_at_20(corpus, kind, owner):
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
    # These queries lie far from every scene (noise of norm ~11 on a unit vector): binary
    # codes order such candidates coarsely, and bit measured 0.835 with its 40x re-ranking.
    floor = 0.95 if owner == 0 else (0.80 if kind == "bit" else 0.92)
    assert recall >= floor


def _order_by(pool, kind: str) -> str:
    """The search function's ORDER BY for the first slot under ``kind`` ($1 made %s)."""
    with pool.connection() as conn:
        order = conn.execute(
            "SELECT heimdex_clip_search_order(%s, 'embedding_visual_clip')", (kind,)
        ).fetchone()[0]
    return order.replace("$1", "%s")


def test_iterative_scan_is_what_keeps_small_owners_whole(corpus, kind, module_pool):
    """Forced onto the HNSW index, a 1% owner gets too few rows without iterative scans
    (the filter prunes the ef_search candidates) and all 20 with the function's setting."""
    _, vectors, owners, owner_ids, _, _ = corpus
    query = vectors[np.flatnonzero(owners == 0)[0]]
    sql = (
        "SELECT id FROM scenes s WHERE owner_id = %s AND embedding_visual_clip IS NOT NULL "
        f"ORDER BY {_order_by(module_pool, kind)} LIMIT 20"
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
            assert search_index.index_name(kind, "embedding_visual_clip") in plan
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


def _search_path_taken(conn, kind, owner, query) -> tuple[str, int]:
    """('hnsw' | 'exact', rows) of one call of the search function: walks the HNSW index,
    or reads the owner's rows (through a b-tree on owner_id) and sorts them."""
    conn.notices.clear()
    rows = conn.execute(
        f"SELECT id FROM search_scenes_by_visual_clip_embedding(%s, -1, {K}, %s, %s)",
        (query, owner, ARTIFACT),
    ).fetchall()
    plan = next(n for n in conn.notices if "CTE main" in n).split("CTE alt")[0]
    index = search_index.index_name(kind, "embedding_visual_clip")
    return ("hnsw" if index in plan else "exact"), len(rows)


def test_one_connection_plans_each_owner_for_its_size(corpus, kind, module_pool):
    """Same function, a 1% and a 30% owner, alternating on one connection: every call is
    planned for its owner (the function's query runs through EXECUTE, planned with the
    call's values; a cached generic plan would freeze one access path for owners of every
    size, as plan_cache_mode = force_generic_plan showed before migration 010)."""
    _, vectors, owners, owner_ids, _, _ = corpus
    small, large = owner_ids[0], owner_ids[1]
    queries = vectors[np.flatnonzero(owners == 1)[:12]]
    with _explaining_connection(module_pool) as conn:
        paths = [
            (_search_path_taken(conn, kind, large, q), _search_path_taken(conn, kind, small, q))
            for q in queries
        ]
        conn.rollback()
    assert all(big == ("hnsw", K) and little == ("exact", K) for big, little in paths), paths


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    owner_index=st.integers(0, 52),
    seed=st.integers(0, 2**32 - 1),
    threshold=st.floats(-1.0, 1.0),
    count=st.integers(1, 100),
)
def test_tenant_isolation_on_the_hnsw_path(corpus, kind, owner_index, seed, threshold, count):
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


def test_an_empty_second_slot_costs_an_index_probe_not_a_scan(corpus, kind, module_pool):
    """Outside an upgrade the second slot is empty; its half of the search must not read
    the table (it did, on every call, before migration 011: ~600 ms at 1M rows)."""
    _, vectors, _, owner_ids, _, _ = corpus
    with _explaining_connection(module_pool) as conn:
        conn.notices.clear()
        conn.execute(
            f"SELECT id FROM search_scenes_by_visual_clip_embedding(%s, -1, {K}, %s, %s)",
            (vectors[0], owner_ids[1], ARTIFACT),
        ).fetchall()
        plan = next(n for n in conn.notices if "CTE alt" in n)
    alt = plan.split("CTE alt")[1].split("CTE Scan")[0]
    assert "Seq Scan" not in alt and "scenes_visual_clip_alt_owner_idx" in alt, alt
