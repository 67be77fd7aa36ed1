"""The search service over real HTTP: every route, owner isolation, credentials, errors.

Expectations come from the Python API (SceneStore, ClipEmbedder) called in-process on the
same database, never from the service under test.
"""

from __future__ import annotations

import base64
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from heimdex_clip import ImageError
from heimdex_clip.db.api_keys import create_key, list_keys, revoke_key
from heimdex_clip.db.store import SceneStore
from heimdex_clip.query import QueryPart

from .serve_helpers import TRANSCRIPTS, add_owner, client, distinct, patient_embedder, png, serve

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def embedder(artifact_dir):
    return patient_embedder(artifact_dir)


KINDS = ("key", "jwt")


@pytest.fixture(scope="module")
def world(module_pool, embedder, photos):
    media = Path(tempfile.mkdtemp(prefix="heimdex-serve-media-"))
    few = distinct(photos, 6)
    a = add_owner(module_pool, embedder, few, media, uuid.uuid4(), transcripts=TRANSCRIPTS)
    b = add_owner(module_pool, embedder, few, media, uuid.uuid4())
    with serve(module_pool, embedder, media) as server, client(server) as http:
        yield {
            "http": http,
            "a": a,
            "b": b,
            "store": SceneStore(module_pool),
            "embedder": embedder,
            "photos": few,
            "pool": module_pool,
            "media": media,
            "server": server,
        }
    shutil.rmtree(media, ignore_errors=True)


def ids(body) -> list[str]:
    return [r["scene_id"] for r in body["results"]]


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"]["code"] == status and body["error"]["message"]
    assert "Traceback" not in response.text
    return body


def same_hits(body, hits) -> None:
    assert ids(body) == [str(h.id) for h in hits]
    np.testing.assert_allclose(
        [r["similarity"] for r in body["results"]], [h.similarity for h in hits], atol=1e-6
    )


@pytest.mark.parametrize("kind", KINDS)
def test_image_search_finds_the_same_frame_first_and_only_own_scenes(world, kind):
    http, a, b = world["http"], world["a"], world["b"]
    for owner in (a, b):
        data = png(world["photos"][2][1])
        response = http.post(
            "/v1/search/image",
            headers=owner.headers(kind),
            files={"image": ("q.png", data, "image/png")},
            data={"match_threshold": "-1", "match_count": "50"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert ids(body)[0] == str(owner.scenes[2])
        assert body["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
        assert set(ids(body)) == {str(s) for s in owner.scenes}  # all own, none of other's
        expected = world["store"].search_by_image(
            owner.id, world["embedder"], data, threshold=-1, count=50
        )
        same_hits(body, expected)
        first = body["results"][0]
        assert (first["scene_index"], first["start_s"], first["end_s"]) == (2, 20.0, 27.5)
        assert body["model"] == world["embedder"].artifact_id and body["took_ms"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_scene_search_matches_the_store_and_hides_other_owners_scenes(world, kind):
    http, a, b, store = world["http"], world["a"], world["b"], world["store"]
    response = http.post(
        "/v1/search/scene",
        headers=a.headers(kind),
        json={"scene_id": str(a.scenes[1]), "match_threshold": -1},
    )
    assert response.status_code == 200
    same_hits(
        response.json(),
        store.search_similar(
            a.id, a.scenes[1], threshold=-1, artifact=world["embedder"].artifact_id
        ),
    )
    assert str(a.scenes[1]) not in ids(response.json())
    foreign_id, missing_id = b.scenes[1], uuid.uuid4()
    foreign = http.post(
        "/v1/search/scene", headers=a.headers(kind), json={"scene_id": str(foreign_id)}
    )
    missing = http.post(
        "/v1/search/scene", headers=a.headers(kind), json={"scene_id": str(missing_id)}
    )
    # Another owner's scene answers exactly like one that does not exist.
    assert assert_error(foreign, 404)["error"]["message"] == f"scene {foreign_id} not found"
    assert assert_error(missing, 404)["error"]["message"] == f"scene {missing_id} not found"


@pytest.mark.parametrize("kind", KINDS)
def test_text_search_matches_the_store(world, kind):
    http, a, store = world["http"], world["a"], world["store"]
    response = http.post(
        "/v1/search/text",
        headers=a.headers(kind),
        json={"query": "a photo of a cat", "match_threshold": -1, "match_count": 4},
    )
    assert response.status_code == 200
    same_hits(
        response.json(),
        store.search_by_text(a.id, world["embedder"], "a photo of a cat", threshold=-1, count=4),
    )


def test_hybrid_fuses_the_clip_and_full_text_rankings(world):
    http, a, b, store = world["http"], world["a"], world["b"], world["store"]
    query = "zebra"
    # Above this threshold the CLIP ranking is empty: only the words can find a scene.
    words_only = http.post(
        "/v1/search/text",
        headers=a.headers(),
        json={"query": query, "mode": "hybrid", "match_threshold": 0.999},
    )
    assert words_only.status_code == 200
    assert ids(words_only.json()) == [str(a.scenes[0])]  # TRANSCRIPTS[0] has "zebra"
    # Owner-scoped: b's scenes have no transcripts, and a's words are not b's.
    other = http.post(
        "/v1/search/text",
        headers=b.headers(),
        json={"query": query, "mode": "hybrid", "match_threshold": 0.999},
    )
    assert other.json()["results"] == []
    # The fused order, computed here: RRF over the store's CLIP ranking and the words.
    fused = http.post(
        "/v1/search/text",
        headers=a.headers(),
        json={"query": query, "mode": "hybrid", "match_threshold": -1, "match_count": 6},
    ).json()
    clip = store.search_by_text(a.id, world["embedder"], query, threshold=-1, count=50)
    score = {h.id: 1 / (60 + rank) for rank, h in enumerate(clip, 1)}
    score[a.scenes[0]] += 1 / (60 + 1)
    expected = sorted(score, key=lambda s: (-score[s], str(s)))[:6]
    assert ids(fused) == [str(s) for s in expected]
    np.testing.assert_allclose(
        [r["score"] for r in fused["results"]], [score[s] for s in expected], rtol=1e-9
    )
    # A scene found by its pixels only (the CLIP top hit, no transcript) comes back too.
    assert str(clip[0].id) in ids(fused)


def test_composed_search_matches_the_store(world):
    http, a, store = world["http"], world["a"], world["store"]
    body = {
        "parts": [{"text": "a red car"}, {"scene_id": str(a.scenes[4]), "weight": -0.5}],
        "match_threshold": -1,
        "match_count": 5,
    }
    response = http.post("/v1/search", headers=a.headers(), json=body)
    assert response.status_code == 200, response.text
    parts = [QueryPart("text", "a red car"), QueryPart("scene", a.scenes[4], -0.5)]
    same_hits(
        response.json(),
        store.search_composed(a.id, world["embedder"], parts, threshold=-1, count=5),
    )
    foreign = {"parts": [{"text": "x"}, {"scene_id": str(world["b"].scenes[0])}]}
    assert_error(http.post("/v1/search", headers=a.headers(), json=foreign), 404)


def test_text_embeddings_are_openai_shaped_and_equal_the_runtime(world):
    http, a, embedder = world["http"], world["a"], world["embedder"]
    texts = ["a dog", "two cats on a sofa"]
    body = http.post(
        "/v1/embeddings", headers=a.headers(), json={"input": texts, "model": "whatever"}
    ).json()
    assert body["object"] == "list" and body["model"] == embedder.artifact_id
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    np.testing.assert_allclose(
        [d["embedding"] for d in body["data"]], embedder.embed_texts(texts), atol=1e-6
    )
    tokens = int(np.count_nonzero(embedder.tokenize(texts)))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    one = http.post(
        "/v1/embeddings", headers=a.headers(), json={"input": "a dog", "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, embedder.embed_texts(["a dog"])[0], atol=1e-6)


def test_openais_own_client_works_unchanged(world):
    openai = pytest.importorskip("openai")  # dev extra
    a, embedder = world["a"], world["embedder"]
    client = openai.OpenAI(base_url=world["server"].url + "/v1", api_key=a.key)
    # Its default asks for base64 and decodes it; floats on request.
    for fmt in ({}, {"encoding_format": "float"}):
        got = client.embeddings.create(input=["a dog", "a cat"], model="clip", **fmt)
        np.testing.assert_allclose(
            [d.embedding for d in got.data], embedder.embed_texts(["a dog", "a cat"]), atol=1e-6
        )
        assert got.model == embedder.artifact_id
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=world["server"].url + "/v1", api_key="hck_wrong", max_retries=0
        ).embeddings.create(input="x", model="clip")


def test_image_embeddings(world):
    http, a, embedder = world["http"], world["a"], world["embedder"]
    images = [png(p) for _, p in world["photos"][:3]]
    response = http.post(
        "/v1/embeddings/images",
        headers=a.headers(),
        files=[("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)],
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    np.testing.assert_allclose(
        [d["embedding"] for d in data], embedder.embed_images(images), atol=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
def test_frames_only_for_own_scenes_under_the_media_root(world, kind):
    http, a, b = world["http"], world["a"], world["b"]
    own = http.get(f"/v1/scenes/{a.scenes[0]}/frame", headers=a.headers(kind))
    assert own.status_code == 200 and own.headers["content-type"] == "image/png"
    assert own.content == a.frames[a.scenes[0]].read_bytes()
    assert_error(http.get(f"/v1/scenes/{b.scenes[0]}/frame", headers=a.headers(kind)), 404)
    assert_error(http.get(f"/v1/scenes/{uuid.uuid4()}/frame", headers=a.headers(kind)), 404)
    # A scene of a's whose frame lies outside the media root (or escapes it) is not served.
    store = world["store"]
    for outside in ("/etc/hostname", str(world["media"] / ".." / "escape.png")):
        scene = store.add_scene(a.id, outside)
        assert_error(http.get(f"/v1/scenes/{scene}/frame", headers=a.headers(kind)), 404)


def test_credentials(world):
    http, a = world["http"], world["a"]
    request = {"query": "x"}
    assert_error(http.post("/v1/search/text", json=request), 401)
    for header in ("Basic abc", "Bearer", f"Token {a.key}", "Bearer hck_not-a-key"):
        assert_error(
            http.post("/v1/search/text", json=request, headers={"Authorization": header}), 401
        )
    bad_tokens = {
        "expired": a.token(exp=int(time.time()) - 10),
        "no exp": a.token(exp=None),
        "sub not a UUID": a.token(sub="alice"),
        "wrong secret": __import__("jwt").encode(
            {"sub": str(a.id), "exp": int(time.time()) + 60},
            "another-secret-of-32-bytes-or-more!",
            algorithm="HS256",
        ),
        "malformed": "a.b.c",
        "alg none": __import__("jwt").encode(
            {"sub": str(a.id), "exp": int(time.time()) + 60}, None, algorithm="none"
        ),
    }
    for name, token in bad_tokens.items():
        response = http.post(
            "/v1/search/text", json=request, headers={"Authorization": f"Bearer {token}"}
        )
        assert_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer", name
    expired = http.post(
        "/v1/search/text",
        json=request,
        headers={"Authorization": f"Bearer {bad_tokens['expired']}"},
    )
    assert "expired" in expired.json()["error"]["message"]


def test_a_revoked_key_stops_working_at_once(world):
    pool, a = world["pool"], world["a"]
    key, stored = create_key(pool, a.id, "temporary")
    headers = {"Authorization": f"Bearer {key}"}
    assert (
        world["http"].post("/v1/search/text", json={"query": "x"}, headers=headers).status_code
        == 200
    )
    revoke_key(pool, stored.id)
    assert_error(world["http"].post("/v1/search/text", json={"query": "x"}, headers=headers), 401)
    listed = {k.id: k for k in list_keys(pool, a.id)}
    assert listed[stored.id].revoked_at is not None
    assert key not in repr(listed[stored.id])  # only the hash is stored


def test_a_bad_image_gets_422_with_the_runtimes_reason_and_spares_its_batch(world):
    http, a, embedder = world["http"], world["a"], world["embedder"]
    bad = b"\x89PNG\r\n\x1a\n but not really"
    with pytest.raises(ImageError) as expected:
        embedder.embed_images([bad])
    response = http.post(
        "/v1/search/image", headers=a.headers(), files={"image": ("bad.png", bad, "image/png")}
    )
    assert assert_error(response, 422)["error"]["message"] == str(expected.value)
    # Good and bad images in one embeddings call share a batch; the bad one fails the call
    # with its reason, and a good request at the same time is not affected.
    good = png(world["photos"][0][1])
    import concurrent.futures as cf

    def search(data):
        return http.post(
            "/v1/search/image", headers=a.headers(), files={"image": ("i.png", data, "image/png")}
        ).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(search, [good, bad] * 4))
    assert codes == [200, 422] * 4


def test_413_is_answered_before_the_body_is_read(world):
    limit = world["embedder"].config.max_image_bytes
    server = world["server"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v1/search/image HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {world['a'].key}\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\n"
                f"Content-Length: {limit * 2}\r\n\r\n"
            ).encode()
        )
        # No body was sent: an answer at all means the body was not read.
        answer = b""
        while b"}}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413")
    assert '"code":413' in answer.replace(" ", "")


def test_json_errors_for_bad_requests(world):
    http, a = world["http"], world["a"]
    assert_error(
        http.post("/v1/search/text", headers=a.headers(), json={"query": "x", "match_count": 201}),
        422,
    )
    assert_error(
        http.post(
            "/v1/search/text", headers=a.headers(), json={"query": "x", "match_threshold": 2}
        ),
        422,
    )
    assert_error(
        http.post(
            "/v1/search/text",
            content=b"{not json",
            headers={**a.headers(), "Content-Type": "application/json"},
        ),
        422,
    )
    assert_error(
        http.post(
            "/v1/search",
            headers=a.headers(),
            json={"parts": [{"text": "x", "scene_id": str(a.scenes[0])}]},
        ),
        422,
    )
    assert_error(http.get("/v1/nothing-here", headers=a.headers()), 404)


def test_health_readiness_and_metrics(world):
    http = world["http"]
    assert http.get("/healthz").json() == {"status": "ok", "model": None, "checks": {}}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"model": "ok", "database": "ok"}
    text = http.get("/metrics").text
    assert 'heimdex_clip_http_requests_total{route="/v1/search/image",status="200"}' in text
    assert 'heimdex_clip_http_requests_total{route="/v1/search/scene",status="404"}' in text
    assert 'heimdex_clip_batch_size_count{kind="image"}' in text
    assert "heimdex_clip_queue_depth" in text and "heimdex_clip_inference_seconds" in text


def test_readyz_says_not_ready_on_a_database_that_is_not_migrated(db_url, embedder, world):
    from heimdex_clip.db.connection import open_pool

    pool = open_pool(db_url)
    try:
        with serve(pool, embedder, world["media"]) as server, client(server) as http:
            response = http.get("/readyz")
            assert response.status_code == 503
            assert response.json()["checks"]["database"].startswith("missing migrations")
    finally:
        pool.close()


def test_overload_and_deadline(world, embedder):
    from heimdex_clip import ClipEmbedder

    pool, a = world["pool"], world["a"]
    images = [
        ("image", (f"{i}.png", png(p), "image/png")) for i, (_, p) in enumerate(world["photos"][:3])
    ]
    with serve(pool, embedder, world["media"], max_queue=2) as server, client(server) as http:
        refused = http.post("/v1/embeddings/images", headers=a.headers(), files=images)
        assert_error(refused, 503)
        assert int(refused.headers["retry-after"]) >= 1
        assert (
            http.post("/v1/embeddings/images", headers=a.headers(), files=images[:2]).status_code
            == 200
        )
        # A full queue refuses a search at once, before its body is read: the request
        # below announces a body it never sends.
        batcher = server.app.state.service.batcher
        batcher._queued = batcher.max_queue  # as if two inputs were waiting
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(
                    (
                        f"POST /v1/search/image HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: Bearer {a.key}\r\n"
                        f"Content-Type: multipart/form-data; boundary=b\r\n"
                        f"Content-Length: 100000\r\n\r\n"
                    ).encode()
                )
                answer = b""
                while b"}}" not in answer and (chunk := sock.recv(65536)):
                    answer += chunk
        finally:
            batcher._queued = 0
        head, _, body = answer.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 503") and "retry-after: 1" in head.lower()
        assert '"code": 503' in body or '"code":503' in body
    hurried = ClipEmbedder(config=embedder.config.replace(timeout_s=0.001)).load()
    with serve(pool, hurried, world["media"]) as server, client(server) as http:
        late = http.post(
            "/v1/search/image",
            headers=a.headers(),
            files={"image": ("i.png", png(world["photos"][0][1]), "image/png")},
        )
        assert_error(late, 504)
