"""Where the INT8 visual encoder's time goes, and how fast this machine's INT8 GEMM is.

    python benchmarks/profile_encoder.py [--artifact models/ViT-B-32__none] [--batch 32]

Runs the INT8 graph under ONNX Runtime's profiler with the runtime's own session options,
then reports kernel time per operator type and the multiply-add rate the quantized MatMuls
reach inside the model (multiply-adds counted from each MatMul's input and output shapes),
beside the INT8 GEMM floor (``heimdex_clip.gemm_floor``: the same shapes as MatMulInteger
alone, timed outside the profiler), what the tower would cost with every other operator
removed. Results go to
``<out>/profile.json`` and ``<out>/profile.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from heimdex_clip.artifact import load_manifest
from heimdex_clip.gemm_floor import artifact_floor
from heimdex_clip.session import cpu_features, physical_cores, session_options

REPO = Path(__file__).resolve().parents[1]
# Operators whose work is an INT8 GEMM after ONNX Runtime's fusions.
QUANTIZED_GEMMS = {
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "QLinearMatMul",
}


def multiply_adds(event_args: dict) -> int:
    """M*K*N of a MatMul kernel event: K from input A's last dim, N from the output's."""
    a_shape = next(iter(event_args["input_type_shape"][0].values()))
    out_shape = next(iter(event_args["output_type_shape"][0].values()))
    return math.prod(out_shape[:-1]) * a_shape[-1] * out_shape[-1]


def profile(artifact: Path, batch: int, threads: int, runs: int) -> dict:
    """Kernel time per operator type (ms/image) and the in-model INT8 GEMM rate.

    The INT8 graph of ``artifact``, fed under the input name and image size its manifest
    records.
    """
    manifest = load_manifest(artifact)
    int8 = manifest.files["visual.int8"]
    return profile_graph(
        artifact / int8.path,
        int8.inputs[0].name,
        manifest.preprocess.image_size,
        batch,
        threads,
        runs,
    )


def profile_graph(
    graph: Path, input_name: str, image_size: int, batch: int, threads: int, runs: int
) -> dict:
    """:func:`profile` for any image graph: ``input_name`` takes [batch, 3, size, size]."""
    shape = (batch, 3, image_size, image_size)
    pixels = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads=threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        session.run(None, {input_name: pixels})  # warm-up run, dropped below
        for _ in range(runs):
            session.run(None, {input_name: pixels})
        events = json.loads(Path(session.end_profiling()).read_text())

    run_durations = [e["dur"] for e in events if e.get("name") == "model_run"][1:]
    first_timed = [e for e in events if e.get("name") == "model_run"][1]["ts"]
    kernels = [
        e
        for e in events
        if e.get("cat") == "Node" and e["ts"] >= first_timed and e["name"].endswith("_kernel_time")
    ]
    per_op_us: dict[str, float] = defaultdict(float)
    gemm_us, gemm_macs = 0.0, 0
    for event in kernels:
        op = event["args"]["op_name"]
        per_op_us[op] += event["dur"]
        if op in QUANTIZED_GEMMS:
            gemm_us += event["dur"]
            gemm_macs += multiply_adds(event["args"])
    images = batch * runs
    kernel_total = sum(per_op_us.values())
    return {
        "batch": batch,
        "threads": threads,
        "timed_runs": runs,
        "wall_ms_per_image": round(sum(run_durations) / 1000 / images, 2),
        "kernel_ms_per_image": round(kernel_total / 1000 / images, 2),
        "by_operator": {
            op: {"ms_per_image": round(us / 1000 / images, 3), "share": round(us / kernel_total, 4)}
            for op, us in sorted(per_op_us.items(), key=lambda kv: -kv[1])
        },
        "int8_gemm": {
            "multiply_adds_per_image": gemm_macs // images,
            "ms_per_image": round(gemm_us / 1000 / images, 2),
            "g_multiply_adds_per_s": round(gemm_macs / gemm_us / 1000, 1),
        },
    }


def _floor_lines(result: dict) -> list[str]:
    """The measured floor (MatMulInteger alone on these shapes) beside the profile."""
    floor = result.get("gemm_floor", {})
    batch = result["batch"]
    if batch not in floor.get("ms_per_image", {}):
        return [f"INT8 GEMM floor: not measured ({floor.get('error', 'not asked for')}).", ""]
    value = floor["ms_per_image"][batch]
    return [
        f"INT8 GEMM floor (the same shapes as MatMulInteger alone, same threads, timed "
        f"outside the profiler): {value} ms/image ({floor['g_multiply_adds_per_s'][batch]} "
        f"G multiply-adds/s). Wall here is {result['wall_ms_per_image'] / value:.2f}x the "
        f"floor, the in-model quantized MatMuls "
        f"{result['int8_gemm']['ms_per_image'] / value:.2f}x.",
        "",
    ]


def markdown(result: dict) -> str:
    gemm = result["int8_gemm"]
    lines = [
        f"INT8 visual encoder profile, batch {result['batch']}, {result['threads']} threads, "
        f"{result['timed_runs']} runs on {result['machine']['cpu_model']} "
        f"(flags: {', '.join(result['machine']['flags']) or 'none of interest'}), "
        f"{result['machine']['date']}"
        + (
            f", load average {result['machine']['load_average_after'][0]} (other processes "
            "share the machine: compare runs made under the same load)"
            if "load_average_after" in result["machine"]
            else ""
        )
        + ".",
        "",
        f"Wall {result['wall_ms_per_image']} ms/image; kernels {result['kernel_ms_per_image']} "
        "ms/image.",
        f"Quantized MatMuls: {gemm['multiply_adds_per_image'] / 1e9:.2f} G multiply-adds/image "
        f"at {gemm['g_multiply_adds_per_s']} G multiply-adds/s = {gemm['ms_per_image']} "
        "ms/image in the model (activation scales applied, quantization nodes not "
        "included). The 6 ms/image target at batch 32 would need "
        f"{gemm['multiply_adds_per_image'] / 0.006 / 1e9:.0f} G multiply-adds/s from the "
        "MatMuls alone.",
        "",
        *_floor_lines(result),
        "| operator | ms/image | share of kernel time |",
        "|---|---|---|",
    ]
    lines += [
        f"| {op} | {v['ms_per_image']} | {v['share'] * 100:.1f}% |"
        for op, v in result["by_operator"].items()
        if v["share"] >= 0.001
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, default=REPO / "models" / "ViT-B-32__none")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    result = profile(args.artifact, args.batch, args.threads, args.runs)
    result["gemm_floor"] = artifact_floor(
        args.artifact, load_manifest(args.artifact), [args.batch], args.threads, repeats=args.runs
    )
    features = cpu_features()
    present = [flag for flag, on in features["flags"].items() if on]
    result["machine"] = {
        "cpu_model": features["cpu_model"],
        "flags": present,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "profile.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
