"""Backfill with the real model: exactly once across concurrent processes and after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.db.backfill import Policy, Scope, count_pending, run_backfill
from heimdex_clip.db.connection import open_pool
from heimdex_clip.db.stats import clip_stats
from heimdex_clip.db.store import SceneStore

pytestmark = [pytest.mark.db, pytest.mark.slow]
MAX_ATTEMPTS = 3
ALL = Scope(all_owners=True)
FAST = Policy(batch_size=5, retry_base_s=0)  # retries at once: no waiting in tests
COUNT_WRITES = """
CREATE TABLE embedding_writes (scene_id uuid NOT NULL);
CREATE FUNCTION count_embedding_writes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.embedding_visual_clip IS DISTINCT FROM OLD.embedding_visual_clip THEN
        INSERT INTO embedding_writes VALUES (NEW.id);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER count_embedding_writes BEFORE UPDATE ON scenes
    FOR EACH ROW EXECUTE FUNCTION count_embedding_writes();
"""


@pytest.fixture(scope="module")
def frames(photos, tmp_path_factory) -> list[Path]:
    """Distinct real JPEG frames (photos, crops and flips), as a video indexer leaves them."""
    folder = tmp_path_factory.mktemp("scenes")
    paths = []
    for name, photo in photos:
        for k in range(5):
            w, h = photo.size
            crop = photo.crop((k * w // 20, k * h // 20, w - k * w // 25, h - k * h // 30))
            path = folder / f"{name}_{k}.jpg"
            crop.save(path, quality=85)
            paths.append(path)
    return paths


def _seed_scenes(pool, frames, bad: int = 3) -> tuple[dict, list]:
    store = SceneStore(pool)
    owners = [uuid.uuid4(), uuid.uuid4()]
    scenes = {store.add_scene(owners[i % 2], str(p)): owners[i % 2] for i, p in enumerate(frames)}
    junk_dir = frames[0].parent / "junk"
    junk_dir.mkdir(exist_ok=True)
    broken = []
    for i in range(bad):
        junk = junk_dir / f"junk_{uuid.uuid4().hex}.jpg"
        junk.write_bytes(b"not a jpeg" * (i + 1))
        broken.append(store.add_scene(owners[0], str(junk)))
    if bad:
        broken.append(store.add_scene(owners[0], str(junk_dir / "missing.jpg")))
    return scenes, broken


def _rows(pool):
    with pool.connection() as conn:
        return conn.execute(
            "SELECT id, embedding_visual_clip IS NOT NULL, "
            "visual_clip_attempts, visual_clip_last_error, visual_clip_fault "
            "FROM scenes"
        ).fetchall()


def _writes(pool) -> dict:
    """Embedding writes per scene, counted by a trigger (independent of the backfill)."""
    with pool.connection() as conn:
        return dict(
            conn.execute("SELECT scene_id, count(*) FROM embedding_writes GROUP BY 1").fetchall()
        )


def _backfill_cmd(artifact_dir: Path, db_url: str, *extra: str) -> tuple[list[str], dict]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "CLIP_PRETRAINED": "none",
        "CLIP_MODEL_DIR": str(artifact_dir),
        "CLIP_CPU_THREADS": "1",
    }
    return [
        sys.executable,
        "-m",
        "heimdex_clip.cli",
        "backfill",
        "--quiet",
        "--all-owners",
        "--retry-base",
        "0",
        *extra,
    ], env


def test_backfill_embeds_everything_once_and_records_failures(db_url, frames, artifact_dir):
    pool = open_pool(db_url)
    from heimdex_clip.db.migrate import migrate

    migrate(pool)
    scenes, broken = _seed_scenes(pool, frames[:24])
    embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=artifact_dir))
    report = run_backfill(pool, embedder, ALL, policy=FAST)
    assert report.embedded == len(scenes)
    rows = {r[0]: r for r in _rows(pool)}
    for scene in scenes:
        assert rows[scene][1] is True and rows[scene][2] == 1 and rows[scene][3] is None
    for scene in broken:  # tried MAX_ATTEMPTS times, then given up, error and kind kept
        assert rows[scene][1] is False and rows[scene][2] == MAX_ATTEMPTS and rows[scene][3]
        assert rows[scene][4] == "frame"
    assert report.processed == len(scenes) + len(broken)  # retries do not count twice
    assert count_pending(pool, embedder.artifact_id, ALL) == 0
    again = run_backfill(pool, embedder, ALL, policy=FAST)
    assert again.processed == 0  # nothing retried forever
    stats = clip_stats(pool, ALL)
    assert stats.embedded == len(scenes) and stats.failures == len(broken)
    assert stats.latency_p50_ms > 0 and stats.timeouts == 0
    pool.close()


def test_owner_and_limit_options(pool, frames, artifact_dir):
    scenes, _ = _seed_scenes(pool, frames[:12], bad=0)
    owner = next(iter(scenes.values()))
    embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=artifact_dir))
    report = run_backfill(
        pool, embedder, Scope(owner_id=owner), limit=4, policy=Policy(batch_size=3)
    )
    assert report.processed == 4
    done = {r[0] for r in _rows(pool) if r[1]}
    assert len(done) == 4 and all(scenes[s] == owner for s in done)


def test_concurrent_processes_split_the_work_exactly_once(db_url, frames, artifact_dir):
    pool = open_pool(db_url)
    from heimdex_clip.db.migrate import migrate

    migrate(pool)
    scenes, _ = _seed_scenes(pool, frames, bad=0)
    cmd, env = _backfill_cmd(artifact_dir, db_url, "--batch", "4")
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    rows = _rows(pool)
    assert len(rows) == len(scenes)
    assert all(r[1] and r[2] == 1 for r in rows)  # every scene embedded, claimed once
    per_process = [int(out.split("backfill: ")[1].split(" embedded")[0]) for out, _ in outputs]
    assert sum(per_process) == len(scenes)
    assert sum(1 for n in per_process if n > 0) >= 2  # the work was really shared
    pool.close()


def test_kill_9_mid_way_loses_nothing_and_repeats_nothing(db_url, frames, artifact_dir):
    pool = open_pool(db_url)
    from heimdex_clip.db.migrate import migrate

    migrate(pool)
    scenes, _ = _seed_scenes(pool, frames, bad=0)
    with pool.connection() as conn:
        conn.execute(COUNT_WRITES)
    cmd, env = _backfill_cmd(artifact_dir, db_url, "--batch", "4", "--lease", "3")
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    leased = 0
    while time.monotonic() < deadline:  # kill while it holds a claimed, unwritten batch
        with pool.connection() as conn:
            done, leased = conn.execute(
                "SELECT count(embedding_visual_clip), count(visual_clip_lease_until) FROM scenes"
            ).fetchone()
        if done >= 8 and leased:
            break
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done_at_kill = sum(1 for r in _rows(pool) if r[1])
    assert 8 <= done_at_kill < len(scenes), "the kill must land mid-way"
    with pool.connection() as conn:  # the batch it held is still leased to the dead worker
        assert (
            conn.execute(
                "SELECT count(*) FROM scenes WHERE visual_clip_lease_until IS "
                "NOT NULL AND embedding_visual_clip IS NULL"
            ).fetchone()[0]
            >= 1
        )
    time.sleep(3.5)  # the killed batch's lease expires
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    rows = _rows(pool)
    assert all(r[1] for r in rows)  # nothing lost
    assert _writes(pool) == {r[0]: 1 for r in rows}  # every vector written exactly once
    assert f"backfill: {len(scenes) - done_at_kill} embedded" in resumed.stdout
    assert sum(r[2] == 2 for r in rows) >= 1  # the killed batch was claimed again
    pool.close()


def test_poison_frame_that_kills_its_worker_is_given_up_alone(
    pool, db_url, frames, artifact_dir, tmp_path
):
    """Whenever a worker holds the poison frame's lease it is SIGKILLed, as the kernel's
    OOM killer does to a worker decoding a frame too big for its memory. The frame is given
    up after MAX_ATTEMPTS worker faults; every other scene, its batch mates included, is
    embedded exactly once."""
    import threading

    import numpy as np
    from PIL import Image

    scenes, _ = _seed_scenes(pool, frames[:11], bad=0)
    poison_path = tmp_path / "poison.png"  # big noise: seconds to decode, never finished
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), np.uint8)).save(
        poison_path, compress_level=1
    )
    poison = SceneStore(pool).add_scene(next(iter(scenes.values())), str(poison_path))
    with pool.connection() as conn:
        conn.execute(COUNT_WRITES)
    cmd, env = _backfill_cmd(artifact_dir, db_url, "--batch", "4", "--lease", "2")
    kills = 0
    for _ in range(10):
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        done = threading.Event()

        def oom_killer(proc=proc, done=done):
            nonlocal kills
            while not done.is_set():
                with pool.connection() as conn:
                    holder = conn.execute(
                        "SELECT visual_clip_leased_by FROM scenes WHERE id = %s", (poison,)
                    ).fetchone()[0]
                if holder and holder.endswith(f":{proc.pid}"):
                    os.kill(proc.pid, signal.SIGKILL)
                    kills += 1
                    return
                time.sleep(0.01)

        watcher = threading.Thread(target=oom_killer)
        watcher.start()
        _, err = proc.communicate(timeout=600)
        done.set()
        watcher.join()
        assert proc.returncode in (0, -signal.SIGKILL), err
        with pool.connection() as conn:
            left = conn.execute(
                "SELECT count(*) FROM scenes WHERE embedding_visual_clip IS "
                "NULL AND visual_clip_attempts < %s OR visual_clip_lease_until "
                "IS NOT NULL",
                (MAX_ATTEMPTS,),
            ).fetchone()[0]
        if proc.returncode == 0 and left == 0:
            break
        time.sleep(2.2)  # the killed worker's lease expires
    rows = {r[0]: r for r in _rows(pool)}
    assert kills == MAX_ATTEMPTS
    assert rows[poison][1] is False and rows[poison][2] == MAX_ATTEMPTS
    assert rows[poison][4] == "worker" and "lease expired" in rows[poison][3]
    assert all(rows[s][1] for s in scenes)  # everything else completed
    assert _writes(pool) == dict.fromkeys(scenes, 1)  # once each, the poison never


def test_follow_mode_embeds_new_scenes_and_stops_cleanly_on_sigterm(
    pool, db_url, frames, artifact_dir
):
    import socket
    import urllib.request

    pytest.importorskip("prometheus_client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd, env = _backfill_cmd(
        artifact_dir,
        db_url,
        "--follow",
        "--batch",
        "4",
        "--idle-max",
        "0.5",
        "--stats-interval",
        "1",
        "--metrics-port",
        str(port),
    )
    worker = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    store, owner = SceneStore(pool), uuid.uuid4()

    def embedded() -> int:
        return sum(1 for r in _rows(pool) if r[1])

    added = []
    for wave in (frames[:6], frames[6:14]):  # scenes arrive while the worker runs
        added += [store.add_scene(owner, str(p)) for p in wave]
        deadline = time.monotonic() + 300
        while embedded() < len(added) and time.monotonic() < deadline:
            assert worker.poll() is None, worker.communicate()
            time.sleep(0.2)
        assert embedded() == len(added)
    deadline = time.monotonic() + 30  # the figures refresh every --stats-interval
    while time.monotonic() < deadline:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
        if "heimdex_clip_availability_ratio 1.0" in text:
            break
        time.sleep(0.5)
    assert "heimdex_clip_availability_ratio 1.0" in text
    assert "heimdex_clip_failure_ratio 0.0" in text and "heimdex_clip_timeout_ratio 0.0" in text
    assert "heimdex_clip_inference_time_ms_avg" in text
    # A last wave, and SIGTERM the moment the worker holds a lease: it must finish that
    # batch (write it, end its leases) and only then exit 0.
    added += [store.add_scene(owner, str(p)) for p in frames[14:22]]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with pool.connection() as conn:
            leased = conn.execute(
                "SELECT array_agg(id) FROM scenes WHERE visual_clip_lease_until IS NOT NULL"
            ).fetchone()[0]
        if leased:
            break
        time.sleep(0.01)
    assert leased, "the worker never claimed the last wave"
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert "figures: availability 100.0%" in err and "worker stopping" in err
    rows = {r[0]: r for r in _rows(pool)}
    assert all(rows[s][1] for s in leased)  # the batch in flight was finished, not dropped
    with pool.connection() as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM scenes WHERE visual_clip_lease_until IS NOT NULL"
            ).fetchone()[0]
            == 0
        )
    done = sum(1 for r in rows.values() if r[1])
    assert f"backfill: {done} embedded, 0 failed" in out
    # The rest of the wave (if any) waits, never claimed, for the next worker.
    assert all(r[2] == 0 for r in rows.values() if not r[1])
    assert all(r[2] == 1 for r in rows.values() if r[1])  # nothing claimed twice
