"""The metadata stored beside every embedding, and the checks that keep it storable.

Pure functions: nothing here touches the model. Whatever a caller passes, the metadata is
valid JSON with finite numbers and UTF-8 text, so storing it (PostgreSQL ``jsonb``) can
never be what loses a scene.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np

from .vectors import vector_problem

#: The design document's fields, in its order, plus the artifact that made the vector.
METADATA_FIELDS = (
    "model_name",
    "pretrained",
    "embed_dim",
    "normalized",
    "device",
    "frame_path",
    "frame_quality",
    "inference_time_ms",
    "created_at",
    "error",
    "artifact_id",
    "provider",
)


@dataclass(frozen=True)
class ModelIdentity:
    """What made an embedding: the model and where it ran (or what was asked for, when the
    model could not be loaded)."""

    model_name: str
    pretrained: str
    embed_dim: int | None
    device: str
    normalized: bool
    #: :attr:`heimdex_clip.artifact.Manifest.artifact_id`; None when nothing was loaded.
    artifact_id: str | None = None
    #: The execution provider that ran the model (``cpu`` or ``openvino``).
    provider: str = "cpu"


@dataclass
class EmbeddingResult:
    """One frame's (or scene's) embedding and the metadata stored beside it.

    ``metadata`` has the design document's fields (model_name, pretrained, embed_dim,
    normalized, device, frame_path, frame_quality, inference_time_ms, created_at, error)
    plus ``artifact_id`` and ``provider``. A failed frame has ``embedding=None`` and the
    reason in ``error``.
    """

    embedding: np.ndarray | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.embedding is not None

    @property
    def error(self) -> str | None:
        return self.metadata.get("error")


#: The error prefix of a worker-path failure caused by the configuration, not the frame: a
#: worker must not count it against the frame or give the scene up (docs/reliability.md).
CONFIG_FAULT_PREFIX = "ConfigError:"


def is_config_fault(error: str | None) -> bool:
    """Whether a failed result's ``error`` is a fault of the configuration."""
    return error is not None and error.startswith(CONFIG_FAULT_PREFIX)


class InvalidArgument(ValueError):
    """A worker-path argument that cannot be turned into storable metadata."""


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    if depth > 8:
        raise InvalidArgument(f"{where} is nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str):
            _check_text(value, where)
        return
    if isinstance(value, Real):
        if not math.isfinite(float(value)):
            raise InvalidArgument(f"{where} must be a finite number, got {value!r}")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"{where} keys must be strings, got {key!r}")
            _check_text(key, where)
            _check_json(item, f"{where}[{key!r}]", depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    raise InvalidArgument(f"{where} must be JSON data, got {type(value).__name__}")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{where} is not valid UTF-8 text") from None
    if "\x00" in text:  # PostgreSQL text and jsonb cannot hold NUL
        raise InvalidArgument(f"{where} contains a NUL character")


def quality_field(frame_quality: object) -> dict[str, Any] | None:
    """The ``frame_quality`` metadata value: None, ``{"quality_score": x}`` or a JSON dict.

    Raises InvalidArgument for anything else (a string, a list, NaN, infinity, a bool).
    """
    if frame_quality is None:
        return None
    if isinstance(frame_quality, dict):
        _check_json(frame_quality, "frame_quality")
        return dict(frame_quality)
    if isinstance(frame_quality, Real) and not isinstance(frame_quality, bool):
        score = float(frame_quality)
        if not math.isfinite(score):
            raise InvalidArgument(f"frame_quality must be a finite number, got {score!r}")
        return {"quality_score": score}
    raise InvalidArgument(
        f"frame_quality must be a number, a dict or None, got {type(frame_quality).__name__}"
    )


def storable_text(text: str) -> str:
    """``text`` as valid UTF-8 without NUL: what cannot be stored raw becomes an escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def storable_path(frame_path: object) -> str | None:
    """``frame_path`` as UTF-8 text: a file name that is not valid UTF-8 keeps its
    undecodable bytes as ``\\xNN`` escapes (PostgreSQL text cannot hold them raw)."""
    if frame_path is None:
        return None
    if not isinstance(frame_path, (str, bytes, os.PathLike)):
        raise InvalidArgument(f"frame_path must be a path or None, got {type(frame_path).__name__}")
    try:
        raw = os.fsencode(frame_path)  # undoes surrogateescape: the file name's real bytes
    except UnicodeEncodeError:
        return storable_text(os.fspath(frame_path))  # type: ignore[arg-type]
    return storable_text(raw.decode("utf-8", "backslashreplace"))


def now_iso() -> str:
    """UTC now as ``2025-01-15T12:34:56Z`` (the design's ``created_at``)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_metadata(
    identity: ModelIdentity,
    *,
    frame_path: str | None,
    frame_quality: dict[str, Any] | None,
    time_ms: float | None,
    error: str | None,
) -> dict[str, Any]:
    """The metadata dict; a failed frame stores null quality and time (the design's rule)."""
    return {
        "model_name": identity.model_name,
        "pretrained": identity.pretrained,
        "embed_dim": identity.embed_dim,
        "normalized": identity.normalized,
        "device": identity.device,
        "frame_path": frame_path,
        "frame_quality": None if error else frame_quality,
        "inference_time_ms": None if error or time_ms is None else round(time_ms, 1),
        "created_at": now_iso(),
        "error": error,
        "artifact_id": identity.artifact_id,
        "provider": identity.provider,
    }


def success(
    identity: ModelIdentity,
    vector: np.ndarray,
    *,
    frame_path: str | None,
    frame_quality: dict[str, Any] | None,
    time_ms: float,
) -> EmbeddingResult:
    """A successful result, or a failed one when ``vector`` is not finite or has no
    direction: every worker-path success passes here, so none can carry a NaN vector."""
    if problem := vector_problem(vector):
        return failure(
            identity,
            frame_path=frame_path,
            error=f"InvalidVectorError: the model's vector {problem}",
        )
    return EmbeddingResult(
        vector,
        build_metadata(
            identity,
            frame_path=frame_path,
            frame_quality=frame_quality,
            time_ms=time_ms,
            error=None,
        ),
    )


def failure(identity: ModelIdentity, *, frame_path: str | None, error: str) -> EmbeddingResult:
    return EmbeddingResult(
        None,
        build_metadata(
            identity,
            frame_path=frame_path,
            frame_quality=None,
            time_ms=None,
            error=storable_text(error),
        ),
    )
