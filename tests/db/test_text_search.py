"""Text -> scenes on real PostgreSQL + pgvector: the API, owner scoping, the CLI and its page."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from heimdex_clip.db.store import SceneStore
from heimdex_clip.errors import TextError

pytestmark = [pytest.mark.db, pytest.mark.slow]

QUERY = "a photo of a cat"


@pytest.fixture(scope="module")
def indexed(module_pool, embedder, photos, tmp_path_factory):
    """Eight photographs for owner A, three of them again for owner B."""
    folder = tmp_path_factory.mktemp("frames")
    owner_a, owner_b = uuid.uuid4(), uuid.uuid4()
    store = SceneStore(module_pool)
    vectors = {}
    for name, image in photos[:8]:
        path = folder / f"{name}.jpg"
        image.save(path, quality=90)
        result = embedder.embed_frame(str(path))
        store.upsert_scene(
            owner_a, str(path), result.embedding, result.metadata, artifact=embedder.artifact_id
        )
        vectors[str(path)] = result.embedding
    for path in list(vectors)[:3]:
        result = embedder.embed_frame(path)
        store.upsert_scene(
            owner_b, path, result.embedding, result.metadata, artifact=embedder.artifact_id
        )
    return store, owner_a, owner_b, vectors, folder


def test_search_by_text_ranks_by_cosine_within_the_owner(indexed, embedder):
    store, owner_a, owner_b, vectors, _ = indexed
    hits = store.search_by_text(owner_a, embedder, QUERY, threshold=-1.0, count=5)
    # The expected ranking, computed here from the stored vectors and the text vector.
    query = embedder.embed_texts([QUERY])[0]
    expected = sorted((float(v @ query) for v in vectors.values()), reverse=True)[:5]
    # scikit-image's "cat" is "chelsea": equal vectors tie, so compare similarities in rank
    # order and each hit's similarity with its own stored vector, not the tie's order.
    np.testing.assert_allclose([h.similarity for h in hits], expected, atol=1e-4)
    np.testing.assert_allclose(
        [h.similarity for h in hits],
        [float(vectors[h.frame_path] @ query) for h in hits],
        atol=1e-4,
    )
    assert {h.owner_id for h in hits} == {owner_a}
    only_b = store.search_by_text(owner_b, embedder, QUERY, threshold=-1.0, count=20)
    assert {h.owner_id for h in only_b} == {owner_b} and len(only_b) == 3
    assert store.search_by_text(uuid.uuid4(), embedder, QUERY, threshold=-1.0) == []


def test_search_by_text_is_search_by_embedding_of_the_text(indexed, embedder):
    store, owner_a, *_ = indexed
    by_text = store.search_by_text(owner_a, embedder, QUERY, threshold=-1.0, count=8)
    by_vector = store.search_by_embedding(
        owner_a,
        embedder.embed_texts([QUERY])[0],
        artifact=embedder.artifact_id,
        threshold=-1.0,
        count=8,
    )
    assert [h.id for h in by_text] == [h.id for h in by_vector]


def test_search_by_text_refuses_bad_text(indexed, embedder):
    store, owner_a, *_ = indexed
    with pytest.raises(TextError):
        store.search_by_text(owner_a, embedder, None)  # type: ignore[arg-type]


def test_cli_search_text_table_and_html(indexed, module_pool, artifact_dir, tmp_path):
    _, owner_a, _, _, folder = indexed
    url = module_pool.conninfo
    html = tmp_path / "text.html"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "CLIP_PRETRAINED": "none",
        "CLIP_MODEL_DIR": str(artifact_dir),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "heimdex_clip.cli",
            "search",
            "--text",
            "sunset & sea <b>",
            "--owner",
            str(owner_a),
            "--count",
            "3",
            "--html",
            str(html),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if str(folder) in line]) == 3
    assert "ranking is meaningless" in proc.stderr  # the test artifact is a random init
    page = html.read_text()
    assert "sunset &amp; sea &lt;b&gt;" in page  # the query text, escaped
    assert page.count("data:image/jpeg;base64,") == 3  # three result thumbnails
    assert "not semantic" in page


def test_cli_search_with_a_non_utf8_query_writes_a_whole_page(
    indexed, module_pool, artifact_dir, tmp_path
):
    """Bytes that are not UTF-8 in argv (a Latin-1 terminal) reach Python as lone
    surrogates: the page is still written whole, valid UTF-8, with the bytes escaped."""
    _, owner_a, *_ = indexed
    html = tmp_path / "latin1.html"
    env = {
        **os.environ,
        "DATABASE_URL": module_pool.conninfo,
        "CLIP_PRETRAINED": "none",
        "CLIP_MODEL_DIR": str(artifact_dir),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "heimdex_clip.cli",
            "search",
            "--text",
            b"caf\xe9 au lait",
            "--owner",
            str(owner_a),
            "--count",
            "2",
            "--html",
            str(html),
        ],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "caf\\udce9 au lait" in html.read_bytes().decode("utf-8")
