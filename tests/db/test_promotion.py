"""`db promote`/`db prune` without a model: all or nothing, waiting for locks, refusing to
switch to an artifact that does not cover every scene, never dropping a served vector."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from heimdex_clip.db.backfill import Policy, Scope, claim, count_pending
from heimdex_clip.db.connection import DatabaseError, DbSettings, open_pool
from heimdex_clip.db.errors import LockedRowsError
from heimdex_clip.db.slots import SERVING_LOCK
from heimdex_clip.db.store import SERVING_KEY, SceneStore, write_vector
from heimdex_clip.db.upgrade import promote, prune

pytestmark = pytest.mark.db
A, B, C = (f"ViT-B-32:none:{c * 16}" for c in "abc")
ALL = Scope(all_owners=True)


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(512)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _serving(pool) -> str | None:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT value FROM heimdex_clip_settings WHERE key = %s", (SERVING_KEY,)
        ).fetchone()
    return row and row[0]


def _slots(pool) -> dict:
    with pool.connection() as conn:
        return {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT id, visual_clip_artifact, embedding_visual_clip IS NOT NULL, "
                "visual_clip_alt_artifact, embedding_visual_clip_alt IS NOT NULL FROM scenes"
            )
        }


def _two_artifacts(pool, n: int = 6, owners: int = 2) -> tuple[SceneStore, list]:
    """n scenes over ``owners`` owners, each with A's vector first and B's second."""
    store, scenes = SceneStore(pool), []
    owner_ids = [uuid.uuid4() for _ in range(owners)]
    for i in range(n):
        owner = owner_ids[i % owners]
        scene = store.upsert_scene(owner, f"f{i}.jpg", _unit(i), {}, artifact=A)
        store.save_embedding(scene, owner, _unit(100 + i), {}, artifact=B)
        scenes.append((scene, owner))
    return store, scenes


def _hold_lock(db_url: str, scene: uuid.UUID, seconds: float) -> threading.Thread:
    """Another session holds FOR UPDATE on one row for ``seconds``; returns once it holds it."""
    held = threading.Event()

    def run() -> None:
        with psycopg.connect(db_url) as conn:
            conn.execute("SELECT 1 FROM scenes WHERE id = %s FOR UPDATE", (scene,))
            held.set()
            time.sleep(seconds)
            conn.rollback()

    thread = threading.Thread(target=run)
    thread.start()
    assert held.wait(10)
    return thread


def test_promote_waits_for_a_locked_row_instead_of_skipping_it(pool, db_url):
    _, scenes = _two_artifacts(pool)
    assert _serving(pool) == A
    locker = _hold_lock(db_url, scenes[0][0], 1.5)  # shorter than the 5 s lock_timeout
    assert promote(pool, B, ALL) == 6
    locker.join()
    assert all(s[:2] == (B, True) and s[2:] == (A, True) for s in _slots(pool).values())
    assert _serving(pool) == B


def test_a_lock_held_past_every_retry_changes_nothing(pool, db_url):
    _, scenes = _two_artifacts(pool, owners=1)
    # Lock waits of 0.2 s instead of the default 5 s keep the test short.
    impatient = open_pool(db_url, settings=DbSettings(lock_timeout_ms=200))
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT 1 FROM scenes WHERE id = %s FOR UPDATE", (scenes[3][0],))
        with pytest.raises(LockedRowsError, match="through 3 attempts; this step changed"):
            promote(impatient, B, ALL, lock_retries=3, backoff_s=0.05)
    impatient.close()
    assert all(s[:1] == (A,) and s[2:3] == (B,) for s in _slots(pool).values())
    assert _serving(pool) == A


def test_promote_refuses_unless_every_scene_with_a_vector_has_one_of_the_new_artifact(pool):
    store, owner = SceneStore(pool), uuid.uuid4()
    for i in range(4):
        store.upsert_scene(owner, f"f{i}.jpg", _unit(i), {}, artifact=A)
    # 0 % coverage: B gave up every scene (a failure, no vector).
    for scene in _slots(pool):
        store.save_embedding(scene, owner, None, {"error": "ImageError: bad"}, artifact=B)
    with pytest.raises(DatabaseError, match="4 scenes with a vector have none of"):
        promote(pool, B, ALL)
    # 75 %: one scene still lacks B; a scene with no vector at all does not count.
    scenes = sorted(_slots(pool))
    for scene in scenes[:3]:
        store.save_embedding(scene, owner, _unit(50), {}, artifact=B)
    store.add_scene(owner, "never-embedded.jpg")
    with pytest.raises(DatabaseError, match=f"1 scenes .* {scenes[3]}"):
        promote(pool, B, Scope(owner_id=owner))
    with pytest.raises(DatabaseError):
        promote(pool, B, ALL)
    assert _serving(pool) == A and all(s[0] in (A, None) for s in _slots(pool).values())
    store.save_embedding(scenes[3], owner, _unit(51), {}, artifact=B)
    assert promote(pool, B, ALL) == 4 and _serving(pool) == B


def test_a_served_vector_is_never_overwritten_by_a_third_artifact(pool):
    """The issue's sequence after a promotion that skipped a row: the row has A first and
    the serving B second. Pruning A and re-embedding with C must keep B's vector."""
    store, scenes = _two_artifacts(pool, n=2, owners=1)
    (stuck, owner), _ = scenes
    with pool.connection() as conn:  # B serving, `other` swapped, `stuck` not
        conn.execute("UPDATE heimdex_clip_settings SET value = %s WHERE key = %s", (B, SERVING_KEY))
    promote(pool, B, Scope(owner_id=owner))  # (the fixed promote swaps both)
    with pool.connection() as conn:  # undo the swap of `stuck`, as the old promote left it
        conn.execute(
            """UPDATE scenes SET embedding_visual_clip = embedding_visual_clip_alt,
            visual_clip_artifact = visual_clip_alt_artifact,
            embedding_visual_clip_alt = embedding_visual_clip,
            visual_clip_alt_artifact = visual_clip_artifact WHERE id = %s""",
            (stuck,),
        )
    assert _slots(pool)[stuck] == (A, True, B, True)
    assert prune(pool, A, ALL) == 1  # `other`'s second slot; `stuck` holds A first
    with pool.connection() as conn, conn.transaction():
        assert write_vector(conn, stuck, owner, C, _unit(7), {})
    assert _slots(pool)[stuck] == (C, True, B, True)  # A replaced, B kept
    hits = store.search_by_embedding(owner, _unit(100), artifact=B, threshold=-1)
    assert hits[0].id == stuck and hits[0].similarity > 0.9999


def test_sql_refuses_any_write_that_drops_the_serving_vector(pool):
    """A writer bypassing the package (raw SQL) cannot take a scene out of search either."""
    _, scenes = _two_artifacts(pool, n=1, owners=1)
    scene = scenes[0][0]
    drops = [
        "embedding_visual_clip = NULL",
        "visual_clip_artifact = 'other'",
        "embedding_visual_clip_alt = embedding_visual_clip_alt, "
        "visual_clip_artifact = visual_clip_alt_artifact",
    ]
    for change in drops:
        with (
            pool.connection() as conn,
            pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="serving artifact"),
        ):
            conn.execute(f"UPDATE scenes SET {change} WHERE id = %s", (scene,))
    with pool.connection() as conn:  # B (not serving) may go; a new A vector may replace A
        conn.execute(
            "UPDATE scenes SET embedding_visual_clip_alt = NULL, "
            "visual_clip_alt_artifact = NULL WHERE id = %s",
            (scene,),
        )
        conn.execute(
            "UPDATE scenes SET embedding_visual_clip = %s WHERE id = %s", (_unit(9), scene)
        )
    assert _slots(pool)[scene] == (A, True, None, False)


@pytest.mark.parametrize("writer", ["write_vector", "raw SQL"])
def test_a_write_racing_the_promotion_is_seen_by_its_final_check(pool, db_url, writer):
    """The race a randomized upgrade sequence found: with A serving and B already first
    (an owner's swap done), a writer reads "A serves", so B's slot is the one it may
    replace. If that write commits after promote's final check but before its commit,
    B would serve a scene that has no B vector. Promote must wait for such a writer and
    then refuse; the scene stays findable by A."""
    _, scenes = _two_artifacts(pool, n=2, owners=1)
    (scene, owner), _ = scenes
    assert promote(pool, B, Scope(owner_id=owner)) == 2  # B first; A still serving
    assert _serving(pool) == A and _slots(pool)[scene] == (B, True, A, True)
    outcome: list = []
    with psycopg.connect(db_url) as conn:
        register_vector(conn)
        if writer == "write_vector":
            assert write_vector(conn, scene, owner, C, _unit(7), {})
        else:  # a writer bypassing the package, held back only by migration 007's trigger
            conn.execute(
                "UPDATE scenes SET embedding_visual_clip = %s, visual_clip_artifact = %s "
                "WHERE id = %s",
                (_unit(7), C, scene),
            )

        def run() -> None:
            try:
                outcome.append(promote(pool, B, ALL, backoff_s=0.1))
            except DatabaseError as exc:
                outcome.append(exc)

        promoter = threading.Thread(target=run)
        promoter.start()
        promoter.join(1.0)  # a promote that does not wait for the writer is done by now
        conn.commit()  # the write lands: B's vector of `scene` is replaced by C's
    promoter.join(30)
    assert not promoter.is_alive()
    assert _slots(pool)[scene] == (C, True, A, True)
    assert isinstance(outcome[0], DatabaseError), outcome
    assert "1 scenes with a vector have none of" in str(outcome[0])
    assert _serving(pool) == A


def test_a_writer_waits_out_a_promotion_longer_than_its_lock_timeout(pool, db_url):
    """A promotion's final check holds the serving lock for as long as it scans the table
    (seconds at a million scenes): writers wait for it rather than fail at lock_timeout."""
    _, scenes = _two_artifacts(pool, n=1, owners=1)
    (scene, owner) = scenes[0]
    impatient = open_pool(db_url, settings=DbSettings(lock_timeout_ms=100))
    with psycopg.connect(db_url) as promoter:
        promoter.execute("SELECT pg_advisory_xact_lock(%s)", (SERVING_LOCK,))
        threading.Timer(0.6, promoter.commit).start()
        started = time.monotonic()
        with impatient.connection() as conn, conn.transaction():
            assert write_vector(conn, scene, owner, C, _unit(7), {})
            waited = time.monotonic() - started
            # The connection's own lock_timeout is back for everything after the wait.
            assert conn.execute("SHOW lock_timeout").fetchone()[0] == "100ms"
    impatient.close()
    assert waited >= 0.5  # it did wait for the promotion (and then wrote)
    assert _slots(pool)[scene] == (A, True, C, True)


def test_an_upsert_during_a_promotion_waits_for_it_instead_of_deadlocking(pool, db_url):
    """upsert_scene locks an existing scene's row before it writes the vector; promote holds
    the serving lock, then locks rows. The upsert takes the serving lock first, so it waits
    for the promotion rather than forming a cycle with it (PostgreSQL would abort one)."""
    store, scenes = _two_artifacts(pool, n=1, owners=1)
    scene, owner = scenes[0]
    errors: list = []

    def upsert() -> None:
        try:
            store.upsert_scene(owner, "f0.jpg", _unit(8), {}, artifact=C)
        except Exception as exc:  # a deadlock victim, without the lock order
            errors.append(exc)

    with psycopg.connect(db_url) as promoter:
        promoter.execute("SELECT pg_advisory_xact_lock(%s)", (SERVING_LOCK,))
        writer = threading.Thread(target=upsert)
        writer.start()
        time.sleep(0.3)  # the upsert is waiting by now
        promoter.execute("SELECT 1 FROM scenes WHERE id = %s FOR UPDATE", (scene,))  # a swap
        promoter.commit()
    writer.join(30)
    assert not writer.is_alive() and not errors, errors
    assert _slots(pool)[scene] == (A, True, C, True)


def test_prune_refuses_the_serving_artifact_and_waits_for_locks(pool, db_url):
    _, scenes = _two_artifacts(pool, n=4, owners=1)
    with pytest.raises(DatabaseError, match="is the serving artifact"):
        prune(pool, A, ALL)
    locker = _hold_lock(db_url, scenes[2][0], 1.0)
    assert prune(pool, B, ALL) == 4  # the locked row waited for, not skipped
    locker.join()
    assert all(s == (A, True, None, False) for s in _slots(pool).values())


def test_a_scene_whose_vector_was_replaced_is_re_embedded_not_given_up(pool):
    """Embedded by C, replaced by another artifact's vector, claimed again by C, many times:
    attempts count failures in a row, so C never gives the scene up (it could never be
    promoted otherwise)."""
    store, owner = SceneStore(pool), uuid.uuid4()
    scene = store.upsert_scene(owner, "f.jpg", _unit(0), {}, artifact=A)  # A serves
    policy = Policy(max_attempts=3, retry_base_s=0)
    for round_ in range(5):
        token, rows = claim(pool, C, ALL, policy, 4, reembed_stale=True)
        assert [(r[0], r[3]) for r in rows] == [(scene, 1)], round_
        with pool.connection() as conn, conn.transaction():
            assert write_vector(conn, scene, owner, C, _unit(1), {}, lease=token)
            assert write_vector(conn, scene, owner, B, _unit(2), {})  # replaces C, keeps A
        assert _slots(pool)[scene] == (A, True, B, True)
    assert count_pending(pool, C, ALL, reembed_stale=True, max_attempts=3) == 1
