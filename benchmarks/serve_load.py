"""Load run of the search service on loopback (``heimdex-clip serve`` in a subprocess).

    python benchmarks/serve_load.py --artifact models/ViT-B-32__none [--seconds 8]

* text search and image search at 1, 8, 32 and 64 concurrent clients (closed loop, each
  level bounded by --seconds and --max-requests; a client refused with 503 waits its
  Retry-After, at most 1 s, as a polite client does): requests/s answered 200, p50/p99
  latency of those, every status counted;
* batching efficiency: the service's image throughput at 32 clients / the in-process
  ``embed_images`` throughput at batch 32 on the same PNG bytes, measured in this run
  (target >= 0.8);
* overload: open-loop arrivals at 4x the measured sustainable image rate: only 503s with
  Retry-After may be refused, accepted requests must keep p99 under CLIP_TIMEOUT_S, and
  the server's RSS is sampled throughout.

The service runs with CLIP_BATCH_SIZE=32 on a fresh database of the embedded PostgreSQL
(--scenes random unit vectors for one owner) with CLIP_TIMEOUT_S=--timeout. Results go to
benchmarks/results/serve_load.json.
The load generator (httpx, asyncio) shares the machine's cores with the service.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psycopg
from PIL import Image

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.db.api_keys import create_key
from heimdex_clip.db.connection import open_pool, start_embedded
from heimdex_clip.db.migrate import migrate
from heimdex_clip.db.store import SceneStore
from heimdex_clip.session import cpu_features

REPO = Path(__file__).resolve().parents[1]
QUERIES = [
    "sunset over the sea",
    "a red car at night",
    "a cat sleeping on a sofa",
    "people dancing at a wedding",
    "snow covered mountains",
    "a crowded train station",
]
LEVELS = (1, 8, 32, 64)
RETRY_CAP_S = 1.0  # closed-loop clients wait Retry-After (at most this) after a 503


def query_image() -> bytes:
    """A 640x480 photo-like JPEG (smooth gradients and noise), as uploads would be."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x / 640 * 255, y / 480 * 255, (x + y) / 1120 * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def seed(url: str, embedder: ClipEmbedder, scenes: int) -> tuple[str, str]:
    """One owner with ``scenes`` random unit vectors of the artifact; (owner, API key)."""
    pool = open_pool(url, max_size=2)
    try:
        migrate(pool)
        owner = uuid.uuid4()
        rng = np.random.default_rng(1)
        vectors = rng.standard_normal((scenes, embedder.embed_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store = SceneStore(pool)
        for i, vector in enumerate(vectors):
            store.upsert_scene(owner, f"/frames/{i}.jpg", vector, {}, artifact=embedder.artifact_id)
        return str(owner), create_key(pool, owner, "load test")[0]
    finally:
        pool.close()


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


class Load:
    """Requests against the service; latencies of 200s and counts of every status."""

    def __init__(self, url: str, key: str, image: bytes) -> None:
        self.url, self.image = url, image
        self.headers = {"Authorization": f"Bearer {key}"}

    async def one(
        self, http: httpx.AsyncClient, kind: str, i: int
    ) -> tuple[int, float, str | None]:
        started = time.perf_counter()
        try:
            if kind == "text":
                r = await http.post(
                    "/v1/search/text",
                    headers=self.headers,
                    json={"query": QUERIES[i % len(QUERIES)]},
                )
            else:
                r = await http.post(
                    "/v1/search/image",
                    headers=self.headers,
                    files={"image": ("q.jpg", self.image, "image/jpeg")},
                )
            status, retry = r.status_code, r.headers.get("retry-after")
        except httpx.HTTPError:
            status, retry = 0, None
        return status, time.perf_counter() - started, retry

    async def closed_loop(self, kind: str, clients: int, seconds: float, max_requests: int) -> dict:
        results: list[tuple[int, float, str | None]] = []
        stop = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as http:

            async def client(c: int) -> None:
                i = c
                while time.perf_counter() < stop and len(results) < max_requests:
                    results.append(await self.one(http, kind, i))
                    i += clients
                    if results[-1][2] is not None:  # a polite client honours Retry-After
                        await asyncio.sleep(min(float(results[-1][2]), RETRY_CAP_S))

            started = time.perf_counter()
            await asyncio.gather(*(client(c) for c in range(clients)))
            elapsed = time.perf_counter() - started
        return summarize(results, elapsed) | {"clients": clients, "kind": kind}

    async def open_loop(self, rate: float, seconds: float, rss) -> dict:
        """Arrivals at ``rate``/s regardless of answers (what a real overload looks like)."""
        results: list[tuple[int, float, str | None]] = []
        rss_samples: list[int] = []
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as http:
            tasks = []
            started = time.perf_counter()
            n = 0
            while (now := time.perf_counter()) - started < seconds:
                due = started + n / rate
                if now < due:
                    await asyncio.sleep(due - now)
                tasks.append(asyncio.create_task(self.one(http, "image", n)))
                n += 1
                if n % max(1, int(rate / 4)) == 0:
                    rss_samples.append(rss())
            results = list(await asyncio.gather(*tasks))
            elapsed = time.perf_counter() - started
        rss_samples.append(rss())
        out = summarize(results, elapsed)
        out["offered_rps"] = round(rate, 1)
        out["rss_mb_max"] = round(max(rss_samples) / 1e6, 1)
        return out


def summarize(results: list[tuple[int, float, str | None]], elapsed: float) -> dict:
    ok = [t for s, t, _ in results if s == 200]
    statuses: dict[str, int] = {}
    for s, _, _ in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    refused = [r for r in results if r[0] == 503]
    return {
        "requests": len(results),
        "seconds": round(elapsed, 2),
        "ok_rps": round(len(ok) / elapsed, 1),
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "statuses": statuses,
        "errors": len(results) - len(ok),
        "refused_without_retry_after": sum(1 for r in refused if r[2] is None),
    }


def in_process_throughput(embedder: ClipEmbedder, image: bytes, repeats: int = 5) -> float:
    """Images/s of ``embed_images`` at batch 32 (decode + preprocess + model), best run."""
    batch = [image] * 32
    embedder.embed_images(batch, batch_size=32)  # warm-up
    best = min(_timed(lambda: embedder.embed_images(batch, batch_size=32)) for _ in range(repeats))
    return 32 / best


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def rss_of(pid: int):
    def read() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    return read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=8.0, help="per level")
    parser.add_argument("--max-requests", type=int, default=600, help="per level")
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        help="the service's CLIP_TIMEOUT_S (the runtime's default: 2)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/serve_load.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    config = ClipConfig.from_env().replace(model_dir=args.artifact, batch_size=32)
    embedder = ClipEmbedder(config=config).load()
    image = query_image()
    data = Path(tempfile.mkdtemp(prefix="heimdex-serve-load-")) / "pgdata"
    server_url = start_embedded(data)
    name = f"load_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    _, key = seed(url, embedder, args.scenes)

    port = 18000 + os.getpid() % 1000
    env = {
        **os.environ,
        "CLIP_BATCH_SIZE": "32",
        "CLIP_MODEL_DIR": str(args.artifact),
        "CLIP_TIMEOUT_S": str(args.timeout),
        "PYTHONPATH": f"{REPO / 'runtime'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "heimdex_clip.cli",
            "serve",
            "--database-url",
            url,
            "--port",
            str(port),
        ],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the service did not become ready")
            time.sleep(0.3)
        rss = rss_of(server.pid)
        rss_idle = rss()
        in_process = in_process_throughput(embedder, image)
        load = Load(base, key, image)
        levels = []
        for kind in ("text", "image"):
            for clients in LEVELS:
                row = asyncio.run(load.closed_loop(kind, clients, args.seconds, args.max_requests))
                print(json.dumps(row), flush=True)
                levels.append(row)
        image_32 = next(r for r in levels if r["kind"] == "image" and r["clients"] == 32)
        sustainable = max(r["ok_rps"] for r in levels if r["kind"] == "image")
        overload = asyncio.run(load.open_loop(4 * sustainable, args.overload_seconds, rss))
        print(json.dumps(overload), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    timeout_s = args.timeout
    statuses = set(overload["statuses"])
    result = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "cpu": cpu_features()["cpu_model"],
            "logical_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_before_after": [
                round(load_before[0], 1),
                round(os.getloadavg()[0], 1),
            ],
            "note": "shared with other jobs during the run: figures are noisy",
        },
        "artifact": embedder.artifact_id,
        "clip_batch_size": 32,
        "clip_timeout_s": timeout_s,
        "levels": levels,
        "batching": {
            "in_process_images_per_s": round(in_process, 1),
            "service_images_per_s_at_32": image_32["ok_rps"],
            "efficiency": round(image_32["ok_rps"] / in_process, 3),
            "target": 0.8,
        },
        "overload": overload
        | {
            "rss_mb_idle": round(rss_idle / 1e6, 1),
            "only_503_refused": statuses <= {"200", "503"},
            "every_503_has_retry_after": overload["refused_without_retry_after"] == 0,
            "accepted_p99_under_timeout": (overload["p99_ms"] or 0) < timeout_s * 1000,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["batching"]), json.dumps(result["overload"]), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
