"""The end-to-end demo: embedded database, migrations, indexing, searches, stats.

    python -m heimdex_clip.db.demo FRAMES_DIR [--model-dir DIR] [--html OUT.html]

FRAMES_DIR holds owner_a/, owner_b/ and query.jpg (``python -m heimdex_clip_export.samples``
writes real photographs there). Uses DATABASE_URL if set, else the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import logging
import uuid
from pathlib import Path

from ..config import ClipConfig
from ..embedder import ClipEmbedder
from ..errors import TextError
from ..query import QueryPart
from .backfill import Scope
from .cli import index_folder, print_hits
from .connection import database
from .migrate import migrate
from .report import render_results
from .stats import clip_stats, format_stats
from .store import SceneStore

OWNER_A = uuid.UUID("00000000-0000-4000-a000-00000000000a")
OWNER_B = uuid.UUID("00000000-0000-4000-a000-00000000000b")
BANNER = "=" * 78
QUERY_TEXT = "a photo of a cat"
COMPOSED_TEXT = "at night"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heimdex_clip.db.demo")
    parser.add_argument("frames", type=Path)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--html", type=Path, default=Path("demo_results.html"))
    parser.add_argument(
        "--video",
        type=Path,
        default=None,
        help="also index this video for owner A (needs the video extra)",
    )
    parser.add_argument(
        "--media-dir",
        type=Path,
        default=Path("demo_media"),
        help="where the video's scene frames go",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    embedder = ClipEmbedder(model_dir=args.model_dir, config=ClipConfig.from_env()).load()
    model = embedder.manifest.model
    print(f"model: {model.name} weights={model.pretrained} artifact={embedder.artifact_dir}")
    warning = None
    if model.random_init:
        warning = (
            "RANDOM-INITIALISATION MODEL (no model hub was reachable): the pipeline "
            "is real, but similarities are NOT semantic. Export real weights with "
            "`make export-model PRETRAINED=openai` (or a checkpoint path)."
        )
        print(f"\n{BANNER}\n!!! {warning}\n{BANNER}\n")

    with database(embedded=True) as pool:  # DATABASE_URL if set, else the embedded server
        applied = migrate(pool)
        print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
        store = SceneStore(pool)
        for owner, folder in (
            (OWNER_A, args.frames / "owner_a"),
            (OWNER_B, args.frames / "owner_b"),
        ):
            summary = index_folder(store, embedder, folder, owner)
            print(
                f"owner {owner}: indexed {summary['embedded']} of {summary['frames']} "
                f"frames ({summary['failed']} failed)"
            )

        if args.video is not None:
            _index_video(pool, embedder, args.video, args.media_dir)

        query = args.frames / "query.jpg"
        print(f"\nSearch by image {query} (owner {OWNER_A}, top 5):")
        hits = store.search_by_image(OWNER_A, embedder, query, count=5)
        print_hits(hits)

        scene_id = store.add_scene(
            OWNER_A, str((args.frames / "owner_a" / "astronaut.jpg").resolve())
        )
        print(f"\nScenes similar to {scene_id} (astronaut.jpg, owner {OWNER_A}, top 5):")
        similar = store.search_similar(OWNER_A, scene_id, artifact=embedder.artifact_id, count=5)
        print_hits(similar)

        text_hits = _text_search(store, embedder, model.random_init)
        if text_hits is not None:
            parts = [QueryPart("scene", scene_id), QueryPart("text", COMPOSED_TEXT, 0.5)]
            print(
                f"\nComposed query {' + '.join(p.describe() for p in parts)} "
                f"(owner {OWNER_A}, top 5):"
            )
            print_hits(store.search_composed(OWNER_A, embedder, parts, count=5))

        print("\nMonitoring (all owners):")
        print(format_stats(clip_stats(pool, Scope(all_owners=True))))
    args.html.write_text(
        render_results(f"image {query.name}", query, hits, warning=warning), encoding="utf-8"
    )
    print(f"\nwrote {args.html} (query and result thumbnails)")
    if text_hits is not None:
        text_html = args.html.with_name(f"{args.html.stem}_text{args.html.suffix}")
        text_warning = (
            "Random-initialisation model: this text ranking is MEANINGLESS."
            if model.random_init
            else None
        )
        text_html.write_text(
            render_results(f"text: {QUERY_TEXT}", None, text_hits, warning=text_warning),
            encoding="utf-8",
        )
        print(f"wrote {text_html} (query text and result thumbnails)")
    return 0


def _index_video(pool, embedder: ClipEmbedder, video: Path, media_dir: Path) -> None:
    """Index the demo video for owner A: its scenes join the photographs in search."""
    from .videos import index_video  # the video extra (PyAV)

    done = index_video(pool, embedder, video, OWNER_A, media_dir=media_dir)
    timings = done.report.get("timings_s", {})
    print(
        f"owner {OWNER_A}: video {video.name} {done.status} as {done.video_id}: "
        f"{done.scenes} scenes in {timings.get('total', 0):.1f} s"
    )


def _text_search(store: SceneStore, embedder: ClipEmbedder, random_init: bool):
    """Text -> scenes over owner A's photographs; None when the artifact has no text tower."""
    print(f'\nSearch by text "{QUERY_TEXT}" (owner {OWNER_A}, top 5):')
    try:
        hits = store.search_by_text(OWNER_A, embedder, QUERY_TEXT, count=5)
    except TextError as exc:
        print(f"skipped: {exc}")
        return None
    print_hits(hits)
    if random_init:
        print("!!! random-initialisation model: this text ranking is MEANINGLESS")
    return hits


if __name__ == "__main__":
    raise SystemExit(main())
