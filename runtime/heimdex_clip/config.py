"""ClipConfig: every CLIP_* setting of the design, read and validated once at start-up.

An invalid value raises :class:`~heimdex_clip.errors.ConfigError` from
:meth:`ClipConfig.from_env`, so a misconfigured worker fails when it starts rather than at
its first frame.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NULL = {"", "null", "none"}

#: Where the Docker image bakes the artifacts; the repository's ``models/`` otherwise.
DEFAULT_MODEL_DIRS = (Path("/opt/heimdex-clip/models"), Path("models"))


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true/false)")


def _parse_optional_int(name: str, raw: str, *, minimum: int) -> int | None:
    if raw.strip().lower() in _NULL:
        return None
    return _parse_int(name, raw, minimum=minimum)


def _parse_int(name: str, raw: str, *, minimum: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _parse_float(name: str, raw: str, *, minimum_exclusive: float) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value > minimum_exclusive or value != value or value == float("inf"):
        raise ConfigError(f"{name}={value} must be a finite number > {minimum_exclusive}")
    return value


@dataclass(frozen=True)
class ClipConfig:
    """Runtime settings. Field docs name the environment variable that sets each one."""

    #: CLIP_ENABLED: feature flag; when false :func:`get_embedder` returns None.
    enabled: bool = False
    #: CLIP_MODEL_NAME: open_clip architecture of the artifact to load.
    model_name: str = "ViT-B-32"
    #: CLIP_PRETRAINED: weights tag of the artifact (``openai``, ``none``, a checkpoint name).
    pretrained: str = "openai"
    #: CLIP_DEVICE: ``cpu`` or ``cuda``. ``cuda`` without the CUDA provider falls back to
    #: the CPU with a warning; the metadata's ``device`` always says what really ran.
    device: str = "cpu"
    #: CLIP_NORMALIZE: L2-normalise embeddings (the graph already does; kept for dot products).
    normalize: bool = True
    #: CLIP_TIMEOUT_S: per-scene budget covering decode, preprocessing and inference.
    timeout_s: float = 2.0
    #: CLIP_MAX_IMAGE_SIZE: with fast decode, frames are shrunk cheaply (JPEG DCT scaling,
    #: integer reduce) while their shorter side stays >= this many pixels, before the exact
    #: resize to the model's input size. Must be >= the model's image size.
    max_image_size: int = 224
    #: CLIP_CPU_THREADS: ONNX Runtime intra-op threads; None = physical cores.
    cpu_threads: int | None = None
    #: CLIP_CACHE_DIR: download cache for weights at export time.
    cache_dir: Path = Path("/tmp/clip_cache")
    #: CLIP_DEBUG_LOG: verbose per-frame logging.
    debug_log: bool = False
    #: CLIP_MODEL_DIR: an artifact directory (holding manifest.json) or a models root
    #: holding ``<MODEL>__<PRETRAINED>/``. None = the baked-in /opt/heimdex-clip/models,
    #: then ./models.
    model_dir: Path | None = None
    #: CLIP_BATCH_SIZE: images per ONNX Runtime call in batched embedding.
    batch_size: int = 16
    #: CLIP_FAST_DECODE: shrink frames cheaply before the exact resize (changes pixels
    #: slightly; see the README for its measured effect). Off = exact open_clip parity.
    fast_decode: bool = False
    #: CLIP_MAX_IMAGE_PIXELS: frames larger than this are refused (decompression bombs).
    max_image_pixels: int = 64_000_000
    #: CLIP_PRECISION: ``int8`` (default) or ``fp32`` (needs visual.fp32.onnx in the artifact).
    precision: str = "int8"
    #: CLIP_MEMORY_ARENA: ONNX Runtime's CPU memory arena (faster, holds on to peak memory).
    memory_arena: bool = True
    #: CLIP_EMBED_CACHE_SIZE: identical frames (by content hash) embedded once; 0 = off.
    embed_cache_size: int = 1024
    #: Extra keys seen in the environment that start with CLIP_ but are unknown (typos).
    unknown_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClipConfig:
        """Build the config from ``environ`` (default ``os.environ``); raises ConfigError."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}

        def raw(name: str) -> str | None:
            return env.get(name)

        if (v := raw("CLIP_ENABLED")) is not None:
            values["enabled"] = _parse_bool("CLIP_ENABLED", v)
        if (v := raw("CLIP_MODEL_NAME")) is not None:
            if not v.strip():
                raise ConfigError("CLIP_MODEL_NAME must not be empty")
            values["model_name"] = v.strip()
        if (v := raw("CLIP_PRETRAINED")) is not None:
            if not v.strip():
                raise ConfigError("CLIP_PRETRAINED must not be empty")
            values["pretrained"] = v.strip()
        if (v := raw("CLIP_DEVICE")) is not None:
            device = v.strip().lower()
            if device not in {"cpu", "cuda"}:
                raise ConfigError(f"CLIP_DEVICE={v!r} must be 'cpu' or 'cuda'")
            values["device"] = device
        if (v := raw("CLIP_NORMALIZE")) is not None:
            values["normalize"] = _parse_bool("CLIP_NORMALIZE", v)
        if (v := raw("CLIP_TIMEOUT_S")) is not None:
            values["timeout_s"] = _parse_float("CLIP_TIMEOUT_S", v, minimum_exclusive=0.0)
        if (v := raw("CLIP_MAX_IMAGE_SIZE")) is not None:
            values["max_image_size"] = _parse_int("CLIP_MAX_IMAGE_SIZE", v, minimum=1)
        if (v := raw("CLIP_CPU_THREADS")) is not None:
            values["cpu_threads"] = _parse_optional_int("CLIP_CPU_THREADS", v, minimum=1)
        if (v := raw("CLIP_CACHE_DIR")) is not None:
            values["cache_dir"] = Path(v).expanduser()
        if (v := raw("CLIP_DEBUG_LOG")) is not None:
            values["debug_log"] = _parse_bool("CLIP_DEBUG_LOG", v)
        if (v := raw("CLIP_MODEL_DIR")) is not None and v.strip():
            values["model_dir"] = Path(v).expanduser()
        if (v := raw("CLIP_BATCH_SIZE")) is not None:
            values["batch_size"] = _parse_int("CLIP_BATCH_SIZE", v, minimum=1)
        if (v := raw("CLIP_FAST_DECODE")) is not None:
            values["fast_decode"] = _parse_bool("CLIP_FAST_DECODE", v)
        if (v := raw("CLIP_MAX_IMAGE_PIXELS")) is not None:
            values["max_image_pixels"] = _parse_int("CLIP_MAX_IMAGE_PIXELS", v, minimum=1)
        if (v := raw("CLIP_PRECISION")) is not None:
            precision = v.strip().lower()
            if precision not in {"int8", "fp32"}:
                raise ConfigError(f"CLIP_PRECISION={v!r} must be 'int8' or 'fp32'")
            values["precision"] = precision
        if (v := raw("CLIP_MEMORY_ARENA")) is not None:
            values["memory_arena"] = _parse_bool("CLIP_MEMORY_ARENA", v)
        if (v := raw("CLIP_EMBED_CACHE_SIZE")) is not None:
            values["embed_cache_size"] = _parse_int("CLIP_EMBED_CACHE_SIZE", v, minimum=0)

        known = {f"CLIP_{f.name.upper()}" for f in dataclasses.fields(cls)} | {
            "CLIP_TIMEOUT_S",
            "CLIP_CPU_THREADS",
        }
        values["unknown_keys"] = tuple(
            sorted(k for k in env if k.startswith("CLIP_") and k not in known)
        )
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> ClipConfig:
        """A copy with some fields changed (validation is the caller's, as in tests)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
