"""ClipEmbedder: frames in, CLIP vectors out, on the CPU, without torch. The public API.

Two faces:

* the worker path (:meth:`ClipEmbedder.embed_frame`, :meth:`~ClipEmbedder.embed_frames`,
  :meth:`~ClipEmbedder.embed_scene`) never raises, whatever it is given: a failure gives
  ``embedding=None`` and the error in the metadata, within CLIP_TIMEOUT_S per frame;
* the strict path (:meth:`~ClipEmbedder.embed_images`, :meth:`~ClipEmbedder.preprocess`)
  raises a clear :class:`~heimdex_clip.errors.ClipError` for bad input.

The parts live in their own modules: :mod:`.model` loads and verifies the artifact,
:mod:`.frames` is the one pipeline every frame goes through, :mod:`.jobs` runs work
against deadlines, :mod:`.metadata` builds what is stored beside a vector. The model loads
lazily, once, under a lock; it is held in one attribute, so :meth:`~ClipEmbedder.close`
is one assignment and calls already in flight finish with the model they started with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .artifact import Manifest
from .config import ClipConfig
from .errors import ArtifactError, ClipError, ConfigError
from .frames import EmbeddingCache, Frame, FramePipeline
from .images import ImageSource
from .jobs import DeadlineRunner, JobTimeout
from .metadata import (
    EmbeddingResult,
    InvalidArgument,
    ModelIdentity,
    failure,
    quality_field,
    storable_path,
    success,
)
from .model import VisualModel, load_visual_model
from .scenes import as_sequence, best_frames, pool_scene
from .session import SessionInfo
from .text import TextTower, has_text_tower
from .vectors import check_vectors

log = logging.getLogger("heimdex_clip")

__all__ = ["ClipEmbedder", "EmbeddingResult", "get_embedder", "reset_embedder"]


class ClipEmbedder:
    """CLIP image embedder over an exported INT8 ONNX artifact.

    Args:
        model_dir: the artifact directory (holding manifest.json) or a models root holding
            ``<MODEL>__<PRETRAINED>/``; default: ``config.model_dir``, then the baked-in
            /opt/heimdex-clip/models, then ./models.
        config: settings; default ``ClipConfig.from_env()``.
    """

    def __init__(self, model_dir: str | Path | None = None,
                 config: ClipConfig | None = None) -> None:
        self.config = config if config is not None else ClipConfig.from_env()
        if self.config.unknown_keys:
            log.warning("unknown CLIP_* settings ignored: %s", ", ".join(self.config.unknown_keys))
        chosen = model_dir if model_dir is not None else self.config.model_dir
        self._model_dir = Path(chosen) if chosen is not None else None
        self._load_lock = threading.Lock()
        self._model: VisualModel | None = None
        self._load_error: ClipError | None = None
        self._cache = EmbeddingCache(self.config.embed_cache_size)
        self._runner = DeadlineRunner()
        self._pipeline = FramePipeline(self.config, self._runner, self._cache)
        self._text_lock = threading.Lock()
        self._text: tuple[VisualModel, TextTower | ClipError] | None = None

    # ------------------------------------------------------------------ loading

    def load(self) -> ClipEmbedder:
        """Load the model now (otherwise it loads on first use); raises ClipError on failure.

        A failed load is remembered: later calls raise the same error without re-reading a
        broken artifact for every frame. :meth:`reload` tries again.
        """
        self._current()
        return self

    def _current(self) -> VisualModel:
        """The loaded model (loading it if needed); what one call uses from start to end."""
        model = self._model
        if model is not None:
            return model
        with self._load_lock:
            if self._model is not None:
                return self._model
            if self._load_error is not None:
                raise self._load_error
            cfg = self.config
            log.info("Loading CLIP model: %s (pretrained=%s, device=%s)",
                     cfg.model_name, cfg.pretrained, cfg.device)
            try:
                model = load_visual_model(cfg, self._model_dir)
            except ClipError as exc:
                self._load_error = exc
                log.error("Failed to load CLIP model: %s", exc)
                raise
            except Exception as exc:  # an unexpected failure must not be retried per frame
                self._load_error = ArtifactError(f"cannot load the model: {exc}")
                log.error("Failed to load CLIP model: %s", exc)
                raise self._load_error from exc
            self._cache.clear()  # vectors of another model must never be served
            self._model = model
        self._log_loaded(model)
        return model

    def _log_loaded(self, model: VisualModel) -> None:
        info, m = model.session_info, model.manifest
        log.info("CLIP model loaded successfully: %s (embed_dim=%d, device=%s, load_time=%.1fms, "
                 "cache_dir=%s)", m.model.name, m.model.embed_dim, info.device,
                 model.load_time_ms, self.config.cache_dir)
        log.info("CLIP runtime: providers=%s, intra_op_threads=%d, memory_arena=%s, "
                 "precision=%s, artifact=%s", ",".join(info.providers), info.intra_op_threads,
                 info.memory_arena, self.config.precision, model.artifact_dir)
        if m.model.random_init:
            log.warning("!!! CLIP artifact %s is a RANDOM INITIALISATION (seed %s): its "
                        "embeddings carry no visual meaning. Export real weights for "
                        "production (make export-model PRETRAINED=openai).",
                        model.artifact_dir, m.model.seed)

    def reload(self) -> ClipEmbedder:
        """Forget a failed (or successful) load and load again."""
        with self._load_lock:
            self._model = None
            self._load_error = None
        return self.load()

    def close(self) -> None:
        """Release the model. Calls in flight finish with it; a later call loads it again."""
        with self._load_lock:
            self._model = None
            self._load_error = None
            self._cache.clear()
        with self._text_lock:
            self._text = None

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def manifest(self) -> Manifest:
        """The loaded artifact's manifest (loads the model if needed)."""
        return self._current().manifest

    @property
    def embed_dim(self) -> int:
        return self._current().embed_dim

    @property
    def artifact_id(self) -> str:
        """The loaded artifact's identity (see :attr:`Manifest.artifact_id`)."""
        return self._current().manifest.artifact_id

    @property
    def session_info(self) -> SessionInfo:
        return self._current().session_info

    @property
    def artifact_dir(self) -> Path:
        return self._current().artifact_dir

    @property
    def load_time_ms(self) -> float | None:
        model = self._model
        return model.load_time_ms if model is not None else None

    @property
    def active_jobs(self) -> int:
        """Job threads still running (a timed-out job stops within moments)."""
        return self._runner.live_jobs

    @property
    def cache_stats(self) -> dict[str, int]:
        return {"hits": self._cache.hits, "misses": self._cache.misses,
                "capacity": self._cache.capacity}

    def _identity(self) -> ModelIdentity:
        """What made (or would have made) a vector, even when no model could be loaded."""
        model = self._model
        if model is not None:
            return model.identity
        cfg = self.config
        return ModelIdentity(model_name=cfg.model_name, pretrained=cfg.pretrained,
                             embed_dim=None, device=cfg.device, normalized=cfg.normalize)

    # ------------------------------------------------------------------ strict path

    def preprocess(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Exactly what the model sees: float32 [N, 3, S, S] (raises ImageError)."""
        return self._pipeline.pixels(self._current(), as_sequence(images, "preprocess"))

    def embed_images(self, images: Sequence[ImageSource],
                     batch_size: int | None = None) -> np.ndarray:
        """Embed every image; float32 [N, D]. Raises ClipError for bad input or a bad model."""
        images = as_sequence(images, "embed_images")
        batch = self.config.batch_size if batch_size is None else batch_size
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch!r}")
        model = self._current()
        out = np.empty((len(images), model.embed_dim), dtype=np.float32)
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            out[start:start + len(chunk)] = model.run(self._pipeline.pixels(model, chunk))
        return check_vectors(out, "image")

    # ------------------------------------------------------------------ worker path

    def embed_frame(self, image: ImageSource, *, frame_path: str | None = None,
                    frame_quality: float | dict | None = None,
                    scene: str | int | None = None) -> EmbeddingResult:
        """Embed one frame for the worker. Never raises.

        The CLIP_TIMEOUT_S budget covers decode, preprocessing and inference (the one-off
        model load is not counted); at the deadline the work is stopped and the frame gets
        ``error="Timeout after <T>s"``. A bad argument (a ``frame_quality`` that is not a
        finite number or a JSON dict) fails the frame with the reason in ``error``.
        """
        prefix = f"Scene {scene}: " if scene is not None else ""
        log.info("%sGenerating CLIP embedding from best frame", prefix)
        result = self.embed_frames([image], frame_paths=[frame_path],
                                   frame_qualities=[frame_quality])[0]
        if result.ok:
            assert result.embedding is not None
            log.info("%sCLIP embedding created (dim=%d, time=%.1fms)", prefix,
                     result.embedding.shape[0], result.metadata["inference_time_ms"])
        return result

    def embed_frames(self, images: Sequence[ImageSource],
                     frame_paths: Sequence[str | None] | None = None,
                     frame_qualities: Sequence[float | dict | None] | None = None
                     ) -> list[EmbeddingResult]:
        """Batched worker path: one result per frame, in order, failures isolated per frame.

        Frames from many scenes can go through one call: they share model runs of up to
        CLIP_BATCH_SIZE frames, and each keeps its own deadline and its own error. Never
        raises; a call whose arguments do not fit together (``frame_paths`` of another
        length) fails every frame with the reason.
        """
        try:
            items = self._frames(images, frame_paths, frame_qualities)
        except InvalidArgument as exc:
            count = len(images) if isinstance(images, Sequence) and not isinstance(
                images, (str, bytes)) else 1
            return [failure(self._identity(), frame_path=None, error=f"Invalid call: {exc}")
                    for _ in range(count)]
        frames = [f for f in items if isinstance(f, Frame)]
        if not frames:
            return items  # type: ignore[return-value]
        try:
            model = self._current()
        except ClipError as exc:
            embedded = [failure(self._identity(), frame_path=f.path,
                                error=f"Model load failed: {exc}") for f in frames]
        else:
            try:
                embedded = self._pipeline.embed(model, frames)
            except Exception as exc:  # a bug must cost these frames, never the worker
                log.exception("CLIP pipeline failed")
                embedded = [failure(model.identity, frame_path=f.path,
                                    error=f"{type(exc).__name__}: {exc}") for f in frames]
        done = iter(embedded)
        return [next(done) if isinstance(item, Frame) else item for item in items]

    def _frames(self, images: Sequence[ImageSource],
                frame_paths: Sequence[str | None] | None,
                frame_qualities: Sequence[float | dict | None] | None
                ) -> list[Frame | EmbeddingResult]:
        """Validate the call; a frame with a bad argument becomes its failure result."""
        images = as_sequence(images, "embed_frames", error=InvalidArgument)
        n = len(images)
        paths: list[str | Path | None] = [None] * n if frame_paths is None else list(frame_paths)
        qualities = [None] * n if frame_qualities is None else list(frame_qualities)
        if len(paths) != n or len(qualities) != n:
            raise InvalidArgument(f"{n} images with {len(paths)} frame_paths and "
                                  f"{len(qualities)} frame_qualities")
        items: list[Frame | EmbeddingResult] = []
        for image, path, quality in zip(images, paths, qualities, strict=True):
            if path is None and isinstance(image, (str, Path)):
                path = image
            try:
                stored_path = storable_path(path)
            except InvalidArgument as exc:
                items.append(failure(self._identity(), frame_path=None,
                                     error=f"Invalid argument: {exc}"))
                continue
            try:
                items.append(Frame(image, stored_path, quality_field(quality)))
            except InvalidArgument as exc:
                items.append(failure(self._identity(), frame_path=stored_path,
                                     error=f"Invalid argument: {exc}"))
        return items

    def embed_scene(self, frames: Sequence[ImageSource | tuple[ImageSource, float]], *,
                    top_k: int = 3, frame_path: str | None = None) -> EmbeddingResult:
        """Multi-frame pooling: mean of the best ``top_k`` frames' embeddings, re-normalised.

        ``frames`` are images in best-first order, or ``(image, quality_score)`` pairs (the
        best ``top_k`` by score are used). Frames that fail are skipped; the scene fails
        only if all of them do. Never raises.
        """
        return self.embed_scenes([frames], top_k=top_k, frame_paths=[frame_path])[0]

    def embed_scenes(self, scenes: Sequence[Sequence[ImageSource | tuple[ImageSource, float]]],
                     *, top_k: int = 3,
                     frame_paths: Sequence[str | None] | None = None
                     ) -> list[EmbeddingResult]:
        """:meth:`embed_scene` for every scene of a video at once (call it once per video).

        The chosen frames of all scenes go through one :meth:`embed_frames` call, so they
        share batched model runs (batching pays most on CPUs with fast INT8 GEMMs), while
        each frame keeps its own deadline and each scene its own result. Never raises.
        """
        try:
            scene_list = as_sequence(scenes, "embed_scenes", error=InvalidArgument)
            paths = [None] * len(scene_list) if frame_paths is None else list(frame_paths)
            if len(paths) != len(scene_list):
                raise InvalidArgument(f"{len(scene_list)} scenes with {len(paths)} frame_paths")
        except InvalidArgument as exc:
            return [failure(self._identity(), frame_path=None, error=f"Invalid call: {exc}")]
        plans: list[tuple[str | None, list | None, str | None]] = []
        for frames, path in zip(scene_list, paths, strict=True):
            try:
                plans.append((storable_path(path), best_frames(frames, top_k), None))
            except InvalidArgument as exc:
                plans.append((None, None, f"Invalid argument: {exc}"))
        images = [img for _, chosen, _ in plans for img, _ in (chosen or [])]
        results = iter(self.embed_frames(images))
        return [pool_scene(self._identity(), path, chosen, [next(results) for _ in chosen],
                           normalize=self.config.normalize)
                if chosen is not None else failure(self._identity(), frame_path=None,
                                                   error=error or "")
                for path, chosen, error in plans]

    # ------------------------------------------------------------------ text (text tower)
    # Thin delegations to heimdex_clip.text.TextTower, loaded on first text call from the
    # same artifact as the image tower (its vectors are comparable with the image vectors).

    def _text_tower(self) -> TextTower:
        """The text tower of the loaded artifact; TextError if it has none. A failed load is
        remembered for that model (:meth:`reload` tries again)."""
        model = self._current()
        loaded = self._text
        if loaded is None or loaded[0] is not model:
            with self._text_lock:
                if self._text is None or self._text[0] is not model:
                    try:
                        tower: TextTower | ClipError = TextTower(
                            model.artifact_dir, model.manifest, self.config,
                            cache_size=self.config.embed_cache_size, pinned=model.pinned)
                    except ClipError as exc:
                        tower = exc
                    self._text = (model, tower)
                loaded = self._text
        if isinstance(loaded[1], ClipError):
            raise loaded[1]
        return loaded[1]

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """open_clip.tokenize's token ids, int64 [N, 77], torch-free; raises TextError."""
        return self._text_tower().tokenize(texts)

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embed every text, float32 [N, D], comparable with the image vectors. Raises
        ClipError (TextError for a bad text or an artifact without text tower)."""
        batch = self.config.batch_size if batch_size is None else batch_size
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch!r}")
        return self._text_tower().embed(texts, batch_size=batch)

    def embed_text(self, text: str) -> EmbeddingResult:
        """Embed one query text for a worker or a search endpoint. Never raises.

        Same rules as :meth:`embed_frame`: CLIP_TIMEOUT_S covers tokenizing and inference
        (not the one-off load), a failure gives ``embedding=None`` and the reason in the
        metadata (``frame_path`` and ``frame_quality`` are null). Repeated texts come from
        a small LRU (CLIP_EMBED_CACHE_SIZE).
        """
        started = time.perf_counter()
        try:
            tower = self._text_tower()
        except ClipError as exc:
            return failure(self._identity(), frame_path=None, error=f"Model load failed: {exc}")
        except Exception as exc:  # a bug must cost this query, never the worker
            return failure(self._identity(), frame_path=None,
                           error=f"Model load failed: {type(exc).__name__}: {exc}")
        timeout = self.config.timeout_s
        try:
            vector = self._runner.run(lambda job: tower.embed_one(text, job.run_options),
                                      timeout)
        except JobTimeout:
            log.warning("CLIP text embedding failed: Timeout after %ss", timeout)
            return failure(self._identity(), frame_path=None, error=f"Timeout after {timeout}s")
        except Exception as exc:  # TextError, an ONNX Runtime failure, MemoryError...
            log.error("CLIP text embedding failed: %s", exc)
            return failure(self._identity(), frame_path=None,
                           error=f"{type(exc).__name__}: {exc}")
        return success(self._identity(), vector, frame_path=None, frame_quality=None,
                       time_ms=(time.perf_counter() - started) * 1000)

    @property
    def has_text_tower(self) -> bool:
        """Whether the loaded artifact ships a text tower (loads the model if needed)."""
        return has_text_tower(self.manifest)


_instance: ClipEmbedder | None = None
_instance_lock = threading.Lock()


def get_embedder(config: ClipConfig | None = None) -> ClipEmbedder | None:
    """The process-wide embedder, created on first call; None when CLIP_ENABLED is false.

    Thread-safe; the model itself loads lazily on the first frame. Invalid CLIP_* settings
    raise ConfigError here, at start-up, and so does a config that differs from the one the
    existing embedder was made with (call :func:`reset_embedder` first to switch).
    """
    global _instance
    cfg = config if config is not None else ClipConfig.from_env()
    if not cfg.enabled:
        return None
    with _instance_lock:
        if _instance is None:
            _instance = ClipEmbedder(config=cfg)
        elif _instance.config != cfg:
            raise ConfigError("the process-wide CLIP embedder already exists with another "
                              "configuration; call reset_embedder() before switching")
        return _instance


def reset_embedder() -> None:
    """Forget the process-wide instance (tests, or after changing the environment).

    The old instance is not closed: threads that still hold it keep working with it.
    """
    global _instance
    with _instance_lock:
        _instance = None
