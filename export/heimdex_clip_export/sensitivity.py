"""Which weight MatMuls a dynamic INT8 recipe hurts most: quantize one at a time, rank.

For each weight MatMul of an fp32 graph, the recipe is applied to that MatMul alone (every
other one left in fp32) and the graph's outputs on a set of inputs compared with the fp32
graph's: the drop is the mean ``1 - cosine``. The most sensitive layers come first; the
export's ladder (``ladder.py``) keeps the first few in fp32 when the whole recipe misses a
gate. Any tower whose graph ``quantize.quantize_visual`` quantizes works (image, text): the
caller says how to embed inputs with a graph.

The scan of a static QDQ graph (``qdq_tuning.sensitivity_scan``) goes the other way (one
layer put back into float in a fully quantized graph), because a static graph's scales
are calibrated for the whole graph at once.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from . import evaluation as ev
from . import quantize, rowwise
from .recipes import Granularity, QuantRecipe

log = logging.getLogger(__name__)

#: Builds an embedding function from a graph file (a session as the runtime builds it).
EmbedFactory = Callable[[Path], ev.EmbedFn]


@dataclass(frozen=True)
class LayerDrop:
    """One weight MatMul quantized alone: the node and the accuracy it costs."""

    node: str
    #: Mean ``1 - cosine`` against the fp32 graph with only this MatMul in INT8.
    drop: float

    def to_dict(self) -> dict:
        return asdict(self)


def weight_matmul_names(prepared: Path, recipe: QuantRecipe) -> list[str]:
    """The weight MatMuls ``recipe`` would quantize in a ``quantize.prepare``-d graph."""
    model = onnx.load(str(prepared), load_external_data=False)
    return [model.graph.node[i].name for i in rowwise.weight_matmuls(model, recipe.excluded_nodes)]


def layer_sensitivity(
    fp32_path: Path,
    recipe: QuantRecipe,
    embed: EmbedFactory,
    inputs: np.ndarray,
    *,
    calibration: np.ndarray | None = None,
) -> list[LayerDrop]:
    """Every weight MatMul's drop under ``recipe`` alone, most sensitive first.

    ``inputs`` are what the drop is measured on (calibration inputs, never the evaluation
    set the gates use); ``calibration`` feeds SmoothQuant as in the export. Other op types
    the recipe quantizes (the text tower's Gather) stay float in every trial, so that each
    drop belongs to its MatMul alone.
    """
    # Fusions leave the arithmetic as it is (tests/test_fusions.py) and are skipped here.
    matmul_only = replace(recipe, op_types=("MatMul",), ort_fusions=False)
    reference = embed(fp32_path)(inputs)
    drops = []
    with tempfile.TemporaryDirectory(dir=fp32_path.parent) as tmp:
        prepared = quantize.prepare(fp32_path, Path(tmp) / "prepared.onnx", recipe)
        names = weight_matmul_names(prepared, recipe)
        absmax = None
        if recipe.activation_granularity is Granularity.PER_ROW and recipe.smooth_alpha is not None:
            # Measured once: the fp32 activations do not depend on which layer is quantized.
            absmax = quantize.activation_absmax(onnx.load(str(prepared)), calibration)
        trial = Path(tmp) / "one_layer.onnx"
        for name in names:
            alone = matmul_only.keeping_fp32(tuple(n for n in names if n != name))
            quantize.quantize_prepared(prepared, trial, alone, calibration, absmax)
            cos = ev.row_cosines(reference, embed(trial)(inputs))
            drops.append(LayerDrop(node=name, drop=float(np.mean(1.0 - cos))))
    drops.sort(key=lambda d: -d.drop)
    log.info(
        "sensitivity of %d MatMuls on %d inputs; largest drops: %s",
        len(drops),
        len(inputs),
        ", ".join(f"{d.node} {d.drop:.1e}" for d in drops[:5]),
    )
    return drops
