"""``heimdex-clip``: embed images, inspect the runtime, and (with the db extra) index/search.

heimdex-clip embed PATH... [--text TEXT]... [--json]
heimdex-clip info [--json]
heimdex-clip bench [--json] [--batch N]   (every provider x graph, and auto's pick)
heimdex-clip db migrate | index | index-video | search | backfill | bulk-embed | stats
                                                           (needs the db extra)
heimdex-clip serve   (the search service; needs the db and serve extras)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import __version__
from .config import ClipConfig
from .cpu import cpu_features
from .embedder import ClipEmbedder
from .errors import ClipError
from .providers import available_providers


def _embedder(args: argparse.Namespace) -> ClipEmbedder:
    return ClipEmbedder(model_dir=args.model_dir, config=ClipConfig.from_env())


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed each image and text; print dimension, norm and time (never stops at a bad one)."""
    if not args.paths and not args.text:
        print("error: give image paths and/or --text TEXT", file=sys.stderr)
        return 2
    embedder = _embedder(args)
    try:
        embedder.load()
    except ClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    queries = [("path", p, embedder.embed_frame(p, frame_path=p)) for p in args.paths]
    queries += [("text", t, embedder.embed_text(t)) for t in args.text]
    for kind, query, result in queries:
        row: dict[str, Any] = {
            kind: query,
            "ok": result.ok,
            "error": result.error,
            "time_ms": result.metadata["inference_time_ms"],
        }
        if result.ok:
            assert result.embedding is not None
            row.update(
                dim=int(result.embedding.shape[0]),
                norm=round(float(np.linalg.norm(result.embedding)), 6),
            )
            if args.vectors:
                row["embedding"] = [round(float(x), 7) for x in result.embedding]
        rows.append(row)
    if args.json:
        json.dump(rows, sys.stdout, indent=None if args.vectors else 2)
        print()
    else:
        for r in rows:
            label = r["path"] if "path" in r else f"text {r['text']!r}"
            if r["ok"]:
                print(f"{label}: dim={r['dim']} norm={r['norm']:.4f} time={r['time_ms']}ms")
            else:
                print(f"{label}: FAILED {r['error']}")
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_info(args: argparse.Namespace) -> int:
    """Manifest, weights, providers, threads and CPU features of this runtime."""
    embedder = _embedder(args)
    info: dict[str, Any] = {
        "heimdex_clip": __version__,
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "cpu": cpu_features(),
        # CLIP_PROVIDER names -> None (runs here) or why it cannot
        "clip_providers": available_providers(),
    }
    try:
        started = time.perf_counter()
        embedder.load()
        info["load_time_ms"] = round((time.perf_counter() - started) * 1000, 1)
        m = embedder.manifest
        session = embedder.session_info
        info.update(
            artifact=str(embedder.artifact_dir),
            model=m.model.__dict__,
            weights=("RANDOM INIT (not semantic)" if m.model.random_init else m.model.pretrained),
            preprocess=m.preprocess.__dict__,
            files={
                k: {"path": f.path, "precision": f.precision, "bytes": f.bytes, "sha256": f.sha256}
                for k, f in m.files.items()
            },
            quantization=m.quantization,
            parity=m.parity,
            session={
                "provider": session.provider,
                "providers": session.providers,
                "device": session.device,
                "intra_op_threads": session.intra_op_threads,
                "memory_arena": session.memory_arena,
            },
            config={k: str(v) for k, v in embedder.config.__dict__.items() if k != "unknown_keys"},
        )
    except ClipError as exc:
        info["error"] = str(exc)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    return 0 if "error" not in info else 2


def _print_info(info: dict[str, Any]) -> None:
    cpu = info["cpu"]
    flags = ", ".join(f for f, on in cpu["flags"].items() if on) or "none"
    print(f"heimdex-clip {info['heimdex_clip']}, onnxruntime {info['onnxruntime']}")
    print(
        f"CPU: {cpu['cpu_model']} ({cpu['physical_cores']} physical cores, "
        f"{cpu['logical_cpus']} logical); flags: {flags}"
    )
    print(f"available providers: {', '.join(info['available_providers'])}")
    for name, why_not in info["clip_providers"].items():
        print(f"CLIP_PROVIDER={name}: {'runs here' if why_not is None else why_not}")
    if "error" in info:
        print(f"model: NOT LOADED: {info['error']}")
        return
    m, s = info["model"], info["session"]
    print(f"artifact: {info['artifact']} (loaded in {info['load_time_ms']} ms)")
    print(
        f"model: {m['name']} embed_dim={m['embed_dim']} weights={info['weights']} "
        f"quick_gelu={m['quick_gelu']}"
    )
    print(
        f"session: provider={s['provider']} device={s['device']} "
        f"ort_providers={','.join(s['providers'])} "
        f"threads={s['intra_op_threads']} arena={s['memory_arena']}"
    )
    for key, f in info["files"].items():
        print(f"file {key}: {f['path']} {f['bytes'] / 1e6:.1f} MB sha256={f['sha256'][:16]}...")
    parity = info["parity"]
    if "int8_vs_fp32" in parity:
        q = parity["int8_vs_fp32"]
        print(
            f"INT8 vs fp32 (export-time, {q['images']} images): mean cos "
            f"{q['mean_cosine']:.5f}, min {q['min_cosine']:.5f}, top-5 agreement "
            f"{q['top5_agreement']:.3f}"
        )


def cmd_bench(args: argparse.Namespace) -> int:
    """Every provider x graph this machine runs, side by side, and auto's choice."""
    from .bench import format_report, run_bench  # only this command needs it

    config = ClipConfig.from_env()
    batches = (1, args.batch) if args.batch else None
    report = run_bench(
        config,
        args.model_dir,
        batches=batches,
        repeats=args.repeats,
        update_cache=not args.no_cache_update,
    )
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0 if any(not r["error"] for r in report["rows"]) else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heimdex-clip", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"heimdex-clip {__version__}")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="artifact directory or models root (default: $CLIP_MODEL_DIR)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    embed = sub.add_parser("embed", help="embed images and texts; print dim, norm and time")
    embed.add_argument("paths", nargs="*", help="image files")
    embed.add_argument(
        "--text",
        action="append",
        default=[],
        help="a query text to embed with the text tower (repeatable)",
    )
    embed.add_argument("--json", action="store_true", help="JSON output")
    embed.add_argument("--vectors", action="store_true", help="include the vectors (JSON)")
    embed.set_defaults(func=cmd_embed)

    info = sub.add_parser("info", help="manifest, weights, providers, threads, CPU features")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser(
        "bench",
        help="measure every provider and graph here; show (and "
        "cache) what CLIP_PROVIDER=auto picks",
    )
    bench.add_argument("--json", action="store_true")
    bench.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size of the throughput column (default: CLIP_BATCH_SIZE)",
    )
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    bench.add_argument(
        "--no-cache-update",
        action="store_true",
        help="do not store the measured decision for CLIP_PROVIDER=auto",
    )
    bench.set_defaults(func=cmd_bench)

    if missing := _missing_db_dependencies():
        _register_db_placeholders(sub, missing)
    else:
        from .db import cli as db_cli  # a real import error in db/ must surface, not hide

        db_cli.register(sub)
        from .serve import cli as serve_cli  # FastAPI itself is imported only when serving

        serve_cli.register(sub)
    return parser


#: The database commands; without the db extra each one says how to get it.
DB_COMMANDS = ("db", "index", "index-video", "search", "backfill", "bulk-embed", "stats", "serve")
#: The db extra (the client); the embedded server is its own extra, checked when it is needed.
_DB_MODULES = ("psycopg", "psycopg_pool", "pgvector")


def _missing_db_dependencies() -> list[str]:
    return [name for name in _DB_MODULES if importlib.util.find_spec(name) is None]


def _register_db_placeholders(sub: argparse._SubParsersAction, missing: list[str]) -> None:
    def needs_extra(args: argparse.Namespace) -> int:
        print(
            f"error: `heimdex-clip {args.command}` needs the database extra (missing: "
            f"{', '.join(missing)}); install it with: pip install 'heimdex-clip[db]'",
            file=sys.stderr,
        )
        return 2

    for name in DB_COMMANDS:
        placeholder = sub.add_parser(
            name, help="(needs: pip install 'heimdex-clip[db]')", add_help=False
        )
        # Whatever follows is the real command's arguments: accepted, not parsed.
        placeholder.set_defaults(func=needs_extra, accepts_any_arguments=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line by default, the traceback with --verbose
        if args.verbose:
            raise
        print(
            f"error: unexpected {type(exc).__name__}: {exc} (re-run with --verbose for "
            "the traceback, and please report it)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
