"""``heimdex-clip bench``: every provider and graph this machine can run, measured side by side.

An operator runs it on their own machine (well under a minute on an idle 2-core server)
and sees milliseconds per image at batch 1 and at CLIP_BATCH_SIZE for each combination
of execution provider (ONNX Runtime CPU, OpenVINO EP) and artifact graph (dynamic INT8,
static QDQ INT8, fp32), which combination CLIP_PROVIDER=auto runs, and why. Its
measurement replaces auto's cached decision for this machine, artifact and libraries.

Speed only: the accuracy of each graph is gated at export time (the manifest's figures).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .artifact import Manifest, load_manifest, resolve_artifact_dir
from .config import DEFAULT_MODEL_DIRS, ClipConfig
from .cpu import cpu_features
from .gemm_floor import artifact_floor, floor_line, multiple
from .providers import (
    PROVIDERS,
    ProviderSetup,
    available_providers,
    graph_key,
    has_graph,
    openvino_precision_hint,
    openvino_status,
    remember_measured,
)
from .session import open_graph

#: Graphs worth measuring on each provider (OpenVINO on the dynamic INT8 graph is left out:
#: it cannot fuse run-time activation quantization and runs it slower than fp32).
GRAPHS = {
    "cpu": ("visual.int8", "visual.qdq", "visual.fp32"),
    "openvino": ("visual.qdq", "visual.fp32"),
}


def ms_per_image(
    session: ort.InferenceSession, batch: int, *, repeats: int = 3, image_size: int | None = None
) -> float:
    """Median wall time per image of ``repeats`` runs at ``batch`` (after one warm-up run).

    The input is seeded noise: speed does not depend on pixel values (accuracy is gated
    at export time on real photographs, not here).
    """
    inp = session.get_inputs()[0]
    size = image_size or next((d for d in inp.shape[2:] if isinstance(d, int)), 224)
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size), np.float32)
    session.run(None, {inp.name: pixels})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {inp.name: pixels})
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000 / batch


@dataclass
class BenchRow:
    """One provider x graph (x OpenVINO precision hint) measurement."""

    provider: str
    graph: str
    precision_hint: str | None
    ran_on: str | None = None
    load_ms: float | None = None
    ms_per_image: dict[int, float] = field(default_factory=dict)
    error: str | None = None
    #: True when this is the graph ``provider`` runs under CLIP_PRECISION=int8 (auto's row).
    default: bool = False


def _hints(provider: str) -> list[str | None]:
    if provider != "openvino":
        return [None]
    best = openvino_precision_hint(exact=False)
    return list(sorted({"f32", best}))  # bf16 where the CPU has it, and f32 beside it


def measure_row(
    row: BenchRow,
    config: ClipConfig,
    artifact_dir: Path,
    manifest: Manifest,
    batches: tuple[int, ...],
    repeats: int,
) -> BenchRow:
    """Load the row's graph on its provider and time it at each batch size."""
    setup = ProviderSetup(
        provider=row.provider,
        threads=config.cpu_threads,
        memory_arena=config.memory_arena,
        precision_hint=row.precision_hint or "f32",
    )
    try:
        started = time.perf_counter()
        session, info = open_graph(artifact_dir, manifest.file(row.graph), setup)
        row.load_ms = round((time.perf_counter() - started) * 1000, 1)
        row.ran_on = info.provider
        if info.provider != row.provider:
            row.error = f"{row.provider} fell back to {info.provider}"
            return row
        for batch in batches:
            row.ms_per_image[batch] = round(ms_per_image(session, batch, repeats=repeats), 2)
    except Exception as exc:  # one failing combination must not stop the others
        row.error = f"{type(exc).__name__}: {exc}"
    return row


def run_bench(
    config: ClipConfig,
    model_dir: Path | None = None,
    *,
    batches: tuple[int, ...] | None = None,
    repeats: int = 3,
    update_cache: bool = True,
) -> dict[str, Any]:
    """Measure every runnable provider x graph; the report :func:`format_report` prints."""
    artifact_dir = resolve_artifact_dir(
        model_dir or config.model_dir,
        config.model_name,
        config.pretrained,
        search=DEFAULT_MODEL_DIRS,
    )
    manifest = load_manifest(artifact_dir)
    batches = batches or tuple(sorted({1, config.batch_size}))
    why_not = available_providers()
    rows: list[BenchRow] = []
    runs_by_default = (None, openvino_precision_hint(exact=False))
    for provider in PROVIDERS:
        if why_not[provider] is not None:
            continue
        default = graph_key(provider, "int8", manifest, artifact_dir)
        for key in GRAPHS[provider]:
            if not has_graph(manifest, artifact_dir, key):
                continue  # not exported, or left out of this image
            for hint in _hints(provider):
                row = BenchRow(
                    provider, key, hint, default=key == default and hint in runs_by_default
                )
                rows.append(measure_row(row, config, artifact_dir, manifest, batches, repeats))
    # auto compares each provider's own graph at the worker's batch size.
    auto_batch = max(batches)
    figures = {
        r.provider: r.ms_per_image[auto_batch]
        for r in rows
        if r.default and not r.error and auto_batch in r.ms_per_image
    }
    # The measurement replaces auto's remembered decision (unless asked not to).
    choice, cache_path, cache_key, cached = remember_measured(
        config.replace(batch_size=auto_batch), manifest, figures, write=update_cache
    )
    # The INT8 GEMMs of the artifact's own shapes, alone: every figure is also read against it.
    floor = artifact_floor(artifact_dir, manifest, list(batches), cache_key["threads"], repeats)
    return {
        "gemm_floor": floor,
        "artifact": str(artifact_dir),
        "artifact_id": manifest.artifact_id,
        "onnxruntime": ort.__version__,
        "openvino_plugin": openvino_status().plugin_version,
        "cpu": cpu_features(),
        "threads": cache_key["threads"],
        "batches": list(batches),
        "unavailable": {k: v for k, v in why_not.items() if v},
        "rows": [asdict(r) for r in rows],
        "auto": {
            "choice": choice,
            "batch": auto_batch,
            "ms_per_image": figures,
            "cache": str(cache_path),
            "cache_updated": bool(cached),
        },
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as the table an operator reads."""
    cpu = report["cpu"]
    flags = ", ".join(f for f, on in cpu["flags"].items() if on) or "none"
    batches = report["batches"]
    lines = [
        f"CPU: {cpu['cpu_model']} ({cpu['physical_cores']} physical cores); flags: {flags}",
        f"onnxruntime {report['onnxruntime']}, OpenVINO EP plugin "
        f"{report['openvino_plugin'] or 'not installed'}; {report['threads']} threads; "
        f"artifact {report['artifact_id']}",
        "",
        f"{'provider':<9} {'graph':<12} {'hint':<5} {'load ms':>8} "
        + " ".join(f"{f'b{b} ms/img (x floor)':>20}" for b in batches),
    ]
    floor = report.get("gemm_floor", {}).get("ms_per_image", {})
    auto = report["auto"]
    for r in report["rows"]:
        cells = " ".join(
            f"{r['ms_per_image'].get(b, float('nan')):>11.2f} "
            f"{'(' + multiple(r['ms_per_image'].get(b), floor.get(b)) + ')':>8}"
            for b in batches
        )
        # Each provider's default row is what auto compares; the fastest is what it runs.
        mark = ""
        if r["default"]:
            chosen = r["provider"] == auto["choice"]
            mark = "  <- auto runs this" if chosen else "  <- auto's other candidate"
        load = f"{r['load_ms']:>8.0f}" if r["load_ms"] is not None else f"{'-':>8}"
        line = f"{r['provider']:<9} {r['graph']:<12} {r['precision_hint'] or '-':<5} {load} "
        lines.append(line + (f"FAILED: {r['error']}" if r["error"] else cells + mark))
    for name, why in report["unavailable"].items():
        lines.append(f"{name:<9} not available: {why}")
    lines += ["", floor_line(report.get("gemm_floor", {}))]
    lines += [
        "",
        f"CLIP_PROVIDER=auto runs: {auto['choice']} "
        f"(ms/image at batch {auto['batch']}: {auto['ms_per_image'] or 'only one'})"
        + (f"; decision cached in {auto['cache']}" if auto["cache_updated"] else ""),
    ]
    return "\n".join(lines)
