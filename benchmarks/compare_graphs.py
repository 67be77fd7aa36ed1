"""Several image graphs side by side: ms/image and kernel time per operator, same run.

    python benchmarks/compare_graphs.py A.onnx B.onnx [...] [--labels a,b] [--batches 32,1]
        [--repeats 5] [--threads 2] [--input pixel_values] [--size 224] [--out DIR]

Graphs are measured in alternation (A, B, A, B, ...) so that load from other processes on
a shared machine falls on all of them alike; each figure is the median over the repeats.
ms/image comes from plain timed runs (median, and the fastest repeat: on a shared machine
the least disturbed one); the per-operator split from separate runs under ONNX Runtime's
profiler (benchmarks/profile_encoder.py), whose own overhead it includes.
Writes ``<out>/compare_graphs.json`` and ``.md`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from profile_encoder import profile_graph

from heimdex_clip.session import cpu_features, session_options


def timed_ms_per_image(
    session: ort.InferenceSession, input_name: str, pixels: np.ndarray, runs: int
) -> float:
    session.run(None, {input_name: pixels})  # warm-up
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, {input_name: pixels})
    return (time.perf_counter() - start) * 1000 / runs / len(pixels)


def compare(
    graphs: list[Path], input_name: str, size: int, batches: list[int], repeats: int, threads: int
) -> dict:
    """Median ms/image and per-operator ms/image of each graph at each batch size."""
    sessions = [
        ort.InferenceSession(
            str(g), session_options(threads=threads), providers=["CPUExecutionProvider"]
        )
        for g in graphs
    ]
    rng = np.random.default_rng(0)
    result: dict = {}
    for batch in batches:
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        runs = max(4, 128 // batch)  # >= 128 images per timed sample
        walls: list[list[float]] = [[] for _ in graphs]
        ops: list[list[dict]] = [[] for _ in graphs]
        for _ in range(repeats):
            for i, (graph, session) in enumerate(zip(graphs, sessions, strict=True)):
                walls[i].append(timed_ms_per_image(session, input_name, pixels, runs))
                ops[i].append(
                    profile_graph(graph, input_name, size, batch, threads, runs)["by_operator"]
                )
        result[str(batch)] = [
            {
                "ms_per_image": round(statistics.median(walls[i]), 3),
                "ms_per_image_min": round(min(walls[i]), 3),
                "ms_per_image_all": [round(w, 3) for w in walls[i]],
                "by_operator": _median_ops(ops[i]),
            }
            for i in range(len(graphs))
        ]
    return result


def _median_ops(runs: list[dict]) -> dict[str, float]:
    names = {op for run in runs for op in run}
    medians = {
        op: statistics.median(run.get(op, {}).get("ms_per_image", 0.0) for run in runs)
        for op in names
    }
    return dict(sorted(((op, round(v, 3)) for op, v in medians.items()), key=lambda kv: -kv[1]))


def markdown(result: dict, labels: list[str]) -> str:
    lines = []
    for batch, per_graph in result.items():
        lines += [
            f"Batch {batch}:",
            "",
            "| ms/image | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
            "| **wall, median (timed runs)** | "
            + " | ".join(f"**{g['ms_per_image']}**" for g in per_graph)
            + " |",
            "| wall, fastest repeat | "
            + " | ".join(f"{g['ms_per_image_min']}" for g in per_graph)
            + " |",
            "| kernels, sum (profiled runs) | "
            + " | ".join(f"{sum(g['by_operator'].values()):.2f}" for g in per_graph)
            + " |",
        ]
        ops = dict.fromkeys(op for g in per_graph for op in g["by_operator"])
        for op in ops:
            values = [g["by_operator"].get(op, 0.0) for g in per_graph]
            if max(values) >= 0.01:
                lines.append(f"| {op} | " + " | ".join(f"{v:g}" for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graphs", type=Path, nargs="+")
    parser.add_argument("--labels", default=None)
    parser.add_argument("--batches", default="32,1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input", default="pixel_values")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [g.stem for g in args.graphs]
    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()[0]
    result = compare(args.graphs, args.input, args.size, batches, args.repeats, args.threads)
    table = markdown(result, labels)
    features = cpu_features()
    header = (
        f"{', '.join(labels)}: {args.threads} threads, median of {args.repeats} "
        f"alternating repeats on {features['cpu_model']}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after.\n\n"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare_graphs.json").write_text(
            json.dumps(
                {"labels": labels, "graphs": [str(g) for g in args.graphs], "result": result},
                indent=2,
            )
            + "\n"
        )
        (args.out / "compare_graphs.md").write_text(header + table)
    print(header + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
