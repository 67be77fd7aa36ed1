"""Per-row (per-token) dynamic INT8 for every weight MatMul of an ONNX graph.

Each MatMul ``Y = X @ W`` whose ``W`` is a 2-D initializer becomes:

* ``X`` divided per channel by SmoothQuant factors ``s`` (``W`` multiplied by them), which
  moves activation outlier channels into the weights (optional). The division is folded
  into the layer norm that produces ``X`` where there is one, else it is one ``Mul``;
* ``X`` quantized per row to uint8 around a fixed zero point of 128 (symmetric: one scale
  per row = max |x| / 127), so a token's quantization depends on that token only and an
  image's embedding cannot depend on its batch-mates; ONNX Runtime's integer kernels accept
  only a scalar zero point for ``X``, hence symmetric;
* ``W`` quantized per output channel to int8 (symmetric) with its scale chosen so that no
  two adjacent same-sign weights add up to more than 128 in magnitude: CPUs without VNNI
  multiply uint8 x int8 with ``vpmaddubsw``, which sums adjacent products into a saturating
  int16, and 255 x 128 is the largest sum that cannot saturate. The integer result is then
  exact on every x86 kernel (AVX2, AVX-512, VNNI, AMX) instead of only on VNNI;
* ``com.microsoft.MatMulIntegerToFloat`` (integer GEMM, per-row x per-channel scales
  applied to the int32 result), reshaped back to ``X``'s leading dimensions.

The rewrite knows nothing about CLIP: any graph with weight MatMuls (a ViT tower, the
real-weights proxy) goes through the same code.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_edit import default_opset

MS_DOMAIN = "com.microsoft"
ACTIVATION_ZERO_POINT = 128
QMAX = 127
#: Largest |w1| + |w2| of an adjacent same-sign int8 pair that 255 * sum cannot saturate int16.
PAIR_LIMIT = 128


def weight_matmuls(model: onnx.ModelProto, excluded: Iterable[str] = ()) -> list[int]:
    """Indices of the MatMuls with a 2-D float initializer as right operand, minus
    ``excluded`` node names."""
    inits = {i.name: i for i in model.graph.initializer}
    skip = set(excluded)
    return [
        i
        for i, n in enumerate(model.graph.node)
        if n.op_type == "MatMul"
        and n.name not in skip
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 2
        and inits[n.input[1]].data_type == TensorProto.FLOAT
    ]


def smoothing_factors(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    act_absmax: dict[str, np.ndarray],
    alpha: float,
) -> dict[str, np.ndarray]:
    """SmoothQuant factors ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` per activation.

    MatMuls sharing an activation (Q, K and V projections) share one ``s`` (their weights'
    row maxima are pooled). Factors are normalised to geometric mean 1.
    """
    inits = {i.name: i for i in model.graph.initializer}
    weight_rows: dict[str, np.ndarray] = {}
    for node in nodes:
        rows = np.abs(numpy_helper.to_array(inits[node.input[1]])).max(axis=1)
        x = node.input[0]
        weight_rows[x] = np.maximum(weight_rows.get(x, 0.0), rows)
    factors = {}
    for x, rows in weight_rows.items():
        s = np.maximum(act_absmax[x], 1e-5) ** alpha / np.maximum(rows, 1e-5) ** (1 - alpha)
        factors[x] = (s / np.exp(np.log(s).mean())).astype(np.float32)
    return factors


def fold_smoothing(
    model: onnx.ModelProto, x: str, inv_s: np.ndarray, consumers_ok: set[int]
) -> bool:
    """Divide activation ``x`` by ``s`` inside the affine op that produces it, if it can.

    ``x`` must be read only by the nodes in ``consumers_ok``, and be produced by a
    ``LayerNormalization`` with constant scale/bias or by ``Add(Mul(z, gamma), beta)`` with
    constant ``gamma``/``beta`` (a decomposed layer norm). Otherwise nothing changes and the
    caller divides with an explicit Mul.
    """
    graph = model.graph
    nodes = list(graph.node)
    readers = [i for i, n in enumerate(nodes) if x in n.input]
    if not readers or not set(readers) <= consumers_ok:
        return False
    producer = {o: n for n in nodes for o in n.output}
    inits = {i.name: i for i in graph.initializer}

    def rescale(node: onnx.NodeProto, slot: int) -> bool:
        name = node.input[slot]
        if name not in inits or list(inits[name].dims) not in (
            [inv_s.size],
            [1, inv_s.size],
            [1, 1, inv_s.size],
        ):
            return False
        scaled = numpy_helper.to_array(inits[name]) * inv_s
        graph.initializer.append(
            numpy_helper.from_array(scaled.astype(np.float32), f"{name}/smoothed/{x}")
        )
        node.input[slot] = f"{name}/smoothed/{x}"
        return True

    node = producer.get(x)
    if node is None:
        return False
    if node.op_type == "LayerNormalization":
        slots = [s for s in (1, 2) if len(node.input) > s and node.input[s]]
        if all(node.input[s] in inits for s in slots):
            return all(rescale(node, s) for s in slots)
        return False
    if node.op_type == "Add":
        const = next((s for s in (0, 1) if node.input[s] in inits), None)
        mul = producer.get(node.input[1 - const]) if const is not None else None
        if (
            mul is None
            or mul.op_type != "Mul"
            or sum(node.input[1 - const] in n.input for n in nodes) != 1
        ):
            return False
        gamma = next((s for s in (0, 1) if mul.input[s] in inits), None)
        if gamma is None or list(inits[mul.input[gamma]].dims) != [inv_s.size]:
            return False
        return rescale(mul, gamma) and rescale(node, const)
    return False


def _same_sign_pair_sums(w: np.ndarray) -> np.ndarray:
    """|w[2i]| + |w[2i+1]| where both have the same sign, else 0 (per column)."""
    k = w.shape[0] - w.shape[0] % 2
    first, second = w[0:k:2], w[1:k:2]
    return np.where(first * second > 0, np.abs(first) + np.abs(second), 0)


def quantize_weight(w: np.ndarray, pair_safe: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 weights and their float scales."""
    bound = np.abs(w).max(axis=0)
    if pair_safe:
        # /QMAX, not /PAIR_LIMIT: rounding each of the two may add 0.5 to the pair's sum.
        bound = np.maximum(bound, _same_sign_pair_sums(w).max(axis=0, initial=0.0))
    scale = np.where(bound > 0, bound / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -QMAX, QMAX).astype(np.int8)
    if pair_safe and _same_sign_pair_sums(q.astype(np.int32)).max(initial=0) > PAIR_LIMIT:
        raise RuntimeError("int8 weight pair bound violated")  # guards the arithmetic above
    return q, scale


class _Builder:
    """Collects the nodes and initializers of the rewritten graph."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        domain = MS_DOMAIN if op == "MatMulIntegerToFloat" else ""
        self.nodes.append(
            helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs)
        )
        return output

    def reduce_last(self, op: str, x: str, output: str) -> str:
        if self.opset >= 18:  # axes became an input in opset 18
            return self.node(op, [x, "rowq/last_axis"], output, keepdims=0)
        return self.node(op, [x], output, axes=[-1], keepdims=0)


def _static_lead(model: onnx.ModelProto, x: str) -> list[int] | None:
    """``x``'s dims between the batch axis and the last one, if shape inference fixed them."""
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    info = next((v for v in values if v.name == x), None)
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    dims = info.type.tensor_type.shape.dim
    middle = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:-1]]
    return middle if len(dims) >= 2 and None not in middle else None


def _quantize_rows(
    b: _Builder,
    x: str,
    k: int,
    inv_smooth: np.ndarray | None,
    p: str,
    static_lead: list[int] | None,
):
    """Nodes quantizing activation ``x`` per row; returns (q [M,K] u8, scale [M,1], lead):
    ``lead`` is ``x``'s leading dims, a constant list when known, else a tensor name."""
    if inv_smooth is not None:
        x = b.node("Mul", [x, b.const(p + "/inv_smooth", inv_smooth)], p + "/smoothed")
    flat = b.node("Reshape", [x, b.const(p + "/shape2d", np.array([-1, k], np.int64))], p + "/flat")
    # Fewer nodes when the token count is static: each costs dispatch time at batch 1.
    lead = (
        [-1, *static_lead]
        if static_lead is not None
        else b.node(
            "Slice",
            [b.node("Shape", [x], p + "/shape"), "rowq/zero", "rowq/last_axis"],
            p + "/lead_dims",
        )
    )
    # max |x| without writing |x|: max(max x, -min x)
    amax = b.node(
        "Max",
        [
            b.reduce_last("ReduceMax", flat, p + "/max"),
            b.node("Neg", [b.reduce_last("ReduceMin", flat, p + "/min")], p + "/neg_min"),
        ],
        p + "/amax",
    )
    scale = b.node(
        "Max", [b.node("Mul", [amax, "rowq/inv_qmax"], p + "/scale0"), "rowq/tiny"], p + "/scale"
    )
    # Per-axis QuantizeLinear wants a zero point per row: 128 everywhere.
    zero_points = b.node(
        "ConstantOfShape",
        [b.node("Shape", [scale], p + "/rows")],
        p + "/zero_points",
        value=numpy_helper.from_array(np.array([ACTIVATION_ZERO_POINT], np.uint8)),
    )
    q = b.node("QuantizeLinear", [flat, scale, zero_points], p + "/q", axis=0)
    scale_col = b.node("Unsqueeze", [scale, "rowq/last_axis"], p + "/scale_col")
    return q, scale_col, lead


def rewrite(
    model: onnx.ModelProto,
    *,
    act_absmax: dict[str, np.ndarray] | None = None,
    alpha: float | None = None,
    pair_safe: bool = True,
    excluded: Iterable[str] = (),
) -> list[str]:
    """Rewrite ``model`` in place; returns the names of the MatMuls now in INT8.

    ``act_absmax`` (per-channel max |x| of each MatMul input, from calibration) and
    ``alpha`` enable SmoothQuant; without them activations are quantized as they are.
    """
    graph = model.graph
    opset = default_opset(model)
    targets = set(weight_matmuls(model, excluded))
    target_nodes = [n for i, n in enumerate(graph.node) if i in targets]
    smooth = (
        smoothing_factors(model, target_nodes, act_absmax, alpha)
        if act_absmax is not None and alpha is not None
        else {}
    )
    explicit = {
        x: (1.0 / s).astype(np.float32)
        for x, s in smooth.items()
        if not fold_smoothing(model, x, (1.0 / s).astype(np.float32), targets)
    }
    inits = {i.name: i for i in graph.initializer}
    b = _Builder(opset)
    b.const("rowq/last_axis", np.array([-1], np.int64))
    b.const("rowq/zero", np.array([0], np.int64))
    b.const("rowq/inv_qmax", np.array(1.0 / QMAX, np.float32))
    b.const("rowq/tiny", np.array(1e-12, np.float32))
    b.const("rowq/zp", np.array(ACTIVATION_ZERO_POINT, np.uint8))
    quantized: dict[str, tuple[str, str, str]] = {}
    done = []
    for index, node in enumerate(graph.node):
        if index not in targets:
            b.nodes.append(node)
            continue
        x, p = node.input[0], f"rowq/{len(done)}"
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if x in smooth:
            w = w * smooth[x][:, None]
        if x not in quantized:  # Q, K and V share one quantized input
            quantized[x] = _quantize_rows(
                b, x, w.shape[0], explicit.get(x), p, _static_lead(model, x)
            )
        q, scale_col, lead = quantized[x]
        wq, wscale = quantize_weight(w, pair_safe)
        y2d = b.node(
            "MatMulIntegerToFloat",
            [q, b.const(p + "/w", wq), scale_col, b.const(p + "/w_scale", wscale), "rowq/zp"],
            p + "/y2d",
        )
        if isinstance(lead, list):
            out_shape = b.const(p + "/out_shape", np.array([*lead, w.shape[1]], np.int64))
        else:
            out_shape = b.node(
                "Concat",
                [lead, b.const(p + "/n", np.array([w.shape[1]], np.int64))],
                p + "/out_shape",
                axis=0,
            )
        b.nodes.append(
            helper.make_node(
                "Reshape", [y2d, out_shape], [node.output[0]], name=node.name + "/rowq"
            )
        )
        done.append(node.name)
    del graph.node[:]
    graph.node.extend(b.nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in [*graph.initializer, *b.inits] if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done
