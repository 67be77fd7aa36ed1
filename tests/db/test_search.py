"""Owner-scoped search on real PostgreSQL + pgvector, with synthetic unit vectors."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heimdex_clip import DimensionError
from heimdex_clip.db.connection import DatabaseError, open_pool
from heimdex_clip.db.store import SceneStore

pytestmark = pytest.mark.db
DIM = 512
A = "ViT-B-32:none:aaaaaaaaaaaaaaaa"  # two artifact ids: vectors of one never match the other
B = "ViT-B-32:none:bbbbbbbbbbbbbbbb"


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def with_cosine(query: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector whose cosine with the unit vector ``query`` is exactly ``cosine``."""
    noise = rng.standard_normal(DIM)
    noise -= noise @ query * query
    noise /= np.linalg.norm(noise)
    return (cosine * query + np.sqrt(1 - cosine**2) * noise).astype(np.float32)


def test_threshold_and_count_semantics(pool):
    store, rng = SceneStore(pool), np.random.default_rng(0)
    owner = uuid.uuid4()
    query = unit(rng.standard_normal(DIM))
    cosines = [0.95, 0.9, 0.8, 0.71, 0.69, 0.3, -0.5]
    ids = [
        store.upsert_scene(owner, f"f{i}.jpg", with_cosine(query, c, rng), {"i": i}, artifact=A)
        for i, c in enumerate(cosines)
    ]
    hits = store.search_by_embedding(owner, query, threshold=0.7, count=20, artifact=A)
    assert [h.id for h in hits] == ids[:4]  # strictly above 0.7, highest first
    np.testing.assert_allclose([h.similarity for h in hits], cosines[:4], atol=1e-5)
    top2 = store.search_by_embedding(owner, query, threshold=0.7, count=2, artifact=A)
    assert [h.id for h in top2] == ids[:2]
    everything = store.search_by_embedding(owner, query, threshold=-1.0, count=100, artifact=A)
    assert len(everything) == len(cosines)
    assert store.search_by_embedding(owner, query, threshold=0.99, count=5, artifact=A) == []
    assert hits[0].metadata == {"i": 0, "artifact_id": A} and hits[0].frame_path == "f0.jpg"


def test_scenes_without_embedding_are_not_returned(pool):
    store, rng = SceneStore(pool), np.random.default_rng(1)
    owner = uuid.uuid4()
    store.add_scene(owner, "pending.jpg")
    kept = store.upsert_scene(owner, "done.jpg", unit(rng.standard_normal(DIM)), {}, artifact=A)
    hits = store.search_by_embedding(
        owner, unit(rng.standard_normal(DIM)), threshold=-1, artifact=A
    )
    assert [h.id for h in hits] == [kept]


def test_similar_scenes_exclude_the_query_scene_and_other_owners(pool):
    store, rng = SceneStore(pool), np.random.default_rng(2)
    owner, other = uuid.uuid4(), uuid.uuid4()
    base = unit(rng.standard_normal(DIM))
    query_id = store.upsert_scene(owner, "q.jpg", base, {}, artifact=A)
    near = store.upsert_scene(owner, "near.jpg", with_cosine(base, 0.9, rng), {}, artifact=A)
    far = store.upsert_scene(owner, "far.jpg", with_cosine(base, 0.2, rng), {}, artifact=A)
    store.upsert_scene(other, "q.jpg", base, {}, artifact=A)  # identical vector, other tenant
    hits = store.search_similar(owner, query_id, threshold=-1, count=10, artifact=A)
    assert [h.id for h in hits] == [near, far]
    with pytest.raises(DatabaseError, match="not found for this owner"):
        store.search_similar(other, query_id, artifact=A)
    pending = store.add_scene(owner, "pending.jpg")
    with pytest.raises(DatabaseError, match="no CLIP embedding"):
        store.search_similar(owner, pending, artifact=A)


def test_null_owner_is_refused_in_python_and_in_sql(pool):
    store = SceneStore(pool)
    query = unit(np.ones(DIM))
    with pytest.raises(ValueError, match="owner_id is required"):
        store.search_by_embedding(None, query, artifact=A)
    with (
        pool.connection() as conn,
        pytest.raises(psycopg.errors.NullValueNotAllowed, match="always owner-scoped"),
    ):
        conn.execute(
            "SELECT * FROM search_scenes_by_visual_clip_embedding(%s, 0, 5, NULL, %s)", (query, A)
        )


def test_dimension_mismatch_is_refused_before_sql(pool):
    store, owner = SceneStore(pool), uuid.uuid4()
    scene = store.add_scene(owner, "a.jpg")
    for bad in (np.ones(511), np.ones(768), np.ones((2, 512)), np.full(512, np.nan)):
        with pytest.raises(DimensionError):
            store.save_embedding(scene, owner, bad, {"x": 1}, artifact=A)
        with pytest.raises(DimensionError):
            store.search_by_embedding(owner, bad, artifact=A)
    assert store.get_scene(owner, scene)["visual_clip_metadata"] is None  # nothing written


def test_save_embedding_requires_the_owner_of_the_scene(pool):
    store, rng = SceneStore(pool), np.random.default_rng(3)
    owner = uuid.uuid4()
    scene = store.add_scene(owner, "a.jpg")
    with pytest.raises(DatabaseError, match="does not exist for owner"):
        store.save_embedding(scene, uuid.uuid4(), unit(rng.standard_normal(DIM)), {}, artifact=A)
    store.save_embedding(scene, owner, unit(rng.standard_normal(DIM)), {"ok": True}, artifact=A)
    assert store.get_scene(owner, scene)["visual_clip_metadata"] == {"ok": True, "artifact_id": A}
    assert store.get_scene(uuid.uuid4(), scene) is None  # reads are owner-scoped too


def test_two_artifacts_in_one_table_each_see_only_their_own(pool):
    """Identical vectors from two models: each model's search returns its own rows only,
    whichever slot holds them, and the four-argument form uses the serving artifact."""
    store, rng = SceneStore(pool), np.random.default_rng(5)
    owner = uuid.uuid4()
    vectors = unit(rng.standard_normal((6, DIM)))
    only_a = [
        store.upsert_scene(owner, f"a{i}.jpg", v, {}, artifact=A) for i, v in enumerate(vectors[:3])
    ]
    only_b = [
        store.upsert_scene(owner, f"b{i}.jpg", v, {}, artifact=B) for i, v in enumerate(vectors[:3])
    ]  # the very same vectors, other model
    both = store.upsert_scene(owner, "both.jpg", vectors[3], {}, artifact=A)
    store.save_embedding(both, owner, vectors[3], {}, artifact=B)  # beside A's: second slot
    row = store.get_scene(owner, both)
    assert (row["visual_clip_artifact"], row["visual_clip_alt_artifact"]) == (A, B)
    for artifact, own in ((A, {*only_a, both}), (B, {*only_b, both})):
        for query in vectors[:4]:
            hits = store.search_by_embedding(
                owner, query, artifact=artifact, threshold=-1, count=50
            )
            assert {h.id for h in hits} == own
            assert all(h.metadata["artifact_id"] == artifact for h in hits)
    assert (
        store.search_by_embedding(owner, vectors[0], artifact="ViT-B-32:x:none", threshold=-1) == []
    )
    with pool.connection() as conn:  # the first model that stored a vector serves
        four = conn.execute(
            "SELECT id FROM search_scenes_by_visual_clip_embedding(%s, -1, 50, %s)",
            (vectors[0], owner),
        ).fetchall()
    assert {r[0] for r in four} == {*only_a, both}
    with pytest.raises(ValueError, match="artifact is required"):
        store.search_by_embedding(owner, vectors[0], artifact="")


@pytest.fixture(scope="module")
def tenants(module_pool):
    """Three owners with clustered vectors, some sharing exact vectors across owners."""
    store, rng = SceneStore(module_pool), np.random.default_rng(4)
    owners = [uuid.uuid4() for _ in range(3)]
    centers = unit(rng.standard_normal((5, DIM)))
    rows = {}
    for i in range(90):
        owner = owners[i % 3]
        vec = unit(centers[i % 5] + 0.3 * rng.standard_normal(DIM))
        rows[store.upsert_scene(owner, f"t{i}.jpg", vec, {}, artifact=A)] = owner
    return store, owners, rows, centers


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    owner_index=st.integers(0, 3),
    center=st.integers(0, 4),
    threshold=st.floats(-1.0, 1.0),
    count=st.integers(1, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_tenant_isolation_property(tenants, owner_index, center, threshold, count, seed):
    store, owners, rows, centers = tenants
    owner = owners[owner_index] if owner_index < 3 else uuid.uuid4()  # 3: unknown owner
    query = unit(centers[center] + np.random.default_rng(seed).standard_normal(DIM))
    hits = store.search_by_embedding(owner, query, threshold=threshold, count=count, artifact=A)
    assert all(rows[h.id] == owner for h in hits)
    assert len(hits) <= count and all(h.similarity > threshold for h in hits)
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    if hits:
        similar = store.search_similar(owner, hits[0].id, threshold=-1, count=count, artifact=A)
        assert all(rows[h.id] == owner for h in similar) and hits[0].id not in {
            h.id for h in similar
        }


def test_unreachable_database_is_a_clear_error_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(DatabaseError, match="cannot connect to the database"):
        open_pool(f"postgresql://postgres@127.0.0.1:{port}/x")
    assert time.perf_counter() - started < 5


def test_silent_server_times_out_instead_of_hanging():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def accept_and_say_nothing():
        conns = []
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):  # accept timed out: look at `stop` again
                conns.append(server.accept()[0])
        for c in conns:
            c.close()

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DatabaseError, match="cannot connect"):
            open_pool(f"postgresql://postgres@127.0.0.1:{server.getsockname()[1]}/x")
        assert time.perf_counter() - started < 15
    finally:
        stop.set()
        thread.join()
        server.close()
