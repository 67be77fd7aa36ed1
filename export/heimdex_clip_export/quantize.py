"""Step 4: INT8 quantization of an fp32 image-tower graph (any ViT ONNX graph).

The shipped recipe, dynamic ``per_row`` (see ``rowwise.py`` and docs/quantization.md for the
measurements behind it): after ``quant_pre_process`` (ONNX shape inference and
optimisation; the symbolic shape pass is skipped because it fails on exported open_clip
graphs), every weight MatMul gets per-row symmetric uint8 activations, per-channel int8
weights that cannot saturate the non-VNNI integer kernels, and SmoothQuant factors
calibrated on images that are not in the evaluation set; then ``fusions.py`` hands the
attention cores to ONNX's ``Attention`` operator. The patch Conv (left only by
``--no-rewrites``), the embedding Gathers and the attention's activation x activation
MatMuls stay float.

``per_tensor`` is the previous recipe, ONNX Runtime's ``quantize_dynamic`` (one activation
scale per tensor, so a batch-mate's outlier moves an image's embedding); it stays selectable
so the benchmark can compare the two.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from . import fusions, rowwise
from .recipes import Granularity, Method, QuantRecipe

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 4


#: The recipe the export ships (and the real-weights test applies, unchanged); the name
#: stays for callers, the definition is the preset.
SHIPPED_RECIPE = QuantRecipe.per_row_dynamic()
#: The recipe shipped before the real-weights proxy existed (kept for comparisons).
PER_TENSOR_RECIPE = QuantRecipe.per_tensor_dynamic()


def quantize_visual(
    fp32_path: Path,
    out_path: Path,
    recipe: QuantRecipe | None = None,
    calibration: np.ndarray | None = None,
) -> dict:
    """Write the INT8 graph of ``fp32_path`` to ``out_path``; return the recipe as recorded.

    ``calibration``: input batches (float32, the graph's input layout) for SmoothQuant;
    required when the recipe smooths. Use images that are not in the evaluation set.
    """
    recipe = recipe or SHIPPED_RECIPE
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = prepare(fp32_path, Path(tmp) / "prepared.onnx", recipe)
        record = quantize_prepared(prepared, out_path, recipe, calibration)
    log.info(
        "quantized %s -> %s (%.1f MB)", fp32_path.name, out_path.name, out_path.stat().st_size / 1e6
    )
    return record


def prepare(fp32_path: Path, prepared_path: Path, recipe: QuantRecipe) -> Path:
    """``quant_pre_process`` as the recipe asks; node names are then the ones
    ``excluded_nodes`` and the sensitivity scan (``sensitivity.py``) refer to."""
    quant_pre_process(str(fp32_path), str(prepared_path), **recipe.pre_process)
    return prepared_path


def quantize_prepared(
    prepared: Path,
    out_path: Path,
    recipe: QuantRecipe,
    calibration: np.ndarray | None = None,
    act_absmax: dict[str, np.ndarray] | None = None,
) -> dict:
    """``quantize_visual`` on a graph ``prepare`` already wrote (the sensitivity scan
    quantizes one graph many times). ``act_absmax``: SmoothQuant statistics already
    measured (``activation_absmax`` of this graph), instead of ``calibration``."""
    if recipe.method is not Method.DYNAMIC:
        raise ValueError("quantize_visual writes dynamic recipes; static ones: static_qdq")
    if recipe.activation_granularity is Granularity.PER_TENSOR:
        return _quantize_per_tensor(prepared, out_path, recipe)
    return _quantize_per_row(prepared, out_path, recipe, calibration, act_absmax)


def _quantize_per_tensor(prepared: Path, out_path: Path, recipe: QuantRecipe) -> dict:
    quantize_dynamic(
        str(prepared),
        str(out_path),
        weight_type=QuantType[recipe.weight_type.value],
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        op_types_to_quantize=list(recipe.op_types),
        nodes_to_exclude=list(recipe.excluded_nodes),
    )
    return recipe.to_dict()


def _quantize_per_row(
    prepared: Path,
    out_path: Path,
    recipe: QuantRecipe,
    calibration: np.ndarray | None,
    act_absmax: dict[str, np.ndarray] | None = None,
) -> dict:
    model = onnx.load(str(prepared))
    if recipe.smooth_alpha is None:
        act_absmax = None
    elif act_absmax is None:
        if calibration is None or len(calibration) == 0:
            raise ValueError("SmoothQuant needs calibration images")
        act_absmax = activation_absmax(model, calibration, recipe.excluded_nodes)
    done = rowwise.rewrite(
        model,
        act_absmax=act_absmax,
        alpha=recipe.smooth_alpha,
        pair_safe=recipe.saturation_safe_weights,
        excluded=recipe.excluded_nodes,
    )
    fused = fusions.fuse(model) if recipe.ort_fusions else None
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    record = recipe.to_dict()
    record["quantized_matmuls"] = len(done)
    record["calibration_images"] = (
        0 if act_absmax is None or calibration is None else len(calibration)
    )
    if fused is not None:
        record["fused"] = fused.to_dict()
    return record


def activation_absmax(
    model: onnx.ModelProto, calibration: np.ndarray, excluded: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Per-channel max |x| of every weight MatMul's input over the calibration images."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = sorted({probe.graph.node[i].input[0] for i in rowwise.weight_matmuls(probe, excluded)})
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    absmax: dict[str, np.ndarray] = {}
    if not names:  # every weight MatMul excluded (ONNX Runtime reads [] as "all outputs")
        return absmax
    for start in range(0, len(calibration), CALIBRATION_BATCH):
        batch = calibration[start : start + CALIBRATION_BATCH]
        for name, value in zip(names, session.run(names, {input_name: batch}), strict=True):
            channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            absmax[name] = np.maximum(absmax.get(name, 0.0), channel_max)
    return absmax
