"""The INT8 GEMM floor (heimdex_clip.gemm_floor) is built from the graph's own GEMMs and
computes real integer products. No timing is asserted: speed is measured in benchmarks/."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from test_benchmark_tools import vit_b32_multiply_adds_with_class_token_last_block

from heimdex_clip import gemm_floor
from heimdex_clip.artifact import load_manifest
from heimdex_clip_export import rowwise

TOKENS, WIDTH, HIDDEN, OUT = 5, 16, 24, 8


def _two_layer_tower() -> onnx.ModelProto:
    """x [B, 5, 16] -> MatMul [16, 24] -> Relu -> MatMul [24, 16] -> token 0 -> MatMul [16, 8]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w1", (WIDTH, HIDDEN)), ("w2", (HIDDEN, WIDTH)), ("w3", (WIDTH, OUT)))
    ]
    inits.append(numpy_helper.from_array(np.array(0, np.int64), "first"))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["z"]),
        helper.make_node("Gather", ["z", "first"], ["cls"], axis=1),
        helper.make_node("MatMul", ["cls", "w3"], ["y"]),
    ]
    for node in nodes:
        node.name = node.output[0]
    graph = helper.make_graph(
        nodes,
        "tower",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert len(rowwise.rewrite(model)) == 3  # the export's own per-row INT8 rewrite
    return model


def test_gemm_shapes_are_read_off_the_graph():
    feed = lambda batch: {"x": np.zeros((batch, TOKENS, WIDTH), np.float32)}  # noqa: E731
    gemms = gemm_floor.artifact_gemms(_two_layer_tower().SerializeToString(), feed)

    assert sorted(gemms, key=lambda g: (g.k, g.n)) == [
        gemm_floor.Gemm(1, WIDTH, OUT),
        gemm_floor.Gemm(TOKENS, WIDTH, HIDDEN),
        gemm_floor.Gemm(TOKENS, HIDDEN, WIDTH),
    ]
    assert gemm_floor.describe(gemms)["multiply_adds_per_image"] == (
        TOKENS * WIDTH * HIDDEN + TOKENS * HIDDEN * WIDTH + WIDTH * OUT
    )


def test_floor_graph_multiplies_exactly_the_shapes_asked_for():
    gemms = [gemm_floor.Gemm(3, 32, 8, count=2), gemm_floor.Gemm(1, 16, 4)]
    model = onnx.load_from_string(gemm_floor.floor_graph(gemms, batch=2))
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("MatMulInteger") == 3
    weights = {
        i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("/w")
    }
    assert sorted(w.shape for w in weights.values()) == [(16, 4), (32, 8), (32, 8)]
    assert len({w.tobytes() for w in weights.values()}) == 3  # each GEMM its own weights

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    feeds = {i.name: rng.integers(0, 256, i.shape, dtype=np.uint8) for i in session.get_inputs()}
    assert {i.name: tuple(i.shape) for i in session.get_inputs()} == {
        "a_6x32": (6, 32),
        "a_2x16": (2, 16),
    }
    results = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
    )
    for node in (n for n in model.graph.node if n.op_type == "MatMulInteger"):
        a = feeds[node.input[0]].astype(np.int64) - 128
        expected = (a @ weights[node.input[1]].astype(np.int64))[0, 0]
        assert results[node.output[0] + "/y"][0, 0] == expected


def test_the_artifacts_floor_has_every_int8_gemm_of_vit_b32(artifact_dir):
    floor = gemm_floor.artifact_floor(
        artifact_dir, load_manifest(artifact_dir), [1, 2], threads=1, repeats=1
    )

    assert "error" not in floor, floor
    assert floor["multiply_adds_per_image"] == vit_b32_multiply_adds_with_class_token_last_block()
    assert set(floor["ms_per_image"]) == {1, 2} and min(floor["ms_per_image"].values()) > 0
    assert "INT8 GEMM floor (visual.int8's 74 INT8 GEMMs" in gemm_floor.floor_line(floor)


def test_an_fp32_graph_has_no_int8_floor(artifact_dir):
    floor = gemm_floor.artifact_floor(
        artifact_dir, load_manifest(artifact_dir), [1], threads=1, key="visual.fp32"
    )
    assert floor == {"error": "the graph has no INT8 GEMM (an fp32 graph has no INT8 floor)"}
