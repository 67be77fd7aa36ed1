"""Export pipeline: parity against the real open_clip model, gates, manifest, failure modes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from heimdex_clip.artifact import artifact_dir_name, load_manifest
from heimdex_clip.preprocess import Preprocessor
from heimdex_clip.session import create_session

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402

from heimdex_clip_export import evaluation as ev  # noqa: E402
from heimdex_clip_export import pipeline, visual_tower  # noqa: E402
from heimdex_clip_export.install import current_version, versions  # noqa: E402
from heimdex_clip_export.onnx_export import (  # noqa: E402
    INPUT_NAME,
    OUTPUT_NAME,
    RAW_OUTPUT_NAME,
)
from heimdex_clip_export.pipeline import (  # noqa: E402
    GateError,
    Gates,
    evaluation_pixels,
    export_artifact,
    preprocess_spec,
    prove_runtime_preprocessing,
)
from heimdex_clip_export.weights import (  # noqa: E402
    WeightsError,
    load_model,
    resolve_quick_gelu,
)

pytestmark = pytest.mark.parity
GATES = Gates()


def _session(path: Path) -> ort.InferenceSession:
    return create_session(path)[0]


def _run(session: ort.InferenceSession, pixels: np.ndarray, output: str = OUTPUT_NAME):
    return session.run([output], {INPUT_NAME: pixels})[0]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of matching rows, computed here (not with heimdex_clip_export.evaluation)."""
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _top5_overlap(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean share of each row's 5 most similar other rows found in both spaces (plain loops)."""

    def top5(e: np.ndarray, i: int) -> set[int]:
        unit = e / np.linalg.norm(e, axis=1, keepdims=True)
        scored = sorted(
            ((float(unit[i] @ unit[j]), j) for j in range(len(e)) if j != i), reverse=True
        )
        return {j for _, j in scored[:5]}

    return float(
        np.mean([len(top5(reference, i) & top5(candidate, i)) / 5 for i in range(len(reference))])
    )


def _in_batches(session: ort.InferenceSession, pixels: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate(
        [_run(session, pixels[i : i + size]) for i in range(0, len(pixels), size)]
    )


@pytest.fixture(scope="module")
def reference():
    """The real open_clip model with the artifact's seed, and the evaluation pixels."""
    loaded = load_model("ViT-B-32", "none", seed=0)
    return loaded, evaluation_pixels(loaded, preprocess_spec(loaded))[0]


@pytest.fixture(scope="module")
def open_clip_transform(reference):
    """open_clip's own eval transform for the model, built here from its preprocess config."""
    loaded, _ = reference
    return image_transform_v2(PreprocessCfg(**loaded.model.visual.preprocess_cfg), is_train=False)


@pytest.fixture(scope="module")
def torch_embeddings(reference):
    loaded, pixels = reference
    with torch.inference_mode():
        return loaded.model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()


def test_fp32_onnx_matches_pytorch_at_batch_1_and_odd_batch(
    artifact_dir, reference, torch_embeddings
):
    _, pixels = reference
    fp32 = _session(artifact_dir / "visual.fp32.onnx")
    alone = _in_batches(fp32, pixels[:8], 1)
    odd = _in_batches(fp32, pixels, 7)
    assert _cosines(torch_embeddings[:8], alone).min() >= GATES.fp32_min_cosine
    assert _cosines(torch_embeddings, odd).min() >= GATES.fp32_min_cosine
    assert np.abs(torch_embeddings - odd).max() < 1e-4


def test_raw_features_output_is_the_unnormalised_embedding(artifact_dir, reference):
    loaded, pixels = reference
    fp32 = _session(artifact_dir / "visual.fp32.onnx")
    raw = _run(fp32, pixels[:3], RAW_OUTPUT_NAME)
    with torch.inference_mode():
        ref = loaded.model.encode_image(torch.from_numpy(pixels[:3]), normalize=False).numpy()
    np.testing.assert_allclose(raw, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        raw / np.linalg.norm(raw, axis=1, keepdims=True), _run(fp32, pixels[:3]), atol=1e-6
    )


def test_int8_figures_in_the_manifest_are_true_and_meet_the_gates(artifact_dir, reference):
    """Recomputed here from the graphs: the recorded figures are what the graphs do."""
    _, pixels = reference
    assert len(pixels) >= 100
    fp32, int8 = (
        _session(artifact_dir / "visual.fp32.onnx"),
        _session(artifact_dir / "visual.int8.onnx"),
    )
    ref, got = _in_batches(fp32, pixels, 32), _in_batches(int8, pixels, 32)
    cosines = _cosines(ref, got)
    top5 = _top5_overlap(ref, got)
    alone = _in_batches(int8, pixels[:32], 1)
    invariance = _cosines(alone, got[:32]).min()

    assert cosines.mean() >= GATES.int8_mean_cosine
    assert cosines.min() >= GATES.int8_min_cosine
    assert top5 >= GATES.int8_top5_agreement
    assert invariance >= GATES.batch_invariance_min_cosine
    # INT8 is not the fp32 graph in disguise: quantization visibly moved the vectors.
    assert cosines.mean() < 0.99999

    recorded = load_manifest(artifact_dir).parity
    assert recorded["int8_vs_fp32"]["images"] == len(pixels)
    assert recorded["int8_vs_fp32"]["mean_cosine"] == pytest.approx(cosines.mean(), abs=1e-5)
    assert recorded["int8_vs_fp32"]["min_cosine"] == pytest.approx(cosines.min(), abs=1e-4)
    # One neighbour of one image may swap on a near-tie: 1 / (5 x images).
    assert recorded["int8_vs_fp32"]["top5_agreement"] == pytest.approx(top5, abs=0.01)
    assert recorded["int8_batch_invariance"]["min_cosine"] == pytest.approx(invariance, abs=1e-4)


def test_evaluation_figures_on_cases_with_known_answers():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    b = np.array([[1.0, 1.0], [0.0, -3.0]], np.float32)
    np.testing.assert_allclose(ev.row_cosines(a, b), [2**-0.5, -1.0], rtol=1e-6)

    def points(*degrees: float) -> np.ndarray:
        rad = np.deg2rad(degrees)
        return np.stack([np.cos(rad), np.sin(rad)], axis=1)

    # Nearest other point: 0 and 10 degrees pair up, 90 and 100 too. In the candidate
    # (0, 80, 90, 170) the nearest are 80, 90, 80, 90: rows 0 and 3 keep theirs, 1 and 2 lose.
    reference, candidate = points(0, 10, 90, 100), points(0, 80, 90, 170)
    assert ev.topk_agreement(reference, candidate, k=1) == 0.5
    assert ev.topk_agreement(reference, reference, k=2) == 1.0

    def embed_with_batch_mates(batch: np.ndarray) -> np.ndarray:
        # Alone, each row is itself; in a batch, every row gains (0, 1).
        return batch + (len(batch) > 1) * np.array([0.0, 1.0])

    pair = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Together: (1, 1) and (0, 2); cosines with alone: 1/sqrt(2) and 1.
    assert ev.batch_invariance(embed_with_batch_mates, pair, batch_size=2) == pytest.approx(2**-0.5)

    failures: list[str] = []
    ev.check_min("equal", 0.9, 0.9, failures)
    assert failures == []
    ev.check_min("below", 0.5, 0.9, failures)
    ev.check_min("nan", float("nan"), 0.9, failures)
    assert len(failures) == 2 and "below = 0.500000 < required 0.9" in failures[0]


def test_manifest_records_model_preprocessing_figures_and_hashes(artifact_dir, reference):
    loaded, _ = reference
    m = load_manifest(artifact_dir)
    raw = json.loads((artifact_dir / "manifest.json").read_text())
    assert m.model.name == "ViT-B-32" and m.model.pretrained == "none"
    assert m.preprocess == preprocess_spec(loaded)
    assert m.model.random_init and m.model.seed == 0
    assert m.model.quick_gelu is True  # same architecture as the openai production default
    assert m.model.embed_dim == loaded.model.visual.output_dim == 512
    cfg = loaded.model.visual.preprocess_cfg
    assert m.preprocess.image_size == 224
    assert m.preprocess.mean == tuple(cfg["mean"]) and m.preprocess.std == tuple(cfg["std"])
    assert (m.preprocess.interpolation, m.preprocess.resize_mode) == ("bicubic", "shortest")
    for entry in m.files.values():
        path = artifact_dir / entry.path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
        assert path.stat().st_size == entry.bytes
        if entry.role != "visual":  # the text tower's files: tests/test_text.py
            continue
        # The names the runtime and the benchmarks read from the manifest.
        assert [t.name for t in entry.inputs] == ["pixel_values"] == [INPUT_NAME]
        assert [t.name for t in entry.outputs] == ["image_embeds", "image_features"]
        assert entry.inputs[0].shape[1:] == [3, 224, 224]
        assert isinstance(entry.inputs[0].shape[0], str)  # dynamic batch axis
    assert m.file("visual.int8").bytes < 100 * 1024 * 1024
    q = m.quantization
    assert q["method"] == "dynamic" and q["weight_type"] == "QInt8" and q["per_channel"]
    p = raw["parity"]
    assert p["evaluation_set"]["images"] == len(ev.evaluation_images()) >= 100
    assert p["runtime_preprocessing"]["bit_exact"] is True
    assert p["runtime_preprocessing"]["images"] == p["evaluation_set"]["images"]
    for dist in ("torch", "open_clip_torch", "onnx", "onnxruntime"):
        assert m.versions[dist]
    assert m.created_at


def test_manifest_spec_gives_open_clips_pixels_bit_for_bit(artifact_dir, open_clip_transform):
    """What the export proved, checked again from the written manifest."""
    images = ev.evaluation_images()
    ours = Preprocessor(load_manifest(artifact_dir).preprocess)(images)
    theirs = torch.stack([open_clip_transform(img) for img in images]).numpy()
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    "change",
    [
        {"interpolation": "bilinear"},
        {"resize_mode": "squash"},
        {"image_size": 225},
        # One float32 step off in one channel's mean.
        {
            "mean": (
                float(np.nextafter(np.float32(0.48145466), np.float32(1))),
                0.4578275,
                0.40821073,
            )
        },
    ],
)
def test_preprocessing_proof_refuses_a_spec_that_differs_from_open_clip(
    reference, open_clip_transform, change
):
    loaded, _ = reference
    images = ev.evaluation_images()[:12]
    theirs = torch.stack([open_clip_transform(img) for img in images]).numpy()
    spec = preprocess_spec(loaded)
    assert prove_runtime_preprocessing(spec, images, theirs)["bit_exact"] is True
    with pytest.raises(GateError, match="runtime preprocessing gate failed"):
        prove_runtime_preprocessing(dataclasses.replace(spec, **change), images, theirs)


def test_export_fails_when_the_written_spec_would_differ(tmp_path, monkeypatch):
    """The export writes no artifact whose preprocessing the runtime would get wrong."""
    models = tmp_path / "models"
    real_spec = pipeline.preprocess_spec
    monkeypatch.setattr(
        pipeline,
        "preprocess_spec",
        lambda loaded: dataclasses.replace(real_spec(loaded), interpolation="bilinear"),
    )
    with pytest.raises(GateError, match=r"runtime preprocessing gate failed.*bilinear"):
        export_artifact("ViT-B-32", "none", models)
    assert list(models.iterdir()) == []


def test_cli_export_installs_gates_in_runtime_sessions_and_is_deterministic(
    artifact_dir, reference, tmp_path, monkeypatch
):
    """A full export through the CLI: runtime-built sessions, the versioned install, seeds."""
    from heimdex_clip_export.cli import main

    _, pixels = reference
    sessions_for: list[str] = []

    def recording_create_session(model, **kwargs):
        sessions_for.append(Path(model).name)
        return create_session(model, **kwargs)

    # The fp32 parity session (pipeline) and the INT8 gate sessions (the ladder's visual tower).
    monkeypatch.setattr(pipeline, "create_session", recording_create_session)
    monkeypatch.setattr(visual_tower, "create_session", recording_create_session)
    out = tmp_path / "models"
    assert (
        main(["--pretrained", "none", "--seed", "0", "--models-dir", str(out), "--no-text", "-q"])
        == 0
    )
    assert sorted(set(sessions_for)) == ["visual.fp32.onnx", "visual.int8.onnx"]

    final = out / "ViT-B-32__none"
    assert final.is_symlink() and versions(final) == [current_version(final)]
    again = _run(_session(final / "visual.int8.onnx"), pixels[:6])
    first = _run(_session(artifact_dir / "visual.int8.onnx"), pixels[:6])
    np.testing.assert_allclose(again, first, atol=1e-6)
    other = load_model("ViT-B-32", "none", seed=1).model
    with torch.inference_mode():
        other_emb = other.encode_image(torch.from_numpy(pixels[:6]), normalize=True).numpy()
    assert _cosines(first, other_emb).max() < 0.99


def test_offline_openai_fails_fast_with_a_clear_message(tmp_path, monkeypatch, capsys):
    from heimdex_clip_export import weights
    from heimdex_clip_export.cli import main

    if any(weights._reachable(h) for h in weights._hub_hosts("ViT-B-32", "openai")):
        # A hub answers from here: no outage to produce, so the probe is told it failed.
        monkeypatch.setattr(weights, "_reachable", lambda host, timeout=0: False)

    def no_download(*args, **kwargs):
        raise AssertionError("the export went on to open_clip (and its hub retries)")

    monkeypatch.setattr(weights.open_clip, "create_model", no_download)
    assert main(["--pretrained", "openai", "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "PRETRAINED=none" in err and "PRETRAINED=/path/to/checkpoint" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", ["versioned", "pre-versioned directory"])
def test_failed_gate_leaves_no_artifact_and_keeps_the_old_one(tmp_path, layout):
    models = tmp_path / "models"
    existing = models / ("ViT-B-32__none" if layout != "versioned" else ".old-version")
    existing.mkdir(parents=True)
    (existing / "manifest.json").write_text('{"old": true}')
    if layout == "versioned":
        os.symlink(existing.name, models / "ViT-B-32__none")
    before = sorted(p.name for p in models.iterdir())
    impossible = Gates(fp32_min_cosine=1.5)
    with pytest.raises(GateError, match="fp32 parity gate failed"):
        export_artifact("ViT-B-32", "none", models, gates=impossible)
    assert sorted(p.name for p in models.iterdir()) == before
    assert (models / "ViT-B-32__none" / "manifest.json").read_text() == '{"old": true}'


def test_local_checkpoint_loads_the_same_weights(tmp_path):
    seeded = load_model("ViT-B-32", "none", seed=0).model
    checkpoint = tmp_path / "my weights.pt"
    torch.save(seeded.state_dict(), checkpoint)
    loaded = load_model("ViT-B-32", str(checkpoint))
    assert loaded.pretrained == "checkpoint-my-weights" and not loaded.random_init
    assert loaded.quick_gelu is True
    for (name, a), (_, b) in zip(
        seeded.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # One rule: the directory is named after what the manifest records.
    assert artifact_dir_name("ViT-B-32", str(checkpoint)) == "ViT-B-32__checkpoint-my-weights"
    assert artifact_dir_name("ViT-B-32", "my-weights.safetensors") == (
        "ViT-B-32__checkpoint-my-weights"
    )
    assert artifact_dir_name("ViT-B-32", "None") == "ViT-B-32__none"
    # A worker configured with the recorded label finds the same directory as with the path.
    assert artifact_dir_name("ViT-B-32", loaded.pretrained) == artifact_dir_name(
        "ViT-B-32", str(checkpoint)
    )


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
    vectors = ClipEmbedder(
        config=ClipConfig(model_name="ViT-S-32", pretrained="none", model_dir=tmp_path)
    ).embed_images([img for _, img in photos[:2]])
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
        torch.testing.assert_close(
            PatchEmbedLinear(conv)(pixels), conv(pixels), rtol=1e-5, atol=1e-5
        )
    assert PatchEmbedLinear.supports(conv, 32)
    assert not PatchEmbedLinear.supports(conv, 36)  # image not a whole number of patches
    overlapping = torch.nn.Conv2d(3, 24, kernel_size=8, stride=4)
    assert not PatchEmbedLinear.supports(overlapping, 32)


def test_export_ready_copy_is_the_same_image_tower_and_leaves_the_original_alone():
    from heimdex_clip_export.onnx_export import Rewrites, export_ready_copy

    model = load_model("ViT-B-32", "none").model
    ready, applied = export_ready_copy(model, 224)
    assert applied == Rewrites(
        attention_layers=12, patch_embed_as_matmul=True, class_token_last_block=True
    )
    assert ready is not model
    assert isinstance(model.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    assert isinstance(model.visual.conv1, torch.nn.Conv2d)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected, got = model.encode_image(pixels), ready.encode_image(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_manifest_records_the_rewrites_and_the_graph_is_lean(artifact_dir):
    raw = json.loads((artifact_dir / "manifest.json").read_text())
    assert raw["export"]["rewrites"] == {
        "attention_layers": 12,
        "patch_embed_as_matmul": True,
        "class_token_last_block": True,
    }
    graph = (
        __import__("onnx")
        .load(str(artifact_dir / "visual.fp32.onnx"), load_external_data=False)
        .graph
    )
    ops = [n.op_type for n in graph.node]
    assert "Conv" not in ops  # the patch embedding is a MatMul, so it is quantized too
    assert ops.count("Transpose") <= 45  # traced nn.MultiheadAttention gave 97
