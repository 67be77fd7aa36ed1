"""Two text graphs side by side: ms per run on the same token ids, taking turns.

    python benchmarks/compare_text_graphs.py OLD.onnx NEW.onnx [--repeats 16] [--threads 2]
        [--out DIR]

The image graphs' comparison is ``compare_graphs.py``; this one feeds token ids (int32,
a start token, random ids, an end token) at the shapes a search sends: one query of 7 and
of 20 positions, and a batch of 32 texts of 12. The graphs alternate run by run (A, B, B,
A, ...) so that load from other processes falls on both alike; each figure is the median
of the repeats, and the ratio the median of the paired ratios. The outputs are compared
too (min cosine between the two graphs' vectors).
Writes ``<out>/compare_text_graphs.{json,md}`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from bench_utils import machine_info, write_results

from heimdex_clip.session import session_options

#: (texts, positions) per case: what one search and a bulk re-embed send.
CASES = ((1, 7), (1, 20), (32, 12))
START, END = 49406, 49407  # open_clip's start and end-of-text ids


def compare(graphs: list[Path], repeats: int, threads: int) -> list[dict]:
    """Median ms per run of each graph, per case, and how close their outputs are."""
    sessions = [
        ort.InferenceSession(
            str(g), session_options(threads=threads), providers=["CPUExecutionProvider"]
        )
        for g in graphs
    ]
    name = sessions[0].get_inputs()[0].name
    rng = np.random.default_rng(0)
    rows = []
    for texts, positions in CASES:
        ids = rng.integers(1, START, (texts, positions)).astype(np.int32)
        ids[:, 0], ids[:, -1] = START, END
        outputs = [s.run(None, {name: ids})[0] for s in sessions]  # also the warm-up
        runs = 20 if texts == 1 else 3
        times: list[list[float]] = [[] for _ in sessions]
        for r in range(repeats):
            order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
            for i in order:
                started = time.perf_counter()
                for _ in range(runs):
                    sessions[i].run(None, {name: ids})
                times[i].append((time.perf_counter() - started) * 1000 / runs)
        rows.append(
            {
                "texts": texts,
                "positions": positions,
                "ms_per_run": [round(statistics.median(t), 3) for t in times],
                "ratio_to_first": [
                    round(statistics.median(b / a for a, b in zip(times[0], t, strict=True)), 3)
                    for t in times
                ],
                "min_cosine_to_first": [
                    round(float(np.min(np.sum(outputs[0] * o, axis=1))), 7) for o in outputs
                ],
            }
        )
    return rows


def markdown(rows: list[dict], labels: list[str]) -> str:
    lines = [
        "| texts x positions | "
        + " | ".join(f"{x}, ms" for x in labels)
        + " | ratio | min cosine |",
        "|---|" + "---|" * (len(labels) + 2),
    ]
    for row in rows:
        lines.append(
            f"| {row['texts']} x {row['positions']} | "
            + " | ".join(str(v) for v in row["ms_per_run"])
            + f" | {row['ratio_to_first'][-1]} | {row['min_cosine_to_first'][-1]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("graphs", type=Path, nargs="+")
    parser.add_argument("--labels", default=None)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [g.stem for g in args.graphs]
    machine = machine_info(args.threads)
    rows = compare(args.graphs, args.repeats, args.threads)
    flags = ", ".join(f for f, on in machine["flags"].items() if on) or "none"
    header = (
        f"{', '.join(labels)}: {args.threads} threads, median of {args.repeats} alternating "
        f"repeats on {machine['cpu_model']} (flags: {flags}), {machine['date']}, load average "
        f"{machine['load_average_at_start'][0]:.1f} before / {os.getloadavg()[0]:.1f} after. "
        "Ratio and min cosine: the last graph against the first.\n\n"
    )
    table = header + markdown(rows, labels)
    if args.out:
        result = {"machine": machine, "labels": labels, "graphs": [str(g) for g in args.graphs]}
        write_results(args.out, "compare_text_graphs", result | {"rows": rows}, table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
