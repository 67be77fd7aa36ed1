"""The text tower as the ladder climbs it: quantize, gate, rank layers (``ladder.Tower``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heimdex_clip.session import create_session
from heimdex_clip.text import INPUT_NAME, OUTPUT_NAME, active_length

from . import evaluation as ev
from .quantize import quantize_visual
from .recipes import QuantRecipe
from .sensitivity import LayerDrop, layer_sensitivity

#: int32 ids measured as fast as int64 and half the bytes (docs/text.md).
TOKEN_DTYPE = "int32"
ODD_BATCH = 7
#: The last texts of the corpus (the hostile ones among them) also run one by one (batch 1),
#: as a search query runs.
BATCH1_TEXTS = 24
#: Texts the per-layer sensitivity is measured on (the captions, not the hostile texts).
SENSITIVITY_TEXTS = 32


def onnx_text_embed(path: Path, token_dtype: str = TOKEN_DTYPE) -> ev.EmbedFn:
    """Embed ids [N, 77] as the runtime does: in a session built by the runtime's own
    ``create_session``, cut to the batch's longest text."""
    session = create_session(path)[0]

    def embed(ids: np.ndarray) -> np.ndarray:
        cut = ids[:, : active_length(ids)].astype(token_dtype)
        return session.run([OUTPUT_NAME], {INPUT_NAME: cut})[0]

    return embed


def retrieval_overlap(
    images: np.ndarray, reference: np.ndarray, candidate: np.ndarray, k: int = 5
) -> float:
    """Mean overlap of each text's top-k images when ranked by two text embeddings."""

    def top(texts: np.ndarray) -> np.ndarray:
        return np.argsort(-(texts @ images.T), axis=1, kind="stable")[:, :k]

    return float(
        np.mean(
            [len(set(a) & set(b)) / k for a, b in zip(top(reference), top(candidate), strict=True)]
        )
    )


@dataclass
class TextTower:
    """Gates the text tower's INT8 graphs against its fp32 graph on the gate corpus."""

    fp32_path: Path
    #: The gate corpus as open_clip's ids [N, 77], and the fp32 graph's embeddings of it.
    ids: np.ndarray
    fp32_embeddings: np.ndarray
    #: Unit-norm image embeddings the retrieval gate ranks.
    image_embeddings: np.ndarray
    #: ``gates.text_gates``: the thresholds by name.
    thresholds: dict[str, float]
    name: str = "text tower"

    def quantize(self, recipe: QuantRecipe, out_path: Path) -> dict:
        return quantize_visual(self.fp32_path, out_path, recipe)

    def evaluate(self, path: Path) -> tuple[dict, list[str]]:
        embed = onnx_text_embed(path)
        emb = ev.embed_batched(embed, self.ids, ODD_BATCH)
        cos = ev.row_cosines(self.fp32_embeddings, emb)
        alone = ev.embed_batched(embed, self.ids[-BATCH1_TEXTS:], 1)
        report = {
            "texts": len(self.ids),
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "retrieval_top5_overlap": retrieval_overlap(
                self.image_embeddings, self.fp32_embeddings, emb
            ),
            "retrieval_images": len(self.image_embeddings),
            "batch1_vs_batch_min_cosine": float(ev.row_cosines(alone, emb[-BATCH1_TEXTS:]).min()),
        }
        failures: list[str] = []
        for name in ("mean_cosine", "min_cosine", "retrieval_top5_overlap"):
            ev.check_min(
                f"text INT8 {name.replace('_', ' ')}",
                report[name],
                self.thresholds[f"int8_{name}"],
                failures,
            )
        return report, failures

    def sensitivity(self, recipe: QuantRecipe) -> list[LayerDrop]:
        return layer_sensitivity(
            self.fp32_path, recipe, onnx_text_embed, self.ids[:SENSITIVITY_TEXTS]
        )
