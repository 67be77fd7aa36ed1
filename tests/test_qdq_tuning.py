"""The QDQ recipe's tools on a small real ONNX graph: SmoothQuant keeps the float function,
and the sensitivity budget keeps exactly the ranked MatMuls in float (and says which)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from heimdex_clip_export import qdq_tuning
from heimdex_clip_export.static_qdq import QdqRecipe, heads_first_layout, quantize_qdq

TOKENS, WIDTH, HIDDEN = 6, 16, 32


def _tiny_block(path) -> onnx.ModelProto:
    """LayerNorm -> MatMul -> Relu -> MatMul -> mean over tokens; one outlier channel."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (WIDTH, HIDDEN)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (HIDDEN, WIDTH)).astype(np.float32)
    gamma = np.ones(WIDTH, np.float32)
    gamma[3] = 20.0  # an activation outlier channel, as trained ViTs have
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [
            (w1, "w1"),
            (w2, "w2"),
            (gamma, "gamma"),
            (np.zeros(WIDTH, np.float32), "beta"),
            (np.zeros(HIDDEN, np.float32) + 0.1, "b1"),
            (np.array([1], np.int64), "axes"),
        ]
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["act"], name="act"),
        helper.make_node("MatMul", ["act", "w2"], ["y"], name="fc2"),
        helper.make_node("ReduceMean", ["y", "axes"], ["embedding"], name="pool", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"x": x})[0]


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, TOKENS, WIDTH)).astype(np.float32)


def test_smoothing_keeps_the_float_function_and_folds_into_the_layer_norm(tmp_path):
    model = _tiny_block(tmp_path / "tiny.onnx")
    x = _inputs(8, 1)
    before = _run(model, x)
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    assert qdq_tuning.smooth_graph(smoothed, _inputs(16, 2), alpha=0.6) == 2
    np.testing.assert_allclose(_run(smoothed, x), before, rtol=1e-4, atol=1e-5)
    ln = next(n for n in smoothed.graph.node if n.op_type == "LayerNormalization")
    inits = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    # fc1's input: divided inside the layer norm, the outlier channel shrunk the most.
    gamma = inits[ln.input[1]]
    assert gamma[3] / 20.0 < np.delete(gamma, 3).min()
    # fc2's input comes from a Relu: an explicit per-channel Mul feeds fc2.
    fc2 = next(n for n in smoothed.graph.node if n.name == "fc2")
    mul = next(n for n in smoothed.graph.node if fc2.input[0] in n.output)
    assert mul.op_type == "Mul" and mul.input[0] == "act"


def test_float_budget_keeps_the_most_sensitive_matmul_float_and_records_it(tmp_path):
    _tiny_block(tmp_path / "tiny.onnx")
    recipe = replace(QdqRecipe(), float_budget=1, sensitivity_images=8, calibration_batch=4)
    out = tmp_path / "tiny.qdq.onnx"
    record = quantize_qdq(tmp_path / "tiny.onnx", out, "x", "embedding", _inputs(16, 3), recipe)
    assert record["float_budget"] == 1 and record["smooth_alpha"] == 0.6
    assert len(record["float_matmuls"]) == 1
    graph = onnx.load(str(out)).graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    float_weight = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    quantized = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul"
        and producer.get(n.input[1]) is not None
        and producer[n.input[1]].op_type == "DequantizeLinear"
    ]
    assert float_weight == record["float_matmuls"]
    assert len(quantized) == 1 and set(quantized) | set(float_weight) == {"fc1", "fc2"}


def test_sensitivity_scan_ranks_every_quantized_matmul_by_its_measured_gain(tmp_path):
    _tiny_block(tmp_path / "tiny.onnx")
    gains = qdq_tuning.sensitivity_scan(
        _quantized_without_budget(tmp_path, QdqRecipe(calibration_batch=4)),
        onnx.load(str(tmp_path / "tiny.onnx")),
        _inputs(8, 3),
        "x",
        "embedding",
    )
    assert {name for name, _ in gains} == {"fc1", "fc2"}
    assert gains[0][1] >= gains[1][1] and gains[0][1] > 0  # float again: a smaller error


def _quantized_without_budget(tmp_path, recipe: QdqRecipe) -> onnx.ModelProto:
    out = tmp_path / "tiny.all.qdq.onnx"
    quantize_qdq(
        tmp_path / "tiny.onnx",
        out,
        "x",
        "embedding",
        _inputs(16, 3),
        replace(recipe, float_budget=0, smooth_alpha=None),
    )
    return onnx.load(str(out))


def _packed_heads(heads: int = 2, dim: int = 4, tokens: int = 5) -> onnx.ModelProto:
    """The 5-D form quant_pre_process leaves: Q and V sliced from the packed projection
    [B, L, 3, H, D], Transpose(2,0,3,1,4), Squeeze(0); then softmax(Q K^T) V."""
    shape = np.array([0, tokens, 3, heads, dim], np.int64)
    inits = [
        numpy_helper.from_array(shape, "shape"),
        numpy_helper.from_array(np.array([0], np.int64), "ax0"),
    ]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["packed"])]
    for i, part in enumerate("qkv"):
        inits += [
            numpy_helper.from_array(np.array([i], np.int64), f"{part}_start"),
            numpy_helper.from_array(np.array([i + 1], np.int64), f"{part}_end"),
            numpy_helper.from_array(np.array([2], np.int64), f"{part}_axis"),
        ]
        nodes.append(
            helper.make_node(
                "Slice", ["packed", f"{part}_start", f"{part}_end", f"{part}_axis"], [f"{part}5"]
            )
        )
    for part in "qv":
        nodes += [
            helper.make_node("Transpose", [f"{part}5"], [f"{part}t"], perm=[2, 0, 3, 1, 4]),
            helper.make_node("Squeeze", [f"{part}t", "ax0"], [part]),
        ]
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "ax2"))
    nodes += [
        helper.make_node("Squeeze", ["k5", "ax2"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "v"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "packed_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, tokens, 3 * heads * dim])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 5, 4]),
            helper.make_tensor_value_info("q", TensorProto.FLOAT, [None, 2, 5, 4]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_heads_first_layout_reorders_without_changing_a_value():
    model = _packed_heads()
    x = np.random.default_rng(0).standard_normal((3, 5, 24)).astype(np.float32)
    before = _run(model, x)
    assert heads_first_layout(model) == 2  # Q and V; K's 4-D transpose is left alone
    onnx.checker.check_model(model, full_check=True)
    perms = [list(n.attribute[0].ints) for n in model.graph.node if n.op_type == "Transpose"]
    assert sorted(perms) == [[0, 2, 1, 3], [0, 2, 1, 3], [0, 2, 3, 1]]
    for old, new in zip(before, _run(model, x), strict=True):
        np.testing.assert_array_equal(old, new)


def test_the_exported_qdq_graph_has_no_five_dimensional_head_transposes(artifact_dir):
    graph = onnx.load(str(artifact_dir / "visual.qdq.onnx"), load_external_data=False).graph
    perms = [list(n.attribute[0].ints) for n in graph.node if n.op_type == "Transpose"]
    assert [0, 2, 1, 3] in perms and [2, 0, 3, 1, 4] not in perms
