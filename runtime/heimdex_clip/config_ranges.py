"""The valid range of every ClipConfig field, checked wherever a config is built.

:class:`~heimdex_clip.config.ClipConfig` calls :func:`check_config` from ``__post_init__``,
so ``ClipConfig.from_env()``, ``ClipConfig(...)`` and ``.replace()`` all refuse the same
values with the same :class:`~heimdex_clip.errors.ConfigError`. A value outside its range is
a fault of the configuration: it must stop the process at start-up, never fail frames one
by one (``CLIP_TIMEOUT_S=1e10`` used to overflow every wait; ``CLIP_CPU_THREADS=1000``
started 2,000 threads that timed out every frame).

The checks are type-exact: ``True`` is not an integer, ``2.0`` is not a thread count.
docs/reliability.md lists these ranges (a test keeps its table equal to :data:`RANGES`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Inclusive bounds of a numeric setting, and what its unit is."""

    low: float
    high: float
    unit: str
    #: Only integers (``int``, not ``bool``) are valid.
    integer: bool = True
    #: ``None`` is valid too (it means "choose for me").
    nullable: bool = False

    def bounds(self, high: float | None = None) -> str:
        """``1..256``, or ``1e-06..3600`` for a real-valued setting."""
        top = self.high if high is None else high
        if self.integer:
            return f"{int(self.low)}..{int(top)}"
        return f"{self.low:g}..{top:g}"


#: Threads beyond the CPUs a process may run on only make ONNX Runtime's spinning workers
#: fight each other; 256 bounds it on any machine.
MAX_THREADS = 256


def cpu_limit() -> int:
    """The highest valid CLIP_CPU_THREADS here: the CPUs this process may use, at most 256."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, available))


#: Field -> its valid range. Why each upper bound: beyond it the value can only exhaust the
#: machine or overflow (a wait of 1e10 s), never serve a real deployment.
RANGES: dict[str, Range] = {
    # threading waits overflow past ~9.2e9 s; an hour per frame is already no deadline.
    "timeout_s": Range(1e-6, 3600.0, "seconds", integer=False),
    "max_image_size": Range(1, 8192, "pixels (shorter side)"),
    # The upper bound is cpu_limit(), computed when the config is checked.
    "cpu_threads": Range(1, MAX_THREADS, "threads (null: physical cores)", nullable=True),
    # One run holds batch x 3 x S x S float32 inputs plus the activations of every frame.
    "batch_size": Range(1, 256, "frames per model run"),
    # 500 Mpx is 1.5 GB of RGB after decoding.
    "max_image_pixels": Range(1, 500_000_000, "pixels"),
    "max_image_bytes": Range(1, 2**31, "bytes"),
    "max_resize_pixels": Range(1, 100_000_000, "pixels"),
    # 100,000 vectors of 512 float32 are 200 MB.
    "embed_cache_size": Range(0, 100_000, "vectors (0: off)"),
}

#: Field -> the values a choice setting may take.
CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("cpu", "cuda"),
    "precision": ("int8", "fp32"),
    "provider": ("auto", "cpu", "openvino"),
}

BOOLEANS = ("enabled", "normalize", "debug_log", "fast_decode", "memory_arena")
NAMES = ("model_name", "pretrained")
#: A model name or weights tag (possibly a checkpoint path) longer than this is not one.
MAX_NAME_CHARS = 4096


def _label(field: str, env: dict[str, str]) -> str:
    """``CLIP_TIMEOUT_S (timeout_s)``: what to fix in the environment and in code."""
    name = env.get(field)
    return f"{name} ({field})" if name else field


def _check_number(field: str, value: Any, spec: Range, label: str) -> None:
    if value is None and spec.nullable:
        return
    kind = "an integer" if spec.integer else "a number"
    allowed = (int,) if spec.integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ConfigError(f"{label} must be {kind}, got {type(value).__name__} {value!r}")
    high = cpu_limit() if field == "cpu_threads" else spec.high
    if not (math.isfinite(value) and spec.low <= value <= high):
        why = (
            f" (the CPUs this process may use, at most {MAX_THREADS})"
            if field == "cpu_threads" and high < spec.high
            else ""
        )
        raise ConfigError(
            f"{label} is {value!r}, outside its valid range {spec.bounds(high)} {spec.unit}{why}"
        )


def _check_name(value: Any, label: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{label} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME_CHARS or "\x00" in value:
        raise ConfigError(f"{label} must be at most {MAX_NAME_CHARS} characters without NUL")


def _check_formats(value: Any, label: str, known: frozenset[str]) -> None:
    if (
        not isinstance(value, frozenset)
        or not value
        or not all(isinstance(f, str) and f == f.upper() and f for f in value)
    ):
        raise ConfigError(
            f"{label} must name at least one image format (e.g. JPEG,PNG), got {value!r}"
        )
    if value <= known:
        return
    from PIL import Image

    Image.init()  # registers every plugin, so Image.OPEN lists the formats Pillow reads
    unknown = sorted(value - set(Image.OPEN))
    if unknown:
        raise ConfigError(f"{label}: Pillow reads no format named {', '.join(unknown)}")


def check_config(config: Any, env_names: dict[str, str], known_formats: frozenset[str]) -> None:
    """Raise ConfigError naming the first field of ``config`` outside its valid range.

    ``env_names``: field -> environment variable, so that the message names what to fix;
    ``known_formats``: image formats valid without asking Pillow (the defaults).
    """
    for field, spec in RANGES.items():
        _check_number(field, getattr(config, field), spec, _label(field, env_names))
    for field, allowed in CHOICES.items():
        value = getattr(config, field)
        if value not in allowed:
            raise ConfigError(
                f"{_label(field, env_names)} is {value!r}, it must be one of {', '.join(allowed)}"
            )
    for field in BOOLEANS:
        value = getattr(config, field)
        if not isinstance(value, bool):
            raise ConfigError(
                f"{_label(field, env_names)} must be a bool, got {type(value).__name__} {value!r}"
            )
    for field in NAMES:
        _check_name(getattr(config, field), _label(field, env_names))
    _check_formats(config.image_formats, _label("image_formats", env_names), known_formats)
    for field in ("cache_dir", "model_dir"):
        value = getattr(config, field)
        if not (isinstance(value, Path) or (value is None and field == "model_dir")):
            raise ConfigError(f"{_label(field, env_names)} must be a path, got {value!r}")
