"""Graph fusions applied to the per-row INT8 graph, for ONNX Runtime's CPU provider.

``rowwise.rewrite`` leaves float work around every integer GEMM that ONNX Runtime does not
fuse on its own (its own fusions need shapes and patterns the rewritten graph no longer
shows). Each pass moves some of it into a kernel ONNX Runtime's CPU provider has:

* :func:`.attention_fusion.fuse_attention`: each attention core (head split, scaled
  QK^T, softmax, PV, head merge) becomes one ``com.microsoft.MultiHeadAttention``, with
  the Q/K/V biases as its bias input and the output projection's SmoothQuant division
  folded into V's weight scales.

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

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionReport:
    """How many places each pass changed (recorded in the manifest)."""

    attention: int = 0
    attention_output_smoothing_folded: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fuse(model: onnx.ModelProto) -> FusionReport:
    """Apply every pass in place; logs what matched and what did not."""
    attention, folded = fuse_attention(model)
    report = FusionReport(attention=attention, attention_output_smoothing_folded=folded)
    if not report.attention:
        log.warning("ONNX Runtime fusions: no attention core matched MultiHeadAttention's "
                    "pattern; attention left as is")
    log.info("ONNX Runtime fusions: %s", report)
    return report
