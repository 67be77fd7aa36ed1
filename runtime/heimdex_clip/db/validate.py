"""Checks on every value the store sends to PostgreSQL, so that a bad value is a one-line
:class:`~.errors.InvalidInputError` naming it, never a raw psycopg error.

The bounds are the database's own: an ``int`` column holds [-2**31, 2**31 - 1]; ``text`` and
``jsonb`` hold no NUL and only valid UTF-8 (so no lone surrogate); ``jsonb`` holds no NaN or
infinity; a btree index entry holds ~2,700 bytes (an artifact id is indexed); and migration
007's constraint keeps every vector's norm in [MIN_NORM, MAX_NORM].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InvalidInputError, InvalidVectorError

#: Norm bounds of a storable or searchable vector (migration 007 checks the same in SQL).
#: Below, the cosine is undefined (zero) or lost to float32 underflow (denormal); above,
#: pgvector's float32 sums overflow.
MIN_NORM, MAX_NORM = 1e-6, 1e6
INT4_MAX = 2**31 - 1
#: Most results one search returns (the CLI's --count bound too).
MAX_COUNT = 10_000
#: Longest artifact id ("<model>:<pretrained>:<sha256[:16]>" is far shorter).
MAX_ARTIFACT_CHARS = 256


def check_vector(vector: Any, dimension: int | None = None) -> np.ndarray:
    """``vector`` as 1-D float32 (of ``dimension`` elements if given), finite, with a norm
    in [MIN_NORM, MAX_NORM]; else InvalidVectorError."""
    try:
        arr = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidVectorError(f"vector is not an array of numbers ({exc})") from None
    if arr.ndim != 1 or (dimension is not None and arr.shape[0] != dimension):
        raise InvalidVectorError(
            f"vector has shape {arr.shape}; the embedding_visual_clip "
            f"column holds vector({dimension})"
        )
    if not np.all(np.isfinite(arr)):
        raise InvalidVectorError("vector contains NaN or infinity")
    norm = float(np.linalg.norm(arr.astype(np.float64)))
    if not MIN_NORM <= norm <= MAX_NORM:
        raise InvalidVectorError(
            f"vector has norm {norm:.3g}, outside [{MIN_NORM:g}, "
            f"{MAX_NORM:g}]: a zero, denormal or huge vector has no "
            "cosine similarity"
        )
    return arr


def check_text(value: str | None, what: str) -> str | None:
    """``value`` if PostgreSQL can store it as text (no NUL, valid UTF-8), else
    InvalidInputError naming ``what``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInputError(
            f"{what} contains a NUL character, which PostgreSQL text cannot hold"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"{what} is not valid Unicode (a lone surrogate, e.g. from a "
            f"non-UTF-8 file name): {value!r:.80}"
        ) from None
    return value


def check_metadata(metadata: Mapping[str, Any], what: str = "metadata") -> dict[str, Any]:
    """``metadata`` as a dict jsonb can hold: string keys, finite numbers, storable texts."""
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(f"{what} must be a mapping, got {type(metadata).__name__}")
    _check_json(metadata, what)
    return dict(metadata)


def _check_json(value: Any, where: str) -> None:
    if isinstance(value, str):
        check_text(value, where)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{where} is {value}: JSON has no NaN or infinity")
    elif value is None or isinstance(value, (bool, int)):
        return
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{where} has a non-string key {key!r}")
            check_text(key, f"a key of {where}")
            _check_json(item, f"{where}[{key!r:.40}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    else:
        raise InvalidInputError(f"{where} holds a {type(value).__name__}, which is not JSON")


def check_artifact(artifact: Any) -> str:
    """A non-empty artifact id of at most MAX_ARTIFACT_CHARS storable characters."""
    if not artifact:
        raise InvalidInputError(
            "artifact is required: vectors of different models are not "
            "comparable (use ClipEmbedder.artifact_id)"
        )
    if not isinstance(artifact, str) or len(artifact) > MAX_ARTIFACT_CHARS:
        got = (
            f"{len(artifact)} characters" if isinstance(artifact, str) else type(artifact).__name__
        )
        raise InvalidInputError(
            f"artifact must be a string of at most {MAX_ARTIFACT_CHARS} characters, got {got}"
        )
    return check_text(artifact, "artifact")  # type: ignore[return-value]


def check_int4(value: int | None, what: str) -> int | None:
    """``value`` if an ``int`` column holds it (None passes)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{what} must be an integer, got {value!r:.40}")
    if not -INT4_MAX - 1 <= value <= INT4_MAX:
        raise InvalidInputError(f"{what} must be in [-2**31, 2**31 - 1], got {value}")
    return int(value)


def check_search_args(threshold: Any, count: Any) -> tuple[float, int]:
    """``(threshold, count)`` as (float, int) if ``count`` is an integer in [1, MAX_COUNT]
    and ``threshold`` a real number in [-1, 1]; else InvalidInputError."""
    if (
        isinstance(count, bool)
        or not isinstance(count, (int, np.integer))
        or not 1 <= count <= MAX_COUNT
    ):
        raise InvalidInputError(f"count must be an integer in [1, {MAX_COUNT}], got {count!r:.40}")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float, np.floating))
        or math.isnan(threshold)
        or not -1.0 <= threshold <= 1.0
    ):
        raise InvalidInputError(f"threshold must be a number in [-1, 1], got {threshold!r:.40}")
    return float(threshold), int(count)
