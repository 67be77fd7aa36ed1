"""Graph fusions applied to the per-row INT8 graph, for ONNX Runtime's CPU provider.

``rowwise.rewrite`` leaves float work around every integer GEMM that ONNX Runtime does not
fuse on its own (its own fusions need shapes and patterns the rewritten graph no longer
shows). Each pass moves some of it into a kernel ONNX Runtime's CPU provider has:

* :func:`.attention_fusion.fuse_attention`: each attention core (head split, scaled
  QK^T, softmax, PV, head merge) becomes one ONNX ``Attention`` (opset 23), with the Q
  and V biases as ``Add``s and the output projection's SmoothQuant division folded into
  V's weight scales.
* :func:`cancel_transpose_pairs`: ``Transpose(p)`` -> a ``Reshape`` that keeps the shape ->
  ``Transpose(p^-1)`` is the identity (the patch embedding's way back from the conv
  layout); ONNX Runtime's transpose optimizer does not see through the Reshape.

The projection biases stay out of ``MatMulIntegerToFloat``'s own ``bias`` input on
purpose: with a per-row ``a_scale`` (what the rewrite feeds it), ONNX Runtime 1.32 scales
the bias by each row's activation scale too (docs/quantization.md), which is wrong.

Every pass matches a precise pattern and leaves the graph untouched where it does not
match; each reports how many places it changed, so the export records (and says) what
was fused and what was not.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import onnx

from .attention_fusion import fuse_attention
from .graph_edit import Graph, probe_shapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionReport:
    """How many places each pass changed (recorded in the manifest)."""

    attention: int = 0
    attention_output_smoothing_folded: int = 0
    transpose_pairs_cancelled: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def cancel_transpose_pairs(model: onnx.ModelProto) -> int:
    """Remove ``Transpose(p) [-> Reshape] -> Transpose(q)`` where ``q`` undoes ``p`` and the
    Reshape (shapes read off runs at two batch sizes) leaves the shape as it is."""
    g = Graph(model)
    pairs = []
    for first in [n for n in g.graph.node if n.op_type == "Transpose"]:
        reshape = g.only_consumer(first.output[0])
        second = reshape if reshape is not None and reshape.op_type == "Transpose" else None
        if reshape is not None and reshape.op_type == "Reshape":
            second = g.only_consumer(reshape.output[0])
        else:
            reshape = None
        p, q = _perm(first), [] if second is None else _perm(second)
        if (
            second is None
            or second.op_type != "Transpose"
            or not p
            or len(p) != len(q)
            or [p[i] for i in q] != list(range(len(p)))
            or second.output[0] in g.outputs
        ):
            continue
        pairs.append((first, reshape, second))
    names = [n for f, r, _ in pairs if r is not None for n in (f.output[0], r.output[0])]
    shapes = [probe_shapes(model, names, batch) for batch in (2, 3)] if names else []
    if None in shapes:
        return 0
    cancelled = 0
    for first, reshape, second in pairs:
        if reshape is not None and any(s[first.output[0]] != s[reshape.output[0]] for s in shapes):
            continue
        for node in g.consumers.get(second.output[0], []):
            for slot, name in enumerate(node.input):
                if name == second.output[0]:
                    node.input[slot] = first.input[0]
        cancelled += 1
    g.remove_dead()
    return cancelled


def fuse(model: onnx.ModelProto) -> FusionReport:
    """Apply every pass in place; logs what matched and what did not."""
    attention, folded = fuse_attention(model)
    report = FusionReport(
        attention=attention,
        attention_output_smoothing_folded=folded,
        transpose_pairs_cancelled=cancel_transpose_pairs(model),
    )
    if not report.attention:
        log.warning(
            "ONNX Runtime fusions: no attention core matched the Attention op's "
            "pattern; attention left as is"
        )
    log.info("ONNX Runtime fusions: %s", report)
    return report
