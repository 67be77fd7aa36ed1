"""The graph OpenVINO runs best: statically quantized INT8 in QDQ form (``visual.qdq.onnx``).

ONNX Runtime's dynamic INT8 graph (``visual.int8.onnx``) computes each activation scale at
run time with its own operators; OpenVINO cannot fuse those into its INT8 kernels and
runs that graph slower than fp32. A QDQ graph (QuantizeLinear/DequantizeLinear pairs
around each MatMul, with fixed scales) is what OpenVINO compiles into INT8 GEMMs.

Fixed activation scales come from calibration, and calibration uses real photographs:
crops of the export's evaluation photographs drawn with a different seed than the
evaluation crops (random tensors would give scales no real frame ever has). The graph
is then held to the same gates as the dynamic INT8 graph, against the fp32 graph, on the
evaluation set; its figures and recipe go into the manifest. Fixed scales also make it
batch-invariant by construction (measured anyway).

Written only when asked: ``python -m heimdex_clip_export --openvino``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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

from . import evaluation as ev

log = logging.getLogger(__name__)

QDQ_FILE = "visual.qdq.onnx"
QDQ_KEY = "visual.qdq"


@dataclass(frozen=True)
class QdqRecipe:
    """Everything that decides the QDQ graph; recorded verbatim in the manifest."""

    method: str = "static"
    quant_format: str = "QDQ"
    calibrate_method: str = "MinMax"
    weight_type: str = "QInt8"
    activation_type: str = "QUInt8"
    per_channel: bool = True
    #: 7-bit weights only help ONNX Runtime's own u8 x s8 kernels on AVX2; OpenVINO's
    #: INT8 kernels do not need them.
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul",)
    #: The attention MatMuls multiply two activations (Q x K^T, softmax x V); one fixed
    #: scale per tensor cannot hold them on trained weights, so they stay float and only
    #: MatMuls with a weight are quantized (docs/providers.md has the measurement).
    quantize_activation_matmuls: bool = False
    calibration_images: int = 64
    #: evaluation_images(seed) for calibration; the evaluation itself uses seed 0.
    calibration_seed: int = 1
    calibration_batch: int = 8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["op_types"] = list(self.op_types)
        return d


class _PixelBatches(CalibrationDataReader):
    """Feeds the calibration pixels to ONNX Runtime's calibrator, one batch at a time."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch: int) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {input_name: pixels[i:i + batch]} for i in range(0, len(pixels), batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibration_pixels(transform: Any, recipe: QdqRecipe) -> np.ndarray:
    """Real photographs (crops drawn with the calibration seed) through ``transform``.

    ``transform`` is open_clip's eval transform (PIL image -> [3, S, S] tensor); images are
    taken evenly across the set so every photograph contributes.
    """
    images = ev.evaluation_images(seed=recipe.calibration_seed)
    picks = np.linspace(0, len(images) - 1, min(recipe.calibration_images, len(images)))
    return np.stack([np.asarray(transform(images[int(i)]), dtype=np.float32)
                     for i in picks])


def activation_matmuls(model_path: Path) -> list[str]:
    """Names of the MatMul nodes none of whose inputs is a weight (an initializer)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and not weights.intersection(node.input)]


def quantize_qdq(fp32_path: Path, out_path: Path, input_name: str, pixels: np.ndarray,
                 recipe: QdqRecipe) -> None:
    """Write the statically quantized QDQ graph of ``fp32_path`` to ``out_path``."""
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # The symbolic shape pass fails on exported open_clip graphs (as for dynamic INT8).
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        excluded = [] if recipe.quantize_activation_matmuls else activation_matmuls(prepared)
        quantize_static(
            str(prepared), str(out_path),
            _PixelBatches(input_name, pixels, recipe.calibration_batch),
            quant_format=QuantFormat[recipe.quant_format],
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=QuantType[recipe.activation_type],
            weight_type=QuantType[recipe.weight_type],
            calibrate_method=CalibrationMethod[recipe.calibrate_method],
            nodes_to_exclude=excluded,
            calibration_providers=["CPUExecutionProvider"],
        )
    log.info("static QDQ graph %s (%.1f MB), calibrated on %d photographs, %d attention "
             "MatMuls left in float", out_path.name, out_path.stat().st_size / 1e6,
             len(pixels), len(excluded))


@dataclass(frozen=True)
class QdqReport:
    """The QDQ graph's figures against the fp32 graph, and whether each gate held."""

    agreement: ev.Agreement
    batch_invariance: float
    failures: list[str]

    def parity(self, recipe: QdqRecipe, gates: dict[str, float]) -> dict[str, Any]:
        return {"qdq_vs_fp32": {**self.agreement.to_dict(), "gates": gates},
                "qdq_batch_invariance": {"min_cosine": self.batch_invariance},
                "qdq_recipe": recipe.to_dict()}


def evaluate_qdq(qdq_path: Path, input_name: str, output_name: str, pixels: np.ndarray,
                 fp32_emb: np.ndarray, gates: dict[str, float], batch: int) -> QdqReport:
    """Gate the QDQ graph against the fp32 graph's embeddings of the evaluation set.

    Measured with ONNX Runtime's CPU provider, which runs QDQ graphs exactly as written;
    OpenVINO fuses the same scales into its kernels.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(qdq_path), options, providers=["CPUExecutionProvider"])

    def embed(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    qdq_emb = ev.embed_batched(embed, pixels, batch)
    agreement = ev.agreement(fp32_emb, qdq_emb)
    invariance = ev.batch_invariance(embed, pixels, batch)
    failures: list[str] = []
    ev.check_min("QDQ mean cosine", agreement.mean_cosine, gates["mean_cosine"], failures)
    ev.check_min("QDQ min cosine", agreement.min_cosine, gates["min_cosine"], failures)
    ev.check_min("QDQ top-5 agreement", agreement.top5_agreement, gates["top5_agreement"],
                 failures)
    ev.check_min("QDQ batch invariance min cosine", invariance,
                 gates["batch_invariance_min_cosine"], failures)
    log.info("QDQ vs fp32: %s; batch invariance min cosine %.6f", agreement, invariance)
    return QdqReport(agreement=agreement, batch_invariance=invariance, failures=failures)
