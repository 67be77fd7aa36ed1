"""No non-finite or direction-less vector is ever returned as a success.

The integration cases run real ONNX Runtime sessions over artifacts whose graphs really
output NaN, infinity, zeros or denormals (small hand-built graphs installed in a copy of
the test artifact with a manifest that lists their hashes), so every API is driven end to
end: the worker path gives a NULL embedding with the reason, the strict path raises.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from artifact_copies import copy_artifact
from onnx import TensorProto, helper

from heimdex_clip import ArtifactError, ClipConfig, ClipEmbedder, QueryError
from heimdex_clip.errors import InvalidVectorError
from heimdex_clip.metadata import EmbeddingResult, ModelIdentity, success
from heimdex_clip.query import combine
from heimdex_clip.scenes import pool_scene
from heimdex_clip.vectors import check_vectors, vector_problem

IDENTITY = ModelIdentity(
    model_name="m", pretrained="none", embed_dim=4, device="cpu", normalized=True
)
DENORMAL = np.float32(1e-40)

BAD_VECTORS = {
    "nan": np.array([math.nan, 0, 0, 1], np.float32),
    "inf": np.array([math.inf, 0, 0, 1], np.float32),
    "zero": np.zeros(4, np.float32),
    "denormal": np.array([DENORMAL, 0, 0, 0], np.float32),
    "tiny": np.full(4, 1e-9, np.float32),
}


@pytest.mark.parametrize("name", BAD_VECTORS)
def test_bad_vectors_are_named(name):
    assert vector_problem(BAD_VECTORS[name]) is not None
    with pytest.raises(InvalidVectorError, match="#1"):
        check_vectors(np.stack([np.ones(4, np.float32), BAD_VECTORS[name]]), "image")


def test_good_vectors_pass_unchanged():
    good = np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32)
    assert check_vectors(good, "image") is good
    assert vector_problem(good[0]) is None


@pytest.mark.parametrize("name", BAD_VECTORS)
def test_a_bad_vector_never_becomes_a_successful_result(name):
    result = success(
        IDENTITY, BAD_VECTORS[name], frame_path="f.jpg", frame_quality=None, time_ms=1.0
    )
    assert result.embedding is None
    assert result.error.startswith("InvalidVectorError: the model's vector")
    json.dumps(result.metadata, allow_nan=False)  # storable as jsonb


def test_a_scene_whose_frames_cancel_out_fails():
    up, down = np.array([0, 0, 0, 1], np.float32), np.array([0, 0, 0, -1], np.float32)
    results = [
        success(IDENTITY, v, frame_path=None, frame_quality=None, time_ms=1.0) for v in (up, down)
    ]
    pooled = pool_scene(IDENTITY, "scene", [("a", None), ("b", None)], results, normalize=True)
    assert pooled.embedding is None and "the mean of 2 frames has norm 0" in pooled.error
    fine = pool_scene(IDENTITY, "scene", [("a", None)], results[:1], normalize=True)
    np.testing.assert_array_equal(fine.embedding, up)


@pytest.mark.parametrize(
    ("vectors", "weights", "message"),
    [
        ([[math.nan, 1.0]], [1.0], "non-finite"),
        ([[math.inf, 1.0]], [1.0], "non-finite"),
        ([[1.0, 0.0], [0.0, 1.0]], [1.0, math.nan], "non-finite"),
        ([[0.0, 0.0]], [1.0], "zero vector"),
        ([[1e-300, 0.0]], [1.0], "zero vector"),
        ([[1.0, 0.0], [1.0, 0.0]], [1.0, -1.0], "cancel out"),
        ([[1.0, 0.0], [1.0, 1e-12]], [1e308, 1e308], "overflow"),
    ],
)
def test_query_composition_refuses_non_finite_and_direction_less_input(vectors, weights, message):
    with pytest.raises(QueryError, match=message):
        combine(np.array(vectors), weights)


def test_huge_equal_weights_give_the_direction_they_mean():
    q = combine(np.array([[1.0, 0.0], [0.0, 1.0]]), [1e308, 1e308])
    np.testing.assert_allclose(q, [math.sqrt(0.5)] * 2, rtol=1e-6)


def test_a_composed_query_is_always_finite_and_unit_length():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 5))
        vectors = rng.standard_normal((n, 8)) * 10.0 ** rng.uniform(-5, 30, (n, 1))
        weights = rng.choice([-1, 1], n) * 10.0 ** rng.uniform(-30, 300, n)
        try:
            q = combine(vectors, weights)
        except QueryError:
            continue
        assert np.isfinite(q).all() and abs(float(np.linalg.norm(q)) - 1) < 1e-5


# --------------------------------------------------------------------------- real graphs


def constant_graph(
    input_name: str, input_dtype: int, outputs: list[str], value: float, dim: int
) -> bytes:
    """An ONNX graph: any [N, ...] input -> ``value`` in every cell of each [N, dim] output.

    ``x * 0`` keeps the batch dimension, then ``+ value``; NaN and infinity are written as
    ``0 / 0`` and ``1 / 0`` so that ONNX Runtime computes them at run time.
    """
    axes = [1, 2, 3] if input_dtype == TensorProto.FLOAT else [1]
    nodes = [
        helper.make_node("Cast", [input_name], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["xf", "axes"], ["s"], keepdims=0),
        helper.make_node("Unsqueeze", ["s", "one"], ["col"]),  # [N, 1]
        helper.make_node("Mul", ["col", "zeros"], ["z"]),  # [N, dim] of zeros
    ]
    if math.isnan(value) or math.isinf(value):
        nodes.append(helper.make_node("Add", ["z", "numerator"], ["top"]))
        nodes.append(helper.make_node("Div", ["top", "zero_scalar"], ["y"]))
    else:
        nodes.append(helper.make_node("Add", ["z", "value"], ["y"]))
    nodes += [helper.make_node("Identity", ["y"], [name]) for name in outputs]
    init = [
        helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zeros", TensorProto.FLOAT, [1, dim], [0.0] * dim),
        helper.make_tensor("zero_scalar", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("numerator", TensorProto.FLOAT, [], [1.0 if math.isinf(value) else 0.0]),
        helper.make_tensor(
            "value", TensorProto.FLOAT, [], [0.0 if not math.isfinite(value) else value]
        ),
    ]
    shape = ["batch", 3, 224, 224] if input_dtype == TensorProto.FLOAT else ["batch", "seq"]
    graph = helper.make_graph(
        nodes,
        "constant",
        [helper.make_tensor_value_info(input_name, input_dtype, shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", dim]) for n in outputs],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def install(art: Path, manifest: dict, key: str, data: bytes) -> None:
    entry = manifest["files"][key]
    (art / entry["path"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module", params=["nan", "inf", "zero", "denormal"])
def broken(request, artifact_dir, tmp_path_factory) -> ClipEmbedder:
    """An embedder whose image and text graphs both output the ``param`` vector."""
    value = {"nan": math.nan, "inf": math.inf, "zero": 0.0, "denormal": float(DENORMAL)}
    art = copy_artifact(artifact_dir, tmp_path_factory.mktemp("broken") / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    dim = manifest["model"]["embed_dim"]
    for key, dtype in (("visual.int8", TensorProto.FLOAT), ("text.int8", TensorProto.INT64)):
        entry = manifest["files"][key]
        outputs = [o["name"] for o in entry["outputs"]]
        if key.startswith("text"):
            outputs = ["text_embeds", "text_features"]
            dtype = (
                TensorProto.INT32
                if manifest["text"].get("token_dtype") == "int32"
                else TensorProto.INT64
            )
            name = "input_ids"
        else:
            name = entry["inputs"][0]["name"]
        install(art, manifest, key, constant_graph(name, dtype, outputs, value[request.param], dim))
    (art / "manifest.json").write_text(json.dumps(manifest))
    return ClipEmbedder(
        config=ClipConfig(pretrained="none", model_dir=art, embed_cache_size=0)
    ).load()


def test_the_worker_path_gives_null_with_the_reason(broken, photos):
    image = photos[0][1]
    for result in (
        broken.embed_frame(image, frame_path="f.jpg"),
        *broken.embed_frames([image, image]),
        broken.embed_scene([image, image]),
        broken.embed_text("a dog"),
    ):
        assert isinstance(result, EmbeddingResult)
        assert result.embedding is None
        assert "InvalidVectorError" in result.error, result.error
        json.dumps(result.metadata, allow_nan=False)


def test_the_strict_path_raises(broken, photos):
    with pytest.raises(InvalidVectorError, match="image #0"):
        broken.embed_images([photos[0][1]])
    with pytest.raises(InvalidVectorError, match="text #0"):
        broken.embed_texts(["a dog"])


@pytest.mark.parametrize(
    ("key", "index", "value"),
    [
        ("std", 0, 1e-45),
        ("std", 1, 0.0),
        ("std", 2, -0.27),
        ("std", 0, math.nan),
        ("std", 1, math.inf),
        ("mean", 0, math.nan),
        ("mean", 2, -math.inf),
        ("mean", 1, 1e38),
    ],
)
def test_preprocessing_that_would_give_non_finite_inputs_is_refused_at_load(
    artifact_dir, tmp_path, key, index, value
):
    art = copy_artifact(artifact_dir, tmp_path / "art", {"visual.int8"})
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["preprocess"][key][index] = value
    (art / "manifest.json").write_text(json.dumps(manifest))  # NaN/Infinity: Python's JSON
    embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=art))
    with pytest.raises(ArtifactError, match=f"preprocess.{key}|out of range"):
        embedder.load()
    result = embedder.embed_frame(np.zeros((8, 8, 3), np.uint8))
    assert result.embedding is None and result.error.startswith("Model load failed")
