"""Arguments of the database commands: every number has a range, every error is one line."""

from __future__ import annotations

import argparse
import math
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from . import key_cli

Command = Callable[[argparse.Namespace], int]


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def number(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (or (low, high])."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if math.isnan(value) or value > high or value < low or (low_open and value == low):
            opening = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"must be a number in {opening}{low:g}, {high:g}], got {text}"
            )
        return value

    return parse


def _one_line(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report usage errors as one line (no usage dump), exit code 2."""

    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error  # type: ignore[method-assign]
    return parser


def _owner_args(parser: argparse.ArgumentParser, *, all_owners: bool) -> None:
    parser.add_argument(
        "--owner",
        type=uuid.UUID,
        default=None,
        required=not all_owners,
        help="the owner whose scenes to use",
    )
    if all_owners:
        parser.add_argument(
            "--all-owners",
            action="store_true",
            help="every owner's scenes (must be said explicitly)",
        )


class _AddPart(argparse.Action):
    """--image/--text/--scene: each adds a part ``[kind, value, weight]`` to ``parts``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.parts = [*namespace.parts, [self.const, values, None]]


class _Weight(argparse.Action):
    """--weight W: the weight of the part given just before it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if not namespace.parts:
            parser.error("--weight follows the --image, --text or --scene it weighs")
        if namespace.parts[-1][2] is not None:
            parser.error("one --weight per --image, --text or --scene")
        if values == 0:
            parser.error("--weight must not be 0 (drop the part instead)")
        namespace.parts[-1][2] = values


_SEARCH_INDEX_HELP = (
    "show the search index, or switch its kind (vector, halfvec, bit) without blocking writes"
)


def _search_index_args(parser: argparse.ArgumentParser) -> None:
    from .search_index import DEFAULT_EF_SEARCH, DEFAULT_EXACT_MAX_ROWS, KINDS, BuildOptions

    defaults = BuildOptions()

    parser.add_argument(
        "kind", nargs="?", choices=KINDS, help="switch to this kind (default: show the current)"
    )
    parser.add_argument(
        "--m", type=integer(2, 100), default=defaults.m, help=f"HNSW m (default {defaults.m})"
    )
    parser.add_argument(
        "--ef-construction",
        type=integer(4, 1000),
        default=defaults.ef_construction,
        help=f"HNSW ef_construction (default {defaults.ef_construction}: see docs/scale.md)",
    )
    parser.add_argument(
        "--maintenance-work-mem",
        default=None,
        help="memory for the build, e.g. 2GB (default: the server's; a graph that does not "
        "fit is finished on disk, several times slower)",
    )
    parser.add_argument(
        "--parallel-workers",
        type=integer(0, 64),
        default=None,
        help="build workers besides the leader (default: the server's "
        "max_parallel_maintenance_workers)",
    )
    parser.add_argument(
        "--keep-old", action="store_true", help="keep the other kinds' indexes (a quick way back)"
    )
    parser.add_argument(
        "--ef-search",
        type=integer(1, 1000),
        default=None,
        help=f"record the search function's hnsw.ef_search (default {DEFAULT_EF_SEARCH})",
    )
    parser.add_argument(
        "--exact-max-rows",
        type=integer(0),
        default=None,
        help="owners of at most this many rows are searched exactly, without the index "
        f"(default {DEFAULT_EXACT_MAX_ROWS})",
    )
    parser.add_argument("--json", action="store_true", help="print the state as JSON")


def register(sub: argparse._SubParsersAction, commands: dict[str, Command]) -> None:
    """Add the database commands (``commands`` by name) to the main parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL URL (default: $DATABASE_URL, else the embedded server)",
    )
    common.add_argument(
        "--pg-data",
        type=Path,
        default=None,
        help="embedded server data directory (default: $HEIMDEX_PG_DATA)",
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar, no database line"
    )

    def command(parent, name: str, **kwargs) -> argparse.ArgumentParser:
        parser = _one_line(parent.add_parser(name, parents=[common], **kwargs))
        parser.set_defaults(func=commands[name])
        return parser

    db = _one_line(sub.add_parser("db", help="database administration"))
    db_sub = db.add_subparsers(dest="db_command", required=True)
    migrate = command(db_sub, "migrate", help="apply pending SQL migrations")
    migrate.add_argument(
        "--lock-timeout",
        type=number(0, 86400, low_open=True),
        default=60.0,
        help="seconds to wait for another migrator (default 60)",
    )
    promote = command(
        db_sub,
        "promote",
        help="make an artifact's vectors the first slot's "
        "once it covers every scene (model upgrade)",
    )
    promote.add_argument("--artifact", help="artifact id (default: the loaded model's)")
    _owner_args(promote, all_owners=True)
    attribute = command(
        db_sub,
        "attribute",
        help="attribute vectors embedded before "
        "provenance to the loaded model, if a sample reproduces them",
    )
    attribute.add_argument(
        "--sample",
        type=integer(1, 1000),
        default=16,
        help="frames to embed again as evidence (default 16)",
    )
    _owner_args(attribute, all_owners=True)
    key_cli.register(db_sub, common, commands["api-key"])
    prune = command(db_sub, "prune", help="delete a retired artifact's second-slot vectors")
    prune.add_argument("--artifact", required=True)
    _owner_args(prune, all_owners=True)

    _search_index_args(command(db_sub, "search-index", help=_SEARCH_INDEX_HELP))

    index = command(sub, "index", help="embed and store a folder of frames")
    index.add_argument("folder")
    _owner_args(index, all_owners=False)
    index.add_argument("--batch", type=integer(1, 4096), default=16)

    video = command(
        sub,
        "index-video",
        help="cut videos into scenes, embed each scene's "
        "best frames and store them (needs the video extra)",
    )
    video.add_argument("paths", nargs="+", metavar="PATH", help="video files")
    _owner_args(video, all_owners=False)
    video.add_argument(
        "--media-dir",
        type=Path,
        default=None,
        help="where the scenes' best frames go (default: $HEIMDEX_MEDIA_DIR, else ./heimdex-media)",
    )
    video.add_argument(
        "--video-id",
        type=uuid.UUID,
        default=None,
        help="the video's id (one PATH only; default: from its content)",
    )
    video.add_argument(
        "--window",
        type=number(1, 3600),
        default=10.0,
        help="longest scene in seconds: longer shots are split (default 10)",
    )
    video.add_argument(
        "--top-k",
        type=integer(1, 16),
        default=3,
        help="best frames pooled into a scene's vector (default 3)",
    )
    video.add_argument(
        "--analysis-fps",
        type=number(1, 240),
        default=15.0,
        help="frames a second the cut detector looks at (default 15: a cut is placed within "
        "one frame of a 30 fps video; 30 places it on the frame, for more CPU)",
    )
    video.add_argument(
        "--threads",
        type=integer(1, 64),
        default=2,
        help="decoder threads (default 2); unless CLIP_CPU_THREADS is set, the model gets "
        "the physical cores they leave, at least 1",
    )
    video.add_argument("--json", action="store_true", help="one JSON line per video")
    delete_video = command(db_sub, "delete-video", help="delete a video's scenes and frames")
    delete_video.add_argument("--video-id", type=uuid.UUID, required=True)
    _owner_args(delete_video, all_owners=False)

    search = command(
        sub,
        "search",
        help="owner-scoped search by image, text or scene, or by several of them combined",
    )
    search.set_defaults(parts=[])
    search.add_argument(
        "--image",
        action=_AddPart,
        const="image",
        help="query image file (each of --image/--text/--scene may repeat)",
    )
    search.add_argument(
        "--text",
        action=_AddPart,
        const="text",
        help="query text (needs an artifact with a text tower)",
    )
    search.add_argument(
        "--scene",
        action=_AddPart,
        const="scene",
        type=uuid.UUID,
        help="query scene id (similar scenes)",
    )
    search.add_argument(
        "--weight",
        action=_Weight,
        type=number(-100, 100),
        help="weight of the --image/--text/--scene just before it (default "
        "1; negative: away from it). Several parts make one composed query",
    )
    _owner_args(search, all_owners=False)
    search.add_argument(
        "--threshold",
        type=number(-1, 1),
        default=0.0,
        help="minimum cosine similarity in [-1, 1] (default 0)",
    )
    search.add_argument("--count", type=integer(1, 10_000), default=20)
    search.add_argument("--html", help="write a self-contained HTML page of the results")
    search.add_argument("--json", action="store_true")

    backfill = command(
        sub, "backfill", help="embed scenes lacking a vector of this model (parallel-safe leases)"
    )
    _owner_args(backfill, all_owners=True)
    backfill.add_argument("--batch", type=integer(1, 4096), default=16)
    backfill.add_argument(
        "--limit", type=integer(1), default=None, help="stop after this many distinct scenes"
    )
    backfill.add_argument(
        "--reembed-stale",
        action="store_true",
        help="also re-embed scenes whose vectors another artifact made",
    )
    backfill.add_argument("--max-attempts", type=integer(1, 100), default=3)
    backfill.add_argument(
        "--lease",
        type=number(0, 86400, low_open=True),
        default=300.0,
        help="seconds a claimed batch stays ours (default 300)",
    )
    backfill.add_argument(
        "--retry-base",
        type=number(0, 86400),
        default=30.0,
        help="first retry delay in seconds, doubling (default 30)",
    )
    backfill.add_argument(
        "--follow",
        action="store_true",
        help="worker service: keep embedding new scenes until SIGTERM",
    )
    backfill.add_argument(
        "--idle-max",
        type=number(0, 3600, low_open=True),
        default=30.0,
        help="--follow: longest sleep when idle (default 30 s)",
    )
    backfill.add_argument(
        "--stats-interval",
        type=number(0, 86400, low_open=True),
        default=60.0,
        help="--follow: seconds between figure logs",
    )
    backfill.add_argument(
        "--metrics-port",
        type=integer(1, 65535),
        default=None,
        help="--follow: serve Prometheus metrics (extra: metrics)",
    )

    bulk = command(
        sub,
        "bulk-embed",
        help="embed a back catalogue on Ray Data (extra: ray; "
        "a local Ray, or the cluster at $RAY_ADDRESS)",
    )
    _owner_args(bulk, all_owners=True)
    bulk.add_argument(
        "--input",
        type=Path,
        default=None,
        help="a .parquet or .csv list of frames (columns owner_id, frame_path) "
        "to add as scenes first",
    )
    bulk.add_argument(
        "--actors", type=integer(1, 4096), default=1, help="Ray actors, one model each (default 1)"
    )
    bulk.add_argument(
        "--cpus-per-actor",
        type=integer(1, 256),
        default=1,
        help="ONNX Runtime threads per actor (default 1)",
    )
    bulk.add_argument(
        "--batch", type=integer(1, 4096), default=32, help="frames per model call (default 32)"
    )
    bulk.add_argument(
        "--chunk",
        type=integer(1, 1_000_000),
        default=2048,
        help="scenes leased per Ray run (default 2048)",
    )
    bulk.add_argument(
        "--write-batch",
        type=integer(1, 100_000),
        default=256,
        help="rows per COPY + UPDATE (default 256)",
    )
    bulk.add_argument(
        "--lease",
        type=number(0, 7 * 86400, low_open=True),
        default=3600.0,
        help="seconds a chunk stays ours (default 3600)",
    )
    bulk.add_argument("--max-attempts", type=integer(1, 100), default=3)
    bulk.add_argument(
        "--reembed-stale",
        action="store_true",
        help="also re-embed scenes whose vectors another artifact made",
    )
    bulk.add_argument(
        "--frame-root",
        type=Path,
        default=None,
        help="where relative frame paths are (as seen by every actor)",
    )

    stats = command(sub, "stats", help="the four monitoring figures and vectors per artifact")
    _owner_args(stats, all_owners=True)
    stats.add_argument("--json", action="store_true")
