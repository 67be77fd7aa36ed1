"""The image as the search service (make docker-test): ``docker run ... serve``.

The container runs ``heimdex-clip serve --migrate`` against a PostgreSQL on the host's
loopback (the image has no embedded server), on the host's network bound to 127.0.0.1,
frames mounted read-only as its media root. A key is created and a folder indexed with the
image's own CLI (docker exec); then, over HTTP from the host: /readyz, an image search that
must find its own frame first, the frame route, and a 401 for a wrong key.

Prints one ``PASS``/``FAIL`` line per check; exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from docker_worker_check import tcp_postgres  # a sibling script (scripts/ is on sys.path)
from PIL import Image

NAME = "heimdex-clip-test-serve"
results = {"PASS": 0, "FAIL": 0}


def check(ok: bool, name: str, detail: str = "") -> bool:
    status = "PASS" if ok else "FAIL"
    results[status] += 1
    print(f"{status} {name}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    frames = args.work / "serve-frames"
    frames.mkdir(parents=True, exist_ok=True)
    frames.chmod(0o755)
    rng = np.random.default_rng(26)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(
            frames / name, quality=90
        )
        (frames / name).chmod(0o644)
    # The image has no embedded server (the client only): a PostgreSQL on the host's
    # loopback, as the worker check uses, reached over the host network.
    with tcp_postgres() as url:
        return serve_checks(args.image, frames, url)


def serve_checks(image: str, frames: Path, database_url: str) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    owner = str(uuid.uuid4())
    docker("rm", "-f", NAME)
    run = docker(
        "run",
        "-d",
        "--name",
        NAME,
        "--network=host",
        "--tmpfs",
        "/tmp",
        "-v",
        f"{frames}:/frames:ro",
        "-e",
        f"CLIP_SERVE_PORT={port}",
        "-e",
        f"DATABASE_URL={database_url}",
        "-e",
        "CLIP_SERVE_MEDIA_ROOT=/frames",
        image,
        "serve",
        "--migrate",
    )
    if not check(run.returncode == 0, "serve: the container starts", run.stderr.strip()):
        return 1
    base = f"http://127.0.0.1:{port}"
    try:
        ready, deadline = None, time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        logs = docker("logs", "--tail", "20", NAME)
        if not check(
            ready is not None and ready.status_code == 200,
            "serve: /readyz answers ready (model loaded, database migrated)",
            ready.text if ready is not None else logs.stderr[-800:],
        ):
            return 1
        created = docker(
            "exec", NAME, "heimdex-clip", "db", "api-key", "create", "--owner", owner, "-q"
        )
        key = created.stdout.strip()
        check(
            created.returncode == 0 and key.startswith("hck_"),
            "serve: `db api-key create` in the container prints a key",
            created.stderr[-300:],
        )
        indexed = docker("exec", NAME, "heimdex-clip", "index", "/frames", "--owner", owner, "-q")
        check(
            indexed.returncode == 0,
            "serve: `index /frames` in the container",
            indexed.stdout.strip() + indexed.stderr[-300:],
        )
        headers = {"Authorization": f"Bearer {key}"}
        query = (frames / "b.jpg").read_bytes()
        found = httpx.post(
            f"{base}/v1/search/image",
            headers=headers,
            timeout=60,
            files={"image": ("b.jpg", query, "image/jpeg")},
            data={"match_threshold": "-1"},
        )
        hits = found.json().get("results", []) if found.status_code == 200 else []
        check(
            bool(hits)
            and hits[0]["frame_path"] == "/frames/b.jpg"
            and hits[0]["similarity"] > 0.999
            and len(hits) == 3,
            "serve: an image search over HTTP finds its own frame first",
            f"{found.status_code} {found.text[:300]}",
        )
        if hits:
            frame = httpx.get(
                f"{base}/v1/scenes/{hits[0]['scene_id']}/frame", headers=headers, timeout=30
            )
            check(
                frame.status_code == 200 and frame.content == query,
                "serve: the frame route serves the scene's frame from the media root",
                str(frame.status_code),
            )
        wrong = httpx.post(
            f"{base}/v1/search/text",
            json={"query": "x"},
            timeout=30,
            headers={"Authorization": "Bearer hck_wrong"},
        )
        check(
            wrong.status_code == 401 and wrong.json()["error"]["code"] == 401,
            "serve: a wrong key gets 401 with a JSON error",
            wrong.text[:200],
        )
    finally:
        docker("rm", "-f", NAME)
    print(f"serve checks finished: {results['PASS']} passed, {results['FAIL']} failed")
    return 1 if results["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
