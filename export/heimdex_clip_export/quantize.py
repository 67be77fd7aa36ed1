"""Step 4: dynamic INT8 quantization of the fp32 visual graph.

Recipe (DESIGN.md, then measured): ``quant_pre_process`` (ONNX shape inference and
optimisation; the symbolic shape pass is skipped because it fails on exported open_clip
graphs), then ``quantize_dynamic`` with QInt8 per-channel weights on MatMul only (the patch
embedding is a MatMul after the export's rewrites, so it is quantized too; a Conv left by
``--no-rewrites`` and the embedding Gathers stay float).

``reduce_range`` (7-bit weights) is on: on CPUs without AVX-512 VNNI, ONNX Runtime's
u8 x s8 kernels accumulate pairs in saturating int16, which with 8-bit weights broke the
gates on an AVX2 machine (mean cosine 0.988, batch invariance 0.996); with 7-bit weights the
same graph measured mean 0.99970 / min 0.99957. VNNI and AMX machines lose only one bit of
weight resolution.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantRecipe:
    """Everything that decides the INT8 graph; recorded verbatim in the manifest."""

    method: str = "dynamic"
    weight_type: str = "QInt8"
    activation_type: str = "QUInt8"
    per_channel: bool = True
    reduce_range: bool = True
    op_types: tuple[str, ...] = ("MatMul",)
    excluded_nodes: tuple[str, ...] = ()
    pre_process: dict = field(default_factory=lambda: {"skip_symbolic_shape": True})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["op_types"] = list(self.op_types)
        d["excluded_nodes"] = list(self.excluded_nodes)
        return d


def quantize_visual(fp32_path: Path, out_path: Path, recipe: QuantRecipe | None = None) -> dict:
    """Write the INT8 graph of ``fp32_path`` to ``out_path``; return the recipe as recorded."""
    recipe = recipe or QuantRecipe()
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), **recipe.pre_process)
        quantize_dynamic(
            str(prepared),
            str(out_path),
            weight_type=QuantType[recipe.weight_type],
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            op_types_to_quantize=list(recipe.op_types),
            nodes_to_exclude=list(recipe.excluded_nodes),
        )
    log.info("quantized %s -> %s (%.1f MB)", fp32_path.name, out_path.name,
             out_path.stat().st_size / 1e6)
    return recipe.to_dict()
