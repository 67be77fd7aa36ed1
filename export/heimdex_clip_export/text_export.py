"""The text tower: ``encode_text`` to ONNX (fp32, INT8), its tokenizer, and its gates.

The graph takes token ids ``[batch, length]`` with both axes dynamic, ``length`` up to the
context length (77). open_clip always runs 77 positions, but with a causal mask and
end-of-text (argmax) pooling nothing after a text's end-of-text token reaches its
embedding, so the runtime cuts a batch to its longest text and the graph slices the
positional embedding and the causal mask to match. The fp32 parity gate compares those cut
runs with PyTorch's full 77-position ``encode_text``.

Outputs: ``text_embeds`` (unit norm, ``encode_text(normalize=True)``) and
``text_features`` (before normalisation), like the image tower.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from heimdex_clip.text import INPUT_NAME, OUTPUT_NAME, RAW_OUTPUT_NAME
from heimdex_clip.tokenizer import ClipTokenizer

from . import evaluation as ev
from . import ladder
from .attention_fusion import ATTENTION_OPSET
from .gates import Gates, text_gates
from .onnx_export import ExportSelfAttention, mha_fastpath_disabled
from .recipes import QuantRecipe
from .text_corpus import gate_corpus
from .text_tower import BATCH1_TEXTS, ODD_BATCH, TOKEN_DTYPE, TextTower, onnx_text_embed
from .tokenizer_export import TokenizerExportError, write_tokenizer

log = logging.getLogger(__name__)

#: Pool types for which positions after the end-of-text token never reach the output.
CUTTABLE_POOLS = ("argmax", "eos", "first")


class TextGateError(RuntimeError):
    """The fp32 text graph does not reproduce PyTorch: a bug, never shipped."""


@dataclass
class TextArtifact:
    """What the text tower adds to the manifest."""

    files: dict[str, tuple[Path, str | None, str]] = field(default_factory=dict)
    spec: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)


class TextEncoder(torch.nn.Module):
    """open_clip's ``encode_text`` for ids of any length up to the context length."""

    def __init__(self, clip_model: torch.nn.Module) -> None:
        super().__init__()
        self.m = clip_model

    @staticmethod
    def supports(clip_model: torch.nn.Module) -> bool:
        return (
            type(clip_model).__name__ == "CLIP"
            and getattr(clip_model, "text_pool_type", None) in CUTTABLE_POOLS
            and getattr(clip_model.transformer, "batch_first", False)
            and clip_model.attn_mask is not None
        )

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.m
        ids = input_ids.long()
        length = ids.shape[1]
        x = m.token_embedding(ids) + m.positional_embedding[:length]
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = text_global_pool(x, ids, m.text_pool_type, eos_token_id=m.text_eos_id)
        x = (
            m.text_projection(x)
            if isinstance(m.text_projection, torch.nn.Linear)
            else x @ m.text_projection
        )
        return F.normalize(x, dim=-1), x


def _with_lean_attention(clip_model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """The text tower's attention as ExportSelfAttention (exact; fewer layout ops)."""
    ready = copy.deepcopy(clip_model)
    layers = 0
    for block in ready.transformer.resblocks:
        if ExportSelfAttention.supports(getattr(block, "attn", None)):
            block.attn = ExportSelfAttention(block.attn, onnx_attention=True)
            layers += 1
    return ready, layers


def export_text_onnx(
    clip_model: torch.nn.Module, out_path: Path, token_dtype: str = TOKEN_DTYPE
) -> int:
    """Write the fp32 text tower; returns how many attention layers were rewritten."""
    ready, layers = _with_lean_attention(clip_model)
    encoder = TextEncoder(ready).eval()
    context = int(clip_model.attn_mask.shape[0])
    example = torch.randint(1, 1000, (2, 12), dtype=getattr(torch, token_dtype))
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("length", min=1, max=context)
    with mha_fastpath_disabled(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder,
            (example,),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, RAW_OUTPUT_NAME],
            dynamic_shapes={"input_ids": {0: batch, 1: length}},
            opset_version=ATTENTION_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    log.info("exported fp32 text encoder to %s (%.1f MB)", out_path, out_path.stat().st_size / 1e6)
    return layers


def text_recipe() -> QuantRecipe:
    """The text tower's INT8 recipe: per-tensor dynamic, as measured for it (docs/text.md).

    The image tower's per-token recipe answers batch invariance and outlier tokens over
    thousands of frames; a query is embedded once, alone, and was gated on this recipe:

    * Unsigned 8-bit weights at full range (U8U8) instead of 7-bit signed ones: the
      retrieval gate failed with 7-bit weights (top-5 overlap 0.874 on the test artifact)
      and passes with 8 bits. U8U8 kernels do not saturate on AVX2-only CPUs, the reason the
      image tower uses 7-bit weights; they are slower than U8S8 on VNNI CPUs, which matters
      little for one query per search.
    * The token embedding (a quarter of the tower's weights, read by a Gather) is quantized
      too: 140 -> 64 MB for ViT-B-32 at the same accuracy.
    """
    return QuantRecipe.text_dynamic()


def _check_tokenizer(tokenizer_path: Path, spec: dict, texts: list[str]) -> dict:
    ours = ClipTokenizer(
        tokenizer_path.read_text(encoding="utf-8"), spec["context_length"], spec["special_tokens"]
    )(texts)
    ref = open_clip.tokenize(texts, context_length=spec["context_length"]).numpy()
    mismatched = int((ours != ref).any(axis=1).sum())
    if mismatched:
        raise TokenizerExportError(
            f"the built tokenizer differs from open_clip.tokenize on "
            f"{mismatched} of {len(texts)} texts"
        )
    return {"texts": len(texts), "mismatched_texts": 0}


def _int8_verdict(climbed: ladder.Outcome) -> str:
    if climbed.rung == ladder.SHIPPED:
        return "passed"
    missed = "; ".join(climbed.attempts[0].failures)
    if climbed.rung == ladder.FP32_MATMULS:
        return f"passed with {len(climbed.kept_fp32)} MatMuls in fp32 (shipped recipe: {missed})"
    return "rejected: " + missed


def export_text_tower(
    model: torch.nn.Module,
    model_name: str,
    work: Path,
    image_embeddings: np.ndarray,
    *,
    keep_fp32: bool,
    gates: Gates,
    strict: bool = False,
) -> TextArtifact | None:
    """Export, verify and write the text tower into ``work``; None if the model's text
    tower or tokenizer is one the runtime cannot reproduce (the artifact then has none).

    ``image_embeddings`` (the evaluation images, unit norm) rank the retrieval gate. Raises
    TextGateError when the fp32 graph misses PyTorch. INT8 missing its gates climbs the
    ladder (``ladder.py``): some MatMuls in fp32, else the fp32 graph; ``strict`` ships the
    fp32 graph at once, as before the ladder (the text tower runs once per query).
    """
    thresholds = text_gates(gates)
    if not TextEncoder.supports(model):
        log.warning(
            "%s: text tower not exportable (pooling %r); artifact without text tower",
            model_name,
            getattr(model, "text_pool_type", None),
        )
        return None
    context = int(model.attn_mask.shape[0])
    try:
        tokenizer_path, tok_spec = write_tokenizer(model_name, context, work)
    except TokenizerExportError as exc:
        log.warning("%s: %s; artifact without text tower", model_name, exc)
        return None
    texts = gate_corpus()
    tok_report = _check_tokenizer(tokenizer_path, tok_spec, texts)
    ids = open_clip.tokenize(texts, context_length=context).numpy()

    fp32_path, int8_path = work / "text.fp32.onnx", work / "text.int8.onnx"
    layers = export_text_onnx(model, fp32_path)
    with torch.inference_mode():
        torch_ref = model.encode_text(torch.from_numpy(ids), normalize=True).numpy()
    fp32 = onnx_text_embed(fp32_path)
    batch1 = ev.embed_batched(fp32, ids[-BATCH1_TEXTS:], 1)
    odd = ev.embed_batched(fp32, ids, ODD_BATCH)
    fp32_report = {
        "texts": len(texts),
        "batch1_min_cosine": float(ev.row_cosines(torch_ref[-BATCH1_TEXTS:], batch1).min()),
        f"batch{ODD_BATCH}_min_cosine": float(ev.row_cosines(torch_ref, odd).min()),
    }
    fp32_report["min_cosine"] = min(
        fp32_report["batch1_min_cosine"], fp32_report[f"batch{ODD_BATCH}_min_cosine"]
    )
    log.info("text fp32 ONNX vs PyTorch: %s", fp32_report)
    if not fp32_report["min_cosine"] >= thresholds["fp32_min_cosine"]:
        raise TextGateError(
            f"text fp32 vs torch min cosine {fp32_report['min_cosine']:.6f} "
            f"< required {thresholds['fp32_min_cosine']}"
        )

    tower = TextTower(fp32_path, ids, odd, image_embeddings, thresholds)
    climbed = ladder.climb(tower, text_recipe(), fp32_path, int8_path, strict=strict)
    log.info("text INT8 vs fp32 (ladder rung %s): %s", climbed.rung, climbed.figures)
    out = TextArtifact()
    out.files["tokenizer"] = (tokenizer_path, None, "tokenizer")
    int8_shipped = climbed.rung != ladder.FP32_GRAPH
    if int8_shipped:
        out.files["text.int8"] = (int8_path, "int8", "text")
    if keep_fp32 or not int8_shipped:
        out.files["text.fp32"] = (fp32_path, "fp32", "text")
    else:
        fp32_path.unlink()
    out.spec = {
        "tokenizer": tok_spec,
        "token_dtype": TOKEN_DTYPE,
        "pool": model.text_pool_type,
        "cut_to_longest": True,
        "attention_rewrites": layers,
        "quantization": climbed.record or {"ladder_rung": climbed.rung},
        "int8": _int8_verdict(climbed),
    }
    out.parity = {
        "corpus": "captions + hostile texts (heimdex_clip_export.text_corpus)",
        "gates": thresholds,
        "tokenizer_vs_open_clip": tok_report,
        "fp32_vs_torch": fp32_report,
        "int8_vs_fp32": climbed.figures,
        "ladder": climbed.to_dict(),
    }
    return out
