"""The TypeScript client (clients/typescript) against a live service, under Node.

Checks that the committed OpenAPI document and generated types are the service's current
ones, compiles the client with tsc, runs the design's calls (``searchByImage``,
``searchSimilarScenes``, ``searchByText``) under Node and compares their results with the
Python API's on the same database.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from heimdex_clip.db.store import SceneStore

from .serve_helpers import add_owner, client, distinct, patient_embedder, png, serve

pytestmark = [pytest.mark.db, pytest.mark.slow]


@pytest.fixture(scope="module")
def embedder(artifact_dir):
    return patient_embedder(artifact_dir)


CLIENT = Path(__file__).resolve().parents[2] / "clients" / "typescript"


def npm(*args: str, cwd: Path = CLIENT) -> str:
    run = subprocess.run(["npm", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"npm {' '.join(args)} failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout


@pytest.fixture(scope="module")
def toolchain():
    """node_modules from the committed lock file (npm ci), once."""
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is not installed (Node 20 is required)"
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    assert int(version.lstrip("v").split(".")[0]) >= 20, version
    lock = CLIENT / "package-lock.json"
    stamp = CLIENT / "node_modules" / ".package-lock.json"
    if not stamp.is_file() or stamp.stat().st_mtime < lock.stat().st_mtime:
        npm("ci", "--no-audit", "--no-fund")
    return CLIENT / "node_modules" / ".bin"


def test_the_typescript_client_gives_the_python_results(
    module_pool, embedder, photos, toolchain, tmp_path
):
    media = Path(tempfile.mkdtemp(prefix="heimdex-ts-media-"))
    a = add_owner(module_pool, embedder, distinct(photos, 5), media, uuid.uuid4())
    b = add_owner(module_pool, embedder, distinct(photos, 2), media, uuid.uuid4())
    store = SceneStore(module_pool)
    image = tmp_path / "query.png"
    image.write_bytes(png(distinct(photos, 2)[1][1]))
    with serve(module_pool, embedder, media) as server:
        with client(server) as http:
            live = http.get("/openapi.json").json()
        # The committed document and types are the service's (regenerate: see README).
        assert live == json.loads((CLIENT / "openapi.json").read_text()), (
            "clients/typescript/openapi.json is stale: regenerate it and src/schema.ts"
        )
        generated = tmp_path / "schema.ts"
        subprocess.run(
            [toolchain / "openapi-typescript", str(CLIENT / "openapi.json"), "-o", str(generated)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        assert generated.read_text() == (CLIENT / "src" / "schema.ts").read_text()
        compiled = tmp_path / "dist"
        tsc = subprocess.run(
            [toolchain / "tsc", "-p", str(CLIENT), "--outDir", str(compiled)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert tsc.returncode == 0, tsc.stdout + tsc.stderr
        env = {
            **os.environ,
            "HEIMDEX_URL": server.url,
            "HEIMDEX_KEY": a.key,
            "HEIMDEX_IMAGE": str(image),
            "HEIMDEX_SCENE": str(a.scenes[2]),
            "HEIMDEX_TEXT": "a bowl of coffee",
            "HEIMDEX_FOREIGN_SCENE": str(b.scenes[0]),
        }
        run = subprocess.run(
            ["node", str(CLIENT / "test" / "run.mjs"), str(compiled / "index.js")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    shutil.rmtree(media, ignore_errors=True)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout)
    artifact = embedder.artifact_id
    expected = {
        "image": store.search_by_image(a.id, embedder, image, threshold=-1, count=20),
        "scene": store.search_similar(a.id, a.scenes[2], artifact=artifact, threshold=-1),
        "text": store.search_by_text(a.id, embedder, "a bowl of coffee", threshold=-1),
    }
    for name, hits in expected.items():
        assert [r["scene_id"] for r in out[name]] == [str(h.id) for h in hits], name
        np.testing.assert_allclose(
            [r["similarity"] for r in out[name]], [h.similarity for h in hits], atol=1e-6
        )
    assert out["image"][0]["scene_id"] == str(a.scenes[1])
    # Another owner's scene: the client raises with the service's 404.
    assert out["foreign"] == {"status": 404, "message": f"scene {b.scenes[0]} not found"}
