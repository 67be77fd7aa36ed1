"""ClipConfig: every CLIP_* setting of the design, read and validated once at start-up.

The settings are one declarative table (:data:`SETTINGS`): environment variable, field,
parser. An invalid value raises :class:`~heimdex_clip.errors.ConfigError` from
:meth:`ClipConfig.from_env`, so a misconfigured worker fails when it starts rather than at
its first frame; an unknown ``CLIP_*`` variable (a typo) is reported, never silently dropped.
Every field has a valid range (:mod:`.config_ranges`), checked in ``__post_init__``: for the
environment, ``ClipConfig(...)`` and ``.replace()`` alike.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config_ranges import check_config
from .errors import ConfigError

#: Where the Docker image bakes the artifacts; the repository's ``models/`` otherwise.
DEFAULT_MODEL_DIRS = (Path("/opt/heimdex-clip/models"), Path("models"))

#: Image formats a video frame comes in (Pillow's plugin names; JPEG includes the MPO
#: variant cameras write). Everything else (EPS, which runs Ghostscript; TGA; ICO...) is
#: refused unless CLIP_IMAGE_FORMATS allows it.
DEFAULT_IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM"})

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NULL = {"", "null", "none"}


def _boolean(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true/false)")


def _integer(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw[:100]!r} is not an integer") from None


def _optional_integer(name: str, raw: str) -> int | None:
    return None if raw.strip().lower() in _NULL else _integer(name, raw)


def _number(name: str, raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw[:100]!r} is not a number") from None


def _text(name: str, raw: str) -> str:
    return raw.strip()  # emptiness and length are checked with every other field


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            quoted = " or ".join(f"'{a}'" for a in allowed)
            raise ConfigError(f"{name}={raw!r} must be {quoted}")
        return value

    return parse


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _optional_path(name: str, raw: str) -> Path | None:
    return Path(raw).expanduser() if raw.strip() else None


def _formats(name: str, raw: str) -> frozenset[str]:
    formats = frozenset(f.strip().upper() for f in raw.split(",") if f.strip())
    if not formats:
        raise ConfigError(f"{name} must name at least one image format (e.g. JPEG,PNG)")
    return formats


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
    #: CLIP_TIMEOUT_S: per-frame budget covering decode, preprocessing and the frame's share
    #: of inference.
    timeout_s: float = 2.0
    #: CLIP_MAX_IMAGE_SIZE: with fast decode, frames are shrunk cheaply (JPEG DCT scaling,
    #: integer reduce) while their shorter side stays >= this many pixels, before the exact
    #: resize to the model's input size. Must be >= the model's image size.
    max_image_size: int = 224
    #: CLIP_CPU_THREADS: ONNX Runtime intra-op threads; None = physical cores.
    cpu_threads: int | None = None
    #: CLIP_CACHE_DIR: download cache for weights at export time, and where the runtime
    #: remembers CLIP_PROVIDER=auto's measured decision (``providers.json``).
    cache_dir: Path = Path("/tmp/clip_cache")
    #: CLIP_DEBUG_LOG: verbose per-frame log lines (logged at INFO, so they show without
    #: changing any logger's level).
    debug_log: bool = False
    #: CLIP_MODEL_DIR: an artifact directory (holding manifest.json) or a models root
    #: holding ``<MODEL>__<PRETRAINED>/``. None = the baked-in /opt/heimdex-clip/models,
    #: then ./models.
    model_dir: Path | None = None
    #: CLIP_BATCH_SIZE: frames per ONNX Runtime call in batched embedding.
    batch_size: int = 16
    #: CLIP_FAST_DECODE: shrink frames cheaply before the exact resize (changes pixels
    #: slightly; docs/preprocessing.md has its measured effect). Off = exact open_clip parity.
    fast_decode: bool = False
    #: CLIP_MAX_IMAGE_PIXELS: frames with more pixels are refused from their header, before
    #: decoding (decompression bombs).
    max_image_pixels: int = 64_000_000
    #: CLIP_MAX_IMAGE_BYTES: frame files (or encoded bytes) larger than this are refused
    #: before they are read.
    max_image_bytes: int = 128 * 1024 * 1024
    #: CLIP_MAX_RESIZE_PIXELS: the exact resize keeps a frame's aspect ratio, so a sliver
    #: (20000x1) would become a huge intermediate image; frames whose resized size exceeds
    #: this many pixels are refused before any decoding.
    max_resize_pixels: int = 4_000_000
    #: CLIP_IMAGE_FORMATS: comma-separated Pillow format names a frame may have.
    image_formats: frozenset[str] = DEFAULT_IMAGE_FORMATS
    #: CLIP_PRECISION: ``int8`` (default) or ``fp32`` (needs visual.fp32.onnx in the artifact).
    precision: str = "int8"
    #: CLIP_MEMORY_ARENA: ONNX Runtime's CPU memory arena (faster, holds on to peak memory).
    memory_arena: bool = True
    #: CLIP_EMBED_CACHE_SIZE: identical frames (same model input) embedded once; 0 = off.
    embed_cache_size: int = 1024
    #: CLIP_PROVIDER: ``auto`` (the fastest available here, measured once and cached),
    #: ``cpu`` (ONNX Runtime's CPU provider) or ``openvino`` (the openvino extra); a provider
    #: that cannot run falls back to cpu, and the metadata's ``provider`` says what ran.
    provider: str = "auto"
    #: Extra keys seen in the environment that start with CLIP_ but are unknown (typos).
    unknown_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClipConfig:
        """Build the config from ``environ`` (default ``os.environ``); raises ConfigError."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {
            field_name: parse(name, env[name])
            for name, (field_name, parse) in SETTINGS.items()
            if name in env
        }
        values["unknown_keys"] = tuple(
            sorted(
                k
                for k in env
                if k.startswith("CLIP_")
                and k not in SETTINGS
                # The search service's own settings (heimdex_clip.serve.settings).
                and not k.startswith("CLIP_SERVE_")
            )
        )
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        # Paths and format sets given as plain values are taken in their canonical form;
        # everything else must already have its exact type (see config_ranges).
        if isinstance(self.cache_dir, (str, os.PathLike)):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if isinstance(self.model_dir, (str, os.PathLike)):
            object.__setattr__(self, "model_dir", Path(self.model_dir))
        if isinstance(self.image_formats, (set, frozenset, list, tuple)) and all(
            isinstance(f, str) for f in self.image_formats
        ):
            object.__setattr__(
                self, "image_formats", frozenset(f.strip().upper() for f in self.image_formats)
            )
        check_config(self, ENV_NAMES, DEFAULT_IMAGE_FORMATS)

    def replace(self, **changes: object) -> ClipConfig:
        """A copy with some fields changed, checked like any other config (ConfigError)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


#: Every setting: environment variable -> (ClipConfig field, parser(name, raw) -> value).
SETTINGS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "CLIP_ENABLED": ("enabled", _boolean),
    "CLIP_MODEL_NAME": ("model_name", _text),
    "CLIP_PRETRAINED": ("pretrained", _text),
    "CLIP_DEVICE": ("device", _choice("cpu", "cuda")),
    "CLIP_NORMALIZE": ("normalize", _boolean),
    "CLIP_TIMEOUT_S": ("timeout_s", _number),
    "CLIP_MAX_IMAGE_SIZE": ("max_image_size", _integer),
    "CLIP_CPU_THREADS": ("cpu_threads", _optional_integer),
    "CLIP_CACHE_DIR": ("cache_dir", _path),
    "CLIP_DEBUG_LOG": ("debug_log", _boolean),
    "CLIP_MODEL_DIR": ("model_dir", _optional_path),
    "CLIP_BATCH_SIZE": ("batch_size", _integer),
    "CLIP_FAST_DECODE": ("fast_decode", _boolean),
    "CLIP_MAX_IMAGE_PIXELS": ("max_image_pixels", _integer),
    "CLIP_MAX_IMAGE_BYTES": ("max_image_bytes", _integer),
    "CLIP_MAX_RESIZE_PIXELS": ("max_resize_pixels", _integer),
    "CLIP_IMAGE_FORMATS": ("image_formats", _formats),
    "CLIP_PRECISION": ("precision", _choice("int8", "fp32")),
    "CLIP_MEMORY_ARENA": ("memory_arena", _boolean),
    "CLIP_EMBED_CACHE_SIZE": ("embed_cache_size", _integer),
    "CLIP_PROVIDER": ("provider", _choice("auto", "cpu", "openvino")),
}

#: ClipConfig field -> the environment variable that sets it (for error messages).
ENV_NAMES: dict[str, str] = {field_name: name for name, (field_name, _) in SETTINGS.items()}
