"""OpenVINO EP settings side by side: the runtime's own setup against variants of it.

    python benchmarks/openvino_options.py [--artifact models/ViT-B-32__none]
        [--variants FILE.json] [--batches 1,32] [--repeats 7] [--threads 2] [--out DIR]

Each variant is the runtime's OpenVINO setup (``ProviderSetup``: the bf16 or f32 hint the
runtime would choose, LATENCY, the thread count) with changes: ``cpu`` entries go into
the plugin's ``load_config`` for the CPU device, ``graph`` names another ONNX file to run
(relative to the artifact; ``weight-only-int8`` builds one from the fp32 graph:
:func:`weight_only_int8`), ``only_batch`` limits a variant to one batch size (a static
input shape), ``streams`` > 1 splits each batch across that many calls made
at once from as many Python threads (with ``NUM_STREAMS`` set to match), and any other key
is passed to the plugin as a provider option (``reshape_input``, ...). Variants take turns
call by call (``bench_utils.interleaved_medians``); each figure is the median ms/image,
with the minimum cosine of the variant's embeddings against the first variant's.
Needs the openvino extra and a CPU the plugin offers a device on (Intel).
Writes ``<out>/openvino_options.json`` and ``.md`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from bench_utils import REPO, interleaved_medians, machine_info, write_results

from heimdex_clip.providers import ProviderSetup, openvino_precision_hint, openvino_status
from heimdex_clip.session import physical_cores, session_options

# What was tried on 2026-12-07 (docs/floor.md): static shapes, thread pinning, two streams,
# and weight-only INT8 with OpenVINO's dynamic activation quantization (graph made by hand).
DEFAULT_VARIANTS: dict[str, dict] = {
    "runtime's setup": {},
    "static shape [1,3,224,224]": {
        "reshape_input": "pixel_values[1,3,224,224]",
        "only_batch": 1,
    },
    "bounded shape [1..32,3,224,224]": {"reshape_input": "pixel_values[1..32,3,224,224]"},
    "cpu pinning on": {"cpu": {"ENABLE_CPU_PINNING": "YES"}},
    "two streams, half a batch each": {"streams": 2},
    "fp32 graph": {"graph": "visual.fp32.onnx"},
    "weight-only INT8 graph": {"graph": "weight-only-int8"},
    "weight-only INT8, f32 hint, dynamic quantization, groups of 128": {
        "graph": "weight-only-int8",
        "cpu": {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "128"},
    },
}


def weight_only_int8(fp32_graph: Path, out: Path) -> Path:
    """The fp32 graph with every 2-D MatMul weight as int8 (per output channel, symmetric)
    behind a ``DequantizeLinear``: the form OpenVINO keeps as compressed weights, whose
    activations it can quantize at run time (``DYNAMIC_QUANTIZATION_GROUP_SIZE``)."""
    import onnx
    from onnx import helper, numpy_helper

    from heimdex_clip_export.graph_edit import topological_sort

    model = onnx.load(str(fp32_graph))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        if w.ndim != 2:
            continue
        scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127).astype(np.float32)
        name = node.input[1] + "/int8"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.round(w / scale).astype(np.int8), name + "/q"),
                numpy_helper.from_array(scale, name + "/scale"),
            ]
        )
        graph.node.append(
            helper.make_node("DequantizeLinear", [name + "/q", name + "/scale"], [name], axis=1)
        )
        node.input[1] = name
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    topological_sort(model)  # the DequantizeLinear nodes were appended after their consumers
    onnx.save(model, str(out))
    return out


class Variant:
    """One OpenVINO session built from the runtime's setup plus ``changes``."""

    def __init__(self, artifact: Path, changes: dict, threads: int, scratch: Path) -> None:
        changes = dict(changes)
        graph = changes.pop("graph", "visual.qdq.onnx")
        self.only_batch: int | None = changes.pop("only_batch", None)
        if graph == "weight-only-int8":
            self.graph = scratch / "visual.weight_only_int8.onnx"
            if not self.graph.exists():
                weight_only_int8(artifact / "visual.fp32.onnx", self.graph)
        else:
            self.graph = artifact / graph
        self.streams = int(changes.pop("streams", 1))
        setup = ProviderSetup(
            provider="openvino", threads=threads, precision_hint=openvino_precision_hint(False)
        )
        load_config = json.loads(json.dumps(setup.provider_options))
        load_config["CPU"].update(changes.pop("cpu", {}))
        if self.streams > 1:
            load_config["CPU"].update(
                {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(self.streams)}
            )
            changes.setdefault("num_streams", str(self.streams))
        self.load_config = load_config
        options = session_options(threads=threads)
        status = openvino_status()
        if status.device is None:
            raise SystemExit(f"OpenVINO cannot run here: {status.reason}")
        options.add_provider_for_devices(
            [status.device], {"load_config": json.dumps(load_config), **changes}
        )
        started = time.perf_counter()
        self.session = ort.InferenceSession(str(self.graph), options)
        self.load_s = time.perf_counter() - started
        self.input = self.session.get_inputs()[0].name
        self.pool = ThreadPoolExecutor(self.streams) if self.streams > 1 else None

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if self.pool is None:
            return self.session.run(None, {self.input: pixels})[0]
        parts = [part for part in np.array_split(pixels, self.streams) if len(part)]
        runs = self.pool.map(lambda part: self.session.run(None, {self.input: part})[0], parts)
        return np.concatenate(list(runs))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def compare(
    artifact: Path, variants: dict[str, dict], batches: list[int], repeats: int, threads: int
) -> dict:
    """ms/image (median of turns) and min cosine against the first variant, per batch."""
    with tempfile.TemporaryDirectory() as scratch:
        built = {
            name: Variant(artifact, changes, threads, Path(scratch))
            for name, changes in variants.items()
        }
    rng = np.random.default_rng(0)
    figures: dict = {}
    for batch in batches:
        pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        calls = max(1, 32 // batch)  # >= 32 images per timed sample
        here = {n: v for n, v in built.items() if v.only_batch in (None, batch)}
        medians = interleaved_medians(
            {
                name: (lambda v=v, x=pixels, n=calls: [v.embed(x) for _ in range(n)])
                for name, v in here.items()
            },
            repeats,
        )
        reference = next(iter(built.values())).embed(pixels)
        figures[batch] = {
            name: {
                "ms_per_image": round(medians[name] * 1000 / calls / batch, 2),
                "min_cosine_vs_first": round(min_cosine(v.embed(pixels), reference), 5),
            }
            for name, v in here.items()
        }
    return {
        "variants": {
            name: {"changes": variants[name], "graph": v.graph.name, "load_s": round(v.load_s, 2)}
            for name, v in built.items()
        },
        "ms_per_image": figures,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    batches = list(result["ms_per_image"])
    lines = [
        f"Measured {m['date']} on {m['cpu_model']} "
        f"(flags: {', '.join(f for f, on in m['flags'].items() if on)}), "
        f"{m['threads_used']} threads, load average {m['load_average_at_start']} at the start; "
        f"{result['repeats']} turns per variant.",
        "",
        "| variant | " + " | ".join(f"batch {b}, ms/image (min cos)" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for name in result["variants"]:
        cells = [
            f"{row['ms_per_image']} ({row['min_cosine_vs_first']})"
            if (row := result["ms_per_image"][b].get(name))
            else "-"
            for b in batches
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, default=REPO / "models" / "ViT-B-32__none")
    parser.add_argument("--variants", type=Path, default=None, help="JSON: {name: changes}")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = json.loads(args.variants.read_text()) if args.variants else DEFAULT_VARIANTS
    batches = [int(b) for b in args.batches.split(",")]
    result = {
        "machine": machine_info(args.threads),
        "repeats": args.repeats,
        **compare(args.artifact, variants, batches, args.repeats, args.threads),
    }
    table = markdown(result)
    if args.out:
        write_results(args.out, "openvino_options", result, table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
