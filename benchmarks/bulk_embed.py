"""Bulk embedding throughput: the plain backfill worker vs Ray Data with 1 and 2 actors.

The same frames (crops of scikit-image's photographs, saved as JPEG), a fresh database on
the embedded PostgreSQL for each run, the same artifact, in one process run:

    python benchmarks/bulk_embed.py --artifact models/ViT-B-32__none [--frames 256]

Wall time covers claiming, decoding, embedding and writing every vector (Ray's start-up is
timed apart: a cluster pays it once). Results: benchmarks/results/bulk_embed.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

from bench_utils import machine_info, write_results

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.db.backfill import Policy, Scope, run_backfill
from heimdex_clip.db.bulk import BulkOptions, bulk_embed
from heimdex_clip.db.connection import open_pool, start_embedded
from heimdex_clip.db.migrate import migrate
from heimdex_clip.db.store import SceneStore

ALL = Scope(all_owners=True)
#: A throughput run, not a latency one: a per-frame deadline that a loaded machine cannot
#: trip, so every path embeds every frame (a timed-out frame would count as not done).
TIMEOUT_S = 120.0


def make_frames(folder: Path, count: int) -> list[Path]:
    """``count`` distinct 640x480 JPEG frames cut from real photographs."""
    from PIL import Image
    from skimage import data

    photos = [
        Image.fromarray(getattr(data, n)()).convert("RGB")
        for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
    ]
    frames = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        dx, dy = (i * 7) % (w // 4), (i * 5) % (h // 4)
        path = folder / f"frame_{i:05d}.jpg"
        photo.crop((dx, dy, dx + 3 * w // 4, dy + 3 * h // 4)).resize((640, 480)).save(
            path, quality=90
        )
        frames.append(path)
    return frames


def fresh_database(server: str, frames: list[Path]):
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    pool = open_pool(psycopg.conninfo.make_conninfo(server, dbname=name), max_size=4)
    migrate(pool)
    store, owner = SceneStore(pool), uuid.uuid4()
    for path in frames:
        store.add_scene(owner, str(path))
    return pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    frames = make_frames(work, args.frames)
    server = start_embedded(work / "pgdata")
    rows = []

    pool = fresh_database(server, frames)
    embedder = ClipEmbedder(
        config=ClipConfig(
            pretrained="none", model_dir=args.artifact, cpu_threads=cores, timeout_s=TIMEOUT_S
        )
    ).load()
    started = time.perf_counter()
    report = run_backfill(pool, embedder, ALL, policy=Policy(batch_size=32))
    seconds = time.perf_counter() - started
    rows.append(
        {
            "how": f"backfill worker, 1 process x {cores} threads",
            "seconds": seconds,
            "embedded": report.embedded,
            "failed": report.failed,
            "frames_per_s": report.embedded / seconds,
        }
    )
    pool.close()
    embedder.close()

    from heimdex_clip.ray import init_ray

    started = time.perf_counter()
    init_ray(num_cpus=cores)
    ray_start_s = time.perf_counter() - started
    for actors in (1, 2):
        pool = fresh_database(server, frames)
        options = BulkOptions(
            actors=actors,
            cpus_per_actor=cores / actors,
            batch_size=32,
            settings={"timeout_s": TIMEOUT_S},
        )
        report = bulk_embed(pool, args.artifact, ALL, options)
        rows.append(
            {
                "how": f"Ray Data, {actors} actor(s) x {cores // actors} threads",
                "seconds": report.seconds,
                "embedded": report.embedded,
                "failed": report.failed,
                "frames_per_s": report.embedded / report.seconds,
            }
        )
        pool.close()

    base = rows[0]["frames_per_s"]
    table = (
        "| how | embedded | failed | seconds | frames/s | vs backfill |\n"
        "|---|---|---|---|---|---|\n"
        + "".join(
            f"| {r['how']} | {r['embedded']} | {r['failed']} | {r['seconds']:.1f} | "
            f"{r['frames_per_s']:.1f} | {r['frames_per_s'] / base:.2f}x |\n"
            for r in rows
        )
        + f"\nRay start-up (local, once): {ray_start_s:.1f} s. Frames: {args.frames} "
        "JPEG 640x480 crops of real photographs. Load average at start: "
        f"{os.getloadavg()[0]:.1f}.\n"
    )
    write_results(
        args.out,
        "bulk_embed",
        {
            "machine": machine_info(cores),
            "rows": rows,
            "ray_start_s": ray_start_s,
            "artifact": str(args.artifact),
        },
        table,
    )


if __name__ == "__main__":
    main()
