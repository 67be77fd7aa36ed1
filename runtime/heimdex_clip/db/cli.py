"""Database commands of ``heimdex-clip``: db migrate, index, search, backfill, stats."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..config import ClipConfig
from ..embedder import ClipEmbedder
from .backfill import count_pending, run_backfill
from .connection import database
from .migrate import migrate
from .report import render_results
from .stats import clip_stats, format_stats
from .store import SceneStore, SearchHit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"}


def _embedder(args: argparse.Namespace) -> ClipEmbedder:
    return ClipEmbedder(model_dir=args.model_dir, config=ClipConfig.from_env()).load()


def _db(args: argparse.Namespace):
    return database(args.database_url, data_dir=args.pg_data)


def image_files(folder: Path) -> list[Path]:
    """Image files in ``folder`` (recursively), in a stable order."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a directory")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


def index_folder(store: SceneStore, embedder: ClipEmbedder, folder: Path,
                 owner: uuid.UUID, *, batch: int = 16, progress: bool = True) -> dict:
    """One scene per image in ``folder``: embed in batches and upsert each with its metadata."""
    files = image_files(folder)
    done = failed = 0
    with tqdm(total=len(files), unit="frame", disable=not progress, desc="indexing") as bar:
        for start in range(0, len(files), batch):
            chunk = [str(p.resolve()) for p in files[start:start + batch]]
            for path, result in zip(chunk, embedder.embed_frames(chunk), strict=True):
                store.upsert_scene(owner, path, result.embedding, result.metadata)
                done += result.ok
                failed += not result.ok
            bar.update(len(chunk))
    return {"frames": len(files), "embedded": done, "failed": failed}


def print_hits(hits: Sequence[SearchHit], out=sys.stdout) -> None:
    if not hits:
        print("no scene above the threshold", file=out)
        return
    print(f"{'rank':>4}  {'similarity':>10}  {'scene id':36}  frame", file=out)
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>4}  {hit.similarity:>10.4f}  {hit.id!s:36}  {hit.frame_path}", file=out)


def cmd_migrate(args: argparse.Namespace) -> int:
    with _db(args) as pool:
        applied = migrate(pool)
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    embedder = _embedder(args)
    with _db(args) as pool:
        migrate(pool)
        summary = index_folder(SceneStore(pool), embedder, Path(args.folder), args.owner,
                               batch=args.batch, progress=not args.quiet)
    print(f"indexed {summary['embedded']} of {summary['frames']} frames "
          f"({summary['failed']} failed) for owner {args.owner}")
    return 0 if summary["failed"] == 0 else 1


def cmd_search(args: argparse.Namespace) -> int:
    with _db(args) as pool:
        store = SceneStore(pool)
        if args.text is not None:
            embedder = _embedder(args)
            hits = store.search_by_text(args.owner, embedder, args.text,
                                        threshold=args.threshold, count=args.count)
            query_label, query_frame = f"text: {args.text}", None
            random_init = embedder.manifest.model.random_init
            if random_init:
                print("note: random-initialisation model: this text ranking is meaningless",
                      file=sys.stderr)
        elif args.image:
            embedder = _embedder(args)
            hits = store.search_by_image(args.owner, embedder, args.image,
                                         threshold=args.threshold, count=args.count)
            query_label, query_frame = f"image {args.image}", args.image
            random_init = embedder.manifest.model.random_init
        else:
            hits = store.search_similar(args.owner, args.scene, threshold=args.threshold,
                                        count=args.count)
            scene = store.get_scene(args.scene) or {}
            query_label, query_frame = f"scene {args.scene}", scene.get("frame_path")
            meta = scene.get("visual_clip_metadata") or {}
            random_init = meta.get("pretrained") == "none"
    if args.json:
        print(json.dumps([{"id": str(h.id), "similarity": h.similarity,
                           "frame_path": h.frame_path} for h in hits], indent=2))
    else:
        print_hits(hits)
    if args.html:
        warning = ("Random-initialisation model: similarities are not semantic."
                   if random_init else None)
        Path(args.html).write_text(render_results(query_label, query_frame, hits,
                                                  warning=warning), encoding="utf-8")
        print(f"wrote {args.html}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    embedder = _embedder(args)
    with _db(args) as pool:
        total = count_pending(pool, args.owner)
        if args.limit is not None:
            total = min(total, args.limit)
        with tqdm(total=total, unit="scene", disable=args.quiet, desc="backfill") as bar:
            report = run_backfill(pool, embedder, owner_id=args.owner, batch_size=args.batch,
                                  limit=args.limit, on_batch=bar.update)
    print(f"backfill: {report.embedded} embedded, {report.failed} failed, "
          f"{report.batches} batches")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _db(args) as pool:
        stats = clip_stats(pool, args.owner)
    print(json.dumps(stats.to_dict(), indent=2) if args.json else format_stats(stats))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the database commands to the main ``heimdex-clip`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=None,
                        help="PostgreSQL URL (default: $DATABASE_URL, else the embedded server)")
    common.add_argument("--pg-data", type=Path, default=None,
                        help="embedded server data directory (default: $HEIMDEX_PG_DATA)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("migrate", parents=[common],
                      help="apply pending SQL migrations").set_defaults(func=cmd_migrate)

    index = sub.add_parser("index", parents=[common], help="embed and store a folder of frames")
    index.add_argument("folder")
    index.add_argument("--owner", type=uuid.UUID, required=True)
    index.add_argument("--batch", type=int, default=16)
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", parents=[common], help="owner-scoped visual search")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="query image file")
    query.add_argument("--text", help="query text (needs an artifact with a text tower)")
    query.add_argument("--scene", type=uuid.UUID, help="query scene id (similar scenes)")
    search.add_argument("--owner", type=uuid.UUID, required=True)
    search.add_argument("--threshold", type=float, default=0.0)
    search.add_argument("--count", type=int, default=20)
    search.add_argument("--html", help="write a self-contained HTML page of the results")
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)

    backfill = sub.add_parser("backfill", parents=[common],
                              help="embed scenes whose embedding is NULL (parallel-safe)")
    backfill.add_argument("--owner", type=uuid.UUID, default=None)
    backfill.add_argument("--batch", type=int, default=16)
    backfill.add_argument("--limit", type=int, default=None)
    backfill.set_defaults(func=cmd_backfill)

    stats = sub.add_parser("stats", parents=[common], help="the four monitoring figures")
    stats.add_argument("--owner", type=uuid.UUID, default=None)
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)
