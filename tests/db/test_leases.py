"""Lease semantics without a model: claims, expiry, takeover, backoff, give-up, faults."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from heimdex_clip.db.backfill import (
    Policy,
    Scope,
    claim,
    classify_fault,
    count_pending,
    release_expired,
)
from heimdex_clip.db.store import SceneStore, write_vector

pytestmark = pytest.mark.db
ART = "ViT-B-32:none:1111111111111111"


def _vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
    return v / np.linalg.norm(v)


def _state(pool, scene):
    with pool.connection() as conn:
        return conn.execute(
            "SELECT embedding_visual_clip IS NOT NULL, visual_clip_attempts, "
            "visual_clip_lease_token, visual_clip_fault, visual_clip_last_error, "
            "visual_clip_retry_at > now() FROM scenes WHERE id = %s",
            (scene,),
        ).fetchone()


def test_a_taken_over_lease_writes_nothing(pool):
    owner = uuid.uuid4()
    scene = SceneStore(pool).add_scene(owner, "a.jpg")
    scope, short = Scope(owner_id=owner), Policy(lease_s=0.5, retry_base_s=0)
    first, rows = claim(pool, ART, scope, short, 4)
    assert [r[0] for r in rows] == [scene] and rows[0][3] == 1
    assert claim(pool, ART, scope, short, 4)[1] == []  # leased: nobody else gets it
    time.sleep(0.8)
    assert release_expired(pool, scope, short) == 1  # expired: recorded as a worker fault
    assert _state(pool, scene)[3] == "worker" and "lease expired" in _state(pool, scene)[4]
    second, rows = claim(pool, ART, scope, short, 4)
    assert rows[0][3] == 2 and second != first
    with pool.connection() as conn, conn.transaction():
        assert not write_vector(conn, scene, owner, ART, _vector(0), {}, lease=first)
        assert not write_vector(conn, scene, uuid.uuid4(), ART, _vector(0), {}, lease=second)
        assert write_vector(conn, scene, owner, ART, _vector(1), {}, lease=second)
    done, attempts, lease, fault, error, _ = _state(pool, scene)
    assert done and attempts == 2 and lease is None and fault is None and error is None
    assert count_pending(pool, ART, scope) == 0


def test_backoff_then_give_up_with_the_last_error(pool):
    owner = uuid.uuid4()
    scene = SceneStore(pool).add_scene(owner, "bad.jpg")
    scope = Scope(owner_id=owner)
    slow = Policy(max_attempts=2, retry_base_s=3600)
    token, _ = claim(pool, ART, scope, slow, 1)
    with pool.connection() as conn, conn.transaction():
        write_vector(
            conn,
            scene,
            owner,
            ART,
            None,
            {"error": "ImageError: truncated"},
            lease=token,
            fault=classify_fault("ImageError: truncated"),
            retry_after_s=slow.retry_after(1),
        )
    assert _state(pool, scene)[3:] == ("frame", "ImageError: truncated", True)
    assert claim(pool, ART, scope, slow, 1)[1] == []  # backing off
    assert count_pending(pool, ART, scope, max_attempts=2) == 1  # but not given up
    now = Policy(max_attempts=2, retry_base_s=0)
    with pool.connection() as conn:
        conn.execute("UPDATE scenes SET visual_clip_retry_at = now() WHERE id = %s", (scene,))
    token, rows = claim(pool, ART, scope, now, 1)
    assert rows[0][3] == 2
    with pool.connection() as conn, conn.transaction():
        write_vector(
            conn,
            scene,
            owner,
            ART,
            None,
            {"error": "Timeout after 2.0s"},
            lease=token,
            fault=classify_fault("Timeout after 2.0s"),
        )
    assert claim(pool, ART, scope, now, 1)[1] == []  # given up after 2 attempts
    assert count_pending(pool, ART, scope, max_attempts=2) == 0
    assert _state(pool, scene)[3:5] == ("worker", "Timeout after 2.0s")
    # Another artifact starts its own count: the next model tries the frame again.
    assert claim(pool, "ViT-B-32:none:2222222222222222", scope, now, 1)[1][0][3] == 1


def test_a_failure_never_erases_a_stored_vector(pool):
    store, owner = SceneStore(pool), uuid.uuid4()
    scene = store.upsert_scene(owner, "a.jpg", _vector(2), {"ok": 1}, artifact=ART)
    store.upsert_scene(owner, "a.jpg", None, {"error": "ImageError: gone"}, artifact=ART)
    row = store.get_scene(owner, scene)
    assert row["visual_clip_metadata"]["ok"] == 1 and row["embedding_visual_clip"] is not None
    assert row["visual_clip_last_error"] == "ImageError: gone"


def test_faults_and_scopes():
    assert classify_fault("ImageError: cannot identify image file") == "frame"
    assert classify_fault("Timeout after 2.0s") == "worker"
    assert classify_fault("MemoryError: ") == "worker"
    assert classify_fault("Model load failed: missing") == "worker"
    assert classify_fault("ConfigError: the deadline cannot be waited for") == "worker"
    with pytest.raises(ValueError, match="all_owners"):
        Scope()
    with pytest.raises(ValueError, match="not both"):
        Scope(owner_id=uuid.uuid4(), all_owners=True)
    with pytest.raises(ValueError):
        Policy(batch_size=0)
    assert Policy(retry_base_s=10, retry_max_s=25).retry_after(3) == 25


class _RaisingEmbedder:
    """Stands in for an embedder whose worker path raises (issue: a MemoryError escaping
    embed_frames): that bug cannot be produced on demand with the real embedder, which
    catches it, so a double raises it here."""

    artifact_id = ART
    embed_dim = 512

    def load(self):
        return self

    def embed_frames(self, images, frame_paths=None, frame_qualities=None):
        raise MemoryError("cannot allocate 112 GiB")


def test_a_raising_batch_is_recorded_as_a_worker_fault_and_retried_alone(pool):
    from heimdex_clip.db.backfill import run_backfill

    owner = uuid.uuid4()
    store = SceneStore(pool)
    scenes = [store.add_scene(owner, f"f{i}.jpg") for i in range(3)]
    scope = Scope(owner_id=owner)
    report = run_backfill(
        pool, _RaisingEmbedder(), scope, policy=Policy(batch_size=3, max_attempts=1, retry_base_s=0)
    )
    assert report.failed == 3 and report.batches == 1
    for scene in scenes:
        done, attempts, lease, fault, error, _ = _state(pool, scene)
        assert (done, attempts, lease, fault) == (False, 1, None, "worker")
        assert error == "MemoryError: cannot allocate 112 GiB"
    # Suspects are claimed one at a time by the next worker.
    rows = claim(pool, ART, scope, Policy(batch_size=3, max_attempts=2), 3)[1]
    assert len(rows) == 1
