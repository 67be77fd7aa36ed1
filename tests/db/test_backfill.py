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
from heimdex_clip.db.backfill import MAX_ATTEMPTS, count_pending, run_backfill
from heimdex_clip.db.connection import open_pool
from heimdex_clip.db.stats import clip_stats
from heimdex_clip.db.store import SceneStore

pytestmark = [pytest.mark.db, pytest.mark.slow]


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
    scenes = {store.add_scene(owners[i % 2], str(p)): owners[i % 2]
              for i, p in enumerate(frames)}
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
        return conn.execute("SELECT id, embedding_visual_clip IS NOT NULL, "
                            "(visual_clip_metadata->>'attempts')::int, "
                            "visual_clip_metadata->>'error' FROM scenes").fetchall()


def _backfill_cmd(artifact_dir: Path, db_url: str, *extra: str) -> tuple[list[str], dict]:
    env = {**os.environ, "DATABASE_URL": db_url, "CLIP_PRETRAINED": "none",
           "CLIP_MODEL_DIR": str(artifact_dir), "CLIP_CPU_THREADS": "1"}
    return [sys.executable, "-m", "heimdex_clip.cli", "backfill", "--quiet", *extra], env


def test_backfill_embeds_everything_once_and_records_failures(db_url, frames, artifact_dir):
    pool = open_pool(db_url)
    from heimdex_clip.db.migrate import migrate
    migrate(pool)
    scenes, broken = _seed_scenes(pool, frames[:24])
    embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=artifact_dir))
    report = run_backfill(pool, embedder, batch_size=5)
    assert report.embedded == len(scenes)
    rows = {r[0]: r for r in _rows(pool)}
    for scene in scenes:
        assert rows[scene][1] is True and rows[scene][2] == 1 and rows[scene][3] is None
    for scene in broken:  # tried MAX_ATTEMPTS times, then given up, error kept
        assert rows[scene][1] is False and rows[scene][2] == MAX_ATTEMPTS and rows[scene][3]
    assert count_pending(pool) == 0
    again = run_backfill(pool, embedder)
    assert again.processed == 0  # nothing retried forever
    stats = clip_stats(pool)
    assert stats.embedded == len(scenes) and stats.failures == len(broken)
    assert stats.latency_p50_ms > 0 and stats.timeouts == 0
    pool.close()


def test_owner_and_limit_options(pool, frames, artifact_dir):
    scenes, _ = _seed_scenes(pool, frames[:12], bad=0)
    owner = next(iter(scenes.values()))
    embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=artifact_dir))
    report = run_backfill(pool, embedder, owner_id=owner, limit=4, batch_size=3)
    assert report.processed == 4
    done = {r[0] for r in _rows(pool) if r[1]}
    assert len(done) == 4 and all(scenes[s] == owner for s in done)


def test_concurrent_processes_split_the_work_exactly_once(db_url, frames, artifact_dir):
    pool = open_pool(db_url)
    from heimdex_clip.db.migrate import migrate
    migrate(pool)
    scenes, _ = _seed_scenes(pool, frames, bad=0)
    cmd, env = _backfill_cmd(artifact_dir, db_url, "--batch", "4")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    rows = _rows(pool)
    assert len(rows) == len(scenes)
    assert all(r[1] and r[2] == 1 for r in rows)  # every scene embedded, exactly once
    per_process = [int(out.split("backfill: ")[1].split(" embedded")[0]) for out, _ in outputs]
    assert sum(per_process) == len(scenes)
    assert sum(1 for n in per_process if n > 0) >= 2  # the work was really shared
    pool.close()


def test_kill_9_mid_way_loses_nothing_and_repeats_nothing(db_url, frames, artifact_dir):
    pool = open_pool(db_url)
    from heimdex_clip.db.migrate import migrate
    migrate(pool)
    scenes, _ = _seed_scenes(pool, frames, bad=0)
    cmd, env = _backfill_cmd(artifact_dir, db_url, "--batch", "4")
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = sum(1 for r in _rows(pool) if r[1])
        if done >= 8:
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done_at_kill = sum(1 for r in _rows(pool) if r[1])
    assert 8 <= done_at_kill < len(scenes), "the kill must land mid-way"
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    rows = _rows(pool)
    assert all(r[1] for r in rows)  # nothing lost
    assert all(r[2] == 1 for r in rows)  # the killed batch was not written twice
    assert f"backfill: {len(scenes) - done_at_kill} embedded" in resumed.stdout
    pool.close()
