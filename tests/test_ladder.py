"""The recipe ladder, end to end on a tiny open_clip model (seeded random init).

A first export with the usual gates measures what the shipped recipes give; the gates are
then tightened until the shipped recipes fail, and the export must still write an artifact,
from the next rung that passes, and say so in the manifest; ``strict`` must fail instead.
Every figure is re-measured here from the written graphs with plain numpy.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import open_clip
import pytest

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip_export import evaluation as ev
from heimdex_clip_export.pipeline import (
    RANDOM_INIT_GATES,
    GateError,
    export_artifact,
    open_clip_pixels,
)
from heimdex_clip_export.weights import load_model

pytestmark = pytest.mark.slow

TINY = "heimdex-test-tiny-ladder"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    configs = tmp_path_factory.mktemp("configs")
    (configs / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(configs)
    return TINY


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _embed(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["image_embeds"], {"pixel_values": pixels})[0]


@pytest.fixture(scope="module")
def baseline(tiny, tmp_path_factory) -> dict:
    """The shipped recipes' figures on the tiny model, under the usual random-init gates."""
    out = export_artifact(tiny, "none", tmp_path_factory.mktemp("base"), keep_fp32=True)
    return _manifest(out)


@pytest.fixture(scope="module")
def tight(baseline):
    """A mean-cosine gate half way between what the better shipped recipe reaches and 1:
    both towers (which share the gates) must miss it."""
    image = baseline["parity"]["int8_vs_fp32"]["mean_cosine"]
    text = baseline["parity"]["text"]["int8_vs_fp32"]["mean_cosine"]
    best = max(image, text)
    return replace(RANDOM_INIT_GATES, int8_mean_cosine=best + (1.0 - best) / 2)


def test_usual_gates_pass_on_the_first_rung(baseline):
    for ladder in (baseline["parity"]["ladder"], baseline["parity"]["text"]["ladder"]):
        assert ladder["rung"] == "shipped_recipe"
        assert [a["rung"] for a in ladder["attempts"]] == ["shipped_recipe"]
        assert ladder["kept_fp32"] == []


def test_tightened_gates_ship_the_next_rung_that_passes(tiny, tight, tmp_path, caplog):
    out = export_artifact(tiny, "none", tmp_path, keep_fp32=True, gates=tight)
    manifest = _manifest(out)
    ladder = manifest["parity"]["ladder"]
    assert ladder["attempts"][0]["rung"] == "shipped_recipe"
    assert not ladder["attempts"][0]["passed"]
    assert ladder["rung"] == "fp32_matmuls", ladder
    kept = ladder["kept_fp32"]
    assert kept and kept == manifest["quantization"]["excluded_nodes"]
    assert "shipping it with the" in caplog.text  # and says so
    # The kept layers are plain float MatMuls in the shipped graph; every other weight
    # MatMul is INT8.
    graph = onnx.load(str(out / "visual.int8.onnx")).graph
    weights = {i.name for i in graph.initializer}
    float_weight_matmuls = {
        n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights
    }
    assert float_weight_matmuls >= set(kept)
    assert any(n.op_type == "MatMulIntegerToFloat" for n in graph.node)
    # Fewest: the ladder's attempt with one layer fewer (if any) missed.
    fewer = [
        a
        for a in ladder["attempts"]
        if a["rung"] == "fp32_matmuls" and len(a["kept_fp32"]) == len(kept) - 1
    ]
    assert all(not a["passed"] for a in fewer)
    # Re-measured here: the shipped graph holds the tightened gate.
    loaded = load_model(tiny, "none")
    pixels = open_clip_pixels(loaded, ev.evaluation_images())
    cos = ev.row_cosines(
        _embed(out / "visual.fp32.onnx", pixels), _embed(out / "visual.int8.onnx", pixels)
    )
    assert cos.mean() >= tight.int8_mean_cosine
    assert manifest["parity"]["int8_vs_fp32"]["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-5)
    text = manifest["parity"]["text"]
    assert text["ladder"]["rung"] in ("fp32_matmuls", "fp32_graph")
    if text["ladder"]["rung"] == "fp32_matmuls":
        assert text["int8_vs_fp32"]["mean_cosine"] >= tight.int8_mean_cosine
        assert "text.int8" in manifest["files"]


def test_strict_fails_at_the_first_miss(tiny, tight, tmp_path):
    with pytest.raises(GateError, match=r"INT8 accuracy gate failed.*INT8 mean cosine"):
        export_artifact(tiny, "none", tmp_path, gates=tight, strict=True, text=False)
    assert not any(tmp_path.iterdir())  # nothing written


def test_unreachable_gates_ship_the_fp32_graph_loudly_and_it_loads(tiny, tmp_path, caplog):
    impossible = replace(RANDOM_INIT_GATES, int8_mean_cosine=1.5)
    out = export_artifact(tiny, "none", tmp_path, gates=impossible)
    manifest = _manifest(out)
    assert manifest["parity"]["ladder"]["rung"] == "fp32_graph"
    assert manifest["parity"]["text"]["ladder"]["rung"] == "fp32_graph"
    assert "visual.int8" not in manifest["files"] and "visual.fp32" in manifest["files"]
    assert "text.int8" not in manifest["files"] and "text.fp32" in manifest["files"]
    assert "NO INT8 GRAPH passes the gates" in caplog.text
    rungs = [a["rung"] for a in manifest["parity"]["ladder"]["attempts"]]
    assert rungs[0] == "shipped_recipe" and rungs[-1] == "fp32_graph"
    assert "fp32_matmuls" in rungs  # rung 2 was tried before giving up on INT8
    config = ClipConfig(enabled=True, model_name=tiny, pretrained="none", model_dir=out)
    embedder = ClipEmbedder(config=config).load()  # the runtime falls back to visual.fp32
    assert embedder.embed_images(ev.evaluation_images()[:3]).shape == (3, 64)
    assert embedder.embed_texts(["a photo of a cat"]).shape == (1, 64)
