"""Which vectors may leave the runtime: finite, and with a direction.

A NaN vector has NaN similarity to everything, which passes any threshold (PostgreSQL sorts
NaN above every number) and makes JSON output invalid; a zero or denormal vector has no
direction, so its cosine is NaN too. No embedder API returns one as a success: the worker
path turns it into a failed result (``metadata.success`` checks every vector), the strict
path raises :class:`~heimdex_clip.errors.InvalidVectorError`.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidVectorError

#: Below this L2 norm a vector has no usable direction (embeddings are unit-norm, raw CLIP
#: features have norms of order 1-10; a denormal float32 is below 1.2e-38).
MIN_NORM = 1e-6


def _problems(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    as64 = vectors.astype(np.float64)
    finite = np.asarray(np.isfinite(as64).all(axis=-1))
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.asarray(np.linalg.norm(np.where(np.isfinite(as64), as64, 0.0), axis=-1))
    return finite, norms


def vector_problem(vector: object) -> str | None:
    """Why ``vector`` (one [D] float vector) must not be used, or None when it is fine."""
    array = np.asarray(vector)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        return f"is not a float vector [D] (got {array.dtype} {array.shape})"
    finite, norm = _problems(array)
    if not finite:
        return "contains NaN or infinity"
    if not norm >= MIN_NORM:
        return f"has norm {float(norm):.3g}: a zero or denormal vector has no direction"
    return None


def check_vectors(vectors: np.ndarray, what: str) -> np.ndarray:
    """``vectors`` [N, D] unchanged; InvalidVectorError naming the first bad row."""
    array = np.asarray(vectors)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise InvalidVectorError(
            f"{what}: expected float vectors [N, D], got {array.dtype} {array.shape}"
        )
    finite, norms = _problems(array)
    bad = ~finite | ~(norms >= MIN_NORM)
    if bad.any():
        row = int(np.argmax(bad))
        raise InvalidVectorError(
            f"{what} #{row}: the model's vector "
            f"{vector_problem(array[row])}; refused (the artifact or the "
            "input is broken)"
        )
    return vectors
