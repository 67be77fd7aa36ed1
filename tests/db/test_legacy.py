"""An existing deployment migrates in place: rows embedded before provenance are never
mixed, old callers keep working, and the rows are attributed only on evidence."""

from __future__ import annotations

import shutil
import uuid

import numpy as np
import pytest
from psycopg.types.json import Jsonb

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.db.backfill import Scope
from heimdex_clip.db.connection import DatabaseError, open_pool
from heimdex_clip.db.migrate import MIGRATIONS_DIR, migrate
from heimdex_clip.db.stats import clip_stats
from heimdex_clip.db.store import SceneStore
from heimdex_clip.db.upgrade import attribute_legacy

pytestmark = [pytest.mark.db, pytest.mark.slow]
OLD_SEARCH = "SELECT id FROM search_scenes_by_visual_clip_embedding(%s, -1, 50, %s)"


def test_pre_provenance_rows_survive_the_migration_and_are_attributed_on_evidence(
    db_url, artifact_dir, photos, tmp_path
):
    old_schema = tmp_path / "migrations"
    old_schema.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("00[1-3]_*.sql")):
        shutil.copy(path, old_schema)
    pool = open_pool(db_url)
    migrate(pool, old_schema)  # a deployment as it was before provenance
    embedder = ClipEmbedder(model_dir=artifact_dir, config=ClipConfig(pretrained="none")).load()
    model = embedder.manifest.model
    owner, impostor = uuid.uuid4(), uuid.uuid4()
    paths = []
    for name, image in photos[:8]:
        paths.append(str(tmp_path / f"{name}.jpg"))
        image.save(paths[-1])
    vectors = embedder.embed_images(paths)
    noise = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    with pool.connection() as conn:  # what the old code wrote: no artifact anywhere
        for who, rows in (
            (owner, zip(paths, vectors, strict=True)),
            (impostor, zip(paths[:3], noise, strict=True)),
        ):
            for path, vector in rows:
                conn.execute(
                    "INSERT INTO scenes (owner_id, frame_path, embedding_visual_clip,"
                    " visual_clip_metadata) VALUES (%s, %s, %s, %s)",
                    (
                        who,
                        path,
                        vector,
                        Jsonb({"model_name": model.name, "pretrained": model.pretrained}),
                    ),
                )
        before = {r[0] for r in conn.execute(OLD_SEARCH, (vectors[0], owner))}
    assert len(before) == 8

    assert migrate(pool)[:1] == ["004_provenance_and_leases.sql"]  # in place
    store = SceneStore(pool)
    with pool.connection() as conn:  # the old code's search still answers, unchanged
        assert {r[0] for r in conn.execute(OLD_SEARCH, (vectors[0], owner))} == before
    # Unknown vectors never match a query of a known artifact.
    assert (
        store.search_by_embedding(owner, vectors[0], artifact=embedder.artifact_id, threshold=-1)
        == []
    )
    assert clip_stats(pool, Scope(all_owners=True)).artifacts == {
        "unknown (embedded before provenance)": {"main": 11, "alt": 0}
    }

    with pytest.raises(DatabaseError, match="were not made by"):  # random vectors: refused
        attribute_legacy(pool, embedder, Scope(owner_id=impostor), sample=3)
    compared, attributed = attribute_legacy(pool, embedder, Scope(owner_id=owner), sample=4)
    assert (compared, attributed) == (4, 8)
    hits = store.search_by_embedding(
        owner, vectors[0], artifact=embedder.artifact_id, threshold=-1, count=50
    )
    assert {h.id for h in hits} == before
    assert hits[0].metadata["attributed"]["min_cosine"] >= 0.99
    with pool.connection() as conn:  # the serving artifact is now this one: same answer
        assert {r[0] for r in conn.execute(OLD_SEARCH, (vectors[0], owner))} == before
        assert (
            conn.execute(
                "SELECT count(*) FROM scenes WHERE owner_id = %s AND visual_clip_artifact IS NULL",
                (impostor,),
            ).fetchone()[0]
            == 3
        )
    pool.close()
