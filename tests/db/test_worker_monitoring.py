"""`backfill --follow` never dies of its own bookkeeping: a monitoring query past the
statement timeout is logged, and the worker goes on embedding."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import psycopg
import pytest

from heimdex_clip.db.backfill import Policy, Scope
from heimdex_clip.db.connection import DbSettings, open_pool
from heimdex_clip.db.stats import clip_stats
from heimdex_clip.db.store import SceneStore
from heimdex_clip.db.worker import FollowOptions, follow

pytestmark = [pytest.mark.db, pytest.mark.slow]
ALL = Scope(all_owners=True)


def _slow_stats_table(pool, rows: int = 40) -> None:
    """Scenes whose metadata is ~2 MB of TOASTed JSON each: the stats query (which reads
    inference_time_ms from every row's metadata) takes hundreds of milliseconds, while a
    claim (which never reads metadata) stays at a few. Not work: no frame to embed."""
    with pool.connection() as conn:
        conn.execute("SET statement_timeout = 0")
        conn.execute(
            """INSERT INTO scenes (owner_id, frame_path, visual_clip_metadata)
               SELECT %s, NULL, jsonb_build_object('inference_time_ms', 1, 'blob',
                   (SELECT string_agg(md5(random()::text || g || i), '')
                    FROM generate_series(1, 60000) i))
               FROM generate_series(1, %s) g""",
            (uuid.uuid4(), rows),
        )


def test_a_stats_query_past_the_statement_timeout_never_ends_the_worker(
    pool, db_url, embedder, photos, tmp_path, caplog
):
    _slow_stats_table(pool)
    store, owner, scenes = SceneStore(pool), uuid.uuid4(), []
    for name, photo in photos[:3]:
        photo.save(tmp_path / f"{name}.jpg")
        scenes.append(store.add_scene(owner, str(tmp_path / f"{name}.jpg")))
    worker_pool = open_pool(db_url, settings=DbSettings(statement_timeout_ms=100))
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):  # the bookkeeping does time out
            clip_stats(worker_pool, ALL)
        stop, outcome = threading.Event(), {}

        def run() -> None:
            try:
                outcome["report"] = follow(
                    worker_pool,
                    embedder,
                    ALL,
                    stop,
                    policy=Policy(batch_size=2),
                    options=FollowOptions(idle_min_s=0.05, idle_max_s=0.2, stats_interval_s=0.01),
                )
            except BaseException as exc:  # the bug: the worker raised and ended
                outcome["raised"] = exc

        caplog.set_level(logging.WARNING, logger="heimdex_clip.db.worker")
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and thread.is_alive():
            failures = [r for r in caplog.records if "monitoring query failed" in r.message]
            if clip_stats(pool, Scope(owner_id=owner)).embedded == 3 and len(failures) >= 3:
                break
            time.sleep(0.2)
        assert thread.is_alive(), f"the worker ended: {outcome}"
        stop.set()
        thread.join(60)
        assert "raised" not in outcome, outcome
        assert outcome["report"].embedded == 3
        assert len(failures) >= 3 and "QueryCanceled" in failures[0].message
    finally:
        worker_pool.close()
