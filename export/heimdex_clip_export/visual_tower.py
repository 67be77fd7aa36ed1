"""The image tower as the ladder climbs it: quantize, gate, rank layers (``ladder.Tower``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from heimdex_clip.session import create_session

from . import evaluation as ev
from .gates import Gates
from .onnx_export import INPUT_NAME, OUTPUT_NAME
from .quantize import quantize_visual
from .recipes import QuantRecipe
from .sensitivity import LayerDrop, layer_sensitivity

EVAL_BATCH = 32
#: Calibration images the per-layer sensitivity is measured on.
SENSITIVITY_IMAGES = 16


def onnx_embed(path: Path) -> ev.EmbedFn:
    """The graph in a session built exactly as the runtime builds it (gate what production
    runs), as an embedding function."""
    session = create_session(path)[0]
    return lambda pixels: session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


@dataclass
class VisualTower:
    """Gates the image tower's INT8 graphs against its fp32 graph on the evaluation set."""

    fp32_path: Path
    #: The evaluation set (model input) and the fp32 graph's embeddings of it.
    pixels: np.ndarray
    fp32_embeddings: np.ndarray
    #: SmoothQuant's calibration images (not in the evaluation set); also what the
    #: sensitivity scan measures on.
    calibration: np.ndarray
    gates: Gates
    name: str = "image tower"
    #: The last evaluated graph's embeddings of ``pixels`` (the ladder evaluates the graph
    #: it ships last).
    last_embeddings: np.ndarray | None = field(default=None, repr=False)

    def quantize(self, recipe: QuantRecipe, out_path: Path) -> dict:
        return quantize_visual(self.fp32_path, out_path, recipe, calibration=self.calibration)

    def evaluate(self, path: Path) -> tuple[dict, list[str]]:
        embed = onnx_embed(path)
        self.last_embeddings = ev.embed_batched(embed, self.pixels, EVAL_BATCH)
        agreement = ev.agreement(self.fp32_embeddings, self.last_embeddings)
        invariance = ev.batch_invariance(embed, self.pixels, EVAL_BATCH)
        g, failures = self.gates, []
        ev.check_min("INT8 mean cosine", agreement.mean_cosine, g.int8_mean_cosine, failures)
        ev.check_min("INT8 min cosine", agreement.min_cosine, g.int8_min_cosine, failures)
        ev.check_min(
            "INT8 top-5 agreement", agreement.top5_agreement, g.int8_top5_agreement, failures
        )
        ev.check_min(
            "batch invariance min cosine", invariance, g.batch_invariance_min_cosine, failures
        )
        return {**agreement.to_dict(), "batch_invariance_min_cosine": invariance}, failures

    def sensitivity(self, recipe: QuantRecipe) -> list[LayerDrop]:
        return layer_sensitivity(
            self.fp32_path,
            recipe,
            onnx_embed,
            self.calibration[:SENSITIVITY_IMAGES],
            calibration=self.calibration,
        )
