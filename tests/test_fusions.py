"""The attention fusion (fusions.py): fused where the pattern is, untouched where it is not.

Fast tests build a small self-attention block in ONNX, put it through the export's own
per-row INT8 rewrite, and fuse it. The attention output is compared tensor for tensor
(the fused kernel only reorders float arithmetic: same quantized inputs, same integer
GEMMs); the end output only loosely, because the output projection re-quantizes its input
per row, and a rounding-level change can move a value across a quantization step.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from heimdex_clip_export import attention_fusion, fusions, rowwise
from heimdex_clip_export.graph_edit import Graph
from heimdex_clip_export.quantize import activation_absmax

BATCH, TOKENS, HEADS, HEAD_DIM = 3, 7, 4, 8
WIDTH = HEADS * HEAD_DIM


def _attention_block(interleaved_heads: bool = False) -> onnx.ModelProto:
    """x [B, S, D] -> packed QKV projection -> multi-head attention -> output projection.

    ``interleaved_heads`` gives head ``n`` the columns ``n, n + N, n + 2N...`` instead of a
    contiguous block: a valid attention, but not the one ONNX's Attention op computes.
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(
            (rng.standard_normal((WIDTH, 3 * WIDTH)) / np.sqrt(WIDTH)).astype(np.float32), "w_qkv"
        ),
        numpy_helper.from_array(rng.standard_normal(3 * WIDTH).astype(np.float32), "b_qkv"),
        numpy_helper.from_array(
            (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32), "w_out"
        ),
        numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), "b_out"),
        numpy_helper.from_array(np.array(HEAD_DIM**-0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array([0, 0, WIDTH], np.int64), "merged"),
    ]
    split = [0, 0, 3, HEAD_DIM, HEADS] if interleaved_heads else [0, 0, 3, HEADS, HEAD_DIM]
    inits.append(numpy_helper.from_array(np.array(split, np.int64), "split_heads"))
    # [B, S, 3, N, H] -> [3, B, N, S, H] (interleaved: [B, S, 3, H, N] -> [3, B, N, S, H])
    perm = [2, 0, 4, 1, 3] if interleaved_heads else [2, 0, 3, 1, 4]
    nodes = [
        helper.make_node("MatMul", ["x", "w_qkv"], ["qkv0"]),
        helper.make_node("Add", ["qkv0", "b_qkv"], ["qkv"]),
        helper.make_node("Reshape", ["qkv", "split_heads"], ["heads"]),
        helper.make_node("Transpose", ["heads"], ["qkv_t"], perm=perm),
    ]
    for i, name in enumerate("qkv"):
        inits.append(numpy_helper.from_array(np.array(i, np.int64), f"index_{name}"))
        nodes.append(helper.make_node("Gather", ["qkv_t", f"index_{name}"], [name], axis=0))
    nodes += [
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["q", "scale"], ["q_scaled"]),
        helper.make_node("MatMul", ["q_scaled", "k_t"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["mixed"]),
        helper.make_node("Transpose", ["mixed"], ["mixed_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["mixed_t", "merged"], ["context"]),
        helper.make_node("MatMul", ["context", "w_out"], ["out0"]),
        helper.make_node("Add", ["out0", "b_out"], ["y"]),
    ]
    for node in nodes:
        node.name = node.output[0]
    graph = helper.make_graph(
        nodes,
        "attention_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _inputs(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((BATCH, TOKENS, WIDTH)).astype(np.float32)
    x[..., 3] *= 20  # an outlier channel, so SmoothQuant has something to move
    return x


def _int8_block(interleaved_heads: bool = False) -> onnx.ModelProto:
    model = _attention_block(interleaved_heads)
    absmax = activation_absmax(model, _inputs(1))
    rowwise.rewrite(model, act_absmax=absmax, alpha=0.6)
    return model


def _run(model: onnx.ModelProto, outputs: list[str], x: np.ndarray) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs if n not in known
    )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {"x": x})


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_attention_block_is_fused_and_computes_the_same():
    unfused = _int8_block()
    fused = onnx.ModelProto()
    fused.CopyFrom(unfused)
    report = fusions.fuse(fused)
    onnx.checker.check_model(fused)

    assert report.attention == 1 and report.attention_output_smoothing_folded == 1
    ops = _ops(fused)
    assert ops.count("Attention") == 1
    attention = next(n for n in fused.graph.node if n.op_type == "Attention")
    producers = {o: n.op_type for n in fused.graph.node for o in n.output}
    # Q's and V's biases as Adds; K's is dropped (softmax cancels it).
    assert [producers[i] for i in attention.input] == ["Add", "Reshape", "Add"]
    assert next(o.version for o in fused.opset_import if o.domain == "") == 23
    assert {"Softmax", "MatMul", "Transpose", "Gather"}.isdisjoint(ops)
    # The output projection's SmoothQuant Mul went into V's weight scales.
    smoothing = [
        n
        for n in unfused.graph.node
        if n.op_type == "Mul" and n.input[1].endswith("/inv_smooth") and n.input[0] == "context"
    ]
    assert len(smoothing) == 1
    assert [
        n.input[0]
        for n in fused.graph.node
        if n.op_type == "Mul" and n.input[1].endswith("/inv_smooth")
    ] == ["x"]  # the block input's stays
    attention_out = smoothing[0].output[0]  # the same tensor name in both graphs

    x = _inputs(2)
    want_attention, want_y = _run(unfused, [attention_out, "y"], x)
    got_attention, got_y = _run(fused, [attention_out, "y"], x)
    # Same integer GEMMs; only float summation order and softmax kernels differ.
    np.testing.assert_allclose(
        got_attention, want_attention, rtol=1e-4, atol=1e-5 * np.abs(want_attention).max()
    )
    cos = (
        np.sum(got_y * want_y, -1)
        / np.linalg.norm(got_y, axis=-1)
        / np.linalg.norm(want_y, axis=-1)
    )
    assert cos.min() > 0.9999


def test_interleaved_heads_are_not_mistaken_for_multi_head_attention():
    """The same ops with another head layout: a different function, so no fusion."""
    unfused = _int8_block(interleaved_heads=True)
    # The attention core is found; what its layout ops compute is what rules it out.
    assert len(attention_fusion._find_cores(Graph(unfused))) == 1
    fused = onnx.ModelProto()
    fused.CopyFrom(unfused)
    report = fusions.fuse(fused)
    assert report.attention == 0
    assert fused.SerializeToString() == unfused.SerializeToString()


def test_graph_without_int8_projections_is_left_untouched():
    """The fp32 block: attention is there, but its projections are float MatMuls."""
    model = _attention_block()
    before = model.SerializeToString()
    assert fusions.fuse(model).attention == 0
    assert model.SerializeToString() == before


def test_onnx_runtime_scales_the_gemm_bias_by_a_per_row_activation_scale():
    """Why the projection biases stay separate Adds: with a per-row ``a_scale``,
    MatMulIntegerToFloat's optional bias comes out multiplied by each row's scale. If a
    new ONNX Runtime fixes this, folding the biases into the GEMM becomes possible."""
    rng = np.random.default_rng(0)
    rows, depth, columns = 4, 16, 8
    a = rng.integers(0, 256, (rows, depth)).astype(np.uint8)
    # |b| <= 64, as the export bounds its weights: AVX2's u8 x s8 kernel adds pairs of
    # products in saturating int16, which full-range weights would overflow (a CPU effect
    # this test is not about).
    b = rng.integers(-64, 65, (depth, columns)).astype(np.int8)
    a_scale = rng.uniform(0.01, 0.1, (rows, 1)).astype(np.float32)
    b_scale = rng.uniform(0.01, 0.1, columns).astype(np.float32)
    bias = rng.standard_normal(columns).astype(np.float32)
    node = helper.make_node(
        "MatMulIntegerToFloat",
        ["a", "b", "a_scale", "b_scale", "zp", "", "bias"],
        ["y"],
        domain="com.microsoft",
    )
    graph = helper.make_graph(
        [node],
        "gemm",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, depth]),
            helper.make_tensor_value_info("a_scale", TensorProto.FLOAT, [rows, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(b_scale, "b_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "zp"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"a": a, "a_scale": a_scale})[0]
    product = (a.astype(np.int64) - 128) @ b.astype(np.int64) * a_scale * b_scale
    np.testing.assert_allclose(y, product + bias * a_scale, rtol=1e-5, atol=1e-5)
    assert np.abs(y - (product + bias)).max() > 0.1


def test_the_clip_export_ships_its_attention_fused(artifact_dir):
    """The open_clip ViT-B-32 export matches: every block's attention core is fused."""
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    assert manifest["quantization"]["fused"] == {
        "attention": 12,
        "attention_output_smoothing_folded": 12,
        "transpose_pairs_cancelled": 1,
    }
    ops = _ops(onnx.load(str(artifact_dir / "visual.int8.onnx")))
    assert ops.count("Attention") == 12 and "MultiHeadAttention" not in ops
    assert ops.count("Transpose") == 1  # the patch cut; its way back from the conv layout went
    assert {"Softmax", "MatMul"}.isdisjoint(ops)  # no float attention MatMul is left


def _transpose_round_trip(reshape_to: list[int], back: list[int]) -> onnx.ModelProto:
    """x [B, S, D] -> Transpose(0, 2, 1) -> Reshape(reshape_to) -> Transpose(back) -> + 1."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1], name="t"),
        helper.make_node("Reshape", ["t", "shape"], ["r"], name="r"),
        helper.make_node("Transpose", ["r"], ["back"], perm=back, name="back"),
        helper.make_node("Add", ["back", "one"], ["y"], name="y"),
    ]
    graph = helper.make_graph(
        nodes,
        "round_trip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array(reshape_to, np.int64), "shape"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_transpose_round_trip_through_a_shape_keeping_reshape_is_removed():
    model = _transpose_round_trip([-1, WIDTH, TOKENS], [0, 2, 1])
    x = _inputs(3)
    want = _run(model, ["y"], x)[0]
    assert fusions.cancel_transpose_pairs(model) == 1
    assert _ops(model) == ["Add"]
    np.testing.assert_array_equal(_run(model, ["y"], x)[0], want)  # pure data movement


def test_transpose_pairs_that_move_data_are_kept():
    """A Reshape that regroups the elements, or a second Transpose that does not undo the
    first: removing either would change the result."""
    for model in (
        _transpose_round_trip([-1, TOKENS, WIDTH], [0, 2, 1]),
        _transpose_round_trip([-1, WIDTH, TOKENS], [1, 0, 2]),
    ):
        before = model.SerializeToString()
        assert fusions.cancel_transpose_pairs(model) == 0
        assert model.SerializeToString() == before
