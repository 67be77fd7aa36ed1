"""What makes a static QDQ graph hold on trained weights: SmoothQuant and a sensitivity scan.

Trained ViTs have a few activation channels far larger than the rest; one fixed uint8 scale
per tensor then spends its range on those channels and flattens every other one. Two
remedies, both measured on calibration images only (never the evaluation set):

* ``smooth_graph``: SmoothQuant before calibration, with the project's own factors
  (``rowwise.smoothing_factors``): each weight MatMul's input is divided per channel by
  ``s`` (folded into the layer norm that produces it where there is one, else an explicit
  float ``Mul``) and its weight rows multiplied by ``s``; the float graph computes the same
  function, with flatter activations to calibrate.
* ``sensitivity_scan``: every quantized weight MatMul of a finished QDQ graph put back into
  float alone, the embedding's error against the float graph re-measured, the layers whose
  return helps most ranked first, so that a small budget of them can stay float.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from . import evaluation as ev
from . import quantize, rowwise

log = logging.getLogger(__name__)

#: Batch of the sensitivity runs (calibration images through each candidate graph).
SCAN_BATCH = 16


def smooth_graph(
    model: onnx.ModelProto, calibration: np.ndarray, alpha: float, excluded: Iterable[str] = ()
) -> int:
    """Apply SmoothQuant to ``model``'s weight MatMuls in place; returns activations smoothed.

    ``calibration`` feeds the per-channel activation maxima (``quantize.activation_absmax``).
    """
    excluded = tuple(excluded)
    targets = rowwise.weight_matmuls(model, excluded)
    nodes = [model.graph.node[i] for i in targets]
    absmax = quantize.activation_absmax(model, calibration, excluded)
    factors = rowwise.smoothing_factors(model, nodes, absmax, alpha)
    target_set = set(targets)
    # Folding only edits initializers, so node indices stay valid for every activation.
    explicit = {
        x: s
        for x, s in factors.items()
        if not rowwise.fold_smoothing(model, x, (1.0 / s).astype(np.float32), target_set)
    }
    inits = {i.name: i for i in model.graph.initializer}
    for node in nodes:
        s = factors[node.input[0]]
        w = numpy_helper.to_array(inits[node.input[1]]) * s[:, None]
        name = f"{node.input[1]}/smoothed"
        model.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), name))
        node.input[1] = name
    for x, s in explicit.items():
        _divide_before(model, x, (1.0 / s).astype(np.float32), {n.name for n in nodes})
    used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    log.info(
        "SmoothQuant alpha %.2f on %d activations (%d folded into layer norms)",
        alpha,
        len(factors),
        len(factors) - len(explicit),
    )
    return len(factors)


def _divide_before(model: onnx.ModelProto, x: str, inv_s: np.ndarray, matmuls: set[str]) -> None:
    """One float ``Mul`` by ``inv_s`` between ``x`` and the weight MatMuls reading it."""
    graph = model.graph
    smoothed = f"{x}/smoothed"
    graph.initializer.append(numpy_helper.from_array(inv_s, f"{x}/inv_smooth"))
    readers = [i for i, n in enumerate(graph.node) if n.name in matmuls and n.input[0] == x]
    for i in readers:
        graph.node[i].input[0] = smoothed
    graph.node.insert(
        readers[0], helper.make_node("Mul", [x, f"{x}/inv_smooth"], [smoothed], name=f"{x}/smooth")
    )


def sensitivity_scan(
    qdq: onnx.ModelProto,
    float_model: onnx.ModelProto,
    pixels: np.ndarray,
    input_name: str,
    output_name: str,
) -> list[tuple[str, float]]:
    """Each quantized weight MatMul of ``qdq`` with its error gain, most sensitive first.

    ``float_model`` is the float graph ``qdq`` was quantized from (same node and tensor
    names). For each MatMul, a copy of ``qdq`` reads its float input and float weight
    instead of their dequantized versions; the gain is how much that lowers the mean
    ``1 - cosine`` of the embeddings of ``pixels`` against ``float_model``'s.
    """
    reference = _embed(float_model, pixels, input_name, output_name)
    base = _error(reference, _embed(qdq, pixels, input_name, output_name))
    weights = {n.name: n.input[1] for n in float_model.graph.node if n.op_type == "MatMul"}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    gains = []
    for node in qdq.graph.node:
        if (
            node.op_type != "MatMul"
            or producer.get(node.input[1], node).op_type != "DequantizeLinear"
        ):
            continue  # not quantized (attention, excluded) or not a weight MatMul
        trial = onnx.ModelProto()
        trial.CopyFrom(qdq)
        target = next(n for n in trial.graph.node if n.name == node.name)
        dq_input = producer[node.input[0]]
        q_input = producer.get(dq_input.input[0])
        if dq_input.op_type == "DequantizeLinear" and q_input is not None:
            target.input[0] = q_input.input[0]
        trial.graph.initializer.append(float_inits[weights[node.name]])
        target.input[1] = weights[node.name]
        error = _error(reference, _embed(trial, pixels, input_name, output_name))
        gains.append((node.name, base - error))
        log.debug("sensitivity %d: %s gain %.2e", len(gains), node.name, base - error)
    gains.sort(key=lambda item: -item[1])
    log.info(
        "sensitivity scan of %d MatMuls on %d calibration images: base error %.2e, "
        "largest gains %s",
        len(gains),
        len(pixels),
        base,
        ", ".join(f"{n} {g:.1e}" for n, g in gains[:5]),
    )
    return gains


def _embed(
    model: onnx.ModelProto, pixels: np.ndarray, input_name: str, output_name: str
) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Unoptimised: building the session dominates a scan of one small run per layer, and
    # DequantizeLinear -> float MatMul computes the same products as the fused INT8 kernels.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return np.concatenate(
        [
            session.run([output_name], {input_name: pixels[i : i + SCAN_BATCH]})[0]
            for i in range(0, len(pixels), SCAN_BATCH)
        ]
    )


def _error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.mean(1.0 - ev.row_cosines(reference, candidate)))
