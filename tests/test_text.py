"""The text tower on the real exported artifact: parity with open_clip's encode_text, the
recorded gates, cutting to the longest text, the optional tower, tampered files."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from artifact_copies import copy_artifact

from heimdex_clip import ArtifactError, ClipConfig, ClipEmbedder
from heimdex_clip.artifact import load_manifest
from heimdex_clip.errors import TextError
from heimdex_clip.metadata import METADATA_FIELDS
from heimdex_clip.text import INPUT_NAME, TextSpec, TextTower, has_text_tower

QUERIES = [
    "a photo of a cat",
    "a red car at night",
    "",
    "sunset over the sea " * 10,
    "東京タワーの夜景 👍🏽",
    "Tom &amp; Jerry",
    "an astronaut next to a rocket",
]


def make_tower(artifact_dir: Path, **changes) -> TextTower:
    config = ClipConfig(pretrained="none", model_dir=artifact_dir, **changes)
    return TextTower(artifact_dir, load_manifest(artifact_dir), config)


@pytest.fixture(scope="module")
def fp32_tower(artifact_dir) -> TextTower:
    return make_tower(artifact_dir, precision="fp32")


@pytest.fixture(scope="module")
def int8_tower(artifact_dir) -> TextTower:
    return make_tower(artifact_dir, precision="int8")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.mark.parity
def test_fp32_and_int8_follow_open_clip_encode_text(artifact_dir, fp32_tower, int8_tower):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(load_manifest(artifact_dir).model.seed)  # the artifact's weights
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    with torch.inference_mode():
        ref = model.encode_text(open_clip.tokenize(QUERIES), normalize=True).numpy()
    fp32, int8 = fp32_tower.embed(QUERIES), int8_tower.embed(QUERIES)
    assert fp32.shape == int8.shape == (len(QUERIES), 512) and fp32.dtype == np.float32
    assert cosines(ref, fp32).min() >= 0.99999
    assert cosines(fp32, int8).mean() >= 0.995 and cosines(fp32, int8).min() >= 0.98
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-4)


def test_cutting_to_the_longest_text_changes_nothing(fp32_tower):
    """The graph run on all 77 positions and on the cut batch give the same vectors."""
    ids = fp32_tower.tokenize(QUERIES)
    full = fp32_tower.session.run(
        [fp32_tower.output_name], {INPUT_NAME: ids.astype(fp32_tower.spec.token_dtype)}
    )[0]
    cut = fp32_tower.embed_ids(ids)
    assert cosines(full, cut).min() >= 0.99999


def test_batches_by_length_keep_the_input_order(fp32_tower):
    together = fp32_tower.embed(QUERIES, batch_size=3)
    alone = np.stack([fp32_tower.embed([q])[0] for q in QUERIES])
    assert cosines(alone, together).min() >= 0.99999


def test_raw_features_when_not_normalizing(artifact_dir, fp32_tower):
    raw = make_tower(artifact_dir, precision="fp32", normalize=False).embed(QUERIES[:2])
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(
        raw / np.linalg.norm(raw, axis=1, keepdims=True), fp32_tower.embed(QUERIES[:2]), atol=1e-5
    )


def test_repeated_query_comes_from_the_cache(int8_tower):
    first = int8_tower.embed_one("a dog on the beach")
    hits = int8_tower.cache.hits
    again = int8_tower.embed_one("a dog on the beach")
    assert int8_tower.cache.hits == hits + 1
    np.testing.assert_array_equal(first, again)


def test_manifest_records_the_text_gates_and_they_hold(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    files, text = manifest["files"], manifest["parity"]["text"]
    assert files["tokenizer"]["role"] == "tokenizer"
    graphs = {k: f for k, f in files.items() if f["role"] == "text"}
    assert "text.fp32" in graphs and graphs["text.fp32"]["inputs"][0]["name"] == INPUT_NAME
    gates = text["gates"]
    assert text["tokenizer_vs_open_clip"]["mismatched_texts"] == 0
    assert text["fp32_vs_torch"]["min_cosine"] >= gates["fp32_min_cosine"]
    if "text.int8" in graphs:  # INT8 ships only when it held every gate
        q = text["int8_vs_fp32"]
        assert q["mean_cosine"] >= gates["int8_mean_cosine"]
        assert q["min_cosine"] >= gates["int8_min_cosine"]
        assert q["retrieval_top5_overlap"] >= gates["int8_retrieval_top5_overlap"]
        assert manifest["text"]["int8"].startswith("passed")
    else:
        assert manifest["text"]["int8"].startswith("rejected")


def test_artifact_without_text_tower_says_so(artifact_dir, tmp_path):
    bare = copy_artifact(artifact_dir, tmp_path / "bare", {"visual.int8"})
    manifest = load_manifest(bare)
    assert not has_text_tower(manifest)
    with pytest.raises(TextError, match="this artifact has no text tower"):
        TextTower(bare, manifest, ClipConfig(pretrained="none"))


def test_tampered_tokenizer_or_graph_is_refused(artifact_dir, tmp_path):
    art = copy_artifact(artifact_dir, tmp_path / "art", {"visual.int8", "text.int8", "tokenizer"})
    tok = art / "tokenizer.json"
    tok.write_text(
        tok.read_text(encoding="utf-8").replace('"cat</w>"', '"cet</w>"'), encoding="utf-8"
    )
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        make_tower(art)
    shutil.copy(artifact_dir / "tokenizer.json", tok)
    graph = art / load_manifest(art).file("text.int8").path
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="truncated"):
        make_tower(art)
    graph.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        make_tower(art)


def test_precision_falls_back_to_the_graph_shipped(artifact_dir):
    manifest = load_manifest(artifact_dir)
    only_fp32 = {k: f for k, f in manifest.files.items() if k != "text.int8"}
    spec = TextSpec.from_manifest(replace(manifest, files=only_fp32), "int8")
    assert spec.graph_key == "text.fp32"


def test_bad_texts_raise_text_error(int8_tower):
    with pytest.raises(TextError):
        int8_tower.embed("not a list")
    with pytest.raises(TextError):
        int8_tower.embed([None])
    assert int8_tower.embed([]).shape == (0, 512)


@pytest.fixture(scope="module")
def embedder(artifact_dir) -> ClipEmbedder:
    return ClipEmbedder(
        config=ClipConfig(pretrained="none", model_dir=artifact_dir, embed_cache_size=8)
    ).load()


class TestClipEmbedderText:
    """The public API: ClipEmbedder.tokenize / embed_texts / embed_text."""

    @pytest.mark.parity
    def test_tokenize_is_open_clip_tokenize(self, embedder):
        open_clip = pytest.importorskip("open_clip")
        assert embedder.has_text_tower
        np.testing.assert_array_equal(
            embedder.tokenize(QUERIES), open_clip.tokenize(QUERIES).numpy()
        )

    def test_embed_texts_and_embed_text_agree(self, embedder):
        strict = embedder.embed_texts(QUERIES, batch_size=2)
        assert strict.shape == (len(QUERIES), embedder.embed_dim)
        result = embedder.embed_text(QUERIES[1])
        assert result.ok and result.error is None
        assert set(result.metadata) == set(METADATA_FIELDS)
        assert result.metadata["frame_path"] is None and result.metadata["frame_quality"] is None
        assert result.metadata["artifact_id"] == embedder.artifact_id
        assert result.metadata["inference_time_ms"] >= 0
        # Alone vs in a batch of 2: INT8 activation scales depend on the batch.
        assert cosines(strict[1:2], result.embedding[None])[0] >= 0.999

    def test_repeated_query_is_served_from_the_lru(self, embedder):
        tower = embedder._slot.text_tower()
        first = embedder.embed_text("a red car at night")
        hits = tower.cache.hits
        second = embedder.embed_text("a red car at night")
        assert tower.cache.hits == hits + 1
        np.testing.assert_array_equal(first.embedding, second.embedding)

    def test_bad_text_fails_the_result_not_the_caller(self, embedder):
        result = embedder.embed_text(None)  # type: ignore[arg-type]
        assert not result.ok and result.error.startswith("TextError")
        assert result.metadata["inference_time_ms"] is None
        with pytest.raises(TextError):
            embedder.embed_texts([b"bytes"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="batch_size"):
            embedder.embed_texts(QUERIES, batch_size=0)

    def test_timeout_gives_a_timeout_error(self, artifact_dir):
        slow = ClipEmbedder(
            config=ClipConfig(
                pretrained="none", model_dir=artifact_dir, timeout_s=1e-6, embed_cache_size=0
            )
        ).load()
        slow._slot.text_tower()  # the one-off load is not part of the budget
        result = slow.embed_text("a photo of a cat " * 10)
        assert not result.ok and result.error == "Timeout after 1e-06s"

    def test_artifact_without_text_tower(self, artifact_dir, tmp_path):
        bare = copy_artifact(artifact_dir, tmp_path / "bare", {"visual.int8"})
        embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=bare))
        assert embedder.embed_images([np.zeros((32, 32, 3), np.uint8)]).shape == (1, 512)
        assert not embedder.has_text_tower
        with pytest.raises(TextError, match="this artifact has no text tower"):
            embedder.embed_texts(["a cat"])
        result = embedder.embed_text("a cat")
        assert not result.ok and "this artifact has no text tower" in result.error


@pytest.mark.parity
@pytest.mark.parametrize("onnx_attention", [False, True], ids=["matmuls", "onnx_attention"])
def test_export_attention_with_the_causal_mask_is_multihead_attention(onnx_attention):
    torch = pytest.importorskip("torch")
    from heimdex_clip_export.onnx_export import ExportSelfAttention

    torch.manual_seed(5)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 9, 64)
    causal = torch.full((9, 9), float("-inf")).triu(1)
    lean = ExportSelfAttention(mha, onnx_attention=onnx_attention)
    with torch.inference_mode():
        expected = mha(x, x, x, need_weights=False, attn_mask=causal)[0]
        got = lean(x, x, x, attn_mask=causal)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="additive float mask"):
        lean(x, x, x, attn_mask=causal.isinf())


def test_the_text_graphs_run_attention_as_one_onnx_op_per_layer(artifact_dir):
    """The export's text attention: a Split of the QKV projection and one Attention op."""
    onnx = pytest.importorskip("onnx")
    graphs = ["text.int8.onnx"] + ["text.fp32.onnx"] * (artifact_dir / "text.fp32.onnx").exists()
    for name in graphs:
        path = artifact_dir / name
        ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
        assert ops.count("Attention") == 12 and ops.count("Split") == 12, name
        assert {"Softmax", "Transpose"}.isdisjoint(ops), name


@pytest.mark.parity
def test_text_encoder_on_cut_ids_is_open_clips_encode_text():
    """The exported module on ids cut after the last end-of-text token == PyTorch on 77."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from heimdex_clip_export.text_export import TextEncoder

    torch.manual_seed(7)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    assert TextEncoder.supports(model)
    ids = open_clip.tokenize(QUERIES)
    cut = ids[:, : int(ids.argmax(dim=1).max()) + 1]
    with torch.inference_mode():
        expected = model.encode_text(ids, normalize=True)
        normed, raw = TextEncoder(model)(cut.int())
    torch.testing.assert_close(normed, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(normed, torch.nn.functional.normalize(raw, dim=-1))


def test_cli_embed_text(artifact_dir, tmp_path, capsys, monkeypatch):
    from heimdex_clip.cli import main

    monkeypatch.setenv("CLIP_PRETRAINED", "none")
    assert (
        main(
            [
                "--model-dir",
                str(artifact_dir),
                "embed",
                "--text",
                "a red car",
                "--text",
                "",
                "--json",
                "--vectors",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == ["a red car", ""]
    assert all(r["ok"] and r["dim"] == 512 and abs(r["norm"] - 1) < 1e-3 for r in rows)
    np.testing.assert_allclose(
        rows[0]["embedding"], make_tower(artifact_dir).embed(["a red car"])[0], atol=1e-5
    )
    bare = copy_artifact(artifact_dir, tmp_path / "bare", {"visual.int8"})
    assert main(["--model-dir", str(bare), "embed", "--text", "a red car"]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert main(["--model-dir", str(bare), "embed"]) == 2
    assert "--text" in capsys.readouterr().err


def test_the_text_tower_loads_from_its_version_after_a_new_install_deleted_it(
    artifact_dir, tmp_path
):
    """A search service loads the image tower, a new export is installed (deleting the old
    version), then the first text query arrives: the text tower still comes from the
    version the image tower was loaded from."""
    from heimdex_clip_export.install import install, versions

    models, name = tmp_path / "models", artifact_dir.name
    copy_artifact(artifact_dir, models / ".work-old")
    old_version = install(models / ".work-old", models / name)
    embedder = ClipEmbedder(
        model_dir=models / name, config=ClipConfig(pretrained="none", provider="cpu")
    )
    assert embedder.embed_frame(np.full((64, 64, 3), 90, np.uint8)).ok  # image tower only
    assert embedder._slot._text is None
    new_work = models / ".work-new"
    copy_artifact(artifact_dir, new_work)
    manifest = json.loads((new_work / "manifest.json").read_text())
    manifest["created_at"] = "a later export"  # another version directory
    (new_work / "manifest.json").write_text(json.dumps(manifest))
    install(new_work, models / name)
    assert not old_version.exists() and versions(models / name) != [old_version]
    vectors = embedder.embed_texts(QUERIES)  # the first text call, after the deletion
    reference = make_tower(artifact_dir, precision="int8").embed(QUERIES)
    assert np.allclose(vectors, reference, atol=1e-6)
    embedder.close()
