"""Loading the image tower: the manifest is checked against what the runtime can do and
against the graph itself, and only verified bytes are parsed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from artifact_copies import copy_artifact

import heimdex_clip.session as session_module
from heimdex_clip import ArtifactError, ClipConfig
from heimdex_clip.model import load_visual_model


def config(**changes) -> ClipConfig:
    return ClipConfig(enabled=True, pretrained="none", **changes)


@pytest.fixture()
def artifact_copy(artifact_dir, tmp_path) -> Path:
    return copy_artifact(artifact_dir, tmp_path / "artifact")


def edit_manifest(artifact: Path, edit) -> None:
    path = artifact / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_names_come_from_the_manifest(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    entry = manifest["files"]["visual.int8"]
    unit = load_visual_model(config(), artifact_dir)
    raw = load_visual_model(config(normalize=False), artifact_dir)
    assert unit.input_name == entry["inputs"][0]["name"]
    assert unit.output_name == entry["outputs"][0]["name"]
    assert raw.output_name == entry["outputs"][1]["name"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["preprocess"].update(image_size=100000), "outside 1..1024"),
        (lambda m: m["preprocess"].update(image_size=336), "does not belong to this graph"),
        (lambda m: m["model"].update(embed_dim=768), "outputs 512 dimensions"),
        (lambda m: m["preprocess"].update(crop="top"), "centre crop only"),
        (lambda m: m["model"].update(normalized_in_graph=False), "does not L2-normalise"),
        (
            lambda m: m["files"]["visual.int8"]["inputs"][0].update(name="pixels"),
            "the manifest says 'pixels'",
        ),
        (lambda m: m["files"]["visual.int8"]["outputs"][0].update(name="nope"), "no output 'nope'"),
        (lambda m: m["files"]["visual.int8"].update(outputs=[]), "lists 0 output(s)"),
    ],
)
def test_a_manifest_that_does_not_match_its_graph_is_refused(artifact_copy, edit, message):
    edit_manifest(artifact_copy, edit)
    with pytest.raises(ArtifactError) as info:
        load_visual_model(config(), artifact_copy)
    assert message in str(info.value)


def test_tampered_bytes_never_reach_the_parser(artifact_copy, monkeypatch):
    graph = artifact_copy / "visual.int8.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 3] ^= 0x01
    graph.write_bytes(bytes(data))
    parsed = []
    monkeypatch.setattr(
        session_module, "build_session", lambda *a, **k: parsed.append(a) or pytest.fail("parsed")
    )
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_visual_model(config(), artifact_copy)
    assert parsed == []


def test_a_graph_swapped_with_its_manifest_updated_still_loads_only_if_consistent(
    artifact_copy, artifact_dir
):
    """Re-hashing a manifest is possible for anyone who can write it; what the runtime
    still checks is that the graph is the one the manifest describes."""
    import hashlib

    fp32 = (artifact_dir / "visual.fp32.onnx").read_bytes()
    (artifact_copy / "visual.int8.onnx").write_bytes(fp32)

    def rehash(m):
        m["files"]["visual.int8"].update(sha256=hashlib.sha256(fp32).hexdigest(), bytes=len(fp32))

    edit_manifest(artifact_copy, rehash)
    assert load_visual_model(config(), artifact_copy).embed_dim == 512  # consistent: loads
    edit_manifest(artifact_copy, lambda m: m["preprocess"].update(image_size=256))
    with pytest.raises(ArtifactError, match="does not belong to this graph"):
        load_visual_model(config(), artifact_copy)


def test_an_install_switching_the_symlink_mid_load_is_not_seen(artifact_dir, tmp_path):
    """The artifact directory is resolved once, so what a load reads stays one version even
    when `models/<name>` is switched to another export meanwhile."""
    first = tmp_path / ".v1"
    copy_artifact(artifact_dir, first)
    link = tmp_path / "ViT-B-32__none"
    link.symlink_to(first.name)
    from heimdex_clip.artifact import resolve_artifact_dir

    found = resolve_artifact_dir(tmp_path, "ViT-B-32", "none")
    assert found == first.resolve()
    second = tmp_path / ".v2"
    second.mkdir()
    (second / "manifest.json").write_text("{}")
    link.unlink()
    link.symlink_to(second.name)  # a new install lands between two reads of one load
    assert load_visual_model(config(), found).artifact_dir == first.resolve()
