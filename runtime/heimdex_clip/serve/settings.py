"""The service's settings: ``CLIP_SERVE_*`` environment variables, overridable by flags.

The model's own settings (CLIP_BATCH_SIZE, CLIP_TIMEOUT_S, CLIP_MAX_IMAGE_BYTES...) stay in
:class:`~heimdex_clip.config.ClipConfig`; the service reads those from there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

#: Shortest HS256 secret accepted (RFC 7518 §3.2: a key at least as long as the hash).
MIN_JWT_SECRET_BYTES = 32


@dataclass(frozen=True)
class ServeSettings:
    """Every CLIP_SERVE_* setting, validated once at start-up."""

    #: CLIP_SERVE_HOST / CLIP_SERVE_PORT: where to listen.
    host: str = "127.0.0.1"
    port: int = 8080
    #: CLIP_SERVE_MAX_QUEUE: embedding requests waiting for the model at most; past it
    #: (or past what the model can finish within CLIP_TIMEOUT_S) new ones get 503.
    max_queue: int = 64
    #: CLIP_SERVE_BATCH_WAIT_MS: longest a model run waits for more work to fill a batch.
    batch_wait_ms: float = 5.0
    #: CLIP_SERVE_MAX_COUNT: the largest match_count a search may ask for.
    max_count: int = 200
    #: CLIP_SERVE_MAX_INPUTS: texts or images one /v1/embeddings* call may embed.
    max_inputs: int = 64
    #: CLIP_SERVE_DB_POOL: database connections of the process.
    db_pool: int = 8
    #: CLIP_SERVE_MEDIA_ROOT: the only directory frames are served from (unset: none).
    media_root: Path | None = None
    #: CLIP_SERVE_JWT_SECRET: HS256 secret for JWTs (unset: only API keys are accepted).
    jwt_secret: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("port", "max_queue", "max_count", "max_inputs", "db_pool"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CLIP_SERVE_{name.upper()} must be >= 1")
        if self.port > 65535:
            raise ConfigError(f"CLIP_SERVE_PORT must be <= 65535, got {self.port}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError("CLIP_SERVE_BATCH_WAIT_MS must be in [0, 1000]")
        if (
            self.jwt_secret is not None
            and len(self.jwt_secret.encode("utf-8")) < MIN_JWT_SECRET_BYTES
        ):
            raise ConfigError(
                f"CLIP_SERVE_JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes (HS256)"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> ServeSettings:
        """Settings from ``environ`` (default os.environ), then ``overrides`` (flags; None
        values are ignored). Raises ConfigError for a bad value."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(f"CLIP_SERVE_{field.name.upper()}")
            if raw is not None and raw != "":
                values[field.name] = _parse(field.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _parse(name: str, raw: str) -> object:
    kind = {f.name: f.type for f in dataclasses.fields(ServeSettings)}[name]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"CLIP_SERVE_{name.upper()}={raw!r} is not a number") from None
    if name == "media_root":
        return Path(raw).expanduser()
    return raw
