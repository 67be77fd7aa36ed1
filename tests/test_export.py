"""Export pipeline: parity against the real open_clip model, gates, manifest, failure modes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from heimdex_clip.artifact import artifact_dir_name, load_manifest, sha256_file

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from heimdex_clip_export import evaluation as ev  # noqa: E402
from heimdex_clip_export.pipeline import (  # noqa: E402
    GateError,
    Gates,
    evaluation_pixels,
    export_artifact,
)
from heimdex_clip_export.weights import (  # noqa: E402
    WeightsError,
    load_model,
    resolve_quick_gelu,
)

pytestmark = pytest.mark.parity
GATES = Gates()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, pixels: np.ndarray, output: str = "image_embeds"):
    return session.run([output], {"pixel_values": pixels})[0]


@pytest.fixture(scope="module")
def reference():
    """The real open_clip model with the artifact's seed, and the evaluation pixels."""
    loaded = load_model("ViT-B-32", "none", seed=0)
    return loaded, evaluation_pixels(loaded)


@pytest.fixture(scope="module")
def torch_embeddings(reference):
    loaded, pixels = reference
    with torch.inference_mode():
        return loaded.model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()


def test_fp32_onnx_matches_pytorch_at_batch_1_and_odd_batch(artifact_dir, reference,
                                                             torch_embeddings):
    _, pixels = reference
    fp32 = _session(artifact_dir / "visual.fp32.onnx")
    alone = np.concatenate([_run(fp32, pixels[i:i + 1]) for i in range(8)])
    odd = np.concatenate([_run(fp32, pixels[i:i + 7]) for i in range(0, len(pixels), 7)])
    assert ev.row_cosines(torch_embeddings[:8], alone).min() >= GATES.fp32_min_cosine
    assert ev.row_cosines(torch_embeddings, odd).min() >= GATES.fp32_min_cosine
    assert np.abs(torch_embeddings - odd).max() < 1e-4


def test_raw_features_output_is_the_unnormalised_embedding(artifact_dir, reference):
    loaded, pixels = reference
    fp32 = _session(artifact_dir / "visual.fp32.onnx")
    raw = _run(fp32, pixels[:3], "image_features")
    with torch.inference_mode():
        ref = loaded.model.encode_image(torch.from_numpy(pixels[:3]), normalize=False).numpy()
    np.testing.assert_allclose(raw, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               _run(fp32, pixels[:3]), atol=1e-6)


def test_int8_meets_accuracy_and_batch_invariance_gates(artifact_dir, reference):
    _, pixels = reference
    assert len(pixels) >= 100
    fp32, int8 = _session(artifact_dir / "visual.fp32.onnx"), _session(
        artifact_dir / "visual.int8.onnx")
    ref = ev.embed_batched(lambda x: _run(fp32, x), pixels, 32)
    got = ev.embed_batched(lambda x: _run(int8, x), pixels, 32)
    figures = ev.agreement(ref, got)
    assert figures.mean_cosine >= GATES.int8_mean_cosine
    assert figures.min_cosine >= GATES.int8_min_cosine
    assert figures.top5_agreement >= GATES.int8_top5_agreement
    assert ev.batch_invariance(lambda x: _run(int8, x), pixels) >= (
        GATES.batch_invariance_min_cosine)
    # INT8 is not the fp32 graph in disguise: quantization visibly moved the vectors.
    assert figures.mean_cosine < 0.99999


def test_manifest_records_model_preprocessing_figures_and_hashes(artifact_dir, reference):
    loaded, _ = reference
    m = load_manifest(artifact_dir)
    raw = json.loads((artifact_dir / "manifest.json").read_text())
    assert m.model.name == "ViT-B-32" and m.model.pretrained == "none"
    assert m.model.random_init and m.model.seed == 0
    assert m.model.quick_gelu is True  # same architecture as the openai production default
    assert m.model.embed_dim == loaded.model.visual.output_dim == 512
    cfg = loaded.model.visual.preprocess_cfg
    assert m.preprocess.image_size == 224
    assert m.preprocess.mean == tuple(cfg["mean"]) and m.preprocess.std == tuple(cfg["std"])
    assert (m.preprocess.interpolation, m.preprocess.resize_mode) == ("bicubic", "shortest")
    for entry in m.files.values():
        path = artifact_dir / entry.path
        assert sha256_file(path) == entry.sha256 and path.stat().st_size == entry.bytes
        if entry.role != "visual":  # the text tower's files: tests/test_text.py
            continue
        assert [t.name for t in entry.inputs] == ["pixel_values"]
        assert [t.name for t in entry.outputs] == ["image_embeds", "image_features"]
        assert entry.inputs[0].shape[1:] == [3, 224, 224]
        assert isinstance(entry.inputs[0].shape[0], str)  # dynamic batch axis
    assert m.file("visual.int8").bytes < 100 * 1024 * 1024
    q = m.quantization
    assert q["method"] == "dynamic" and q["weight_type"] == "QInt8" and q["per_channel"]
    p = raw["parity"]
    assert p["fp32_vs_torch"]["min_cosine"] >= GATES.fp32_min_cosine
    assert p["int8_vs_fp32"]["mean_cosine"] >= GATES.int8_mean_cosine
    assert p["int8_vs_fp32"]["min_cosine"] >= GATES.int8_min_cosine
    assert p["int8_vs_fp32"]["top5_agreement"] >= GATES.int8_top5_agreement
    assert p["int8_batch_invariance"]["min_cosine"] >= GATES.batch_invariance_min_cosine
    assert p["evaluation_set"]["images"] >= 100
    for dist in ("torch", "open_clip_torch", "onnx", "onnxruntime"):
        assert m.versions[dist]
    assert m.created_at


def test_same_seed_reexport_gives_same_embeddings_and_other_seed_differs(
        artifact_dir, reference, tmp_path):
    _, pixels = reference
    out = tmp_path / "models"
    subprocess.run([sys.executable, "-m", "heimdex_clip_export", "--pretrained", "none",
                    "--seed", "0", "--models-dir", str(out), "--no-text", "-q"], check=True)
    again = _run(_session(out / "ViT-B-32__none" / "visual.int8.onnx"), pixels[:6])
    first = _run(_session(artifact_dir / "visual.int8.onnx"), pixels[:6])
    np.testing.assert_allclose(again, first, atol=1e-6)
    other = load_model("ViT-B-32", "none", seed=1).model
    with torch.inference_mode():
        other_emb = other.encode_image(torch.from_numpy(pixels[:6]), normalize=True).numpy()
    assert ev.row_cosines(first, other_emb).max() < 0.99


def test_offline_openai_fails_fast_with_a_clear_message(tmp_path):
    from heimdex_clip_export.weights import _hub_hosts, _reachable

    if any(_reachable(h) for h in _hub_hosts("ViT-B-32", "openai")):
        pytest.skip("a model hub is reachable from here: the offline path cannot be produced")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "heimdex_clip_export", "--pretrained",
                           "openai", "--models-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2
    assert "PRETRAINED=none" in proc.stderr and "PRETRAINED=/path/to/checkpoint" in proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s: must not sit in hub retries"
    assert list(tmp_path.iterdir()) == []


def test_failed_gate_leaves_no_artifact_and_keeps_the_old_one(tmp_path):
    models = tmp_path / "models"
    existing = models / "ViT-B-32__none"
    existing.mkdir(parents=True)
    (existing / "manifest.json").write_text("{\"old\": true}")
    impossible = Gates(fp32_min_cosine=1.5)
    with pytest.raises(GateError, match="fp32 parity gate failed"):
        export_artifact("ViT-B-32", "none", models, gates=impossible)
    assert sorted(p.name for p in models.iterdir()) == ["ViT-B-32__none"]
    assert (existing / "manifest.json").read_text() == "{\"old\": true}"


def test_local_checkpoint_loads_the_same_weights(tmp_path):
    seeded = load_model("ViT-B-32", "none", seed=0).model
    checkpoint = tmp_path / "my weights.pt"
    torch.save(seeded.state_dict(), checkpoint)
    loaded = load_model("ViT-B-32", str(checkpoint))
    assert loaded.pretrained == "checkpoint:my weights.pt" and not loaded.random_init
    assert loaded.quick_gelu is True
    for (name, a), (_, b) in zip(seeded.state_dict().items(),
                                 loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert artifact_dir_name("ViT-B-32", str(checkpoint)) == "ViT-B-32__checkpoint-my-weights"


def test_quick_gelu_follows_the_weights():
    assert resolve_quick_gelu("ViT-B-32", "openai") is True
    assert resolve_quick_gelu("ViT-B-32", "none") is True
    assert resolve_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") is False


def test_unknown_tag_and_model_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match=r"no pretrained tag 'nonsense'.*openai"):
        load_model("ViT-B-32", "nonsense")
    with pytest.raises(WeightsError, match="unknown open_clip model"):
        load_model("ViT-X-99", "none")
    with pytest.raises(WeightsError, match="does not exist"):
        load_model("ViT-B-32", str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_another_open_clip_model_exports_with_its_own_config(tmp_path, photos):
    """Nothing is ViT-B-32-specific: dims and preprocessing come from open_clip."""
    from heimdex_clip import ClipConfig, ClipEmbedder

    path = export_artifact("ViT-S-32", "none", tmp_path, text=False)  # text: test_text.py
    manifest = load_manifest(path)
    reference = load_model("ViT-S-32", "none").model
    cfg = reference.visual.preprocess_cfg
    assert manifest.model.embed_dim == reference.visual.output_dim != 512
    assert manifest.preprocess.image_size == cfg["size"][0]
    assert manifest.preprocess.mean == tuple(cfg["mean"])
    assert manifest.model.quick_gelu is False  # no openai weights for ViT-S-32: its own config
    vectors = ClipEmbedder(config=ClipConfig(model_name="ViT-S-32", pretrained="none",
                                             model_dir=tmp_path)).embed_images(
        [img for _, img in photos[:2]])
    assert vectors.shape == (2, manifest.model.embed_dim)


def test_export_self_attention_is_the_same_function_as_multihead_attention():
    from heimdex_clip_export.onnx_export import ExportSelfAttention

    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 11, 64)
    with torch.inference_mode():
        expected = mha(x, x, x, need_weights=False)[0]
        got = ExportSelfAttention(mha)(x, x, x)[0]
        first_two = ExportSelfAttention(mha, query_tokens=2)(x, x, x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Querying only the first tokens gives exactly those tokens' outputs.
    assert first_two.shape == (3, 2, 64)
    torch.testing.assert_close(first_two, expected[:, :2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="self-attention only"):
        ExportSelfAttention(mha)(x, x, torch.randn(3, 11, 64))


def test_patch_embedding_as_matmul_is_the_same_function_as_the_conv():
    from heimdex_clip_export.onnx_export import PatchEmbedLinear

    torch.manual_seed(4)
    conv = torch.nn.Conv2d(3, 24, kernel_size=8, stride=8, bias=False).eval()
    pixels = torch.randn(2, 3, 32, 48)  # not square: rows and columns must not swap
    with torch.inference_mode():
        torch.testing.assert_close(PatchEmbedLinear(conv)(pixels), conv(pixels),
                                   rtol=1e-5, atol=1e-5)
    assert PatchEmbedLinear.supports(conv, 32)
    assert not PatchEmbedLinear.supports(conv, 36)  # image not a whole number of patches
    overlapping = torch.nn.Conv2d(3, 24, kernel_size=8, stride=4)
    assert not PatchEmbedLinear.supports(overlapping, 32)


def test_export_ready_copy_is_the_same_image_tower_and_leaves_the_original_alone():
    from heimdex_clip_export.onnx_export import Rewrites, export_ready_copy

    model = load_model("ViT-B-32", "none").model
    ready, applied = export_ready_copy(model, 224)
    assert applied == Rewrites(attention_layers=12, patch_embed_as_matmul=True,
                               class_token_last_block=True)
    assert ready is not model
    assert isinstance(model.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    assert isinstance(model.visual.conv1, torch.nn.Conv2d)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected, got = model.encode_image(pixels), ready.encode_image(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_manifest_records_the_rewrites_and_the_graph_is_lean(artifact_dir):
    raw = json.loads((artifact_dir / "manifest.json").read_text())
    assert raw["export"]["rewrites"] == {"attention_layers": 12, "patch_embed_as_matmul": True,
                                         "class_token_last_block": True}
    graph = __import__("onnx").load(str(artifact_dir / "visual.fp32.onnx"),
                                    load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "Conv" not in ops  # the patch embedding is a MatMul, so it is quantized too
    assert ops.count("Transpose") <= 45  # traced nn.MultiheadAttention gave 97
