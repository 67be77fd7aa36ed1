"""Randomized model-upgrade sequences: migrate, backfill, re-embed, promote, prune and failed
frames of three artifacts, in a seeded random order, while another session holds FOR UPDATE
on random rows and a worker thread backfills. After every step, every scene that was ever
findable by the serving artifact is still found first by its own stored vector."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid

import psycopg
import pytest
from artifact_copies import copy_artifact

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.db.backfill import Policy, Scope, run_backfill
from heimdex_clip.db.connection import DatabaseError
from heimdex_clip.db.migrate import migrate
from heimdex_clip.db.store import SERVING_KEY, SceneStore
from heimdex_clip.db.upgrade import promote, prune

pytestmark = [pytest.mark.db, pytest.mark.slow]
SEED, STEPS, BUDGET_S = 20231, 60, 90.0
POLICY = Policy(batch_size=4, retry_base_s=0, lease_s=60)
ALL = Scope(all_owners=True)
# Counts the writes that replace one artifact's vector by another's (a swap is not one):
# the dangerous path must have been taken for the test to mean anything.
COUNT_EVICTIONS = """
CREATE TABLE evictions (scene_id uuid NOT NULL);
CREATE FUNCTION count_evictions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.embedding_visual_clip IS NOT NULL AND NEW.embedding_visual_clip IS NOT NULL
        AND NEW.visual_clip_artifact IS DISTINCT FROM OLD.visual_clip_artifact
        AND NEW.visual_clip_artifact IS DISTINCT FROM OLD.visual_clip_alt_artifact)
       OR (OLD.embedding_visual_clip_alt IS NOT NULL AND NEW.embedding_visual_clip_alt IS NOT NULL
           AND NEW.visual_clip_alt_artifact IS DISTINCT FROM OLD.visual_clip_alt_artifact
           AND NEW.visual_clip_alt_artifact IS DISTINCT FROM OLD.visual_clip_artifact) THEN
        INSERT INTO evictions VALUES (NEW.id);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER count_evictions BEFORE UPDATE ON scenes
    FOR EACH ROW EXECUTE FUNCTION count_evictions();
"""


@pytest.fixture(scope="module")
def embedders(artifact_dir, tmp_path_factory) -> dict[str, ClipEmbedder]:
    """A (the test artifact) and B, C: its INT8 graph under other pretrained tags, so other
    artifact ids (as tests/db/test_upgrade.py makes its second artifact)."""
    dirs = {"A": artifact_dir}
    for name in "BC":
        dest = copy_artifact(
            artifact_dir, tmp_path_factory.mktemp(name) / "art", keep={"visual.int8"}
        )
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["model"]["pretrained"] = f"none-{name}"
        (dest / "manifest.json").write_text(json.dumps(manifest))
        dirs[name] = dest
    # A generous per-frame budget: on a loaded machine a timed-out frame is only a failure,
    # but a sequence of failures would leave little to promote.
    config = ClipConfig(pretrained="none", timeout_s=30.0)
    loaded = {k: ClipEmbedder(model_dir=d, config=config).load() for k, d in dirs.items()}
    assert len({e.artifact_id for e in loaded.values()}) == 3
    return loaded


@pytest.fixture(scope="module")
def frames(photos, tmp_path_factory) -> list[str]:
    folder, paths = tmp_path_factory.mktemp("frames"), []
    for name, photo in photos:
        w, h = photo.size
        for k in range(2):
            crop = photo.crop((k * w // 9, k * h // 11, w - k * w // 13, h - k * h // 7))
            paths.append(str(folder / f"{name}_{k}.jpg"))
            crop.save(paths[-1], quality=90)
    return paths


def _serving(conn) -> str | None:
    row = conn.execute(
        "SELECT value FROM heimdex_clip_settings WHERE key = %s", (SERVING_KEY,)
    ).fetchone()
    return row and row[0]


def _findable(pool, store: SceneStore) -> tuple[str | None, set]:
    """(serving artifact, scenes found first by their own vector of it), through both the
    store (five-argument SQL search) and the four-argument SQL search of the serving one."""
    with pool.connection() as conn:
        serving = _serving(conn)
        rows = conn.execute(
            "SELECT id, owner_id, CASE WHEN visual_clip_artifact = %(s)s THEN "
            "embedding_visual_clip WHEN visual_clip_alt_artifact = %(s)s THEN "
            "embedding_visual_clip_alt END FROM scenes",
            {"s": serving},
        ).fetchall()
    found = set()
    for scene, owner, vector in rows:
        if vector is None:
            continue
        hits = store.search_by_embedding(
            owner, vector.to_numpy(), artifact=serving, threshold=-1, count=3
        )
        with pool.connection() as conn:
            first = conn.execute(
                "SELECT id FROM search_scenes_by_visual_clip_embedding(%s, -1, 3, %s)",
                (vector, owner),
            ).fetchone()
        if hits and hits[0].id == scene and first and first[0] == scene:
            found.add(scene)
    return serving, found


def _explain(pool, store: SceneStore, serving: str | None, lost: set) -> list[dict]:
    """For each lost scene: what its two slots hold, its last error, and what both searches
    answer with its vector of the serving artifact (the failure message's evidence)."""
    evidence = []
    for scene in sorted(lost):
        with pool.connection() as conn:
            owner, main, main_vec, alt, alt_vec, error = conn.execute(
                "SELECT owner_id, visual_clip_artifact, embedding_visual_clip, "
                "visual_clip_alt_artifact, embedding_visual_clip_alt, visual_clip_last_error "
                "FROM scenes WHERE id = %s",
                (scene,),
            ).fetchone()
            vector = main_vec if main == serving else alt_vec if alt == serving else None
            sql_hits = (
                vector is not None
                and conn.execute(
                    "SELECT id, similarity FROM "
                    "search_scenes_by_visual_clip_embedding(%s, -1, 3, %s)",
                    (vector, owner),
                ).fetchall()
            )
        hits = vector is not None and store.search_by_embedding(
            owner, vector.to_numpy(), artifact=serving, threshold=-1, count=3
        )
        evidence.append(
            {
                "scene": str(scene),
                "main": (main, main_vec is not None),
                "alt": (alt, alt_vec is not None),
                "last_error": error,
                "store_hits": hits and [(str(h.id), round(h.similarity, 6)) for h in hits],
                "sql_hits": sql_hits and [(str(i), round(s, 6)) for i, s in sql_hits],
            }
        )
    return evidence


def _locker(db_url: str, stop: threading.Event, rng: random.Random, held: list) -> None:
    """Another session: FOR UPDATE on 1-3 random rows for up to 1 s, again and again."""
    with psycopg.connect(db_url) as conn:
        while not stop.is_set():
            try:
                rows = conn.execute(
                    "SELECT id FROM scenes ORDER BY random() LIMIT %s FOR UPDATE",
                    (rng.randint(1, 3),),
                ).fetchall()
                held[0] += len(rows)
                time.sleep(rng.uniform(0.05, 1.0))
            except psycopg.errors.DeadlockDetected:
                pass  # PostgreSQL broke a lock cycle with a promote or worker: go on
            conn.rollback()
            time.sleep(rng.uniform(0, 0.2))


def _worker(
    pool, embedders, stop: threading.Event, rng: random.Random, errors: list, transient: list
) -> None:
    """A concurrent backfill worker switching between the three artifacts."""
    while not stop.is_set():
        try:
            run_backfill(
                pool,
                embedders[rng.choice("ABC")],
                ALL,
                policy=POLICY,
                reembed_stale=True,
                limit=rng.randint(1, 4),
            )
        except psycopg.OperationalError as exc:  # a lock wait or deadlock: `--follow`
            transient.append(type(exc).__name__)  # retries these; so does this loop
        except Exception as exc:  # any other failure of the worker fails the test
            errors.append(f"{type(exc).__name__}: {exc}")
        stop.wait(rng.uniform(0.05, 0.5))


def test_random_upgrade_sequences_never_lose_a_findable_scene(pool, db_url, embedders, frames):
    rng = random.Random(SEED)
    store, owners = SceneStore(pool), [uuid.uuid4(), uuid.uuid4()]
    # Frames whose vectors are distinct (some sample photos coincide), or "found first by
    # its own vector" would not single a scene out.
    unused: list = []
    for path, result in zip(frames, embedders["A"].embed_frames(frames), strict=True):
        if all(float(result.embedding @ other.embedding) < 0.999 for _, other in unused):
            unused.append((path, result))
    assert len(unused) >= 16, len(unused)
    del unused[24:]  # enough to exercise every path; fewer keeps the test short
    with pool.connection() as conn:
        conn.execute(COUNT_EVICTIONS)
    rng.shuffle(unused)
    for path, result in unused[:8]:  # A serves these from the start
        store.upsert_scene(
            rng.choice(owners),
            path,
            result.embedding,
            result.metadata,
            artifact=embedders["A"].artifact_id,
        )
    del unused[:8]

    stop, errors, transient, held = threading.Event(), [], [], [0]
    threads = [
        threading.Thread(target=_locker, args=(db_url, stop, random.Random(SEED + 1), held)),
        threading.Thread(
            target=_worker, args=(pool, embedders, stop, random.Random(SEED + 2), errors, transient)
        ),
    ]
    for t in threads:
        t.start()
    log, done = [], {"promoted": set(), "pruned": 0, "refused": 0}
    serving, ever_findable = _findable(pool, store)
    assert len(ever_findable) == 8
    start = time.monotonic()
    try:
        for step in range(STEPS):
            if time.monotonic() - start > BUDGET_S:
                break
            if step % 12 == 11:  # a whole upgrade now and then: B, then C, then A, ...
                log.append(_upgrade(pool, embedders, "BCA"[(step // 12) % 3], done))
            else:
                log.append(_step(rng, pool, store, embedders, owners, unused, done))
            serving, found = _findable(pool, store)
            lost = ever_findable - found
            assert not lost, (
                f"step {step}: {len(lost)} scenes no longer findable by "
                f"{serving}: {_explain(pool, store, serving, lost)}; steps so far: {log}"
            )
            ever_findable |= found
            assert not errors, errors
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads), "the locker or the worker hung"
    assert not errors, errors
    # The sequence did take the dangerous paths: promotions to two different artifacts,
    # prunes that removed vectors, writes that replaced one artifact's vector by another's
    # while rows were locked by the other session, and refusals.
    with pool.connection() as conn:
        evictions = conn.execute("SELECT count(*) FROM evictions").fetchone()[0]
    assert len(done["promoted"]) >= 2 and done["pruned"] > 0 and evictions > 0, (done, log)
    assert done["refused"] > 0 and held[0] > 0, (done, log)
    assert len(ever_findable) > 8


def _upgrade(pool, embedders, name: str, done: dict) -> str:
    """The whole protocol for one artifact: re-embed until nothing is ready, then promote
    every owner. Refused while the worker thread holds a lease on a scene it is embedding
    for another artifact (the backfill skips leased scenes): the operator waits a moment
    and runs the backfill again, as the refusal says. Without the wait, three attempts in a
    row could all meet the same lease and the sequence promote one artifact only."""
    for attempt in range(6):
        run_backfill(pool, embedders[name], ALL, policy=POLICY, reembed_stale=True)
        try:
            n = promote(pool, embedders[name].artifact_id, ALL, backoff_s=0.1)
        except DatabaseError:
            done["refused"] += 1
            time.sleep(0.5)
            continue
        done["promoted"].add(name)
        return f"upgrade to {name}: {n} swapped (attempt {attempt + 1})"
    return f"upgrade to {name}: refused 6 times"


def _step(
    rng: random.Random, pool, store: SceneStore, embedders, owners, unused: list, done: dict
) -> str:
    """One random operation; returns what it did (for the failure message)."""
    op = rng.choices(
        ["add", "backfill", "promote", "prune", "fail", "migrate"], weights=[2, 5, 3, 2, 1, 1]
    )[0]
    name = rng.choice("ABC")
    embedder = embedders[name]
    scope = ALL if rng.random() < 0.7 else Scope(owner_id=rng.choice(owners))
    where = "all" if scope.all_owners else "owner"
    if op == "add" and unused:
        path, _ = unused.pop()
        store.add_scene(rng.choice(owners), path)
        return "add"
    if op == "backfill":
        stale = rng.random() < 0.8
        report = run_backfill(
            pool, embedder, scope, policy=POLICY, reembed_stale=stale, limit=rng.randint(1, 8)
        )
        return f"backfill {name} {where} stale={stale}: {report.embedded}"
    if op == "promote":
        try:
            n = promote(pool, embedder.artifact_id, scope, backoff_s=0.1)
        except DatabaseError as exc:  # refused (coverage) or rows locked too long
            done["refused"] += 1
            return f"promote {name} {where}: refused ({str(exc)[:60]})"
        if scope.all_owners:
            done["promoted"].add(name)
        return f"promote {name} {where}: {n}"
    if op == "prune":
        try:
            n = prune(pool, embedder.artifact_id, scope, backoff_s=0.1)
        except DatabaseError as exc:  # the serving artifact
            done["refused"] += 1
            return f"prune {name} {where}: refused ({str(exc)[:40]})"
        done["pruned"] += n
        return f"prune {name} {where}: {n}"
    if op == "fail":
        with pool.connection() as conn:
            row = conn.execute(
                "SELECT id, owner_id FROM scenes ORDER BY random() LIMIT 1"
            ).fetchone()
        store.save_embedding(
            row[0], row[1], None, {"error": "ImageError: simulated"}, artifact=embedder.artifact_id
        )
        return f"fail {name}"
    assert migrate(pool) == []
    return "migrate"
