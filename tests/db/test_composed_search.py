"""Composed queries (texts + images + scenes, weighted) on real PostgreSQL + pgvector, with the
real embedder: the API, owner scoping, strictness and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from heimdex_clip import ImageError, QueryPart
from heimdex_clip.db.connection import DatabaseError
from heimdex_clip.db.store import SceneStore

pytestmark = [pytest.mark.db, pytest.mark.slow]


@pytest.fixture(scope="module")
def indexed(module_pool, embedder, photos, tmp_path_factory):
    """Ten photographs for owner A, one of them for owner B, and one pending scene of A."""
    folder = tmp_path_factory.mktemp("frames")
    owner_a, owner_b = uuid.uuid4(), uuid.uuid4()
    store = SceneStore(module_pool)
    ids, vectors = {}, {}
    for name, image in photos[:10]:
        path = folder / f"{name}.jpg"
        image.save(path, quality=90)
        result = embedder.embed_frame(str(path))
        ids[name] = store.upsert_scene(
            owner_a, str(path), result.embedding, result.metadata, artifact=embedder.artifact_id
        )
        vectors[ids[name]] = result.embedding
    first = next(iter(ids))
    other = store.upsert_scene(
        owner_b,
        str(folder / f"{first}.jpg"),
        vectors[ids[first]],
        {},
        artifact=embedder.artifact_id,
    )
    pending = store.add_scene(owner_a, str(folder / "pending.jpg"))
    return store, owner_a, ids, vectors, folder, other, pending


def test_the_query_is_the_normalised_weighted_sum_of_its_parts(indexed, embedder):
    store, owner, ids, vectors, folder, *_ = indexed
    names = list(ids)
    scene, image = ids[names[1]], folder / f"{names[2]}.jpg"
    parts = [
        QueryPart("scene", scene),
        QueryPart("text", "a photo at night", 0.7),
        QueryPart("image", str(image), -0.3),
    ]
    hits = store.search_composed(owner, embedder, parts, threshold=-1.0, count=20)
    # The same vector computed here from the parts' own embeddings.
    total = (
        vectors[scene]
        + 0.7 * embedder.embed_texts(["a photo at night"])[0]
        - 0.3 * embedder.embed_images([str(image)])[0]
    )
    query = total / np.linalg.norm(total)
    # Every other scene, each with its own cosine to that vector, in descending order (near
    # ties may swap: the sample photographs include duplicates).
    assert {h.id for h in hits} == set(vectors) - {scene}
    np.testing.assert_allclose(
        [h.similarity for h in hits], [float(vectors[h.id] @ query) for h in hits], atol=1e-4
    )
    np.testing.assert_allclose(
        [h.similarity for h in hits],
        sorted((float(vectors[k] @ query) for k in set(vectors) - {scene}), reverse=True),
        atol=1e-4,
    )
    assert scene not in {h.id for h in hits}  # the query's scenes are not results
    assert {h.owner_id for h in hits} == {owner}
    top3 = store.search_composed(owner, embedder, parts, threshold=-1.0, count=3)
    assert [h.id for h in top3] == [h.id for h in hits[:3]]


def test_one_part_searches_like_the_single_searches(indexed, embedder):
    store, owner, ids, _, folder, *_ = indexed
    image = str(folder / f"{next(iter(ids))}.jpg")
    scene = list(ids.values())[3]

    def same(a, b):  # (identical stored vectors tie: their order is not compared)
        assert {h.id for h in a} == {h.id for h in b} and len(a) == len(b)
        np.testing.assert_allclose([h.similarity for h in a], [h.similarity for h in b], atol=1e-5)

    same(
        store.search_composed(owner, embedder, [QueryPart("image", image)], count=5),
        store.search_by_image(owner, embedder, image, count=5),
    )
    same(
        store.search_composed(owner, embedder, [QueryPart("text", "a dog", 2.0)], count=5),
        store.search_by_text(owner, embedder, "a dog", count=5),
    )
    same(
        store.search_composed(owner, embedder, [QueryPart("scene", scene)], threshold=-1, count=20),
        store.search_similar(owner, scene, artifact=embedder.artifact_id, threshold=-1, count=20),
    )


def test_scenes_of_other_owners_or_without_a_vector_are_refused(indexed, embedder):
    store, owner, ids, _, _, other, pending = indexed
    mine = next(iter(ids.values()))
    with pytest.raises(DatabaseError, match="not found for this owner"):
        store.search_composed(
            owner, embedder, [QueryPart("scene", mine), QueryPart("scene", other)]
        )
    with pytest.raises(DatabaseError, match="no CLIP embedding of artifact"):
        store.search_composed(owner, embedder, [QueryPart("scene", pending)])
    # Scene parts are read before any model runs: an unreadable image after a foreign scene
    # is never decoded, the scene's error is the one raised.
    with pytest.raises(DatabaseError, match="not found for this owner"):
        store.search_composed(
            owner, embedder, [QueryPart("image", b"not an image"), QueryPart("scene", other)]
        )
    with pytest.raises(DatabaseError, match="not found for this owner"):
        store.scene_vector(uuid.uuid4(), mine, artifact=embedder.artifact_id)


def test_bad_parts_raise_before_any_search(indexed, embedder, tmp_path):
    store, owner, *_ = indexed
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ImageError):
        store.search_composed(
            owner, embedder, [QueryPart("text", "x"), QueryPart("image", str(broken))]
        )
    with pytest.raises(ValueError, match="cancel out"):
        store.search_composed(
            owner, embedder, [QueryPart("text", "a cat"), QueryPart("text", "a cat", -1)]
        )
    with pytest.raises(ValueError, match="one or more QueryPart"):
        store.search_composed(owner, embedder, [])
    with pytest.raises(ValueError, match="count"):
        store.search_composed(owner, embedder, [QueryPart("text", "x")], count=0)


def run_cli(args: list[str], module_pool, artifact_dir) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DATABASE_URL": module_pool.conninfo,
        "CLIP_PRETRAINED": "none",
        "CLIP_MODEL_DIR": str(artifact_dir),
    }
    return subprocess.run(
        [sys.executable, "-m", "heimdex_clip.cli", "search", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_composes_repeated_parts_with_their_weights(
    indexed, embedder, module_pool, artifact_dir, tmp_path
):
    store, owner, ids, _, folder, *_ = indexed
    scene, image = list(ids.values())[1], str(folder / f"{list(ids)[4]}.jpg")
    html = tmp_path / "composed.html"
    proc = run_cli(
        [
            "--scene",
            str(scene),
            "--text",
            "at night",
            "--weight",
            "0.5",
            "--image",
            image,
            "--weight=-0.25",
            "--owner",
            str(owner),
            "--threshold",
            "-1",
            "--count",
            "6",
            "--json",
            "--html",
            str(html),
        ],
        module_pool,
        artifact_dir,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout[: proc.stdout.rindex("]") + 1])
    expected = store.search_composed(
        owner,
        embedder,
        [
            QueryPart("scene", scene),
            QueryPart("text", "at night", 0.5),
            QueryPart("image", image, -0.25),
        ],
        threshold=-1,
        count=6,
    )
    assert [h["id"] for h in printed] == [str(h.id) for h in expected]
    assert "ranking is meaningless" in proc.stderr  # a text part on the random-init model
    page = html.read_text()
    assert "0.5 x text &#x27;at night&#x27;" in page  # the parts, escaped
    assert page.count("data:image/jpeg;base64,") == 6 + 1  # results + the query's frame


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weight", "2", "--text", "x"], "--weight follows the --image, --text or --scene"),
        (["--text", "x", "--weight", "2", "--weight", "3"], "one --weight per"),
        (["--text", "x", "--weight", "0"], "must not be 0"),
        (["--text", "x", "--weight", "nan"], "--weight"),
        ([], "a query needs --image, --text or --scene"),
        (
            ["--text", "a cat", "--text", "a cat", "--weight=-1"],
            "error: the query's parts cancel out",
        ),
    ],
)
def test_cli_errors_are_one_line(args, message, module_pool, artifact_dir):
    proc = run_cli([*args, "--owner", str(uuid.uuid4())], module_pool, artifact_dir)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
