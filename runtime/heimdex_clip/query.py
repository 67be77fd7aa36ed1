"""Composed queries: texts, images and scenes combined into one search vector.

CLIP maps images and texts into one space, so a query can be a weighted sum of parts:
"scenes like this one, but at night" is the scene's vector plus the text's, several example
images together find what they share, and a negative weight steers away from a part
("a beach", 1; "people", -0.5). The sum is scaled back to unit length, like every stored
vector, so the usual cosine search serves it. This module is the arithmetic, free of any
database; ``SceneStore.search_composed`` embeds the parts and searches.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import QueryError
from .vectors import vector_problem

PartKind = Literal["text", "image", "scene"]
PART_KINDS: tuple[PartKind, ...] = ("text", "image", "scene")

# Below this norm the weighted sum is (numerically) the zero vector: it has no direction.
_MIN_NORM = 1e-6


@dataclass(frozen=True)
class QueryPart:
    """One part of a composed query: a text, an image (path, bytes, PIL image or array) or
    the id of one of the owner's scenes, with its weight (negative: away from it)."""

    kind: PartKind
    #: ``str`` for a text, an ImageSource for an image, ``uuid.UUID`` for a scene (checked and
    #: parsed in __post_init__). Typed Any: a type checker cannot narrow it on ``kind``.
    value: Any
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PART_KINDS:
            raise QueryError(f"a query part is one of {PART_KINDS}, got {self.kind!r}")
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not math.isfinite(self.weight)
            or self.weight == 0
        ):
            raise QueryError(
                f"a query part's weight must be a finite non-zero number, got {self.weight!r}"
            )
        if self.kind == "text" and not isinstance(self.value, str):
            raise QueryError(f"a text part's value is a str, got {type(self.value).__name__}")
        if self.kind == "scene":
            try:  # frozen: the parsed id replaces the text once, here
                object.__setattr__(self, "value", uuid.UUID(str(self.value)))
            except ValueError:
                raise QueryError(
                    f"a scene part's value is a scene id (UUID), got {self.value!r}"
                ) from None

    def describe(self) -> str:
        """A short label for logs and result pages, e.g. ``-0.5 x text 'people'``."""
        if self.kind == "text":
            value = repr(self.value)
        elif self.kind == "scene" or isinstance(self.value, (str, os.PathLike)):
            value = str(self.value)
        else:  # bytes, a PIL image or an array: its type, not its contents
            value = type(self.value).__name__
        weight = "" if self.weight == 1 else f"{self.weight:g} x "
        return f"{weight}{self.kind} {value}"


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The unit-length weighted sum of ``vectors`` [N, D], each scaled to unit length
    first (float32 [D]).

    Raises QueryError (a ValueError) for no vectors, a count or value that does not fit,
    or parts that cancel out (a sum too close to zero has no direction to search in).
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    weights_array = np.asarray(weights, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise QueryError(f"combine needs vectors of shape [N, D] with N >= 1, got {vectors.shape}")
    if weights_array.shape != (len(vectors),):
        raise QueryError(
            f"{len(vectors)} vectors need {len(vectors)} weights, got {weights_array.shape}"
        )
    if not (np.isfinite(vectors).all() and np.isfinite(weights_array).all()):
        raise QueryError("combine got a non-finite vector or weight")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms < _MIN_NORM).any():
        raise QueryError("combine got a zero vector: it has no direction")
    # Each part at unit length first, so that a weight means the same for every part.
    with np.errstate(over="ignore", invalid="ignore"):
        total = weights_array @ (vectors / norms)
    if not np.isfinite(total).all():  # weights so large that the sum overflows
        raise QueryError("the query's weighted sum overflows: use smaller weights")
    # Scaled to a largest component of 1 first, so that the norm of a huge (finite) sum
    # cannot overflow to infinity and turn the result into zeros.
    scale = float(np.abs(total).max())
    norm = scale * float(np.linalg.norm(total / scale)) if scale > 0 else 0.0
    if not norm >= _MIN_NORM:
        raise QueryError(
            "the query's parts cancel out (their weighted sum is ~0): "
            "change a weight or drop a part"
        )
    unit = total / scale
    result = (unit / np.linalg.norm(unit)).astype(np.float32)
    if problem := vector_problem(result):
        raise QueryError(f"the composed query vector {problem}")
    return result
