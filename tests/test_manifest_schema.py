"""The manifest is checked type-exactly: wrong types, bounds and non-finite numbers are
refused with a message naming the field, before anything is coerced or used."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest

from heimdex_clip import ArtifactError, load_manifest
from heimdex_clip.artifact import Manifest
from heimdex_clip.text import TextSpec

GRAPH = b"not really a graph"


def valid() -> dict:
    """A minimal manifest of the shape the export writes, written out by hand."""
    return {
        "schema_version": 1,
        "model": {
            "name": "ViT-B-32",
            "pretrained": "none",
            "embed_dim": 512,
            "random_init": True,
            "seed": 0,
            "quick_gelu": False,
            "normalized_in_graph": True,
        },
        "preprocess": {
            "image_size": 224,
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "crop": "center",
            "fill_color": 0,
        },
        "files": {
            "visual.int8": {
                "path": "visual.int8.onnx",
                "sha256": hashlib.sha256(GRAPH).hexdigest(),
                "bytes": len(GRAPH),
                "role": "visual",
                "precision": "int8",
                "inputs": [
                    {"name": "pixel_values", "shape": ["batch", 3, 224, 224], "dtype": "float32"}
                ],
                "outputs": [{"name": "image_embeds", "shape": ["batch", 512], "dtype": "float32"}],
            }
        },
        "quantization": {},
        "parity": {},
        "versions": {"onnx": "1.17"},
        "created_at": "2026-12-04T00:00:00Z",
        "text": {
            "tokenizer": {"context_length": 77, "special_tokens": ["<start_of_text>"]},
            "token_dtype": "int64",
            "cut_to_longest": True,
        },
    }


def edited(path: str, value) -> dict:
    """``valid()`` with the field at dotted ``path`` set to ``value`` (``...`` deletes it)."""
    d = valid()
    *parents, last = path.split(".")
    node = d
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return d


def test_the_valid_manifest_parses():
    m = Manifest.from_dict(valid())
    assert (m.model.embed_dim, m.preprocess.image_size, m.files["visual.int8"].bytes) == (
        512,
        224,
        len(GRAPH),
    )


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("schema_version", "1", "schema_version must be an integer"),
        ("schema_version", True, "schema_version must be an integer"),
        ("schema_version", 1.0, "schema_version must be an integer"),
        ("schema_version", 0, "outside 1.."),
        ("schema_version", 2, "newer than this runtime"),
        ("model", [], "model must be an object"),
        ("model.embed_dim", 512.0, "model.embed_dim must be an integer, got float 512.0"),
        ("model.embed_dim", True, "model.embed_dim must be an integer, got bool"),
        ("model.embed_dim", 0, "model.embed_dim is 0, outside"),
        ("model.normalized_in_graph", "no", "model.normalized_in_graph must be true or false"),
        ("model.random_init", 0, "model.random_init must be true or false"),
        ("model.quick_gelu", None, "model.quick_gelu must be true or false"),
        ("model.name", "", "model.name must be a non-empty string"),
        ("model.name", 7, "model.name must be a non-empty string"),
        ("model.seed", 1.5, "model.seed must be an integer"),
        ("model.embed_dimension", 512, "unknown key(s) embed_dimension"),
        ("model.embed_dim", ..., "model lacks embed_dim"),
        ("preprocess.image_size", 224.0, "preprocess.image_size must be an integer"),
        ("preprocess.image_size", 10**9, "outside 1..1024"),
        ("model.embed_dim", 16385, "outside 1..16384"),
        ("preprocess.mean", [0.5, 0.5], "preprocess.mean must be a list of 3 numbers"),
        ("preprocess.mean", "0.5", "preprocess.mean must be a list of 3 numbers"),
        ("preprocess.mean.1", math.nan, "preprocess.mean[1] must be finite"),
        ("preprocess.std.0", math.inf, "preprocess.std[0] must be finite"),
        ("preprocess.std.2", True, "preprocess.std[2] must be a number"),
        ("preprocess.std.0", 1e-45, "out of range"),
        ("preprocess.std.0", 0, "out of range"),
        ("preprocess.std.1", -0.27, "out of range"),
        ("preprocess.std.1", 1e30, "out of range"),
        ("preprocess.mean.0", 1e30, "out of range"),
        ("preprocess.fill_color", 300, "preprocess.fill_color is 300, outside 0..255"),
        ("preprocess.interpolation", 3, "preprocess.interpolation must be a non-empty string"),
        ("files", {}, "files must not be empty"),
        ("files", [], "files must be an object"),
    ],
)
def test_wrong_types_and_values_are_refused_naming_the_field(path, value, message):
    with pytest.raises(ArtifactError) as info:
        Manifest.from_dict(edited(path, value))
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("path", "/etc/hostname", "relative path inside the artifact"),
        ("path", "../visual.int8.onnx", "relative path inside the artifact"),
        ("path", "sub/../../x.onnx", "relative path inside the artifact"),
        ("path", "a//b.onnx", "relative path inside the artifact"),
        ("path", ".", "relative path inside the artifact"),
        ("path", "", "must be a non-empty string"),
        ("path", "a\\..\\b", "relative path inside the artifact"),
        ("path", "x\x00.onnx", "without NUL"),
        ("bytes", True, "bytes must be an integer"),
        ("bytes", "18", "bytes must be an integer"),
        ("bytes", 18.0, "bytes must be an integer"),
        ("bytes", -1, "outside 0.."),
        ("sha256", "ABC", "64 lower-case hex digits"),
        (
            "sha256",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85G",
            "64 lower-case hex digits",
        ),
        ("role", None, "role must be a non-empty string"),
        ("inputs", {"name": "x"}, "inputs must be a list"),
        (
            "outputs",
            [{"name": "y", "shape": [True], "dtype": "float32"}],
            "must be a list of sizes",
        ),
    ],
)
def test_file_entries_are_checked(field, value, message):
    d = valid()
    d["files"]["visual.int8"][field] = value
    with pytest.raises(ArtifactError) as info:
        Manifest.from_dict(d)
    assert message in str(info.value), str(info.value)
    assert "files['visual.int8']" in str(info.value)


def test_a_file_key_that_is_not_a_name_is_refused():
    d = valid()
    d["files"]["../escape"] = d["files"].pop("visual.int8")
    with pytest.raises(ArtifactError, match="not a file name"):
        Manifest.from_dict(d)


@pytest.mark.parametrize(
    ("key", "value"),
    [("quantization", []), ("parity", "good"), ("versions", None), ("created_at", 5)],
)
def test_the_other_sections_have_their_types(key, value):
    d = valid()
    d[key] = value
    with pytest.raises(ArtifactError, match=key):
        Manifest.from_dict(d)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t["tokenizer"].update(context_length=77.0), "context_length must be an integer"),
        (lambda t: t["tokenizer"].update(context_length=True), "context_length must be an integer"),
        (lambda t: t["tokenizer"].update(special_tokens="<s>"), "special_tokens must be a list"),
        (lambda t: t.update(cut_to_longest="no"), "cut_to_longest must be true or false"),
    ],
)
def test_the_text_section_is_checked_type_exactly(edit, message):
    d = valid()
    d["files"]["text.int8"] = {
        **copy.deepcopy(d["files"]["visual.int8"]),
        "role": "text",
        "path": "text.int8.onnx",
    }
    d["files"]["tokenizer"] = {
        **copy.deepcopy(d["files"]["visual.int8"]),
        "role": "tokenizer",
        "path": "tokenizer.json",
    }
    assert TextSpec.from_manifest(Manifest.from_dict(d), "int8").context_length == 77
    edit(d["text"])
    with pytest.raises(ArtifactError, match=message):
        TextSpec.from_manifest(Manifest.from_dict(d), "int8")


def test_a_manifest_over_the_size_bound_is_refused_without_parsing(tmp_path):
    d = valid()
    d["parity"] = {"padding": "x" * (2 << 20)}
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="larger than 1048576 bytes"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("text", ["[1, 2]", "null", "{", "\xff\xfe", "[" * 100_000])
def test_a_manifest_that_is_not_a_json_object_is_refused(tmp_path, text):
    (tmp_path / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError):
        load_manifest(tmp_path)
