"""The one frame pipeline: decode -> preprocess -> (cache) -> batched inference.

Single and batched worker calls go through :meth:`FramePipeline.embed` and differ only in
how many frames they pass. Every frame gets the same rules:

* a budget of CLIP_TIMEOUT_S for its own work: its decode and preprocessing (a job of its
  own) and its share of the batched model run. The run must finish within the remaining
  budgets of the frames in it combined; otherwise it is terminated and each of its frames
  fails with ``Timeout after <CLIP_TIMEOUT_S>s``;
* every input is size-checked before work that scales with it (file bytes, header pixels,
  the resize's output, the format), so abandoned work ends soon;
* any error (including MemoryError) fails that frame alone, with the reason in its
  metadata; only a fatal signal (KeyboardInterrupt, SystemExit) leaves the pipeline;
* identical model inputs are embedded once (an LRU keyed by a digest of the input tensor,
  so a file, its bytes, its PIL image and its numpy array share one entry).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import ClipConfig
from .images import ImageSource, load_image
from .jobs import DeadlineRunner, Job, JobTimeout
from .metadata import EmbeddingResult, failure, success
from .model import VisualModel

log = logging.getLogger("heimdex_clip")


class EmbeddingCache:
    """A small thread-safe LRU of embeddings keyed by the model input's digest."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @staticmethod
    def key(pixels: np.ndarray) -> bytes:
        return hashlib.blake2b(pixels.data, digest_size=20).digest()

    def get(self, key: bytes | None) -> np.ndarray | None:
        if key is None or not self.enabled:
            return None
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value.copy()

    def put(self, key: bytes | None, value: np.ndarray) -> None:
        if key is None or not self.enabled:
            return
        with self._lock:
            self._items[key] = value.copy()
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(frozen=True)
class Frame:
    """One worker-path frame: the image and what its metadata says about it."""

    source: ImageSource
    path: str | None = None
    quality: dict | None = None


@dataclass(frozen=True)
class _Prepared:
    index: int
    pixels: np.ndarray
    key: bytes | None
    prep_s: float


class FramePipeline:
    """Frames in, :class:`EmbeddingResult` out, for one loaded model at a time."""

    def __init__(self, config: ClipConfig, runner: DeadlineRunner, cache: EmbeddingCache) -> None:
        self.config = config
        self.runner = runner
        self.cache = cache

    # ------------------------------------------------------------------ pixels

    def decode(self, model: VisualModel, source: ImageSource) -> Image.Image:
        """Decode with every limit of the config (raises ImageError)."""
        cfg, pre = self.config, model.preprocessor
        draft = max(cfg.max_image_size, pre.size) if cfg.fast_decode else None
        return load_image(
            source,
            max_pixels=cfg.max_image_pixels,
            min_side_for_draft=draft,
            max_bytes=cfg.max_image_bytes,
            formats=cfg.image_formats,
            check_size=lambda w, h, label: pre.check_resize_cost(
                w, h, label, cfg.max_resize_pixels
            ),
        )

    def pixels(
        self, model: VisualModel, sources: Sequence[ImageSource], job: Job | None = None
    ) -> np.ndarray:
        """float32 [N, 3, S, S], exactly what the model sees (raises ImageError)."""
        images = []
        for source in sources:
            images.append(self.decode(model, source))
            if job is not None:
                job.check()
        return model.preprocessor(images, fast=self.config.fast_decode)

    # ------------------------------------------------------------------ worker path

    def embed(self, model: VisualModel, frames: Sequence[Frame]) -> list[EmbeddingResult]:
        """One result per frame, in order; never raises for a bad frame or a failed run."""
        results: list[EmbeddingResult | None] = [None] * len(frames)
        batch: list[_Prepared] = []
        for index, frame in enumerate(frames):
            prepared = self._prepare(model, index, frame, results)
            if prepared is not None:
                batch.append(prepared)
            if len(batch) >= self.config.batch_size:
                self._run(model, batch, frames, results)
                batch = []
        if batch:
            self._run(model, batch, frames, results)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _prepare(
        self, model: VisualModel, index: int, frame: Frame, results: list[EmbeddingResult | None]
    ) -> _Prepared | None:
        """Decode and preprocess one frame in a job of its own; a cache hit is final."""
        started = time.perf_counter()
        try:
            pixels = self.runner.run(
                lambda job: self.pixels(model, [frame.source], job), self.config.timeout_s
            )
        except JobTimeout:
            results[index] = self._failed(model, frame, self._timeout_message(), warn=True)
            return None
        except Exception as exc:  # ImageError, MemoryError, a Pillow bug...: this frame only
            results[index] = self._failed(model, frame, f"{type(exc).__name__}: {exc}")
            return None
        prep_s = time.perf_counter() - started
        key = EmbeddingCache.key(pixels) if self.cache.enabled else None
        cached = self.cache.get(key)
        if cached is not None:
            results[index] = self._succeeded(model, frame, cached, prep_s)
            return None
        return _Prepared(index, pixels, key, prep_s)

    def _run(
        self,
        model: VisualModel,
        batch: list[_Prepared],
        frames: Sequence[Frame],
        results: list[EmbeddingResult | None],
    ) -> None:
        """One model run for the prepared frames, within their remaining budgets."""
        timeout = self.config.timeout_s
        budget = sum(max(0.0, timeout - p.prep_s) for p in batch)
        pixels = np.concatenate([p.pixels for p in batch])
        started = time.perf_counter()
        try:
            vectors = self.runner.run(lambda job: model.run(pixels, job.run_options), budget)
        except JobTimeout:
            for p in batch:
                results[p.index] = self._failed(
                    model, frames[p.index], self._timeout_message(), warn=True
                )
            return
        except Exception as exc:  # an ONNX Runtime failure, MemoryError...
            for p in batch:
                results[p.index] = self._failed(
                    model, frames[p.index], f"{type(exc).__name__}: {exc}"
                )
            return
        share_s = (time.perf_counter() - started) / len(batch)
        for p, vector in zip(batch, vectors, strict=True):
            self.cache.put(p.key, vector)
            results[p.index] = self._succeeded(model, frames[p.index], vector, p.prep_s + share_s)

    def _timeout_message(self) -> str:
        return f"Timeout after {self.config.timeout_s}s"

    def _succeeded(
        self, model: VisualModel, frame: Frame, vector: np.ndarray, seconds: float
    ) -> EmbeddingResult:
        time_ms = seconds * 1000
        # CLIP_DEBUG_LOG shows this line at INFO; no logger's level is changed.
        log.log(
            logging.INFO if self.config.debug_log else logging.DEBUG,
            "CLIP embedding created: %s, dim=%d, time=%.1fms, norm=%.4f",
            frame.path,
            vector.shape[0],
            time_ms,
            float(np.linalg.norm(vector)),
        )
        return success(
            model.identity,
            vector,
            frame_path=frame.path,
            frame_quality=frame.quality,
            time_ms=time_ms,
        )

    def _failed(
        self, model: VisualModel, frame: Frame, error: str, warn: bool = False
    ) -> EmbeddingResult:
        (log.warning if warn else log.error)(
            "CLIP embedding failed: %s (frame=%s)", error, frame.path
        )
        return failure(model.identity, frame_path=frame.path, error=error)
