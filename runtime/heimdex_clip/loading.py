"""The embedder's loaded model: loaded once under a lock, a failed load remembered.

:class:`ModelSlot` is what both API styles share (:class:`~heimdex_clip.embedder.ClipEmbedder`,
the strict calls, and :class:`~heimdex_clip.worker_api.WorkerEmbedder`, the calls that never
raise). The model is held in one attribute, so :meth:`ModelSlot.close` is one assignment and
a call in flight finishes with the model it started with. The text tower loads on the first
text call, from the same artifact as the image tower.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .config import ClipConfig
from .errors import ArtifactError, ClipError
from .frames import EmbeddingCache
from .metadata import ModelIdentity
from .model import VisualModel, load_visual_model
from .text import TextTower

log = logging.getLogger("heimdex_clip")


class ModelSlot:
    """Holds (at most) one loaded :class:`~heimdex_clip.model.VisualModel` and its text tower."""

    def __init__(self, config: ClipConfig, model_dir: Path | None, cache: EmbeddingCache) -> None:
        self.config = config
        self.model_dir = model_dir
        self._cache = cache
        self._lock = threading.Lock()
        self._model: VisualModel | None = None
        self._error: ClipError | None = None
        self._text_lock = threading.Lock()
        self._text: tuple[VisualModel, TextTower | ClipError] | None = None

    @property
    def model(self) -> VisualModel | None:
        """The loaded model, or None (never loads)."""
        return self._model

    def load(self) -> VisualModel:
        """The loaded model, loading it now if needed; raises ClipError on failure.

        A failed load is remembered: later calls raise the same error without re-reading a
        broken artifact for every frame (:meth:`forget` lets the next call try again).
        """
        model = self._model
        if model is not None:
            return model
        with self._lock:
            if self._model is not None:
                return self._model
            if self._error is not None:
                raise self._error
            cfg = self.config
            log.info(
                "Loading CLIP model: %s (pretrained=%s, device=%s)",
                cfg.model_name,
                cfg.pretrained,
                cfg.device,
            )
            try:
                model = load_visual_model(cfg, self.model_dir)
            except ClipError as exc:
                self._error = exc
                log.error("Failed to load CLIP model: %s", exc)
                raise
            except Exception as exc:  # an unexpected failure must not be retried per frame
                self._error = ArtifactError(f"cannot load the model: {exc}")
                log.error("Failed to load CLIP model: %s", exc)
                raise self._error from exc
            self._cache.clear()  # vectors of another model must never be served
            self._model = model
        self._log_loaded(model)
        return model

    def _log_loaded(self, model: VisualModel) -> None:
        info, m = model.session_info, model.manifest
        log.info(
            "CLIP model loaded successfully: %s (embed_dim=%d, device=%s, load_time=%.1fms, "
            "cache_dir=%s)",
            m.model.name,
            m.model.embed_dim,
            info.device,
            model.load_time_ms,
            self.config.cache_dir,
        )
        log.info(
            "CLIP runtime: providers=%s, intra_op_threads=%d, memory_arena=%s, "
            "precision=%s, artifact=%s",
            ",".join(info.providers),
            info.intra_op_threads,
            info.memory_arena,
            self.config.precision,
            model.artifact_dir,
        )
        if m.model.random_init:
            log.warning(
                "!!! CLIP artifact %s is a RANDOM INITIALISATION (seed %s): its "
                "embeddings carry no visual meaning. Export real weights for "
                "production (make export-model PRETRAINED=openai).",
                model.artifact_dir,
                m.model.seed,
            )

    def forget(self, *, clear_cache: bool = False) -> None:
        """Drop the model (and a remembered failure); the next :meth:`load` reads it again."""
        with self._lock:
            self._model = None
            self._error = None
            if clear_cache:
                self._cache.clear()
        if clear_cache:
            with self._text_lock:
                self._text = None

    def identity(self) -> ModelIdentity:
        """What made (or would have made) a vector, even when no model could be loaded."""
        model = self._model
        if model is not None:
            return model.identity
        cfg = self.config
        return ModelIdentity(
            model_name=cfg.model_name,
            pretrained=cfg.pretrained,
            embed_dim=None,
            device=cfg.device,
            normalized=cfg.normalize,
        )

    def text_tower(self) -> TextTower:
        """The text tower of the loaded artifact (loading both if needed); TextError if the
        artifact has none. A failed load is remembered for that model."""
        model = self.load()
        loaded = self._text
        if loaded is None or loaded[0] is not model:
            with self._text_lock:
                if self._text is None or self._text[0] is not model:
                    try:
                        tower: TextTower | ClipError = TextTower(
                            model.artifact_dir,
                            model.manifest,
                            self.config,
                            cache_size=self.config.embed_cache_size,
                            pinned=model.pinned,
                        )
                    except ClipError as exc:
                        tower = exc
                    self._text = (model, tower)
                loaded = self._text
        if isinstance(loaded[1], ClipError):
            raise loaded[1]
        return loaded[1]
