"""The benchmark tools count and schedule what they claim (no timings asserted here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from heimdex_clip.artifact import load_manifest

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
