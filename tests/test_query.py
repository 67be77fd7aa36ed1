"""Composed queries' arithmetic (heimdex_clip.query): no model, no database."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from heimdex_clip import QueryPart, combine


def unit_rows(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_one_part_is_itself_at_unit_length():
    v = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(combine(v, [2.5]), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(combine(v, [-1]), [-0.6, -0.8], rtol=1e-6)


def test_weights_count_on_unit_parts_whatever_their_length():
    # Two orthogonal parts, one stored 10x longer: weights 1 and 1 still point at 45 degrees.
    v = np.array([[10.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(combine(v, [1, 1]), [math.sqrt(0.5)] * 2, rtol=1e-6)
    np.testing.assert_allclose(combine(v, [3, 1]), np.array([3, 1]) / math.sqrt(10), rtol=1e-6)


@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_result_is_the_normalised_weighted_sum(n, seed):
    rng = np.random.default_rng(seed)
    vectors = unit_rows(rng, n)
    weights = rng.uniform(0.1, 2.0, n) * rng.choice([-1, 1], n)
    total = weights @ vectors
    if np.linalg.norm(total) < 1e-3:
        return  # (nearly) cancelled: covered by its own test
    out = combine(vectors, weights)
    assert out.dtype == np.float32 and out.shape == (16,)
    assert abs(float(np.linalg.norm(out)) - 1) < 1e-5
    np.testing.assert_allclose(out, total / np.linalg.norm(total), atol=1e-6)
    order = rng.permutation(n)  # the parts' order does not matter
    np.testing.assert_allclose(combine(vectors[order], weights[order]), out, atol=1e-6)


@pytest.mark.parametrize(
    "vectors, weights, message",
    [
        (np.zeros((0, 4)), [], r"N >= 1"),
        (np.ones(4), [1], r"shape \[N, D\]"),
        (np.ones((2, 4)), [1], r"2 vectors need 2 weights"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), [1, 1], "zero vector"),
        (np.array([[1.0, np.nan]]), [1], "non-finite"),
        (np.array([[1.0, 0.0]]), [np.inf], "non-finite"),
        (np.array([[1.0, 0.0], [2.0, 0.0]]), [1, -1], "cancel out"),
    ],
)
def test_what_has_no_direction_is_refused(vectors, weights, message):
    with pytest.raises(ValueError, match=message):
        combine(vectors, weights)


def test_parts_check_their_kind_value_and_weight():
    scene = uuid.uuid4()
    assert QueryPart("scene", str(scene)).value == scene  # parsed once
    assert QueryPart("image", Path("a.jpg"), 0.5).weight == 0.5
    for bad in [
        dict(kind="video", value="x"),
        dict(kind="text", value=b"bytes"),
        dict(kind="scene", value="not-a-uuid"),
        dict(kind="text", value="x", weight=0),
        dict(kind="text", value="x", weight=float("nan")),
        dict(kind="text", value="x", weight=True),
    ]:
        with pytest.raises(ValueError):
            QueryPart(**bad)


def test_parts_describe_themselves_without_their_pixels():
    assert QueryPart("text", "at night", -0.5).describe() == "-0.5 x text 'at night'"
    assert QueryPart("image", Path("q.jpg")).describe() == "image q.jpg"
    assert QueryPart("image", np.zeros((2, 2, 3), np.uint8)).describe() == "image ndarray"
    assert QueryPart("image", b"\xff\xd8").describe() == "image bytes"
