"""ClipEmbedder: frames in, CLIP vectors out, on the CPU, without torch.

Two faces:

* the worker path (:meth:`ClipEmbedder.embed_frame`, :meth:`~ClipEmbedder.embed_frames`,
  :meth:`~ClipEmbedder.embed_scene`) never raises for a bad frame: a failure gives
  ``embedding=None`` and the error in the metadata, within CLIP_TIMEOUT_S;
* the strict path (:meth:`~ClipEmbedder.embed_images`, :meth:`~ClipEmbedder.preprocess`)
  raises a clear :class:`~heimdex_clip.errors.ClipError` for bad input.

The model loads lazily, once, under a lock, on first use (or on :meth:`~ClipEmbedder.load`).
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .artifact import (
    Manifest,
    load_manifest,
    resolve_artifact_dir,
    sha256_file,
)
from .config import DEFAULT_MODEL_DIRS, ClipConfig
from .errors import ArtifactError, ClipError, ImageError
from .images import ImageSource, content_hash, load_image
from .preprocess import Preprocessor
from .session import SessionInfo, create_session

log = logging.getLogger("heimdex_clip")

INPUT_NAME = "pixel_values"
NORMALIZED_OUTPUT = "image_embeds"
RAW_OUTPUT = "image_features"
#: Worker threads that run per-frame jobs so a caller can stop waiting at the deadline.
JOB_THREADS = 4


@dataclass
class EmbeddingResult:
    """One frame's (or scene's) embedding and the metadata stored beside it.

    ``metadata`` has exactly the design document's fields: model_name, pretrained,
    embed_dim, normalized, device, frame_path, frame_quality, inference_time_ms,
    created_at, error.
    """

    embedding: np.ndarray | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.embedding is not None

    @property
    def error(self) -> str | None:
        return self.metadata.get("error")


class _Cancelled(Exception):
    """The caller stopped waiting; the job abandons its remaining stages."""


class _Job:
    """Cancellation state of one embedding job, shared with the thread running it."""

    def __init__(self) -> None:
        self.run_options = ort.RunOptions()
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise _Cancelled

    def cancel(self) -> None:
        with self._lock:
            self.cancelled.set()
            # Stops an ONNX Runtime run already under way; the session stays usable.
            self.run_options.terminate = True


class _EmbeddingCache:
    """A small thread-safe LRU of embeddings keyed by the frame's content hash."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str | None) -> np.ndarray | None:
        if key is None or self.capacity == 0:
            return None
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value.copy()

    def put(self, key: str | None, value: np.ndarray) -> None:
        if key is None or self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value.copy()
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def _quality_field(frame_quality: float | dict | None) -> dict | None:
    if frame_quality is None or isinstance(frame_quality, dict):
        return frame_quality
    return {"quality_score": float(frame_quality)}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


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
        if self.config.debug_log:
            log.setLevel(logging.DEBUG)
        if self.config.unknown_keys:
            log.warning("unknown CLIP_* settings ignored: %s", ", ".join(self.config.unknown_keys))
        chosen = model_dir if model_dir is not None else self.config.model_dir
        self._model_dir = Path(chosen) if chosen is not None else None
        self._load_lock = threading.Lock()
        self._session: ort.InferenceSession | None = None
        self._manifest: Manifest | None = None
        self._preprocessor: Preprocessor | None = None
        self._session_info: SessionInfo | None = None
        self._artifact_dir: Path | None = None
        self._load_error: ClipError | None = None
        self._output_name = NORMALIZED_OUTPUT if self.config.normalize else RAW_OUTPUT
        self._cache = _EmbeddingCache(self.config.embed_cache_size)
        self._jobs = cf.ThreadPoolExecutor(max_workers=JOB_THREADS,
                                           thread_name_prefix="heimdex-clip")
        self._active = 0
        self._active_lock = threading.Lock()
        self.load_time_ms: float | None = None

    # ------------------------------------------------------------------ loading

    def load(self) -> ClipEmbedder:
        """Load the model now (otherwise it loads on first use); raises ClipError on failure.

        A failed load is remembered: later calls raise the same error without re-reading a
        broken artifact for every frame. :meth:`reload` tries again.
        """
        if self._session is not None:
            return self
        with self._load_lock:
            if self._session is not None:
                return self
            if self._load_error is not None:
                raise self._load_error
            try:
                self._load_locked()
            except ClipError as exc:
                self._load_error = exc
                log.error("Failed to load CLIP model: %s", exc)
                raise
            except Exception as exc:  # ONNX Runtime raises its own types for bad graphs
                self._load_error = ArtifactError(f"cannot load the model: {exc}")
                log.error("Failed to load CLIP model: %s", exc)
                raise self._load_error from exc
        return self

    def reload(self) -> ClipEmbedder:
        """Forget a failed (or successful) load and load again."""
        with self._load_lock:
            self._session = None
            self._load_error = None
        return self.load()

    def _load_locked(self) -> None:
        cfg = self.config
        log.info("Loading CLIP model: %s (pretrained=%s, device=%s)",
                 cfg.model_name, cfg.pretrained, cfg.device)
        started = time.perf_counter()
        artifact_dir = resolve_artifact_dir(self._model_dir, cfg.model_name, cfg.pretrained,
                                            search=DEFAULT_MODEL_DIRS)
        manifest = load_manifest(artifact_dir)
        if manifest.model.name != cfg.model_name:
            log.warning("the artifact in %s holds %s, not CLIP_MODEL_NAME=%s; using the artifact",
                        artifact_dir, manifest.model.name, cfg.model_name)
        entry = manifest.file(f"visual.{cfg.precision}")
        path = artifact_dir / entry.path
        if not path.is_file():
            raise ArtifactError(f"artifact file {path} is missing")
        if path.stat().st_size != entry.bytes:
            raise ArtifactError(f"{path} has {path.stat().st_size} bytes, the manifest says "
                                f"{entry.bytes}: truncated or replaced; re-export the model")
        outputs = {t.name for t in entry.outputs}
        if self._output_name not in outputs:
            raise ArtifactError(f"{path} has no output {self._output_name!r} "
                                f"(outputs: {sorted(outputs)}); re-export the model")
        # Hash on one core while ONNX Runtime builds the session on another (cold start);
        # the session is used only if the hash matches.
        with cf.ThreadPoolExecutor(max_workers=1) as hasher:
            digest_future = hasher.submit(sha256_file, path)
            try:
                session, info = create_session(path, device=cfg.device,
                                               threads=cfg.cpu_threads,
                                               memory_arena=cfg.memory_arena)
                session_error = None
            except Exception as exc:  # reported below, after the (likelier) hash mismatch
                session_error = exc
            digest = digest_future.result()
        if digest != entry.sha256:
            raise ArtifactError(f"sha256 mismatch for {path}: expected {entry.sha256}, got "
                                f"{digest}; the file was modified or corrupted; re-export")
        if session_error is not None:
            raise session_error
        self._preprocessor = Preprocessor(manifest.preprocess)
        self._manifest, self._session_info, self._artifact_dir = manifest, info, artifact_dir
        self._session = session
        self.load_time_ms = (time.perf_counter() - started) * 1000
        log.info("CLIP model loaded successfully: %s (embed_dim=%d, device=%s, load_time=%.1fms, "
                 "cache_dir=%s)", manifest.model.name, manifest.model.embed_dim, info.device,
                 self.load_time_ms, cfg.cache_dir)
        log.info("CLIP runtime: providers=%s, intra_op_threads=%d, memory_arena=%s, "
                 "precision=%s, artifact=%s", ",".join(info.providers), info.intra_op_threads,
                 info.memory_arena, cfg.precision, artifact_dir)
        if manifest.model.random_init:
            log.warning("!!! CLIP artifact %s is a RANDOM INITIALISATION (seed %s): its "
                        "embeddings carry no visual meaning. Export real weights for "
                        "production (make export-model PRETRAINED=openai).",
                        artifact_dir, manifest.model.seed)

    @property
    def manifest(self) -> Manifest:
        """The loaded artifact's manifest (loads the model if needed)."""
        self.load()
        assert self._manifest is not None
        return self._manifest

    @property
    def embed_dim(self) -> int:
        return self.manifest.model.embed_dim

    @property
    def artifact_id(self) -> str:
        """The loaded artifact's identity (see :attr:`Manifest.artifact_id`)."""
        return self.manifest.artifact_id

    @property
    def session_info(self) -> SessionInfo:
        self.load()
        assert self._session_info is not None
        return self._session_info

    @property
    def artifact_dir(self) -> Path:
        self.load()
        assert self._artifact_dir is not None
        return self._artifact_dir

    @property
    def active_jobs(self) -> int:
        """Jobs still running in the background (a timed-out job stops within moments)."""
        return self._active

    def _submit(self, fn, *args) -> cf.Future:
        def tracked():
            with self._active_lock:
                self._active += 1
            try:
                return fn(*args)
            finally:
                with self._active_lock:
                    self._active -= 1
        return self._jobs.submit(tracked)

    @property
    def cache_stats(self) -> dict[str, int]:
        return {"hits": self._cache.hits, "misses": self._cache.misses,
                "capacity": self._cache.capacity}

    # ------------------------------------------------------------------ strict path

    def _draft_side(self) -> int | None:
        if not self.config.fast_decode:
            return None
        return max(self.config.max_image_size, self.manifest.preprocess.image_size)

    def _decode(self, source: ImageSource):
        return load_image(source, max_pixels=self.config.max_image_pixels,
                          min_side_for_draft=self._draft_side())

    def preprocess(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Exactly what the model sees: float32 [N, 3, S, S] (raises ImageError)."""
        self.load()
        assert self._preprocessor is not None
        return self._preprocessor([self._decode(img) for img in images])

    def _infer(self, pixels: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        self.load()
        assert self._session is not None
        out = self._session.run([self._output_name], {INPUT_NAME: pixels}, run_options)[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    def embed_images(self, images: Sequence[ImageSource],
                     batch_size: int | None = None) -> np.ndarray:
        """Embed every image; float32 [N, D]. Raises ClipError for bad input or a bad model."""
        if isinstance(images, (str, Path, bytes)) or not isinstance(images, Sequence):
            raise ImageError("embed_images takes a sequence of images")
        self.load()
        batch = batch_size or self.config.batch_size
        if batch < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch}")
        out = np.empty((len(images), self.embed_dim), dtype=np.float32)
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            out[start:start + len(chunk)] = self._infer(self.preprocess(chunk))
        return out

    # ------------------------------------------------------------------ worker path

    def _metadata(self, *, frame_path: str | None, frame_quality: Any, time_ms: float | None,
                  error: str | None) -> dict[str, Any]:
        manifest = self._manifest
        return {
            "model_name": manifest.model.name if manifest else self.config.model_name,
            "pretrained": manifest.model.pretrained if manifest else self.config.pretrained,
            "embed_dim": manifest.model.embed_dim if manifest else None,
            "normalized": self.config.normalize,
            "device": self._session_info.device if self._session_info else self.config.device,
            "frame_path": frame_path,
            # The design stores null quality and time for a failed frame.
            "frame_quality": None if error else _quality_field(frame_quality),
            "inference_time_ms": None if error else round(time_ms or 0.0, 1),
            "created_at": _now(),
            "error": error,
        }

    def _run_job(self, source: ImageSource, job: _Job) -> np.ndarray:
        key = content_hash(source) if self._cache.capacity else None
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        job.check()
        image = self._decode(source)
        job.check()
        assert self._preprocessor is not None
        pixels = self._preprocessor([image])
        job.check()
        vector = self._infer(pixels, job.run_options)[0]
        self._cache.put(key, vector)
        return vector

    def embed_frame(self, image: ImageSource, *, frame_path: str | None = None,
                    frame_quality: float | dict | None = None,
                    scene: str | int | None = None) -> EmbeddingResult:
        """Embed one frame for the worker. Never raises for a bad frame or a broken model.

        The CLIP_TIMEOUT_S budget covers decode, preprocessing and inference (the one-off
        model load is not counted); at the deadline the ONNX Runtime run is terminated, the
        remaining stages are skipped and the frame gets ``error="Timeout after <T>s"``.
        """
        if frame_path is None and isinstance(image, (str, Path)):
            frame_path = str(image)
        prefix = f"Scene {scene}: " if scene is not None else ""
        log.info("%sGenerating CLIP embedding from best frame", prefix)
        started = time.perf_counter()
        try:
            self.load()
        except ClipError as exc:
            return self._failure(prefix, frame_path, f"Model load failed: {exc}")
        timeout = self.config.timeout_s
        job = _Job()
        future = self._submit(self._run_job, image, job)
        try:
            vector = future.result(timeout=timeout)
        except cf.TimeoutError:
            job.cancel()
            return self._failure(prefix, frame_path, f"Timeout after {timeout}s", warn=True)
        except ClipError as exc:
            return self._failure(prefix, frame_path, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # ORT failures, MemoryError...: the pipeline must go on
            if job.cancelled.is_set():
                return self._failure(prefix, frame_path, f"Timeout after {timeout}s", warn=True)
            return self._failure(prefix, frame_path, f"{type(exc).__name__}: {exc}")
        elapsed_ms = (time.perf_counter() - started) * 1000
        norm = float(np.linalg.norm(vector))
        log.info("%sCLIP embedding created (dim=%d, time=%.1fms)", prefix, vector.shape[0],
                 elapsed_ms)
        log.debug("CLIP embedding created: %s, dim=%d, time=%.1fms, norm=%.4f",
                  frame_path, vector.shape[0], elapsed_ms, norm)
        return EmbeddingResult(vector, self._metadata(frame_path=frame_path,
                                                      frame_quality=frame_quality,
                                                      time_ms=elapsed_ms, error=None))

    def _failure(self, prefix: str, frame_path: str | None, error: str,
                 warn: bool = False) -> EmbeddingResult:
        (log.warning if warn else log.error)("%sCLIP embedding failed: %s (frame=%s)",
                                             prefix, error, frame_path)
        return EmbeddingResult(None, self._metadata(frame_path=frame_path, frame_quality=None,
                                                    time_ms=None, error=error))

    def embed_frames(self, images: Sequence[ImageSource],
                     frame_paths: Sequence[str | None] | None = None,
                     frame_qualities: Sequence[float | dict | None] | None = None
                     ) -> list[EmbeddingResult]:
        """Batched worker path: one result per frame, failures isolated per frame.

        Frames are decoded one by one (a bad frame fails alone), then run through the model
        in batches of CLIP_BATCH_SIZE with a budget of CLIP_TIMEOUT_S per frame.
        """
        n = len(images)
        paths = list(frame_paths) if frame_paths is not None else [
            str(i) if isinstance(i, (str, Path)) else None for i in images]
        qualities = list(frame_qualities) if frame_qualities is not None else [None] * n
        results: list[EmbeddingResult | None] = [None] * n
        try:
            self.load()
        except ClipError as exc:
            return [self._failure("", p, f"Model load failed: {exc}") for p in paths]
        pending: list[tuple[int, np.ndarray, float]] = []
        for i, source in enumerate(images):
            started = time.perf_counter()
            try:
                assert self._preprocessor is not None
                pixels = self._preprocessor([self._decode(source)])
                pending.append((i, pixels, (time.perf_counter() - started) * 1000))
            except ClipError as exc:
                results[i] = self._failure("", paths[i], f"{type(exc).__name__}: {exc}")
        batch = self.config.batch_size
        for start in range(0, len(pending), batch):
            chunk = pending[start:start + batch]
            self._embed_chunk(chunk, paths, qualities, results)
        return [r for r in results if r is not None]

    def _embed_chunk(self, chunk: list[tuple[int, np.ndarray, float]], paths: list,
                     qualities: list, results: list) -> None:
        timeout = self.config.timeout_s * len(chunk)
        job = _Job()
        started = time.perf_counter()
        pixels = np.concatenate([p for _, p, _ in chunk])
        future = self._submit(self._infer, pixels, job.run_options)
        try:
            vectors = future.result(timeout=timeout)
        except cf.TimeoutError:
            job.cancel()
            for i, _, _ in chunk:
                results[i] = self._failure("", paths[i], f"Timeout after {timeout}s", warn=True)
            return
        except Exception as exc:
            for i, _, _ in chunk:
                results[i] = self._failure("", paths[i], f"{type(exc).__name__}: {exc}")
            return
        per_frame_ms = (time.perf_counter() - started) * 1000 / len(chunk)
        for (i, _, decode_ms), vector in zip(chunk, vectors, strict=True):
            results[i] = EmbeddingResult(vector, self._metadata(
                frame_path=paths[i], frame_quality=qualities[i],
                time_ms=decode_ms + per_frame_ms, error=None))

    def embed_scene(self, frames: Sequence[ImageSource | tuple[ImageSource, float]], *,
                    top_k: int = 3, frame_path: str | None = None) -> EmbeddingResult:
        """Multi-frame pooling: mean of the best ``top_k`` frames' embeddings, re-normalised.

        ``frames`` are images in best-first order, or ``(image, quality_score)`` pairs (the
        best ``top_k`` by score are used). Frames that fail are skipped; the scene fails
        only if all of them do.
        """
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        scored = [f if isinstance(f, tuple) else (f, None) for f in frames]
        if scored and all(q is not None for _, q in scored):
            scored.sort(key=lambda f: f[1], reverse=True)
        chosen = scored[:top_k]
        started = time.perf_counter()
        results = self.embed_frames([img for img, _ in chosen])
        good = [(r.embedding, q) for r, (_, q) in zip(results, chosen, strict=True) if r.ok]
        if not good:
            errors = "; ".join(sorted({r.error or "" for r in results})) or "no frames"
            return self._failure("", frame_path, f"all {len(chosen)} frames failed: {errors}")
        pooled = np.mean([e for e, _ in good], axis=0)
        if self.config.normalize:
            pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
        scores = [q for _, q in good if q is not None]
        quality = {"quality_score": float(np.mean(scores)) if scores else None,
                   "frames_pooled": len(good)}
        elapsed_ms = (time.perf_counter() - started) * 1000
        return EmbeddingResult(pooled.astype(np.float32), self._metadata(
            frame_path=frame_path, frame_quality=quality, time_ms=elapsed_ms, error=None))

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release the session and the job threads (the embedder can load again later)."""
        self._jobs.shutdown(wait=False, cancel_futures=True)
        with self._load_lock:
            self._session = None
        self._jobs = cf.ThreadPoolExecutor(max_workers=JOB_THREADS,
                                           thread_name_prefix="heimdex-clip")


_instance: ClipEmbedder | None = None
_instance_lock = threading.Lock()


def get_embedder(config: ClipConfig | None = None) -> ClipEmbedder | None:
    """The process-wide embedder, created on first call; None when CLIP_ENABLED is false.

    Thread-safe; the model itself loads lazily on the first frame. Invalid CLIP_* settings
    raise ConfigError here, at start-up.
    """
    global _instance
    cfg = config if config is not None else ClipConfig.from_env()
    if not cfg.enabled:
        return None
    if _instance is None:
        with _instance_lock:
            if _instance is None:
                _instance = ClipEmbedder(config=cfg)
    return _instance


def reset_embedder() -> None:
    """Drop the process-wide instance (tests, or after changing the environment)."""
    global _instance
    with _instance_lock:
        if _instance is not None:
            _instance.close()
        _instance = None
