"""The process-wide embedder of a worker: created on first use, behind the CLIP_ENABLED flag.

The design's "singleton pattern: one model instance per worker process", kept apart from
:class:`~heimdex_clip.embedder.ClipEmbedder` itself, which any code may also build directly.
"""

from __future__ import annotations

import threading

from .config import ClipConfig
from .embedder import ClipEmbedder
from .errors import ConfigError

__all__ = ["get_embedder", "reset_embedder"]

_instance: ClipEmbedder | None = None
_instance_lock = threading.Lock()


def get_embedder(config: ClipConfig | None = None) -> ClipEmbedder | None:
    """The process-wide embedder for a worker, created on first call; None when CLIP_ENABLED
    is false (the feature flag).

    Thread-safe; the model loads on the first frame (or call ``load()`` at start-up). Invalid
    CLIP_* settings raise ConfigError here, and so does another config than the existing
    embedder's (call :func:`reset_embedder` first).
    """
    global _instance
    cfg = config if config is not None else ClipConfig.from_env()
    if not cfg.enabled:
        return None
    with _instance_lock:
        if _instance is None:
            _instance = ClipEmbedder(config=cfg)
        elif _instance.config != cfg:
            raise ConfigError(
                "the process-wide CLIP embedder already exists with another "
                "configuration; call reset_embedder() before switching"
            )
        return _instance


def reset_embedder() -> None:
    """Forget the process-wide instance (tests, or after changing the environment).

    The old instance is not closed: threads that still hold it keep working with it.
    """
    global _instance
    with _instance_lock:
        _instance = None
