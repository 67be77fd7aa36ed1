"""A model upgrade end to end: search never mixes artifacts and never goes empty."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.db.backfill import Policy, Scope, eligible_where, run_backfill
from heimdex_clip.db.connection import DatabaseError
from heimdex_clip.db.search_index import search_indexes
from heimdex_clip.db.stats import clip_stats
from heimdex_clip.db.store import SceneStore
from heimdex_clip.db.upgrade import promote, prune

pytestmark = [pytest.mark.db, pytest.mark.slow]


@pytest.fixture(scope="module")
def artifact_b(artifact_dir, tmp_path_factory):
    """A second artifact: the same INT8 graph under another pretrained tag, so another id.

    Its vectors equal A's, so a mix-up could not show in similarities: the test tells the
    artifacts apart by the ids recorded with every row and every hit.
    """
    target = tmp_path_factory.mktemp("artifact-b") / "ViT-B-32__upgrade"
    target.mkdir()
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    manifest["model"]["pretrained"] = "none-upgrade"
    for key in list(manifest["files"]):
        if key != "visual.int8":
            manifest["files"].pop(key)
    shutil.copy(artifact_dir / manifest["files"]["visual.int8"]["path"], target)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _embedder(path):
    return ClipEmbedder(model_dir=path, config=ClipConfig(pretrained="none")).load()


def test_upgrade_with_backfill_never_mixes_and_never_goes_empty(
    pool, artifact_dir, artifact_b, photos, tmp_path
):
    old, new = _embedder(artifact_dir), _embedder(artifact_b)
    assert old.artifact_id != new.artifact_id
    store, owner = SceneStore(pool), uuid.uuid4()
    paths = []
    for name, image in photos[:10]:
        paths.append(str(tmp_path / f"{name}.jpg"))
        image.save(paths[-1])
    for path, result in zip(paths, old.embed_frames(paths), strict=True):
        store.upsert_scene(owner, path, result.embedding, result.metadata, artifact=old.artifact_id)
    # A row embedded before provenance existed: a vector, no artifact. Unknown, never matched.
    legacy = store.add_scene(owner, paths[0] + ".legacy.jpg")
    shutil.copy(paths[0], paths[0] + ".legacy.jpg")
    with pool.connection() as conn:
        conn.execute(
            "UPDATE scenes SET embedding_visual_clip = %s WHERE id = %s",
            (old.embed_images([paths[0]])[0], legacy),
        )
    query = old.embed_images([paths[3]])[0]  # same graph: the same query for both models

    def ids_seen_by(embedder) -> set:
        hits = store.search_by_embedding(
            owner, query, artifact=embedder.artifact_id, threshold=-1, count=100
        )
        assert all(h.metadata["artifact_id"] == embedder.artifact_id for h in hits)
        return {h.id for h in hits}

    everything_a = ids_seen_by(old)
    assert len(everything_a) == 10 and legacy not in everything_a

    scope, policy = Scope(owner_id=owner), Policy(batch_size=4, retry_base_s=0)
    half = run_backfill(pool, new, scope, policy=policy, reembed_stale=True, limit=5)
    assert half.embedded == 5
    assert ids_seen_by(old) == everything_a  # the old model still sees everything
    assert len(ids_seen_by(new)) == 5  # the new one sees only its own vectors
    with pytest.raises(DatabaseError, match="6 scenes with a vector have none of"):
        promote(pool, new.artifact_id, scope)

    rest = run_backfill(pool, new, scope, policy=policy, reembed_stale=True)
    assert rest.embedded == 6  # the other five and the legacy row
    all_b = ids_seen_by(new)
    assert len(all_b) == 11 and legacy in all_b
    assert ids_seen_by(old) == everything_a
    # B first everywhere; A and the unknown vector beside it.
    assert promote(pool, new.artifact_id, Scope(all_owners=True)) == 11
    stats = clip_stats(pool, scope)
    assert stats.artifacts[new.artifact_id] == {"main": 11, "alt": 0}
    assert stats.artifacts[old.artifact_id] == {"main": 0, "alt": 10}
    assert stats.artifacts["unknown (embedded before provenance)"] == {"main": 0, "alt": 1}
    assert ids_seen_by(old) == everything_a and ids_seen_by(new) == all_b  # both served
    assert prune(pool, old.artifact_id, Scope(all_owners=True)) == 10
    assert ids_seen_by(old) == set() and ids_seen_by(new) == all_b
    assert run_backfill(pool, new, scope, policy=policy, reembed_stale=True).processed == 0
    row = store.get_scene(owner, legacy)
    assert row["visual_clip_artifact"] == new.artifact_id
    # The frame's own vector (INT8 results depend slightly on the batch it ran in).
    assert float(row["embedding_visual_clip"].to_numpy() @ new.embed_images([paths[0]])[0]) > 0.99


def _plan_nodes(plan: dict) -> list[str]:
    """Every node type of an EXPLAIN (FORMAT JSON) plan, with its relation."""
    node = f"{plan['Node Type']} {plan.get('Relation Name', '')}".strip()
    return [node, *(n for child in plan.get("Plans", []) for n in _plan_nodes(child))]


def test_claiming_stale_rows_reads_indexes_not_the_whole_table(pool):
    """`backfill --reembed-stale` near the end of an upgrade from artifact A to B: most scenes
    hold B's vector in the second slot, new scenes hold it in the first, a few still have
    only A's. Claims find those few through indexes, never by reading the whole table."""
    owners = [uuid.uuid4() for _ in range(20)]
    rows = """INSERT INTO scenes (owner_id, frame_path, embedding_visual_clip, visual_clip_artifact,
                                  embedding_visual_clip_alt, visual_clip_alt_artifact)
              SELECT (%(owners)s::uuid[])[1 + g %% 20], %(tag)s || g, %(vec)s::vector,
                     %(first)s, CASE WHEN %(alt)s::text IS NULL THEN NULL ELSE %(vec)s::vector
                     END, %(alt)s
              FROM generate_series(1, %(n)s) g RETURNING id, owner_id"""
    vec = "[" + ",".join(["0.01"] * 512) + "]"
    with pool.connection() as conn:
        conn.execute("SET statement_timeout = 0")
        # Throwaway database: without the vector indexes the rows go in 10x faster, and the
        # claim does not read them. The table must be large for the planner to prefer any
        # index to reading it: at 20,000 rows a scan is estimated cheaper and chosen.
        for info in search_indexes(conn):
            conn.execute(f'DROP INDEX "{info.name}"')
        for tag, first, alt, n in (("done-", "A", "B", 199000), ("new-", "B", None, 1000)):
            conn.execute(
                rows, {"owners": owners, "tag": tag, "vec": vec, "first": first, "alt": alt, "n": n}
            )
        stale = conn.execute(
            rows, {"owners": owners, "tag": "stale-", "vec": vec, "first": "A", "alt": None, "n": 6}
        ).fetchall()
        conn.execute("ANALYZE scenes")
        conn.commit()
    params = {"owner": owners[1], "artifact": "B", "max_attempts": 3}
    for scope in (Scope(all_owners=True), Scope(owner_id=owners[1])):
        where = eligible_where(scope, reembed_stale=True)
        with pool.connection() as conn:
            ((plan,),) = conn.execute(
                f"EXPLAIN (FORMAT JSON) SELECT id FROM scenes WHERE {where} LIMIT 16", params
            ).fetchone()
            found = {
                r[0]
                for r in conn.execute(f"SELECT id FROM scenes WHERE {where}", params).fetchall()
            }
        nodes = _plan_nodes(plan["Plan"])
        assert "Seq Scan scenes" not in nodes, nodes
        expected = {i for i, owner in stale if scope.all_owners or owner == owners[1]}
        assert found == expected and found  # exactly the stale rows (of that owner)
