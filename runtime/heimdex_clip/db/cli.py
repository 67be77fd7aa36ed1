"""Database commands of ``heimdex-clip``: db migrate/promote/prune, index, search, backfill,
stats. Every failure is one line on stderr with a non-zero exit code.

Without DATABASE_URL (or ``--database-url``) the commands use the embedded PostgreSQL, and
say so. Data commands never change the schema: on a database that is not migrated they
say "run `heimdex-clip db migrate`".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from psycopg_pool import ConnectionPool
from tqdm import tqdm

from ..config import ClipConfig
from ..embedder import ClipEmbedder
from ..query import QueryPart
from . import args as cli_args
from . import key_cli
from .backfill import Policy, Scope, count_pending, run_backfill
from .connection import DatabaseError, database, describe, resolve_url
from .errors import InvalidInputError, database_errors
from .migrate import migrate, require_schema
from .report import check_page_target, render_results, write_page
from .search_index import (
    DEFAULT_KIND,
    BuildOptions,
    describe_search_index,
    set_ef_search,
    set_exact_max_rows,
    switch_search_index,
)
from .stats import clip_stats, format_stats
from .store import SceneStore, SearchHit
from .upgrade import attribute_legacy, promote, prune
from .validate import check_metadata, check_vector
from .worker import FollowOptions, follow

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"}


def _embedder(args: argparse.Namespace, *, default_threads: int | None = None) -> ClipEmbedder:
    """The embedder of CLIP_*; ``default_threads`` intra-op threads if CLIP_CPU_THREADS is
    unset."""
    config = ClipConfig.from_env()
    if config.cpu_threads is None and default_threads is not None:
        config = dataclasses.replace(config, cpu_threads=default_threads)
    return ClipEmbedder(model_dir=args.model_dir, config=config).load()


@contextmanager
def _db(args: argparse.Namespace, *, schema: bool = True) -> Iterator[ConnectionPool]:
    """A pool on the chosen database, announced on stderr; unless ``schema`` is False,
    refused (naming the fix) when the database is not fully migrated."""
    url = resolve_url(args.database_url, embedded=True, data_dir=args.pg_data)
    if not args.quiet:
        where = (
            "--database-url"
            if args.database_url
            else "DATABASE_URL"
            if os.environ.get("DATABASE_URL")
            else "embedded PostgreSQL"
        )
        print(f"database: {where} ({describe(url)})", file=sys.stderr)
    with database(url) as pool:
        if schema:
            require_schema(pool)
        yield pool


def _scope(args: argparse.Namespace) -> Scope:
    if args.owner is None and not args.all_owners:
        raise DatabaseError("say whose scenes: --owner UUID, or --all-owners")
    if args.owner is not None and args.all_owners:
        raise DatabaseError("--owner and --all-owners exclude each other")
    return Scope(owner_id=args.owner, all_owners=args.all_owners)


def image_files(folder: Path) -> list[Path]:
    """Image files in ``folder`` (recursively), in a stable order."""
    if not folder.is_dir():
        raise DatabaseError(f"{folder} is not a directory")
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _storable(path: Path) -> str | None:
    """The path as text the database can store, or None (not valid UTF-8)."""
    text = str(path.resolve())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def index_folder(
    store: SceneStore,
    embedder: ClipEmbedder,
    folder: Path,
    owner: uuid.UUID,
    *,
    batch: int = 16,
    progress: bool = True,
) -> dict:
    """One scene per image in ``folder``: embed in batches and upsert each with its metadata.

    A file whose name is not valid UTF-8 cannot be stored as text: it is reported and
    skipped, never aborting the folder.
    """
    files = image_files(folder)
    summary = {"frames": len(files), "embedded": 0, "failed": 0, "skipped": 0}
    with tqdm(total=len(files), unit="frame", disable=not progress, desc="indexing") as bar:
        for start in range(0, len(files), batch):
            chunk = []
            for path in files[start : start + batch]:
                if (text := _storable(path)) is None:
                    summary["skipped"] += 1
                    print(
                        f"skipped {os.fsencode(path)!r}: file name is not valid UTF-8 "
                        "(rename it to index it)",
                        file=sys.stderr,
                    )
                else:
                    chunk.append(text)
            for stored, result in zip(chunk, embedder.embed_frames(chunk), strict=True):
                embedding, metadata = result.embedding, result.metadata
                try:
                    check_vector(embedding) if embedding is not None else None
                    check_metadata(metadata)
                except InvalidInputError as exc:  # stored as a failure, never as a vector
                    embedding, metadata = (
                        None,
                        {"frame_path": stored, "error": f"{type(exc).__name__}: {exc}"},
                    )
                store.upsert_scene(
                    owner, stored, embedding, metadata, artifact=embedder.artifact_id
                )
                summary["embedded" if embedding is not None else "failed"] += 1
            bar.update(len(files[start : start + batch]))
    return summary


def print_hits(hits: Sequence[SearchHit], out=sys.stdout) -> None:
    if not hits:
        print("no scene above the threshold", file=out)
        return
    print(f"{'rank':>4}  {'similarity':>10}  {'scene id':36}  frame", file=out)
    for rank, hit in enumerate(hits, 1):
        where = (
            f"  (video {hit.video_id} {hit.start_s:.2f}-{hit.end_s:.2f} s)"
            if hit.video_id and hit.start_s is not None and hit.end_s is not None
            else ""
        )
        print(
            f"{rank:>4}  {hit.similarity:>10.4f}  {hit.id!s:36}  {hit.frame_path}{where}", file=out
        )


def cmd_migrate(args: argparse.Namespace) -> int:
    with _db(args, schema=False) as pool:
        applied = migrate(pool, lock_timeout_s=args.lock_timeout)
        kind = describe_search_index(pool)["kind"]
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    if kind != DEFAULT_KIND:
        print(
            f"search index: {kind}; `heimdex-clip db search-index {DEFAULT_KIND}` builds the "
            "default (half the size) without blocking writes (docs/scale.md)"
        )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    artifact = args.artifact or _embedder(args).artifact_id
    with _db(args) as pool:
        swapped = promote(pool, artifact, _scope(args))
    print(f"promoted {artifact}: {swapped} scenes now hold it in their first slot")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    embedder = _embedder(args)
    with _db(args) as pool:
        compared, attributed = attribute_legacy(pool, embedder, _scope(args), sample=args.sample)
    print(
        f"attributed {attributed} pre-provenance vectors to {embedder.artifact_id} "
        f"({compared} frames re-embedded matched)"
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    with _db(args) as pool:
        pruned = prune(pool, args.artifact, _scope(args))
    print(f"pruned {pruned} vectors of {args.artifact}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    embedder = _embedder(args)
    with _db(args) as pool:
        summary = index_folder(
            SceneStore(pool),
            embedder,
            Path(args.folder),
            args.owner,
            batch=args.batch,
            progress=not args.quiet,
        )
    print(
        f"indexed {summary['embedded']} of {summary['frames']} frames "
        f"({summary['failed']} failed, {summary['skipped']} skipped) for owner {args.owner}"
    )
    return 0 if summary["failed"] == summary["skipped"] == 0 else 1


def _video_module():
    """heimdex_clip.db.videos, or a one-line error naming the missing extra."""
    try:
        from . import videos
    except ModuleNotFoundError as exc:
        if exc.name != "av":
            raise
        raise DatabaseError(
            "`heimdex-clip index-video` needs the video extra (PyAV): "
            "pip install 'heimdex-clip[video]'"
        ) from None
    return videos


def cmd_index_video(args: argparse.Namespace) -> int:
    videos = _video_module()
    from ..video import VideoError, VideoSettings
    from ..video.pipeline import model_threads
    from ..video.segments import SegmentSettings

    if args.video_id is not None and len(args.paths) > 1:
        raise DatabaseError("--video-id names one video: give one PATH with it")
    settings = VideoSettings(
        segments=SegmentSettings(window_s=args.window),
        top_k=args.top_k,
        max_analysis_fps=args.analysis_fps,
        threads=args.threads,
    )
    media = args.media_dir or Path(os.environ.get("HEIMDEX_MEDIA_DIR") or "heimdex-media")
    # The model runs beside the decoder: the cores it leaves (unless CLIP_CPU_THREADS says).
    embedder, failed = _embedder(args, default_threads=model_threads(args.threads)), 0
    with _db(args) as pool:
        for path in args.paths:
            try:
                done = videos.index_video(
                    pool,
                    embedder,
                    path,
                    args.owner,
                    media_dir=media,
                    settings=settings,
                    video_id=args.video_id,
                )
            except VideoError as exc:  # one bad file never stops the others
                failed += 1
                print(f"error: {exc}", file=sys.stderr)
                continue
            report = done.report
            if args.json:
                print(
                    json.dumps(
                        {
                            "path": str(path),
                            "video_id": str(done.video_id),
                            "status": done.status,
                            "scenes": done.scenes,
                            "report": report,
                        }
                    )
                )
            else:
                print(
                    f"{path}: {done.status} video {done.video_id}: {done.scenes} scenes"
                    + (
                        f", {report.get('failed_embeddings')} failed"
                        if report.get("failed_embeddings")
                        else ""
                    )
                )
            if report.get("corrupt_packets") or report.get("oversized_frames"):
                print(
                    f"warning: {path}: skipped {report['corrupt_packets']} corrupt packets "
                    f"and {report['oversized_frames']} oversized frames (around "
                    f"{_ranges(report['skipped_ranges_s'])})",
                    file=sys.stderr,
                )
    return 0 if failed == 0 else 1


def _ranges(ranges: list[list[float]]) -> str:
    return ", ".join(f"{a:.1f}-{b:.1f} s" for a, b in ranges) or "unknown times"


def cmd_delete_video(args: argparse.Namespace) -> int:
    videos = _video_module()
    with _db(args) as pool:
        try:
            deleted = videos.delete_video(pool, args.owner, args.video_id)
        except LookupError as exc:
            raise DatabaseError(str(exc)) from None
    print(f"deleted video {args.video_id}: {deleted} scenes and their frames")
    return 0


def _query_frame(store: SceneStore, owner: uuid.UUID, part: QueryPart | None) -> str | None:
    """The frame to show beside the results: an image part's file, a scene part's frame."""
    if part is None:
        return None
    if part.kind == "image":
        return str(part.value)
    return (store.get_scene(owner, part.value) or {}).get("frame_path")


def cmd_search(args: argparse.Namespace) -> int:
    if not args.parts:
        print(
            "heimdex-clip search: error: a query needs --image, --text or --scene (see --help)",
            file=sys.stderr,
        )
        return 2
    parts = [
        QueryPart(kind, value, 1.0 if weight is None else weight)
        for kind, value, weight in args.parts
    ]
    if args.html:
        check_page_target(args.html)
    embedder = _embedder(args)
    with _db(args) as pool:
        store = SceneStore(pool)
        only = parts[0] if len(parts) == 1 and parts[0].weight == 1 else None
        if only is None:  # a composed query
            hits = store.search_composed(
                args.owner, embedder, parts, threshold=args.threshold, count=args.count
            )
            query_label = "composed: " + " + ".join(p.describe() for p in parts)
            first = next((p for p in parts if p.kind != "text"), None)
            query_frame = _query_frame(store, args.owner, first)
        elif only.kind == "text":
            hits = store.search_by_text(
                args.owner, embedder, only.value, threshold=args.threshold, count=args.count
            )
            query_label, query_frame = f"text: {only.value}", None
        elif only.kind == "image":
            hits = store.search_by_image(
                args.owner, embedder, only.value, threshold=args.threshold, count=args.count
            )
            query_label, query_frame = f"image {only.value}", only.value
        else:
            hits = store.search_similar(
                args.owner,
                only.value,
                artifact=embedder.artifact_id,
                threshold=args.threshold,
                count=args.count,
            )
            query_label = f"scene {only.value}"
            query_frame = _query_frame(store, args.owner, only)
        if any(p.kind == "text" for p in parts) and embedder.manifest.model.random_init:
            print(
                "note: random-initialisation model: this text ranking is meaningless",
                file=sys.stderr,
            )
    if args.json:
        # allow_nan=False: never "NaN" (invalid JSON); the SQL search never returns one.
        print(
            json.dumps(
                [
                    {
                        "id": str(h.id),
                        "similarity": h.similarity,
                        "frame_path": h.frame_path,
                        "video_id": str(h.video_id) if h.video_id else None,
                        "scene_index": h.scene_index,
                        "start_s": h.start_s,
                        "end_s": h.end_s,
                    }
                    for h in hits
                ],
                indent=2,
                allow_nan=False,
            )
        )
    else:
        print_hits(hits)
    if args.html:
        warning = (
            "Random-initialisation model: similarities are not semantic."
            if embedder.manifest.model.random_init
            else None
        )
        page = render_results(
            query_label,
            query_frame,
            hits,
            warning=warning,
            max_pixels=embedder.config.max_image_pixels,
        )
        write_page(args.html, page)
        print(f"wrote {args.html}")
    return 0


def _policy(args: argparse.Namespace) -> Policy:
    return Policy(
        batch_size=args.batch,
        lease_s=args.lease,
        max_attempts=args.max_attempts,
        retry_base_s=args.retry_base,
    )


def cmd_backfill(args: argparse.Namespace) -> int:
    embedder, scope = _embedder(args), _scope(args)
    with _db(args) as pool:
        if args.follow:
            logging.getLogger("heimdex_clip.db.worker").setLevel(logging.INFO)  # the figures
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):  # finish the batch, then exit 0
                signal.signal(sig, lambda *_: stop.set())
            report = follow(
                pool,
                embedder,
                scope,
                stop,
                policy=_policy(args),
                reembed_stale=args.reembed_stale,
                options=FollowOptions(
                    idle_max_s=args.idle_max,
                    stats_interval_s=args.stats_interval,
                    metrics_port=args.metrics_port,
                ),
            )
        else:
            total = count_pending(
                pool,
                embedder.artifact_id,
                scope,
                reembed_stale=args.reembed_stale,
                max_attempts=args.max_attempts,
            )
            total = min(total, args.limit) if args.limit else total
            with tqdm(total=total, unit="scene", disable=args.quiet, desc="backfill") as bar:
                report = run_backfill(
                    pool,
                    embedder,
                    scope,
                    policy=_policy(args),
                    reembed_stale=args.reembed_stale,
                    limit=args.limit,
                    on_batch=bar.update,
                )
        left = count_pending(
            pool,
            embedder.artifact_id,
            scope,
            reembed_stale=args.reembed_stale,
            max_attempts=args.max_attempts,
        )
    print(
        f"backfill: {report.embedded} embedded, {report.failed} failed, "
        f"{report.batches} batches; {left} scenes still pending for {embedder.artifact_id}"
    )
    return 0


def cmd_bulk_embed(args: argparse.Namespace) -> int:
    try:
        from .bulk import BulkOptions, bulk_embed, register_frames
    except ImportError as exc:
        raise DatabaseError(str(exc)) from None
    if args.input is not None and args.owner is None and not args.all_owners:
        args.all_owners = True  # the list names its owners; its scenes are the work
    scope = _scope(args)
    model_dir = _embedder(args).artifact_dir  # loads once here: a bad artifact fails fast
    options = BulkOptions(
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch,
        chunk=args.chunk,
        write_batch=args.write_batch,
        lease_s=args.lease,
        max_attempts=args.max_attempts,
        reembed_stale=args.reembed_stale,
        frame_root=args.frame_root,
    )
    with _db(args) as pool:
        if args.input is not None:
            added, owners = register_frames(pool, args.input)
            print(f"bulk-embed: {added} new scenes from {args.input} ({len(owners)} owners)")
        report = bulk_embed(pool, model_dir, scope, options)
    print(
        f"bulk-embed: {report.embedded} embedded, {report.failed} failed, "
        f"{report.lost_leases} lost leases, {report.chunks} chunks in {report.seconds:.1f} s"
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _db(args) as pool:
        stats = clip_stats(pool, _scope(args))
    print(
        json.dumps(stats.to_dict(), indent=2, allow_nan=False) if args.json else format_stats(stats)
    )
    return 0


def cmd_search_index(args: argparse.Namespace) -> int:
    try:
        options = BuildOptions(
            m=args.m,
            ef_construction=args.ef_construction,
            maintenance_work_mem=args.maintenance_work_mem,
            parallel_workers=args.parallel_workers,
        )
    except ValueError as exc:
        print(f"heimdex-clip db search-index: error: {exc} (see --help)", file=sys.stderr)
        return 2
    with _db(args) as pool:
        if args.kind:
            say = (lambda message: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
            report = switch_search_index(
                pool, args.kind, options, keep_old=args.keep_old, progress=say
            )
            for name, seconds in report.built.items():
                print(f"built {name} in {seconds:.1f} s")
            for name in report.dropped:
                print(f"dropped {name}")
        if args.ef_search is not None:
            set_ef_search(pool, args.ef_search)
        if args.exact_max_rows is not None:
            set_exact_max_rows(pool, args.exact_max_rows)
        state = describe_search_index(pool)
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(
        f"search index: {state['kind']} (hnsw.ef_search {state['ef_search']}; owners of at "
        f"most {state['exact_max_rows']} rows searched exactly)"
    )
    for index in state["indexes"]:
        built_with = ", ".join(f"{k}={v}" for k, v in index["options"].items()) or "defaults"
        validity = "" if index["valid"] else "  INVALID (run the switch again)"
        print(
            f"  {index['name']}: {index['kind']}, {index['size_bytes'] / 2**20:.1f} MB, "
            f"{built_with}{validity}"
        )
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    return key_cli.run(args, _db)


def _guarded(command: Callable[[argparse.Namespace], int], name: str):
    """``command`` with database failures turned into one-line DatabaseErrors."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        with database_errors(name):
            return command(args)

    return run


def register(sub: argparse._SubParsersAction) -> None:
    """Add the database commands to the main ``heimdex-clip`` parser."""
    commands = {
        "migrate": cmd_migrate,
        "promote": cmd_promote,
        "prune": cmd_prune,
        "attribute": cmd_attribute,
        "index": cmd_index,
        "search": cmd_search,
        "backfill": cmd_backfill,
        "stats": cmd_stats,
        "api-key": cmd_api_key,
        "search-index": cmd_search_index,
        "bulk-embed": cmd_bulk_embed,
        "index-video": cmd_index_video,
        "delete-video": cmd_delete_video,
    }
    cli_args.register(sub, {k: _guarded(v, k) for k, v in commands.items()})
    # The pool's reconnect chatter is not actionable for an operator; its errors surface
    # as the command's one-line error.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
