"""The graph OpenVINO runs best: statically quantized INT8 in QDQ form (``visual.qdq.onnx``).

ONNX Runtime's dynamic INT8 graph (``visual.int8.onnx``) computes each activation scale at
run time with its own operators; OpenVINO cannot fuse those into its INT8 kernels and
runs that graph slower than fp32. A QDQ graph (QuantizeLinear/DequantizeLinear pairs
around each MatMul, with fixed scales) is what OpenVINO compiles into INT8 GEMMs.

Fixed activation scales come from calibration, and calibration uses real photographs:
crops of the export's evaluation photographs drawn with a different seed than the
evaluation crops (random tensors would give scales no real frame ever has). On trained
weights one fixed scale per tensor needs help to hold the gates: SmoothQuant before
calibration, no extra rounding of the MatMul outputs, and optionally a budget of layers
kept float by a sensitivity scan (``qdq_tuning.py``; docs/providers.md has the measured
recipes). The graph
is then held to the same gates as the dynamic INT8 graph, against the fp32 graph, on the
evaluation set; its figures and recipe go into the manifest. Fixed scales also make it
batch-invariant by construction (measured anyway).

Written only when asked: ``python -m heimdex_clip_export --openvino``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

from . import evaluation as ev
from . import graph_edit, qdq_tuning
from .recipes import QuantRecipe

log = logging.getLogger(__name__)

QDQ_FILE = "visual.qdq.onnx"
QDQ_KEY = "visual.qdq"


#: The OpenVINO graph's recipe: ``QuantRecipe.static_qdq`` (the old name, kept for callers).
QdqRecipe = QuantRecipe.static_qdq


class _PixelBatches(CalibrationDataReader):
    """Feeds the calibration pixels to ONNX Runtime's calibrator, one batch at a time."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch: int) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {input_name: pixels[i : i + batch]} for i in range(0, len(pixels), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibration_images(recipe: QuantRecipe) -> list[Image.Image]:
    """The recipe's calibration photographs (crops of the evaluation photographs, other
    windows than the evaluation crops); the caller preprocesses them as its model wants."""
    return ev.calibration_images(recipe.calibration_crops_per_photo, seed=recipe.calibration_seed)


def calibration_pixels(transform: Any, recipe: QuantRecipe) -> np.ndarray:
    """``calibration_images`` through ``transform`` (open_clip's eval transform: PIL image
    -> [3, S, S] tensor)."""
    return np.stack(
        [np.asarray(transform(image), dtype=np.float32) for image in calibration_images(recipe)]
    )


def activation_matmuls(model_path: Path) -> list[str]:
    """Names of the MatMul nodes none of whose inputs is a weight (an initializer)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and not weights.intersection(node.input)
    ]


def quantize_qdq(
    fp32_path: Path,
    out_path: Path,
    input_name: str,
    output_name: str,
    pixels: np.ndarray,
    recipe: QuantRecipe,
) -> dict[str, Any]:
    """Write the statically quantized QDQ graph of ``fp32_path`` to ``out_path``.

    ``pixels`` are the calibration images (never the evaluation set). Returns the recipe as
    recorded in the manifest, with the MatMuls the sensitivity scan kept in float.
    """
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # The symbolic shape pass fails on exported open_clip graphs (as for dynamic INT8).
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        excluded = [] if recipe.quantize_activation_matmuls else activation_matmuls(prepared)
        if recipe.smooth_alpha is not None:
            model = onnx.load(str(prepared))
            qdq_tuning.smooth_graph(model, pixels, recipe.smooth_alpha, excluded)
            onnx.save(model, str(prepared))
        _quantize(prepared, out_path, input_name, pixels, recipe, excluded)
        kept: list[str] = []
        if recipe.float_budget > 0:
            gains = qdq_tuning.sensitivity_scan(
                onnx.load(str(out_path)),
                onnx.load(str(prepared)),
                pixels[: recipe.sensitivity_images],
                input_name,
                output_name,
            )
            kept = [name for name, gain in gains[: recipe.float_budget] if gain > 0]
            _quantize(prepared, out_path, input_name, pixels, recipe, excluded + kept)
        model = onnx.load(str(out_path))
        untangled = heads_first_layout(model)
        onnx.save(model, str(out_path))
    log.info(
        "static QDQ graph %s (%.1f MB), calibrated on %d photographs, %d attention "
        "MatMuls and %d sensitive ones left in float, %d head transposes untangled",
        out_path.name,
        out_path.stat().st_size / 1e6,
        len(pixels),
        len(excluded),
        len(kept),
        untangled,
    )
    return {**recipe.to_dict(), "calibration_images": len(pixels), "float_matmuls": kept}


def heads_first_layout(model: onnx.ModelProto) -> int:
    """Rewrite each ``Transpose(perm 2,0,3,1,4) -> Squeeze(axis 0)`` (one of Q, K, V sliced
    from the packed projection, [B, L, 1, H, D] -> [B, H, L, D]) as ``Squeeze(axis 2) ->
    Transpose(perm 0,2,1,3)``, in place; returns how many.

    The same values (a pure reordering), in the form OpenVINO's attention kernel takes into
    itself: 4 transposes a layer at run time become 2 (ONNX Runtime's transpose optimizer
    in quant_pre_process makes the 5-D form). Through the OpenVINO EP on a 2-core Xeon
    (AMX, bf16 hint; medians of 6 and 10 alternating runs): batch 1 9.37 -> 8.85 and
    9.56 -> 8.93 ms, batch 32 4.67 -> 4.60 and 4.63 -> 4.58 ms/image; outputs bit-identical.
    """
    g = graph_edit.Graph(model)
    axis2 = np.array([2], np.int64)
    rewritten = 0
    for transpose in list(model.graph.node):
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if transpose.op_type != "Transpose" or perm != [2, 0, 3, 1, 4]:
            continue
        squeeze = g.only_consumer(transpose.output[0])
        if squeeze is None or squeeze.op_type != "Squeeze" or len(squeeze.input) != 2:
            continue
        axes = g.const(squeeze.input[1])
        if axes is None or axes.reshape(-1).tolist() != [0]:
            continue
        squeezed = f"{transpose.output[0]}/heads_last"
        at = list(model.graph.node).index(transpose)
        model.graph.node.remove(transpose)
        model.graph.node.remove(squeeze)
        model.graph.node.insert(
            at,
            onnx.helper.make_node(
                "Transpose",
                [squeezed],
                [squeeze.output[0]],
                name=f"{squeeze.output[0]}/heads_first",
                perm=[0, 2, 1, 3],
            ),
        )
        model.graph.node.insert(
            at,
            onnx.helper.make_node(
                "Squeeze",
                [transpose.input[0], g.add_const(f"{squeezed}/axis", axis2)],
                [squeezed],
                name=squeezed,
            ),
        )
        rewritten += 1
    g.remove_dead()
    return rewritten


def _quantize(
    prepared: Path,
    out_path: Path,
    input_name: str,
    pixels: np.ndarray,
    recipe: QuantRecipe,
    excluded: list[str],
) -> None:
    quantize_static(
        str(prepared),
        str(out_path),
        _PixelBatches(input_name, pixels, recipe.calibration_batch),
        quant_format=QuantFormat[recipe.quant_format.value],
        op_types_to_quantize=list(recipe.op_types),
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        activation_type=QuantType[recipe.activation_type.value],
        weight_type=QuantType[recipe.weight_type.value],
        calibrate_method=CalibrationMethod[recipe.calibrate_method.value],
        nodes_to_exclude=excluded,
        calibration_providers=["CPUExecutionProvider"],
        extra_options=dict(recipe.extra_options),
    )


@dataclass(frozen=True)
class QdqReport:
    """The QDQ graph's figures against the fp32 graph, and whether each gate held."""

    agreement: ev.Agreement
    batch_invariance: float
    failures: list[str]

    def parity(self, recipe: dict[str, Any], gates: dict[str, float]) -> dict[str, Any]:
        """Manifest parity entries; ``recipe`` is what ``quantize_qdq`` returned."""
        return {
            "qdq_vs_fp32": {**self.agreement.to_dict(), "gates": gates},
            "qdq_batch_invariance": {"min_cosine": self.batch_invariance},
            "qdq_recipe": recipe,
        }


def exact_qdq_session(qdq_path: Path) -> ort.InferenceSession:
    """A CPU session that runs a QDQ graph as written: each QuantizeLinear/DequantizeLinear
    pair rounds exactly as an INT8 kernel would, then a float MatMul.

    With graph optimizations on, ONNX Runtime fuses the pairs into its own u8 x s8 kernels;
    on CPUs without VNNI (AVX2 only) those add pairs of products in saturating 16-bit
    arithmetic, which this graph's full-range 8-bit weights overflow (measured on an AVX2-only
    EPYC: mean cosine 0.992, min 0.967, against 0.9999 when run as written). The QDQ graph
    is OpenVINO's, whose kernels do not saturate, so its gates measure the graph itself.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(qdq_path), options, providers=["CPUExecutionProvider"])


def evaluate_qdq(
    qdq_path: Path,
    input_name: str,
    output_name: str,
    pixels: np.ndarray,
    fp32_emb: np.ndarray,
    gates: dict[str, float],
    batch: int,
) -> QdqReport:
    """Gate the QDQ graph against the fp32 graph's embeddings of the evaluation set.

    Measured on the graph as written (:func:`exact_qdq_session`), not on whatever INT8
    kernel this machine has: the figures are the graph's, the same on every CPU.
    """
    session = exact_qdq_session(qdq_path)

    def embed(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    qdq_emb = ev.embed_batched(embed, pixels, batch)
    agreement = ev.agreement(fp32_emb, qdq_emb)
    invariance = ev.batch_invariance(embed, pixels, batch)
    failures: list[str] = []
    ev.check_min("QDQ mean cosine", agreement.mean_cosine, gates["mean_cosine"], failures)
    ev.check_min("QDQ min cosine", agreement.min_cosine, gates["min_cosine"], failures)
    ev.check_min("QDQ top-5 agreement", agreement.top5_agreement, gates["top5_agreement"], failures)
    ev.check_min(
        "QDQ batch invariance min cosine",
        invariance,
        gates["batch_invariance_min_cosine"],
        failures,
    )
    log.info("QDQ vs fp32: %s; batch invariance min cosine %.6f", agreement, invariance)
    return QdqReport(agreement=agreement, batch_invariance=invariance, failures=failures)
