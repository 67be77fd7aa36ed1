"""Ideas for the gap between the INT8 tower and its GEMM floor, each measured in isolation.

    python benchmarks/gap_ideas.py [--artifact models/ViT-B-32__none] [--repeats 15]

Issue 25 lists ONNX Runtime's fused ops as ways to close the gap the profile shows
(``profile_encoder.py``). Each is measured here on ViT-B-32's own tensor shapes ([B, 50, 768],
12 layers, 12 heads), alternatives taking turns (``run.interleaved_medians``), at batch 1
and 32, with the runtime's session options:

* ``dispatch``: what one more tiny node costs (a chain of 500 ``Neg`` on 50 floats vs 10):
  the price of the per-row quantization's small nodes.
* ``skip_layer_norm``: ``com.microsoft.SkipLayerNormalization`` (residual + bias + norm in
  one op) vs the graph's ``Add`` + ``Add`` + ``LayerNormalization``.
* ``attention``: ONNX's ``Attention`` (opset 23; no bias input, so Q and V get an ``Add``
  each, K's bias is dropped because softmax ignores it) vs ``com.microsoft.MultiHeadAttention``.

Results: ``<out>/gap_ideas.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from heimdex_clip.session import cpu_features, physical_cores, session_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO, interleaved_medians, ms, write_results  # a sibling script

WIDTH, TOKENS, HEADS, LAYERS = 768, 50, 12, 12


def _session(
    nodes: list,
    inputs: dict[str, list[int]],
    output: str,
    inits: list,
    threads: int,
    opset: int = 18,
) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes,
        "idea",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 10
    return ort.InferenceSession(
        model.SerializeToString(),
        session_options(threads=threads),
        providers=["CPUExecutionProvider"],
    )


def dispatch(threads: int, repeats: int) -> dict:
    """Microseconds per extra tiny node."""

    def chain(length: int) -> ort.InferenceSession:
        nodes = [helper.make_node("Neg", [f"x{i}"], [f"x{i + 1}"]) for i in range(length)]
        return _session(nodes, {"x0": [TOKENS]}, f"x{length}", [], threads)

    sessions = {n: chain(n) for n in (10, 510)}
    x = np.ones(TOKENS, np.float32)
    medians = interleaved_medians(
        {n: (lambda s=s: s.run(None, {"x0": x})) for n, s in sessions.items()}, repeats * 10
    )
    return {"us_per_node": round((medians[510] - medians[10]) / 500 * 1e6, 3)}


def _norm_layers(fused: bool, rng: np.random.Generator) -> tuple[list, list]:
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        inits += [
            numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), n)
            for n in (f"gamma{i}", f"beta{i}", f"bias{i}")
        ]
        if fused:
            nodes.append(
                helper.make_node(
                    "SkipLayerNormalization",
                    [x, "y", f"gamma{i}", f"beta{i}", f"bias{i}"],
                    [f"norm{i}", "", "", f"sum{i}"],
                    domain="com.microsoft",
                    epsilon=1e-5,
                )
            )
        else:
            nodes += [
                helper.make_node("Add", ["y", f"bias{i}"], [f"biased{i}"]),
                helper.make_node("Add", [x, f"biased{i}"], [f"sum{i}"]),
                helper.make_node(
                    "LayerNormalization",
                    [f"sum{i}", f"gamma{i}", f"beta{i}"],
                    [f"norm{i}"],
                    axis=-1,
                    epsilon=1e-5,
                ),
            ]
        nodes.append(helper.make_node("Add", [f"sum{i}", f"norm{i}"], [f"x{i + 1}"]))
        x = f"x{i + 1}"
    return nodes, inits


def _attention_layers(onnx_op: bool, rng: np.random.Generator) -> tuple[list, list]:
    bias = rng.standard_normal(3 * WIDTH).astype(np.float32) * 0.1
    inits = [
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(bias[:WIDTH], "bias_q"),
        numpy_helper.from_array(bias[2 * WIDTH :], "bias_v"),
    ]
    nodes, q = [], "q"
    for i in range(LAYERS):
        if onnx_op:
            nodes += [
                helper.make_node("Add", [q, "bias_q"], [f"qb{i}"]),
                helper.make_node("Add", ["v", "bias_v"], [f"vb{i}"]),
                helper.make_node(
                    "Attention",
                    [f"qb{i}", "k", f"vb{i}"],
                    [f"o{i}"],
                    q_num_heads=HEADS,
                    kv_num_heads=HEADS,
                    scale=0.125,
                ),
            ]
        else:
            nodes.append(
                helper.make_node(
                    "MultiHeadAttention",
                    [q, "k", "v", "bias"],
                    [f"o{i}"],
                    domain="com.microsoft",
                    num_heads=HEADS,
                    scale=0.125,
                )
            )
        q = f"o{i}"
    return nodes, inits


def compare(build, feeds: list[str], threads: int, repeats: int, opset: int) -> dict:
    """ms/image of both variants of ``build`` at batch 1 and 32, and their largest difference."""
    out = {}
    for batch in (1, 32):
        rng = np.random.default_rng(0)
        shape = [batch, TOKENS, WIDTH]
        sessions = {}
        for variant in (False, True):
            nodes, inits = build(variant, np.random.default_rng(1))
            sessions[variant] = _session(
                nodes, dict.fromkeys(feeds, shape), nodes[-1].output[0], inits, threads, opset
            )
        feed = {n: rng.standard_normal(shape).astype(np.float32) for n in feeds}
        results = [sessions[v].run(None, feed)[0] for v in (False, True)]
        medians = interleaved_medians(
            {v: (lambda s=s, f=feed: s.run(None, f)) for v, s in sessions.items()},
            max(3, repeats * 8 // batch),
            pause_s=0.05,
        )
        out[batch] = {
            "graph_ops_ms_per_image": ms(medians[False] / batch),
            "fused_op_ms_per_image": ms(medians[True] / batch),
            "max_abs_diff": float(np.abs(results[0] - results[1]).max()),
        }
    return out


def markdown(r: dict) -> str:
    lines = [
        f"Measured {r['date']} on {r['cpu']['cpu_model']} (flags: "
        f"{', '.join(f for f, on in r['cpu']['flags'].items() if on)}), {r['threads']} "
        f"threads, load average {r['load_average']} at the start (shared machine).",
        "",
        f"One more tiny node costs {r['dispatch']['us_per_node']} us.",
        "",
        "| 12 layers of [B, 50, 768], ms/image | batch | graph's ops | fused op | max abs diff |",
        "|---|---|---|---|---|",
    ]
    for name, label in (
        ("skip_layer_norm", "Add + Add + LayerNorm vs SkipLayerNormalization"),
        ("attention", "MultiHeadAttention vs Attention (opset 23) + 2 Add"),
    ):
        for batch, v in r[name].items():
            lines.append(
                f"| {label} | {batch} | {v['graph_ops_ms_per_image']} | "
                f"{v['fused_op_ms_per_image']} | {v['max_abs_diff']:.2g} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    import time

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_features(),
        "threads": args.threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "dispatch": dispatch(args.threads, args.repeats),
        "skip_layer_norm": compare(_norm_layers, ["x", "y"], args.threads, args.repeats, 18),
        "attention": compare(_attention_layers, ["q", "k", "v"], args.threads, args.repeats, 23),
    }
    write_results(args.out, "gap_ideas", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
