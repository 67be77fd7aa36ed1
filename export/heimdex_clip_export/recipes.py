"""The INT8 recipe: one type for every graph the export quantizes, with named presets.

A recipe decides an INT8 graph entirely and is recorded verbatim in the manifest. Closed
choices are enums (their values are the strings ONNX Runtime and the manifest use), checked
when the recipe is built, so a typo fails at construction instead of deep in a quantizer.
The presets are named class methods, as optimum's ``AutoQuantizationConfig.avx512_vnni``:

* ``QuantRecipe.per_row_dynamic()``: the image tower's shipped recipe (``rowwise.py``).
* ``QuantRecipe.per_tensor_dynamic()``: ONNX Runtime's ``quantize_dynamic``, the recipe
  shipped before the real-weights proxy existed (kept for comparisons).
* ``QuantRecipe.text_dynamic()``: the text tower's recipe (docs/text.md).
* ``QuantRecipe.static_qdq()``: OpenVINO's statically quantized QDQ graph (``static_qdq.py``).

Each preset takes keyword overrides (``QuantRecipe.static_qdq(float_budget=4)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

from .evaluation import CALIBRATION_SEED


class Method(str, Enum):
    """When activation scales are decided."""

    #: At run time, from the tensor being multiplied.
    DYNAMIC = "dynamic"
    #: Once, from calibration images (fixed scales: QDQ graphs).
    STATIC = "static"


class Granularity(str, Enum):
    """How many activation scales a dynamic MatMul computes."""

    #: One per token (``rowwise.py``): a batch-mate's outlier cannot move an image.
    PER_ROW = "per_row"
    #: One per batch: ONNX Runtime's ``quantize_dynamic``.
    PER_TENSOR = "per_tensor"


class QType(str, Enum):
    """ONNX Runtime's ``QuantType`` names for 8-bit integers."""

    QINT8 = "QInt8"
    QUINT8 = "QUInt8"


class CalibrateMethod(str, Enum):
    """ONNX Runtime's ``CalibrationMethod`` names (static recipes)."""

    MINMAX = "MinMax"
    ENTROPY = "Entropy"
    PERCENTILE = "Percentile"


class QuantFormat(str, Enum):
    """ONNX Runtime's ``QuantFormat`` names (static recipes)."""

    QDQ = "QDQ"
    QOPERATOR = "QOperator"


#: Fields every recipe records; then those only one method reads.
_COMMON = (
    "method",
    "weight_type",
    "activation_type",
    "per_channel",
    "reduce_range",
    "smooth_alpha",
    "op_types",
)
_DYNAMIC_ONLY = (
    "activation_granularity",
    "saturation_safe_weights",
    "excluded_nodes",
    "ort_fusions",
    "pre_process",
)
_STATIC_ONLY = (
    "quant_format",
    "calibrate_method",
    "quantize_activation_matmuls",
    "float_budget",
    "sensitivity_images",
    "extra_options",
    "calibration_crops_per_photo",
    "calibration_seed",
    "calibration_batch",
)


def _default_pre_process() -> dict[str, Any]:
    # The symbolic shape pass of quant_pre_process fails on exported open_clip graphs.
    return {"skip_symbolic_shape": True}


@dataclass(frozen=True)
class QuantRecipe:
    """Everything that decides an INT8 graph; recorded in the manifest (``to_dict``)."""

    method: Method = Method.DYNAMIC
    weight_type: QType = QType.QINT8
    activation_type: QType = QType.QUINT8
    #: Dynamic only: one activation scale per token or per tensor.
    activation_granularity: Granularity = Granularity.PER_ROW
    per_channel: bool = True
    #: 7-bit weights (per_tensor only); per_row bounds adjacent weight pairs instead.
    reduce_range: bool = False
    #: per_row: int8 weight pairs bounded so uint8 x int8 kernels without VNNI cannot saturate.
    saturation_safe_weights: bool = True
    #: SmoothQuant migration strength (None = no smoothing, no calibration needed).
    smooth_alpha: float | None = 0.6
    op_types: tuple[str, ...] = ("MatMul",)
    #: Dynamic: nodes left in fp32 (the ladder's rung 2 fills this from a sensitivity scan).
    excluded_nodes: tuple[str, ...] = ()
    #: per_row: attention cores as ONNX ``Attention`` ops (``fusions.py``).
    ort_fusions: bool = True
    pre_process: dict[str, Any] = field(default_factory=_default_pre_process)
    # --- static (QDQ) recipes -------------------------------------------------------------
    quant_format: QuantFormat = QuantFormat.QDQ
    calibrate_method: CalibrateMethod = CalibrateMethod.MINMAX
    #: The attention's activation x activation MatMuls (Q x K^T, softmax x V): one fixed
    #: scale per tensor cannot hold them on trained weights (docs/providers.md).
    quantize_activation_matmuls: bool = False
    #: At most this many weight MatMuls stay float: the most sensitive ones, found by
    #: ``qdq_tuning.sensitivity_scan`` on the first ``sensitivity_images`` calibration images.
    float_budget: int = 0
    sensitivity_images: int = 16
    #: ``quantize_static``'s ``extra_options``, as pairs. By default ONNX Runtime also puts a
    #: uint8 Q/DQ pair on each MatMul's output; that second rounding per layer, not needed
    #: for INT8 GEMMs, cost the most accuracy on trained weights.
    extra_options: tuple[tuple[str, Any], ...] = (
        ("OpTypesToExcludeOutputQuantization", ("MatMul",)),
    )
    #: Calibration crops (no whole photograph: those are in the evaluation set), drawn with
    #: ``calibration_seed``; the evaluation crops use seed 0.
    calibration_crops_per_photo: int = 3
    calibration_seed: int = CALIBRATION_SEED
    calibration_batch: int = 8

    def __post_init__(self) -> None:
        # Accept the strings the manifest records (and ``replace(r, weight_type="QUInt8")``).
        for name, kind in (
            ("method", Method),
            ("weight_type", QType),
            ("activation_type", QType),
            ("activation_granularity", Granularity),
            ("quant_format", QuantFormat),
            ("calibrate_method", CalibrateMethod),
        ):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}; choose one of {[k.value for k in kind]}"
                ) from None
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "excluded_nodes", tuple(self.excluded_nodes))
        self._validate()

    def _validate(self) -> None:
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha={self.smooth_alpha} outside [0, 1]")
        if not self.op_types:
            raise ValueError("op_types is empty: nothing would be quantized")
        if self.float_budget < 0 or self.sensitivity_images < 1 or self.calibration_batch < 1:
            raise ValueError("float_budget >= 0, sensitivity_images >= 1, calibration_batch >= 1")
        per_row = (
            self.method is Method.DYNAMIC and self.activation_granularity is Granularity.PER_ROW
        )
        if per_row and (
            self.op_types != ("MatMul",) or self.weight_type is not QType.QINT8 or self.reduce_range
        ):
            raise ValueError("per_row quantizes MatMul with QInt8 weights and no reduce_range")
        if per_row and self.activation_type is not QType.QUINT8:
            raise ValueError("per_row quantizes activations to QUInt8")
        if self.method is Method.STATIC and self.excluded_nodes:
            raise ValueError("a static recipe chooses its float MatMuls with float_budget")

    # --- presets ---------------------------------------------------------------------------
    @classmethod
    def per_row_dynamic(cls, **overrides: Any) -> QuantRecipe:
        """The image tower's shipped recipe: per-token dynamic INT8, SmoothQuant 0.6,
        saturation-safe weights, attention fused into ONNX ``Attention``."""
        return cls(**overrides)

    @classmethod
    def per_tensor_dynamic(cls, **overrides: Any) -> QuantRecipe:
        """ONNX Runtime's ``quantize_dynamic``: one scale per tensor, 7-bit weights."""
        base = {
            "activation_granularity": Granularity.PER_TENSOR,
            "reduce_range": True,
            "saturation_safe_weights": False,
            "smooth_alpha": None,
            "ort_fusions": False,
        }
        return cls(**{**base, **overrides})

    @classmethod
    def text_dynamic(cls, **overrides: Any) -> QuantRecipe:
        """The text tower's recipe: per-tensor dynamic with full-range unsigned 8-bit weights,
        the token embedding's Gather quantized too (why: ``text_export.text_recipe``)."""
        base = {
            "weight_type": QType.QUINT8,
            "reduce_range": False,
            "op_types": ("MatMul", "Gather"),
        }
        return cls.per_tensor_dynamic(**{**base, **overrides})

    @classmethod
    def static_qdq(cls, **overrides: Any) -> QuantRecipe:
        """OpenVINO's graph: static MinMax QDQ on SmoothQuant-ed weights, calibrated on
        photographs; only weight MatMuls quantized."""
        base = {
            "method": Method.STATIC,
            "activation_granularity": Granularity.PER_TENSOR,
            "saturation_safe_weights": False,
            "ort_fusions": False,
        }
        return cls(**{**base, **overrides})

    # --- record -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The manifest's record: the fields this recipe's method reads, as plain JSON."""
        names = _COMMON + (_DYNAMIC_ONLY if self.method is Method.DYNAMIC else _STATIC_ONLY)
        full = asdict(self)
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in names:
                continue
            value = full[f.name]
            if isinstance(value, Enum):
                value = value.value
            elif f.name == "extra_options":  # as JSON will read it back
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def keeping_fp32(self, nodes: tuple[str, ...]) -> QuantRecipe:
        """This recipe with ``nodes`` (weight MatMuls) also left in fp32."""
        return replace(self, excluded_nodes=tuple(dict.fromkeys(self.excluded_nodes + nodes)))
