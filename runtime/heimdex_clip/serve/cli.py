"""``heimdex-clip serve``: the search service on one port (docs/service.md)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from ..config import ClipConfig
from ..db.args import integer
from ..embedder import ClipEmbedder

#: Modules of the serve extra (import names), besides the db extra's.
SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "jwt", "prometheus_client")

log = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> int:
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"error: `heimdex-clip serve` needs the serve extra (missing: "
            f"{', '.join(missing)}); install it with: pip install 'heimdex-clip[db,serve]'",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from ..db.connection import database, describe, resolve_url
    from ..db.migrate import migrate, require_schema
    from .app import create_app
    from .settings import ServeSettings

    settings = ServeSettings.from_env(
        host=args.host, port=args.port, media_root=args.media_root, max_queue=args.max_queue
    )
    embedder = ClipEmbedder(model_dir=args.model_dir, config=ClipConfig.from_env()).load()
    url = resolve_url(args.database_url, embedded=True, data_dir=args.pg_data)
    print(f"database: {describe(url)}", file=sys.stderr)
    with database(url, max_size=settings.db_pool) as pool:
        if args.migrate:
            migrate(pool)
        require_schema(pool)
        app = create_app(settings, embedder, pool)
        print(
            f"serving {embedder.artifact_id} on http://{settings.host}:{settings.port}",
            file=sys.stderr,
        )
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            access_log=args.access_log,
            log_level="info" if args.verbose else "warning",
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the main parser (flags override the CLIP_SERVE_* variables)."""
    serve = sub.add_parser("serve", help="the search service over HTTP (extra: serve)")
    serve.add_argument(
        "--host", default=None, help="listen address (CLIP_SERVE_HOST, default 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=integer(1, 65535),
        default=None,
        help="listen port (CLIP_SERVE_PORT, default 8080)",
    )
    serve.add_argument(
        "--media-root",
        type=Path,
        default=None,
        help="serve scene frames from under this directory only (CLIP_SERVE_MEDIA_ROOT)",
    )
    serve.add_argument(
        "--max-queue",
        type=integer(1),
        default=None,
        help="embedding inputs that may wait for the model (CLIP_SERVE_MAX_QUEUE, default 64)",
    )
    serve.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL URL (default: $DATABASE_URL, else the embedded server)",
    )
    serve.add_argument(
        "--pg-data",
        type=Path,
        default=None,
        help="embedded server data directory (default: $HEIMDEX_PG_DATA)",
    )
    serve.add_argument(
        "--migrate", action="store_true", help="apply pending migrations before serving"
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=cmd_serve)
