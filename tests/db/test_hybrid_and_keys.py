"""Migration 008 in the db layer: API keys (hash only) and hybrid search (reciprocal rank
fusion of the CLIP and full-text rankings), with synthetic unit vectors."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest

from heimdex_clip.db.api_keys import create_key, list_keys, owner_of_key, revoke_key
from heimdex_clip.db.connection import DatabaseError
from heimdex_clip.db.hybrid import scene_spans, search_hybrid
from heimdex_clip.db.store import SceneStore

pytestmark = pytest.mark.db
ART = "ViT-B-32:none:hybridhybridhybr"


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_keys_store_only_a_hash_and_revocation_is_immediate(pool):
    owner = uuid.uuid4()
    key, stored = create_key(pool, owner, "ci")
    assert key.startswith("hck_") and len(key) == 4 + 43
    assert owner_of_key(pool, key) == owner
    with pool.connection() as conn:
        row = conn.execute("SELECT * FROM heimdex_clip_api_keys").fetchone()
    assert key not in [str(v) for v in row]
    assert hashlib.sha256(key.encode()).hexdigest() in row
    other, _ = create_key(pool, uuid.uuid4())
    assert owner_of_key(pool, other) != owner
    assert [k.id for k in list_keys(pool, owner)] == [stored.id]
    assert len(list_keys(pool)) == 2
    first = revoke_key(pool, stored.id).revoked_at
    assert owner_of_key(pool, key) is None
    assert revoke_key(pool, stored.id).revoked_at == first  # the first revocation stays
    with pytest.raises(DatabaseError, match="no API key"):
        revoke_key(pool, uuid.uuid4())
    assert owner_of_key(pool, "hck_" + "x" * 43) is None
    assert owner_of_key(pool, "not-a-key") is None


def test_hybrid_fuses_both_rankings_owner_scoped(pool):
    store, rng = SceneStore(pool), np.random.default_rng(8)
    owner, stranger = uuid.uuid4(), uuid.uuid4()
    query = unit(rng.standard_normal(512))
    # Five scenes by pixels: cosines to the query decreasing; two carry words.
    cosines = [0.9, 0.8, 0.7, 0.6, 0.5]
    ids = []
    for i, c in enumerate(cosines):
        noise = rng.standard_normal(512)
        noise -= noise @ query * query
        vector = unit(c * query + np.sqrt(1 - c**2) * unit(noise))
        ids.append(store.upsert_scene(owner, f"{i}.jpg", vector, {}, artifact=ART))
    words = {ids[4]: "a sunset over the harbour", ids[2]: "sunset sunset and boats"}
    # A scene found only by its words: no vector at all.
    words_only = store.add_scene(owner, "words.jpg")
    words[words_only] = "the harbour at sunset"
    stranger_scene = store.add_scene(stranger, "s.jpg")
    with pool.connection() as conn:
        for scene, text in {**words, stranger_scene: "sunset"}.items():
            conn.execute(
                "UPDATE scenes SET transcript = %s, start_s = 1.5, end_s = 4 WHERE id = %s",
                (text, scene),
            )
    hits = search_hybrid(
        store, owner, query, "sunset harbour", artifact=ART, threshold=0.0, count=10
    )
    # The full-text ranking: scenes holding both words, by ts_rank_cd (computed by
    # PostgreSQL here too, but independently of the fusion).
    with pool.connection() as conn:
        text_order = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM scenes, websearch_to_tsquery('simple', 'sunset harbour') q "
                "WHERE owner_id = %s AND to_tsvector('simple', transcript) @@ q "
                "ORDER BY ts_rank_cd(to_tsvector('simple', transcript), q) DESC, id",
                (owner,),
            ).fetchall()
        ]
    assert set(text_order) == {ids[4], words_only}  # ids[2] lacks "harbour"
    score = {s: 1 / (60 + r) for r, s in enumerate(ids, 1)}
    for r, s in enumerate(text_order, 1):
        score[s] = score.get(s, 0) + 1 / (60 + r)
    expected = sorted(score, key=lambda s: (-score[s], str(s)))
    assert [h.id for h in hits] == expected
    np.testing.assert_allclose([h.score for h in hits], [score[s] for s in expected])
    by_id = {h.id: h for h in hits}
    assert by_id[words_only].similarity is None and by_id[words_only].clip_rank is None
    assert by_id[ids[0]].text_rank is None and by_id[ids[0]].clip_rank == 1
    np.testing.assert_allclose(by_id[ids[1]].similarity, 0.8, atol=1e-5)
    assert stranger_scene not in by_id
    # match_threshold prunes the CLIP ranking only.
    strict = search_hybrid(
        store, owner, query, "sunset harbour", artifact=ART, threshold=0.95, count=10
    )
    assert {h.id for h in strict} == set(text_order)
    assert scene_spans(pool, owner, [words_only, stranger_scene]) == {words_only: (1.5, 4.0)}


def test_hybrid_refuses_bad_arguments(pool):
    store = SceneStore(pool)
    with pytest.raises(ValueError, match="count"):
        search_hybrid(store, uuid.uuid4(), unit(np.ones(512)), "x", artifact=ART, count=0)
    with pytest.raises(ValueError, match="owner_id is required"):
        search_hybrid(store, None, unit(np.ones(512)), "x", artifact=ART)
    # Words that make no full-text query (only punctuation) leave the CLIP ranking alone.
    assert search_hybrid(store, uuid.uuid4(), unit(np.ones(512)), "!!", artifact=ART) == []
