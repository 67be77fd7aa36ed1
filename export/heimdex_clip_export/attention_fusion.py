"""Attention cores as ONNX ``Attention`` (opset 23; ONNX Runtime >= 1.23 has its CPU kernel).

The exported graph computes each attention core as layout ops (Reshape, Slice, Squeeze,
Transpose) that cut heads out of the projections, ``MatMul(q * c, k^T)``, ``Softmax``,
``MatMul(p, v)``, a Transpose back and a Reshape. ``Attention`` takes Q, K and V as
separate ``[B, S, D]`` tensors with the head count as an attribute, and does the head
split, the scaled softmax and the head merge itself. It has no bias input: Q's and V's
biases stay ``Add``s, K's is dropped (``q . (k + b)`` adds the same ``q . b`` to every
score of a query, which softmax cancels). On ONNX Runtime's CPU provider it ran 3-6% faster
per tower than ``com.microsoft.MultiHeadAttention`` with the three biases inside
(docs/floor.md).

Matching is by what the layout ops *do*, not by which ops there are: the ops between each
projection output and the attention MatMuls are run on a tensor of element indices, and
the core is fused only if Q, K and V are exactly ``x[..., o:o+D]`` split into heads (K
transposed for the score MatMul). The projections must be per-row INT8 GEMMs
(``MatMulIntegerToFloat`` -> ``Reshape`` [-> ``Add`` constant bias]); each of Q, K and V
gets its own GEMM on the columns it uses (same quantized input, same scales), so no
packed output has to be split at run time.

When the attention output is only read by a per-channel ``Mul`` (the SmoothQuant division
of the output projection's input), that Mul is folded into V's weight scales and bias:
attention mixes tokens, never channels, so scaling V's channels scales the output's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, version_converter

from .graph_edit import MS_DOMAIN, Graph, default_opset, probe_shapes, topological_sort

log = logging.getLogger(__name__)

LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Flatten"}
PROBE_BATCH = 2
#: Element indices are run through the layout ops as float32, exact below 2**24.
EXACT_FLOAT_INTS = 2**24
#: The first opset with ``Attention``; a fused graph's default domain is raised to it.
ATTENTION_OPSET = 23


@dataclass
class _Chain:
    """What feeds one attention MatMul operand: ``source`` through ``nodes``, times ``scale``."""

    source: str
    nodes: list[onnx.NodeProto]
    scale: float


@dataclass
class _Core:
    score: onnx.NodeProto  # MatMul(q, k^T)
    mix: onnx.NodeProto  # MatMul(softmax, v)
    q: _Chain
    k: _Chain
    v: _Chain
    context: str  # the [B, S, D] tensor after the head merge


def _trace(g: Graph, name: str) -> _Chain:
    """Walk back from ``name`` through layout ops and scalar Mul/Div to the source tensor."""
    nodes, scale = [], 1.0
    while (node := g.producer.get(name)) is not None:
        if node.op_type in LAYOUT_OPS and all(i in g.inits for i in node.input[1:] if i):
            nodes.append(node)
            name = node.input[0]
            continue
        if node.op_type in ("Mul", "Div"):
            const = [s for s in (0, 1) if g.scalar(node.input[s]) is not None]
            if const and (node.op_type == "Mul" or const == [1]):
                value = g.scalar(node.input[const[0]])
                scale = scale * value if node.op_type == "Mul" else scale / value
                nodes.append(node)
                name = node.input[1 - const[0]]
                continue
        break
    return _Chain(name, nodes, scale)


def _find_cores(g: Graph) -> list[_Core]:
    cores = []
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        score = g.producer.get(softmax.input[0])
        mix = g.only_consumer(softmax.output[0])
        if (
            axis not in (-1, 3)
            or score is None
            or score.op_type != "MatMul"
            or g.only_consumer(score.output[0]) is not softmax
            or mix is None
            or mix.op_type != "MatMul"
            or mix.input[0] != softmax.output[0]
        ):
            continue
        merge = g.only_consumer(mix.output[0])
        perm = (
            []
            if merge is None
            else next((list(a.ints) for a in merge.attribute if a.name == "perm"), [])
        )
        reshape = None if merge is None else g.only_consumer(merge.output[0])
        if (
            merge is None
            or merge.op_type != "Transpose"
            or perm != [0, 2, 1, 3]
            or reshape is None
            or reshape.op_type != "Reshape"
        ):
            continue
        cores.append(
            _Core(
                score,
                mix,
                _trace(g, score.input[0]),
                _trace(g, score.input[1]),
                _trace(g, mix.input[1]),
                reshape.output[0],
            )
        )
    return cores


def _index_run(g: Graph, core: _Core, shapes: dict) -> dict[str, np.ndarray]:
    """The three chains run on element indices of their sources (scalars as identity)."""
    nodes, inits, done = [], [], set()
    for chain in (core.q, core.k, core.v):
        for node in reversed(chain.nodes):
            if id(node) in done:
                continue
            done.add(id(node))
            if node.op_type in LAYOUT_OPS:
                nodes.append(node)
                inits += [g.inits[i] for i in node.input[1:] if i]
            else:  # the scalar Mul/Div: its scale goes into the attribute instead
                data = node.input[0] if g.scalar(node.input[0]) is None else node.input[1]
                nodes.append(helper.make_node("Identity", [data], [node.output[0]]))
    sources = list(dict.fromkeys(c.source for c in (core.q, core.k, core.v)))
    outputs = [core.score.input[0], core.score.input[1], core.mix.input[1]]
    graph = helper.make_graph(
        nodes,
        "index_probe",
        [helper.make_tensor_value_info(s, TensorProto.FLOAT, shapes[s]) for s in sources],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in dict.fromkeys(outputs)],
        list({i.name: i for i in inits}.values()),
    )
    model = helper.make_model(graph, opset_imports=g.model.opset_import)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds = {s: np.arange(np.prod(shapes[s]), dtype=np.float32).reshape(shapes[s]) for s in sources}
    names = list(dict.fromkeys(outputs))
    return dict(zip(names, session.run(names, feeds), strict=True)) | feeds


def _head_slice(indices: np.ndarray, source: np.ndarray, key: bool) -> tuple[int, int] | None:
    """(column offset, width) if ``indices`` are ``source[..., o:o+D]`` split into heads
    ([B, N, S, H], or [B, N, H, S] for the transposed key); else None."""
    if indices.ndim != 4 or source.ndim != 3 or indices.shape[0] != source.shape[0]:
        return None
    batch, heads = indices.shape[:2]
    tokens, head = (indices.shape[3], indices.shape[2]) if key else indices.shape[2:]
    width = heads * head
    offset = int(indices.reshape(-1)[0]) % source.shape[2]
    if tokens != source.shape[1] or offset + width > source.shape[2]:
        return None
    expected = source[:, :, offset : offset + width].reshape(batch, tokens, heads, head)
    expected = expected.transpose(0, 2, 3, 1) if key else expected.transpose(0, 2, 1, 3)
    return (offset, width) if np.array_equal(indices, expected) else None


@dataclass
class _Projection:
    """A per-row INT8 projection: MatMulIntegerToFloat -> Reshape [-> Add bias]."""

    gemm: onnx.NodeProto
    bias: np.ndarray | None


def _projection(g: Graph, name: str) -> _Projection | None:
    node = g.producer.get(name)
    bias = None
    if node is not None and node.op_type == "Add":
        consts = [s for s in (0, 1) if g.const(node.input[s]) is not None]
        if len(consts) != 1:
            return None
        bias = g.const(node.input[consts[0]])
        node = g.producer.get(node.input[1 - consts[0]])
    if node is None or node.op_type != "Reshape":
        return None
    gemm = g.producer.get(node.input[0])
    if (
        gemm is None
        or gemm.op_type != "MatMulIntegerToFloat"
        or len(gemm.input) > 6
        or g.const(gemm.input[1]) is None
        or g.const(gemm.input[3]) is None
    ):
        return None
    columns = g.const(gemm.input[1]).shape[1]
    if g.const(gemm.input[3]).shape != (columns,) or (
        bias is not None and bias.shape != (columns,)
    ):
        return None
    return _Projection(gemm, bias)


def _part(
    g: Graph,
    proj: _Projection,
    offset: int,
    width: int,
    tokens: int,
    prefix: str,
    channel_scale: np.ndarray | None = None,
) -> tuple[str, np.ndarray]:
    """A GEMM on columns ``offset:offset+width`` of ``proj``, reshaped to [B, tokens, width];
    returns its output and its bias (zeros if none), both times ``channel_scale``."""
    cols = slice(offset, offset + width)
    scale = np.ones(width, np.float32) if channel_scale is None else channel_scale
    weights = g.add_const(prefix + "/w", g.const(proj.gemm.input[1])[:, cols])
    w_scale = g.add_const(
        prefix + "/w_scale", (g.const(proj.gemm.input[3])[cols] * scale).astype(np.float32)
    )
    inputs = list(proj.gemm.input)
    inputs[1], inputs[3] = weights, w_scale
    g.graph.node.append(
        helper.make_node(
            "MatMulIntegerToFloat",
            inputs,
            [prefix + "/y2d"],
            name=prefix + "/gemm",
            domain=MS_DOMAIN,
        )
    )
    shape = g.add_const(prefix + "/shape", np.array([-1, tokens, width], np.int64))
    g.graph.node.append(
        helper.make_node(
            "Reshape", [prefix + "/y2d", shape], [prefix + "/y"], name=prefix + "/reshape"
        )
    )
    bias = np.zeros(width, np.float32) if proj.bias is None else proj.bias[cols]
    return prefix + "/y", (bias * scale).astype(np.float32)


def _output_smoothing(g: Graph, context: str, width: int) -> onnx.NodeProto | None:
    """The per-channel constant Mul that alone reads the attention output, if there is one."""
    mul = g.only_consumer(context)
    if mul is None or mul.op_type != "Mul":
        return None
    other = mul.input[1] if mul.input[0] == context else mul.input[0]
    value = g.const(other)
    return mul if value is not None and value.shape == (width,) else None


@dataclass
class _Match:
    """An attention core the op computes exactly: where its heads are, and its GEMMs."""

    core: _Core
    slices: tuple[tuple[int, int], ...]  # (column offset, width) of Q, K and V
    projections: list[_Projection]
    tokens: list[int]  # sequence length of Q's, K's and V's sources
    heads: int


def _matches(g: Graph) -> list[_Match]:
    """Every attention core of ``g`` that matches, in graph order."""
    cores = _find_cores(g)
    if not cores:
        return []
    names = [c.source for core in cores for c in (core.q, core.k, core.v)]
    shapes = probe_shapes(g.model, names + [core.context for core in cores], PROBE_BATCH)
    if shapes is None:
        log.info("attention: the graph input has dynamic dimensions besides the batch; left as is")
        return []
    found = []
    for core in cores:
        chains = (core.q, core.k, core.v)
        sources = [shapes[c.source] for c in chains]
        if max(np.prod(s) for s in sources) >= EXACT_FLOAT_INTS or min(map(len, sources)) != 3:
            log.info("attention core %s: sources not [B, S, D], left as is", core.score.name)
            continue
        values = _index_run(g, core, shapes)
        q = _head_slice(values[core.score.input[0]], values[core.q.source], key=False)
        k = _head_slice(values[core.score.input[1]], values[core.k.source], key=True)
        v = _head_slice(values[core.mix.input[1]], values[core.v.source], key=False)
        projections = [_projection(g, c.source) for c in chains]
        if (
            q is None
            or k is None
            or v is None
            or None in projections
            or q[1] != k[1]
            or core.v.scale != 1.0
            or shapes[core.context] != (PROBE_BATCH, shapes[core.q.source][1], v[1])
        ):
            log.info("attention core %s: layout not recognised, left as is", core.score.name)
            continue
        found.append(
            _Match(
                core,
                (q, k, v),
                projections,  # type: ignore[arg-type]  # None ruled out above
                [s[1] for s in sources],
                int(values[core.score.input[0]].shape[1]),
            )
        )
    return found


def fuse_attention(model: onnx.ModelProto) -> tuple[int, int]:
    """Replace every matching attention core; returns (cores fused, output Muls folded).

    A graph below opset 23 is converted to it first (``onnx.version_converter`` adapts the
    operators whose meaning changed, e.g. ReduceMean's axes), only when a core matches.
    """
    matches = _matches(Graph(model))
    if not matches:
        return 0, 0
    if default_opset(model) < ATTENTION_OPSET:
        model.CopyFrom(version_converter.convert_version(model, ATTENTION_OPSET))
        matches = _matches(Graph(model))
    g = Graph(model)
    folded = 0
    for index, match in enumerate(matches):
        core, prefix = match.core, f"attention/{index}"
        smoothing = _output_smoothing(g, core.context, match.slices[2][1])
        v_scale = (
            g.const(next(i for i in smoothing.input if i != core.context))
            if smoothing is not None
            else None
        )
        parts = [
            _part(
                g, proj, offset, width, tokens, f"{prefix}/{tag}", v_scale if tag == "v" else None
            )
            for (offset, width), proj, tokens, tag in zip(
                match.slices, match.projections, match.tokens, "qkv", strict=True
            )
        ]
        output = smoothing.output[0] if smoothing is not None else core.context
        if smoothing is not None:
            smoothing.output[0] = prefix + "/unused_smoothing"
        else:
            g.producer[core.context].output[0] = prefix + "/unused_context"
        (q_out, q_bias), (k_out, _), (v_out, v_bias) = parts  # K's bias: softmax cancels it
        g.graph.node.append(
            helper.make_node(
                "Attention",
                [_biased(g, q_out, q_bias), k_out, _biased(g, v_out, v_bias)],
                [output],
                name=prefix,
                q_num_heads=match.heads,
                kv_num_heads=match.heads,
                scale=float(core.q.scale * core.k.scale),
            )
        )
        folded += smoothing is not None
        g.refresh()
    g.remove_dead()
    topological_sort(model)
    return len(matches), folded


def _biased(g: Graph, name: str, bias: np.ndarray) -> str:
    """``name + bias`` as an ``Add`` node's output (``name`` itself when the bias is zero)."""
    if not bias.any():
        return name
    node = name.rsplit("/", 1)[0] + "/bias_add"
    g.graph.node.append(
        helper.make_node("Add", [name, g.add_const(node + "/bias", bias)], [node], name=node)
    )
    return node
