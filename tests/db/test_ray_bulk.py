"""Bulk embedding on a real local Ray (2 CPUs) against the embedded PostgreSQL."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")  # the ray extra; a skip fails the run under CI

from heimdex_clip import ClipConfig, ClipEmbedder  # noqa: E402
from heimdex_clip.db.backfill import Policy, Scope, count_pending, run_backfill  # noqa: E402
from heimdex_clip.db.bulk import BulkOptions, bulk_embed, register_frames  # noqa: E402
from heimdex_clip.db.store import SERVING_KEY, SceneStore, write_vector  # noqa: E402
from heimdex_clip.ray import init_ray  # noqa: E402

from .test_backfill import COUNT_WRITES  # noqa: E402

pytestmark = [pytest.mark.db, pytest.mark.slow]
ALL = Scope(all_owners=True)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module: 2 CPUs, as on these machines."""
    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def frames(photos, tmp_path_factory) -> list[Path]:
    """Distinct real JPEG frames: crops of the photographs."""
    folder = tmp_path_factory.mktemp("bulk")
    paths = []
    for name, photo in photos:
        for k in range(3):
            w, h = photo.size
            path = folder / f"{name}_{k}.jpg"
            photo.crop((k * w // 16, k * h // 16, w - k * w // 20, h)).save(path, quality=85)
            paths.append(path)
    return paths


def _seed(pool, frames, owners=2) -> tuple[dict, uuid.UUID]:
    store = SceneStore(pool)
    ids = [uuid.uuid4() for _ in range(owners)]
    scenes = {store.add_scene(ids[i % owners], str(p)): p for i, p in enumerate(frames)}
    junk = frames[0].parent / f"junk_{uuid.uuid4().hex}.jpg"
    junk.write_bytes(b"not a jpeg")
    bad = store.add_scene(ids[0], str(junk))
    return scenes, bad


def _stored(pool) -> dict:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, embedding_visual_clip, visual_clip_artifact, visual_clip_metadata, "
            "visual_clip_last_error, visual_clip_fault, visual_clip_lease_token FROM scenes"
        ).fetchall()
    return {r[0]: (None if r[1] is None else r[1].to_numpy(), *r[2:]) for r in rows}


def _writes(pool) -> dict:
    with pool.connection() as conn:
        return dict(
            conn.execute("SELECT scene_id, count(*) FROM embedding_writes GROUP BY 1").fetchall()
        )


def test_bulk_embed_equals_the_worker_path(pool, frames, embedder, artifact_dir):
    scenes, bad = _seed(pool, frames[:14])
    options = BulkOptions(actors=2, batch_size=4, chunk=6, write_batch=4, max_attempts=1)
    report = bulk_embed(pool, artifact_dir, ALL, options)
    assert (report.embedded, report.failed, report.lost_leases) == (len(scenes), 1, 0)
    assert report.chunks == 3  # 15 scenes in chunks of 6

    stored = _stored(pool)
    # The worker path on the provider the bulk job's actors ran (auto measures per batch size:
    # on an Intel CPU it may pick OpenVINO for one and cpu for the other).
    providers = {stored[scene][2]["provider"] for scene in scenes}
    assert len(providers) == 1, providers
    if embedder.session_info.provider not in providers:
        config = replace(embedder.config, provider=providers.pop())
        embedder = ClipEmbedder(model_dir=artifact_dir, config=config).load()
    reference = embedder.embed_frames([str(p) for p in scenes.values()])
    for (scene, _), ref in zip(scenes.items(), reference, strict=True):
        vector, artifact, metadata, error, fault, lease = stored[scene]
        assert artifact == embedder.artifact_id and metadata["artifact_id"] == artifact
        assert error is None and fault is None and lease is None
        cosine = float(
            np.dot(vector, ref.embedding) / np.linalg.norm(vector) / np.linalg.norm(ref.embedding)
        )
        assert cosine >= 0.99999
        assert metadata["frame_path"] == str(scenes[scene])
    vector, artifact, metadata, error, fault, lease = stored[bad]
    assert vector is None and error and fault == "frame" and lease is None
    assert metadata["error"] == error and metadata["artifact_id"] == embedder.artifact_id


def test_a_rerun_writes_nothing(pool, frames, artifact_dir):
    _seed(pool, frames[:6])
    options = BulkOptions(actors=1, batch_size=8, max_attempts=1)
    bulk_embed(pool, artifact_dir, ALL, options)
    with pool.connection() as conn:
        conn.execute(COUNT_WRITES)
    again = bulk_embed(pool, artifact_dir, ALL, options)
    assert (again.embedded, again.failed, again.chunks) == (0, 0, 0)
    assert _writes(pool) == {}


def test_slots_and_failures_follow_write_vector(pool, embedder, artifact_dir):
    """The set-based write applies the same rules as store.write_vector, slot by slot."""
    from heimdex_clip.db.bulk import BulkReport, write_results

    artifact, dim = embedder.artifact_id, SceneStore(pool).dimension
    other, third = "other-artifact", "third-artifact"
    old = np.ones(dim, dtype=np.float32) / np.sqrt(dim)
    new = -old
    # (main artifact, main has vector, alt artifact, alt has vector)
    states = [
        (None, False, None, False),
        (other, True, None, False),
        (artifact, True, other, True),
        (other, True, artifact, False),
        (other, True, third, True),
        (third, True, other, True),
        (other, False, None, False),
    ]
    store = SceneStore(pool)
    owner = uuid.uuid4()
    pairs = []
    for state in states:
        for ok in (True, False):
            twin = []
            for _ in range(2):  # one written by write_results, one by write_vector
                scene = store.add_scene(owner, f"{uuid.uuid4().hex}.jpg")
                with pool.connection() as conn:
                    conn.execute(
                        """UPDATE scenes SET visual_clip_artifact = %s,
                               embedding_visual_clip = %s, visual_clip_alt_artifact = %s,
                               embedding_visual_clip_alt = %s WHERE id = %s""",
                        (
                            state[0],
                            old if state[1] else None,
                            state[2],
                            old if state[3] else None,
                            scene,
                        ),
                    )
                twin.append(scene)
            pairs.append((twin, ok))
    token = uuid.uuid4()
    with pool.connection() as conn:
        conn.execute(
            "UPDATE scenes SET visual_clip_lease_token = %s WHERE owner_id = %s", (token, owner)
        )
        # Search serves `third`: where both slots are full, its vector must survive.
        conn.execute(
            "INSERT INTO heimdex_clip_settings (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (SERVING_KEY, third),
        )
    metadata = {"error": None, "frame_path": "x.jpg"}
    batch = {
        "scene_id": np.array([str(t[0]) for t, _ in pairs], dtype=object),
        "owner_id": np.array([str(owner)] * len(pairs), dtype=object),
        "attempt": np.ones(len(pairs), dtype=np.int64),
        "embedding": np.stack([new] * len(pairs)),
        "ok": np.array([ok for _, ok in pairs]),
        "error": np.array(["" if ok else "ImageError: bad" for _, ok in pairs], dtype=object),
        "metadata": np.array(['{"frame_path": "x.jpg"}'] * len(pairs), dtype=object),
        "artifact_id": np.array([artifact] * len(pairs), dtype=object),
    }
    policy = Policy(retry_base_s=0)
    write_results(pool, artifact, dim, token, batch, policy, BulkReport())
    with pool.connection() as conn, conn.transaction():
        for twin, ok in pairs:
            write_vector(
                conn,
                twin[1],
                owner,
                artifact,
                new if ok else None,
                {**metadata, "error": None if ok else "ImageError: bad", "attempts": 1},
                lease=token,
                fault=None if ok else "frame",
                retry_after_s=0,
            )
    columns = (
        "visual_clip_artifact, embedding_visual_clip, visual_clip_alt_artifact, "
        "embedding_visual_clip_alt, visual_clip_last_error, visual_clip_fault, "
        "visual_clip_lease_token, visual_clip_metadata->>'artifact_id', "
        "visual_clip_alt_metadata->>'artifact_id'"
    )
    with pool.connection() as conn:
        for twin, ok in pairs:
            a, b = (
                conn.execute(f"SELECT {columns} FROM scenes WHERE id = %s", (s,)).fetchone()
                for s in twin
            )
            assert _comparable(a) == _comparable(b), (twin, ok)


def _comparable(row) -> tuple:
    return tuple(v.tolist() if isinstance(v, np.ndarray) else v for v in row)


def test_register_frames_from_csv_and_parquet(pool, frames, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    owner = uuid.uuid4()
    listing = tmp_path / "frames.csv"
    listing.write_text("owner_id,frame_path\n" + "".join(f"{owner},{p}\n" for p in frames[:3]))
    assert register_frames(pool, listing) == (3, {owner})
    assert register_frames(pool, listing) == (0, {owner})  # idempotent
    parquet = tmp_path / "frames.parquet"
    pq.write_table(
        pa.table({"owner_id": [str(owner)] * 4, "frame_path": [str(p) for p in frames[:4]]}),
        parquet,
    )
    assert register_frames(pool, parquet)[0] == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("owner,frame\nx,y\n")
    from heimdex_clip.db.connection import DatabaseError

    with pytest.raises(DatabaseError, match="owner_id and frame_path"):
        register_frames(pool, bad)


def test_a_killed_actor_loses_nothing(pool, frames, artifact_dir):
    scenes, _ = _seed(pool, frames)
    with pool.connection() as conn:
        conn.execute(COUNT_WRITES)
    killed: list[int] = []

    def kill_one_actor() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for pid in _map_worker_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    report = bulk_embed(
        pool, artifact_dir, ALL, BulkOptions(actors=2, batch_size=2, max_attempts=1)
    )
    killer.join()
    assert killed, "no Ray actor process was found to kill"
    assert report.embedded == len(scenes)
    stored = _stored(pool)
    assert all(stored[s][0] is not None and stored[s][5] is None for s in scenes)
    assert all(n == 1 for n in _writes(pool).values())  # each vector written once


def _map_worker_pids() -> list[int]:
    """PIDs of Ray Data's actor processes running the embedder (their title says so)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("ray::MapWorker") and "ClipBatchEmbedder" in title:
            pids.append(int(entry.name))
    return pids


def test_side_by_side_with_backfill_workers(pool, frames, artifact_dir):
    """A backfill worker and a bulk pass at once: every scene embedded exactly once."""
    scenes, _ = _seed(pool, frames)
    with pool.connection() as conn:
        conn.execute(COUNT_WRITES)
    embedder = ClipEmbedder(
        config=ClipConfig(pretrained="none", model_dir=artifact_dir, cpu_threads=1)
    ).load()
    done = []
    worker = threading.Thread(
        target=lambda: done.append(
            run_backfill(pool, embedder, ALL, policy=Policy(batch_size=2, max_attempts=1))
        )
    )
    worker.start()
    report = bulk_embed(
        pool, artifact_dir, ALL, BulkOptions(actors=1, batch_size=4, chunk=8, max_attempts=1)
    )
    worker.join()
    writes = _writes(pool)
    assert set(writes) == set(scenes) and all(n == 1 for n in writes.values())
    assert report.embedded + done[0].embedded == len(scenes)  # the work was split, not doubled
    assert count_pending(pool, embedder.artifact_id, ALL, max_attempts=1) == 0
