"""The benchmark tools count and schedule what they claim (no timings asserted here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from heimdex_clip.artifact import load_manifest
from heimdex_clip.providers import available_providers

REPO = Path(__file__).resolve().parents[1]


BENCHMARKS = REPO / "benchmarks"


def load_benchmark_module(name: str):
    """A benchmark script as a module, its siblings importable as when Python runs it."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def vit_b32_multiply_adds_with_class_token_last_block() -> int:
    """Multiply-adds in ViT-B-32's quantized MatMuls, from the architecture alone."""
    width, tokens, patches, patch_pixels, embed_dim = 768, 50, 49, 3 * 32 * 32, 512
    qkv, out, mlp = width * 3 * width, width * width, 2 * width * 4 * width
    full_block = tokens * (qkv + out + mlp)
    # Last block: keys and values from every token; query, output and MLP for the class token.
    last_block = tokens * width * 2 * width + (width * width) + out + mlp
    return patches * patch_pixels * width + 11 * full_block + last_block + width * embed_dim


def test_profiler_counts_exactly_the_models_multiply_adds(artifact_dir):
    profile_encoder = load_benchmark_module("profile_encoder")
    result = profile_encoder.profile(artifact_dir, batch=2, threads=1, runs=1)

    assert result["int8_gemm"]["multiply_adds_per_image"] == (
        vit_b32_multiply_adds_with_class_token_last_block()
    )
    shares = [op["share"] for op in result["by_operator"].values()]
    assert abs(sum(shares) - 1) < 0.01
    # The quantized GEMM kernel the manifest's recipe produces: per-token activations run in
    # MatMulIntegerToFloat, per-tensor ones in ONNX Runtime's fused DynamicQuantizeMatMul.
    granularity = load_manifest(artifact_dir).quantization["activation_granularity"]
    kernel = {"per_row": "MatMulIntegerToFloat", "per_tensor": "DynamicQuantizeMatMul"}
    assert kernel[granularity] in result["by_operator"]
    result["machine"] = {"cpu_model": "test cpu", "flags": [], "date": "today"}
    assert "G multiply-adds/image" in profile_encoder.markdown(result)


def test_interleaved_medians_let_the_cases_take_turns():
    run = load_benchmark_module("run")
    calls: list[str] = []
    medians = run.interleaved_medians(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3
    )

    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert set(medians) == {"a", "b"}


def test_compare_graphs_reports_every_graph_by_operator(artifact_dir):
    compare_graphs = load_benchmark_module("compare_graphs")
    manifest = load_manifest(artifact_dir)
    graph = artifact_dir / manifest.files["visual.int8"].path
    result = compare_graphs.compare(
        [graph, graph],
        manifest.files["visual.int8"].inputs[0].name,
        manifest.preprocess.image_size,
        [1],
        repeats=1,
        threads=1,
    )

    assert list(result) == ["1"] and len(result["1"]) == 2
    for measured in result["1"]:
        assert measured["ms_per_image"] > 0
        assert "MatMulIntegerToFloat" in measured["by_operator"]
    table = compare_graphs.markdown(result, ["a", "b"])
    assert "| ms/image | a | b |" in table and "| MatMulIntegerToFloat |" in table


def test_compare_text_graphs_times_every_case_and_compares_the_outputs(artifact_dir):
    compare_text_graphs = load_benchmark_module("compare_text_graphs")
    manifest = load_manifest(artifact_dir)
    graph = artifact_dir / manifest.files["text.int8"].path
    rows = compare_text_graphs.compare([graph, graph], repeats=1, threads=1)

    assert [(r["texts"], r["positions"]) for r in rows] == list(compare_text_graphs.CASES)
    for row in rows:
        assert len(row["ms_per_run"]) == 2 and min(row["ms_per_run"]) > 0
        assert row["min_cosine_to_first"][1] > 0.99999  # the same graph, the same vectors
    table = compare_text_graphs.markdown(rows, ["a", "b"])
    assert "| texts x positions | a, ms | b, ms | ratio | min cosine |" in table
    assert "| 1 x 7 |" in table


def test_cold_start_process_embeds_without_torch_and_reports_its_figures(artifact_dir, tmp_path):
    """run.py's cold-start child is a real script: it runs, and it never imports torch."""
    frame = tmp_path / "frame.jpg"
    Image.new("RGB", (320, 240), (200, 40, 90)).save(frame)
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "cold_start_runtime.py"),
            str(artifact_dir),
            str(frame),
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(proc.stdout.strip().splitlines()[-1])

    assert figures["torch_imported"] is False
    assert figures["cold_start_s"] > 0
    assert figures["peak_rss_mb"] > 0


def test_cold_start_process_runs_the_provider_it_is_given(artifact_dir, tmp_path):
    """run.py measures ``cpu`` beside ``auto`` where auto may pick OpenVINO: the child runs
    the provider it is handed (each one that can run here), not auto's choice."""
    frame = tmp_path / "frame.jpg"
    Image.new("RGB", (320, 240), (20, 140, 90)).save(frame)
    script = str(BENCHMARKS / "cold_start_runtime.py")
    runnable = [name for name, why_not in available_providers().items() if why_not is None]
    for provider in runnable:
        proc = subprocess.run(
            [sys.executable, script, str(artifact_dir), str(frame), "1", provider],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(proc.stdout.strip().splitlines()[-1])["provider"] == provider


def test_weight_only_int8_graph_keeps_the_function_and_quantizes_every_matmul_weight(tmp_path):
    """openvino_options.py's weight-only INT8 variant: the same function to int8 rounding,
    every 2-D MatMul weight int8 behind a DequantizeLinear, nodes in an order ORT loads."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    openvino_options = load_benchmark_module("openvino_options")
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 96)).astype(np.float32)
    w2 = rng.standard_normal((96, 32)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))

    out = openvino_options.weight_only_int8(fp32, tmp_path / "int8.onnx")

    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    kinds = [node.op_type for node in model.graph.node]
    assert kinds.count("DequantizeLinear") == 2 and kinds.count("MatMul") == 2
    assert {i.data_type for i in model.graph.initializer if i.name.endswith("/q")} == {
        TensorProto.INT8
    }
    assert not any(i.name in ("w1", "w2") for i in model.graph.initializer)  # fp32 copies gone
    x = rng.standard_normal((8, 64)).astype(np.float32)
    want = ort.InferenceSession(str(fp32)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    cosine = np.sum(want * got, 1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.999 and not np.array_equal(want, got)
