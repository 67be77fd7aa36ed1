"""A model upgrade end to end: search never mixes artifacts and never goes empty."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.db.backfill import Policy, Scope, run_backfill
from heimdex_clip.db.connection import DatabaseError
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


def test_upgrade_with_backfill_never_mixes_and_never_goes_empty(pool, artifact_dir, artifact_b,
                                                               photos, tmp_path):
    old, new = _embedder(artifact_dir), _embedder(artifact_b)
    assert old.artifact_id != new.artifact_id
    store, owner = SceneStore(pool), uuid.uuid4()
    paths = []
    for name, image in photos[:10]:
        paths.append(str(tmp_path / f"{name}.jpg"))
        image.save(paths[-1])
    for path, result in zip(paths, old.embed_frames(paths), strict=True):
        store.upsert_scene(owner, path, result.embedding, result.metadata,
                           artifact=old.artifact_id)
    # A row embedded before provenance existed: a vector, no artifact. Unknown, never matched.
    legacy = store.add_scene(owner, paths[0] + ".legacy.jpg")
    shutil.copy(paths[0], paths[0] + ".legacy.jpg")
    with pool.connection() as conn:
        conn.execute("UPDATE scenes SET embedding_visual_clip = %s WHERE id = %s",
                     (old.embed_images([paths[0]])[0], legacy))
    query = old.embed_images([paths[3]])[0]  # same graph: the same query for both models

    def ids_seen_by(embedder) -> set:
        hits = store.search_by_embedding(owner, query, artifact=embedder.artifact_id,
                                         threshold=-1, count=100)
        assert all(h.metadata["artifact_id"] == embedder.artifact_id for h in hits)
        return {h.id for h in hits}

    everything_a = ids_seen_by(old)
    assert len(everything_a) == 10 and legacy not in everything_a

    scope, policy = Scope(owner_id=owner), Policy(batch_size=4, retry_base_s=0)
    half = run_backfill(pool, new, scope, policy=policy, reembed_stale=True, limit=5)
    assert half.embedded == 5
    assert ids_seen_by(old) == everything_a  # the old model still sees everything
    assert len(ids_seen_by(new)) == 5  # the new one sees only its own vectors
    with pytest.raises(DatabaseError, match="still wait for a vector"):
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
    assert float(row["embedding_visual_clip"].to_numpy() @ new.embed_images([paths[0]])[0]) \
        > 0.99
