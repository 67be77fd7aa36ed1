"""The worker API: calls that never raise, whatever they are given.

A video-indexing worker must never stop on one bad frame, one slow frame or a missing
model. Every call here returns :class:`~heimdex_clip.metadata.EmbeddingResult` objects: a
vector, or ``embedding=None`` with the reason in ``metadata["error"]``, within CLIP_TIMEOUT_S
per frame. Reach it as ``ClipEmbedder(...).worker`` (the embedder's ``embed_frame(s)``,
``embed_scene(s)`` and ``embed_text`` delegate here); the strict calls, which raise
:class:`~heimdex_clip.errors.ClipError`, are :class:`~heimdex_clip.embedder.ClipEmbedder`'s own.

The model loads on the first call if :meth:`ClipEmbedder.load` was not called; a load that
fails fails each frame with ``"Model load failed: ..."`` and is not retried per frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from .config import ClipConfig
from .errors import ClipError
from .frames import Frame, FramePipeline
from .images import ImageSource
from .jobs import DeadlineRunner, JobTimeout
from .loading import ModelSlot
from .metadata import (
    EmbeddingResult,
    InvalidArgument,
    failure,
    quality_field,
    storable_path,
    success,
)
from .scenes import as_sequence, best_frames, pool_scene

log = logging.getLogger("heimdex_clip")

ScenePart = ImageSource | tuple[ImageSource, float]


class WorkerEmbedder:
    """Never-raising embedding calls over a :class:`~heimdex_clip.loading.ModelSlot`."""

    def __init__(
        self, slot: ModelSlot, pipeline: FramePipeline, runner: DeadlineRunner, config: ClipConfig
    ) -> None:
        self._slot = slot
        self._pipeline = pipeline
        self._runner = runner
        self.config = config

    def embed_frame(
        self,
        image: ImageSource,
        *,
        frame_path: str | None = None,
        frame_quality: float | dict | None = None,
        scene: str | int | None = None,
    ) -> EmbeddingResult:
        """Embed one frame. Never raises.

        The CLIP_TIMEOUT_S budget covers decode, preprocessing and inference (the one-off
        model load is not counted); at the deadline the work is stopped and the frame gets
        ``error="Timeout after <T>s"``. A bad argument (a ``frame_quality`` that is not a
        finite number or a JSON dict) fails the frame with the reason in ``error``.
        """
        prefix = f"Scene {scene}: " if scene is not None else ""
        log.info("%sGenerating CLIP embedding from best frame", prefix)
        result = self.embed_frames(
            [image], frame_paths=[frame_path], frame_qualities=[frame_quality]
        )[0]
        if result.ok:
            assert result.embedding is not None
            log.info(
                "%sCLIP embedding created (dim=%d, time=%.1fms)",
                prefix,
                result.embedding.shape[0],
                result.metadata["inference_time_ms"],
            )
        return result

    def embed_frames(
        self,
        images: Sequence[ImageSource],
        frame_paths: Sequence[str | None] | None = None,
        frame_qualities: Sequence[float | dict | None] | None = None,
    ) -> list[EmbeddingResult]:
        """Batched: one result per frame, in order, failures isolated per frame.

        Frames from many scenes can go through one call: they share model runs of up to
        CLIP_BATCH_SIZE frames, and each keeps its own deadline and its own error. Never
        raises; a call whose arguments do not fit together (``frame_paths`` of another
        length) fails every frame with the reason.
        """
        identity = self._slot.identity
        try:
            items = self._frames(images, frame_paths, frame_qualities)
        except InvalidArgument as exc:
            count = (
                len(images)
                if isinstance(images, Sequence) and not isinstance(images, (str, bytes))
                else 1
            )
            return [
                failure(identity(), frame_path=None, error=f"Invalid call: {exc}")
                for _ in range(count)
            ]
        frames = [f for f in items if isinstance(f, Frame)]
        if not frames:
            return items  # type: ignore[return-value]
        try:
            model = self._slot.load()
        except ClipError as exc:
            embedded = [
                failure(identity(), frame_path=f.path, error=f"Model load failed: {exc}")
                for f in frames
            ]
        else:
            try:
                embedded = self._pipeline.embed(model, frames)
            except Exception as exc:  # a bug must cost these frames, never the worker
                log.exception("CLIP pipeline failed")
                embedded = [
                    failure(model.identity, frame_path=f.path, error=f"{type(exc).__name__}: {exc}")
                    for f in frames
                ]
        done = iter(embedded)
        return [next(done) if isinstance(item, Frame) else item for item in items]

    def _frames(
        self,
        images: Sequence[ImageSource],
        frame_paths: Sequence[str | None] | None,
        frame_qualities: Sequence[float | dict | None] | None,
    ) -> list[Frame | EmbeddingResult]:
        """Validate the call; a frame with a bad argument becomes its failure result."""
        images = as_sequence(images, "embed_frames", error=InvalidArgument)
        n = len(images)
        paths = [None] * n if frame_paths is None else list(frame_paths)
        qualities = [None] * n if frame_qualities is None else list(frame_qualities)
        if len(paths) != n or len(qualities) != n:
            raise InvalidArgument(
                f"{n} images with {len(paths)} frame_paths and {len(qualities)} frame_qualities"
            )
        items: list[Frame | EmbeddingResult] = []
        for image, given, quality in zip(images, paths, qualities, strict=True):
            path = image if given is None and isinstance(image, (str, Path)) else given
            try:
                stored_path = storable_path(path)
            except InvalidArgument as exc:
                items.append(
                    failure(
                        self._slot.identity(), frame_path=None, error=f"Invalid argument: {exc}"
                    )
                )
                continue
            try:
                items.append(Frame(image, stored_path, quality_field(quality)))
            except InvalidArgument as exc:
                items.append(
                    failure(
                        self._slot.identity(),
                        frame_path=stored_path,
                        error=f"Invalid argument: {exc}",
                    )
                )
        return items

    def embed_scene(
        self, frames: Sequence[ScenePart], *, top_k: int = 3, frame_path: str | None = None
    ) -> EmbeddingResult:
        """Multi-frame pooling: mean of the best ``top_k`` frames' embeddings, re-normalised.

        ``frames`` are images in best-first order, or ``(image, quality_score)`` pairs (the
        best ``top_k`` by score are used). Frames that fail are skipped; the scene fails
        only if all of them do. Never raises.
        """
        return self.embed_scenes([frames], top_k=top_k, frame_paths=[frame_path])[0]

    def embed_scenes(
        self,
        scenes: Sequence[Sequence[ScenePart]],
        *,
        top_k: int = 3,
        frame_paths: Sequence[str | None] | None = None,
    ) -> list[EmbeddingResult]:
        """:meth:`embed_scene` for every scene of a video at once (call it once per video).

        The chosen frames of all scenes go through one :meth:`embed_frames` call, so they
        share batched model runs (batching pays most on CPUs with fast INT8 GEMMs), while
        each frame keeps its own deadline and each scene its own result. Never raises.
        """
        identity = self._slot.identity
        try:
            scene_list = as_sequence(scenes, "embed_scenes", error=InvalidArgument)
            paths = [None] * len(scene_list) if frame_paths is None else list(frame_paths)
            if len(paths) != len(scene_list):
                raise InvalidArgument(f"{len(scene_list)} scenes with {len(paths)} frame_paths")
        except InvalidArgument as exc:
            return [failure(identity(), frame_path=None, error=f"Invalid call: {exc}")]
        plans: list[tuple[str | None, list | None, str | None]] = []
        for frames, path in zip(scene_list, paths, strict=True):
            try:
                plans.append((storable_path(path), best_frames(frames, top_k), None))
            except InvalidArgument as exc:
                plans.append((None, None, f"Invalid argument: {exc}"))
        images = [img for _, chosen, _ in plans for img, _ in (chosen or [])]
        results = iter(self.embed_frames(images))
        return [
            pool_scene(
                identity(),
                path,
                chosen,
                [next(results) for _ in chosen],
                normalize=self.config.normalize,
            )
            if chosen is not None
            else failure(identity(), frame_path=None, error=error or "")
            for path, chosen, error in plans
        ]

    def embed_text(self, text: str) -> EmbeddingResult:
        """Embed one query text for a worker or a search endpoint. Never raises.

        Same rules as :meth:`embed_frame`: CLIP_TIMEOUT_S covers tokenizing and inference
        (not the one-off load), a failure gives ``embedding=None`` and the reason in the
        metadata (``frame_path`` and ``frame_quality`` are null). Repeated texts come from
        a small LRU (CLIP_EMBED_CACHE_SIZE).
        """
        identity = self._slot.identity
        started = time.perf_counter()
        try:
            tower = self._slot.text_tower()
        except ClipError as exc:
            return failure(identity(), frame_path=None, error=f"Model load failed: {exc}")
        except Exception as exc:  # a bug must cost this query, never the worker
            return failure(
                identity(), frame_path=None, error=f"Model load failed: {type(exc).__name__}: {exc}"
            )
        timeout = self.config.timeout_s
        try:
            vector = self._runner.run(lambda job: tower.embed_one(text, job.run_options), timeout)
        except JobTimeout:
            log.warning("CLIP text embedding failed: Timeout after %ss", timeout)
            return failure(identity(), frame_path=None, error=f"Timeout after {timeout}s")
        except Exception as exc:  # TextError, an ONNX Runtime failure, MemoryError...
            log.error("CLIP text embedding failed: %s", exc)
            return failure(identity(), frame_path=None, error=f"{type(exc).__name__}: {exc}")
        return success(
            identity(),
            vector,
            frame_path=None,
            frame_quality=None,
            time_ms=(time.perf_counter() - started) * 1000,
        )
