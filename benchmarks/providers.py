"""Execution providers side by side: every graph of the artifact on every engine, one run.

    python benchmarks/providers.py [--quick] [--artifact models/ViT-B-32__none]
                                   [--out benchmarks/results] [--only ENGINE ...]
                                   [--graph LABEL=PATH ...]

Rows, each at batch 1 and batch 32 (ms/image, same threads everywhere, engines taking
turns so a slow spell of a shared machine hits all alike):

* ``pytorch``: open_clip fp32 eager, the reference the batch-1 target is a ratio of;
* ``ort-cpu``: ONNX Runtime's CPU provider on the dynamic INT8 graph (shipped), the fp32
  graph (what peers ship) and the static QDQ graph (``--openvino`` exports);
* ``ort-openvino``: ONNX Runtime + the OpenVINO EP plugin (the ``openvino`` extra) on the
  QDQ and fp32 graphs (bf16 and f32 hints) where the plugin offers this CPU;
* ``openvino-native``: OpenVINO's own runtime (the ``openvino`` package, when installed) on
  the same graphs. The runtime never uses it; it shows what the OpenVINO EP would do on a
  CPU the plugin does not offer (the plugin claims Intel CPUs only).

``--graph LABEL=PATH`` adds another graph of the same model (for example a QDQ graph from
another recipe) as rows ``ort-cpu LABEL`` and ``openvino-native LABEL``; ``--only`` keeps the
rows whose name starts with one of the given prefixes (``pytorch``, ``ort-cpu int8``...).

Each row also records its cosine against the fp32 graph on ONNX Runtime (real
photographs), so a faster row that drifts shows it. Results: ``<out>/providers.json`` and
``<out>/providers.md``, with the CPU flags and load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_utils import REPO, interleaved_medians, machine_info, ms, write_results

from heimdex_clip.artifact import load_manifest
from heimdex_clip.preprocess import Preprocessor
from heimdex_clip.session import (
    available_providers,
    create_session,
    openvino_status,
    physical_cores,
)

BATCHES = (1, 32)
OUTPUT = "image_embeds"
Runner = Callable[[np.ndarray], np.ndarray]


def photo_batches(manifest_dir: Path) -> dict[int, np.ndarray]:
    """Real photographs (scikit-image) through the runtime's preprocessing, tiled to 32."""
    from heimdex_clip_export.evaluation import sample_photos

    pixels = Preprocessor(load_manifest(manifest_dir).preprocess)(
        [img for _, img in sample_photos()]
    )
    tiled = np.concatenate([pixels] * (max(BATCHES) // len(pixels) + 1))
    return {b: np.ascontiguousarray(tiled[:b]) for b in BATCHES}


def ort_runners(artifact: Path, threads: int) -> tuple[dict[str, Runner], dict[str, str]]:
    """ONNX Runtime rows: the CPU provider on every graph, OpenVINO EP where it runs."""
    manifest = load_manifest(artifact)
    runners: dict[str, Runner] = {}
    skipped: dict[str, str] = {}
    plans = [("ort-cpu", key, "f32") for key in ("visual.int8", "visual.fp32", "visual.qdq")]
    plans += [
        ("ort-openvino", key, hint)
        for key in ("visual.qdq", "visual.fp32")
        for hint in (("f32", "bf16") if key == "visual.fp32" else ("f32",))
    ]
    why_not = available_providers()
    for engine, key, hint in plans:
        name = f"{engine} {key.split('.')[1]}" + (
            f" {hint}" if key == "visual.fp32" and engine != "ort-cpu" else ""
        )
        provider = "openvino" if engine == "ort-openvino" else "cpu"
        if key not in manifest.files:
            skipped[name] = f"the artifact has no {key} (export with --openvino / --keep-fp32)"
            continue
        if why_not[provider]:
            skipped[name] = why_not[provider]
            continue
        session, info = create_session(
            artifact / manifest.files[key].path,
            threads=threads,
            provider=provider,
            precision_hint=hint,
        )
        if info.provider != provider:
            skipped[name] = f"fell back to {info.provider}"
            continue
        runners[name] = lambda x, s=session: s.run([OUTPUT], {"pixel_values": x})[0]
    return runners, skipped


def extra_ort_runners(graphs: dict[str, Path], threads: int) -> dict[str, Runner]:
    """``--graph`` rows on ONNX Runtime's CPU provider, with the runtime's session options."""
    runners: dict[str, Runner] = {}
    for label, path in graphs.items():
        session, _ = create_session(path, threads=threads, provider="cpu")
        runners[f"ort-cpu {label}"] = lambda x, s=session: s.run([OUTPUT], {"pixel_values": x})[0]
    return runners


def openvino_native_runners(
    artifact: Path, threads: int, graphs: dict[str, Path] | None = None
) -> dict[str, Runner]:
    """OpenVINO's own runtime on the same graphs (a reference, not a runtime path)."""
    if importlib.util.find_spec("openvino") is None:
        return {}
    import openvino as ov

    core = ov.Core()
    manifest = load_manifest(artifact)
    plans = [
        (
            key.split(".")[1] + (f" {hint}" if key == "visual.fp32" else ""),
            artifact / manifest.files[key].path,
            hint,
        )
        for key, hint in [
            ("visual.qdq", "f32"),
            ("visual.fp32", "f32"),
            ("visual.fp32", "bf16"),
            ("visual.int8", "f32"),
        ]
        if key in manifest.files
    ]
    plans += [(label, path, "f32") for label, path in (graphs or {}).items()]
    runners: dict[str, Runner] = {}
    for label, path, hint in plans:
        compiled = core.compile_model(
            str(path),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": hint,
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
            },
        )
        request, port = compiled.create_infer_request(), compiled.output(OUTPUT)

        def run(x: np.ndarray, r=request, p=port) -> np.ndarray:
            r.infer({0: x})
            return np.array(r.get_tensor(p).data)

        runners[f"openvino-native {label}"] = run
    return runners


def torch_runner(threads: int) -> Runner:
    import open_clip
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_image(torch.from_numpy(x), normalize=True).numpy()

    return run


def bench_providers(
    artifact: Path, quick: bool, graphs: dict[str, Path] | None = None, only: tuple[str, ...] = ()
) -> dict:
    threads = physical_cores()
    inputs = photo_batches(artifact)
    runners, skipped = ort_runners(artifact, threads)
    runners.update(extra_ort_runners(graphs or {}, threads))
    runners.update(openvino_native_runners(artifact, threads, graphs))
    reference = runners.get("ort-cpu fp32")
    if not only or "pytorch fp32".startswith(only):
        runners = {"pytorch fp32": torch_runner(threads), **runners}
    if only:
        runners = {n: f for n, f in runners.items() if n.startswith(only)}
    for name, fn in list(runners.items()):
        try:  # an engine that cannot run a graph is a row saying why, not a failed bench
            for batch in BATCHES:
                fn(inputs[batch])
        except Exception as exc:  # any engine error becomes the row's reason
            skipped[name] = " ".join(str(exc).split())[:300]
            del runners[name]
    rows: dict[str, dict] = {name: {} for name in runners}
    for batch in BATCHES:
        x = inputs[batch]
        cases = {name: (lambda f=fn, x=x: f(x)) for name, fn in runners.items()}
        repeats = max(2, (4 if quick else 12) // batch)
        print(f"batch {batch}: {len(cases)} engines x {repeats} runs", flush=True)
        for name, median in interleaved_medians(cases, repeats, pause_s=0.1).items():
            rows[name][f"batch{batch}_ms_per_image"] = ms(median / batch)
    if reference is not None:  # accuracy of each row against fp32 on ONNX Runtime
        x = inputs[max(BATCHES)]
        ref = reference(x)
        for name, fn in runners.items():
            if name == "pytorch fp32":
                continue  # a random init of its own, not the exported weights
            out = fn(x)
            cos = np.sum(ref * out, axis=1) / (
                np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
            )
            rows[name]["cosine_vs_ort_fp32"] = {
                "mean": round(float(cos.mean()), 6),
                "min": round(float(cos.min()), 6),
            }
    return {
        "machine": {**machine_info(threads), "openvino_plugin": openvino_status().plugin_version},
        "artifact": str(artifact),
        "rows": rows,
        "not_run": skipped,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    flags = ", ".join(f for f, on in m["flags"].items() if on)
    lines = [
        f"# Execution providers, {m['date']}",
        "",
        f"{m['cpu_model']}, {m['physical_cores']} cores, {m['threads_used']} threads; "
        f"flags: {flags}; load average at start {m['load_average_at_start']}; "
        f"onnxruntime {m['versions'].get('onnxruntime')}, OpenVINO EP plugin "
        f"{m['openvino_plugin'] or 'not installed'}",
        "",
        "| engine graph | batch 1 ms/img | batch 32 ms/img | cosine vs ORT fp32 (mean / min) |",
        "|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        cos = row.get("cosine_vs_ort_fp32")
        cos_text = f"{cos['mean']:.5f} / {cos['min']:.5f}" if cos else "-"
        lines.append(
            f"| {name} | {row.get('batch1_ms_per_image')} | "
            f"{row.get('batch32_ms_per_image')} | {cos_text} |"
        )
    for name, why in result["not_run"].items():
        lines.append(f"| {name} | not run: {why} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, default=REPO / "models" / "ViT-B-32__none")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--graph",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="another graph of the artifact's model to run as extra rows",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="PREFIX",
        help="keep only the rows whose name starts with one of these",
    )
    args = parser.parse_args(argv)
    graphs = {}
    for item in args.graph:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--graph wants LABEL=PATH of an existing file, got {item!r}")
        graphs[label] = Path(path)
    os.environ.setdefault("OMP_NUM_THREADS", str(physical_cores()))
    result = bench_providers(args.artifact, args.quick, graphs, tuple(args.only))
    write_results(args.out, "providers", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
