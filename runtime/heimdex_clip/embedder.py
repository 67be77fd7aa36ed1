"""ClipEmbedder: images and texts in, CLIP vectors out, on the CPU, without torch.

Two API styles, kept apart:

* **strict** (this class): :meth:`~ClipEmbedder.embed_images`, :meth:`~ClipEmbedder.embed_texts`,
  :meth:`~ClipEmbedder.preprocess`, :meth:`~ClipEmbedder.tokenize` return arrays and raise a
  clear :class:`~heimdex_clip.errors.ClipError` for bad input or a bad model;
* **worker** (:attr:`ClipEmbedder.worker`, a :class:`~heimdex_clip.worker_api.WorkerEmbedder`):
  ``embed_frame(s)``, ``embed_scene(s)``, ``embed_text`` never raise: a failure gives
  ``embedding=None`` and the error in the metadata, within CLIP_TIMEOUT_S per frame. The
  embedder's methods of the same names delegate there.

Loading is explicit: :meth:`~ClipEmbedder.load` reads and verifies the artifact (the first
embedding call does it otherwise). The model's properties (``manifest``, ``embed_dim``, ...)
read before :meth:`load` still load it, with a DeprecationWarning (later: an error).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .artifact import Manifest
from .config import ClipConfig
from .frames import EmbeddingCache, FramePipeline
from .images import ImageSource
from .jobs import DeadlineRunner
from .loading import ModelSlot
from .metadata import EmbeddingResult
from .model import VisualModel
from .scenes import as_sequence
from .session import SessionInfo
from .text import has_text_tower
from .vectors import check_vectors
from .worker_api import ScenePart, WorkerEmbedder

log = logging.getLogger("heimdex_clip")

__all__ = ["ClipEmbedder", "EmbeddingResult", "WorkerEmbedder"]


def _batch_size(batch: object) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch!r}")
    return batch


class ClipEmbedder:
    """CLIP embedder over an exported INT8 ONNX artifact (strict calls; ``.worker`` never raises).

    Args:
        model_dir: the artifact directory (holding manifest.json) or a models root holding
            ``<MODEL>__<PRETRAINED>/``; default: ``config.model_dir``, then the baked-in
            /opt/heimdex-clip/models, then ./models.
        config: settings; default ``ClipConfig.from_env()``.
    """

    def __init__(
        self, model_dir: str | Path | None = None, config: ClipConfig | None = None
    ) -> None:
        self.config = config if config is not None else ClipConfig.from_env()
        if self.config.unknown_keys:
            log.warning("unknown CLIP_* settings ignored: %s", ", ".join(self.config.unknown_keys))
        chosen = model_dir if model_dir is not None else self.config.model_dir
        self._cache = EmbeddingCache(self.config.embed_cache_size)
        self._runner = DeadlineRunner()
        self._pipeline = FramePipeline(self.config, self._runner, self._cache)
        self._slot = ModelSlot(
            self.config, Path(chosen) if chosen is not None else None, self._cache
        )
        #: The never-raising worker API over the same model (see :mod:`heimdex_clip.worker_api`).
        self.worker = WorkerEmbedder(self._slot, self._pipeline, self._runner, self.config)

    # ------------------------------------------------------------------ loading

    def load(self) -> ClipEmbedder:
        """Load and verify the model now (once); raises ClipError on failure. Returns self.

        A failed load is remembered: later calls raise the same error without re-reading a
        broken artifact for every frame. :meth:`reload` tries again.
        """
        self._slot.load()
        return self

    def reload(self) -> ClipEmbedder:
        """Forget a failed (or successful) load and load again."""
        self._slot.forget()
        return self.load()

    def close(self) -> None:
        """Release the model. Calls in flight finish with it; a later call loads it again."""
        self._slot.forget(clear_cache=True)

    @property
    def is_loaded(self) -> bool:  # cheap: nothing is read
        return self._slot.model is not None

    def _loaded(self, name: str) -> VisualModel:
        """The loaded model, for a property; loading it before load() is deprecated."""
        model = self._slot.model
        if model is None:
            warnings.warn(
                f"ClipEmbedder.{name} was read before load(), so it loads the model "
                "now; call load() first (reading model properties before load() is "
                "deprecated and will raise in a future version)",
                DeprecationWarning,
                stacklevel=3,
            )
            model = self._slot.load()
        return model

    @property
    def manifest(self) -> Manifest:
        """The loaded artifact's manifest."""
        return self._loaded("manifest").manifest

    @property
    def embed_dim(self) -> int:
        """Dimensions of a vector (512 for ViT-B-32)."""
        return self._loaded("embed_dim").embed_dim

    @property
    def artifact_id(self) -> str:
        """The loaded artifact's identity (see :attr:`Manifest.artifact_id`)."""
        return self._loaded("artifact_id").manifest.artifact_id

    @property
    def session_info(self) -> SessionInfo:
        """The provider, threads and arena the image tower's session runs with."""
        return self._loaded("session_info").session_info

    @property
    def artifact_dir(self) -> Path:
        """The artifact directory the model was loaded from."""
        return self._loaded("artifact_dir").artifact_dir

    @property
    def has_text_tower(self) -> bool:
        """Whether the loaded artifact ships a text tower."""
        return has_text_tower(self._loaded("has_text_tower").manifest)

    @property
    def load_time_ms(self) -> float | None:
        model = self._slot.model
        return model.load_time_ms if model is not None else None

    @property
    def active_jobs(self) -> int:
        """Job threads still running (a timed-out job stops within moments)."""
        return self._runner.live_jobs

    @property
    def cache_stats(self) -> dict[str, int]:
        return {
            "hits": self._cache.hits,
            "misses": self._cache.misses,
            "capacity": self._cache.capacity,
        }

    # ------------------------------------------------------------------ strict calls (raise)

    def preprocess(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Exactly what the model sees: float32 [N, 3, S, S] (raises ImageError)."""
        return self._pipeline.pixels(self._slot.load(), as_sequence(images, "preprocess"))

    def embed_images(
        self, images: Sequence[ImageSource], batch_size: int | None = None
    ) -> np.ndarray:
        """Embed every image; float32 [N, D]. Raises ClipError for bad input or a bad model."""
        images = as_sequence(images, "embed_images")
        batch = _batch_size(self.config.batch_size if batch_size is None else batch_size)
        model = self._slot.load()
        out = np.empty((len(images), model.embed_dim), dtype=np.float32)
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            out[start : start + len(chunk)] = model.run(self._pipeline.pixels(model, chunk))
        return check_vectors(out, "image")

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """open_clip.tokenize's token ids, int64 [N, 77], torch-free; raises TextError."""
        return self._slot.text_tower().tokenize(texts)

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embed every text, float32 [N, D], comparable with the image vectors. Raises
        ClipError (TextError for a bad text or an artifact without text tower)."""
        batch = _batch_size(self.config.batch_size if batch_size is None else batch_size)
        return self._slot.text_tower().embed(texts, batch_size=batch)

    # ------------------------------------------------------------------ worker calls (never raise)

    def embed_frame(
        self,
        image: ImageSource,
        *,
        frame_path: str | None = None,
        frame_quality: float | dict | None = None,
        scene: str | int | None = None,
    ) -> EmbeddingResult:
        """Worker call, never raises: :meth:`WorkerEmbedder.embed_frame`."""
        return self.worker.embed_frame(
            image, frame_path=frame_path, frame_quality=frame_quality, scene=scene
        )

    def embed_frames(
        self,
        images: Sequence[ImageSource],
        frame_paths: Sequence[str | None] | None = None,
        frame_qualities: Sequence[float | dict | None] | None = None,
    ) -> list[EmbeddingResult]:
        """Worker call, never raises: :meth:`WorkerEmbedder.embed_frames`."""
        return self.worker.embed_frames(images, frame_paths, frame_qualities)

    def embed_scene(
        self, frames: Sequence[ScenePart], *, top_k: int = 3, frame_path: str | None = None
    ) -> EmbeddingResult:
        """Worker call, never raises: :meth:`WorkerEmbedder.embed_scene`."""
        return self.worker.embed_scene(frames, top_k=top_k, frame_path=frame_path)

    def embed_scenes(
        self,
        scenes: Sequence[Sequence[ScenePart]],
        *,
        top_k: int = 3,
        frame_paths: Sequence[str | None] | None = None,
    ) -> list[EmbeddingResult]:
        """Worker call, never raises: :meth:`WorkerEmbedder.embed_scenes`."""
        return self.worker.embed_scenes(scenes, top_k=top_k, frame_paths=frame_paths)

    def embed_text(self, text: str) -> EmbeddingResult:
        """Worker call, never raises: :meth:`WorkerEmbedder.embed_text`."""
        return self.worker.embed_text(text)
