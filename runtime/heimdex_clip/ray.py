"""Bulk embedding on Ray Data: one model per actor, failures isolated per frame.

:class:`ClipBatchEmbedder` is a callable class for ``Dataset.map_batches``: Ray builds one
per actor of an actor pool, so each actor loads the artifact once and then turns batches of
frames into vectors through the same worker path (:meth:`ClipEmbedder.embed_frames`) as the
``backfill`` worker: the same deadline, the same NULL-and-error on a bad frame, the same
metadata and provenance. The same code runs on a laptop (a local Ray started on the fly) and
on a cluster (``RAY_ADDRESS``, e.g. KubeRay).

Columns in: ``frame_path`` (a path the actor can read) or ``image`` (encoded bytes), plus any
others, passed through unchanged. Columns out: ``embedding`` (float32 ``[N, D]``; zeros
where the frame failed), ``ok`` (bool), ``error`` (str, empty on success), ``metadata``
(the JSON text the worker path records), ``artifact_id``.

Needs the ``ray`` extra (``pip install 'heimdex-clip[ray]'``); importing this module without
it raises an ImportError that names the extra.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import ClipConfig
from .embedder import ClipEmbedder

try:
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - exercised by the torch-free install test
    raise ImportError("heimdex_clip.ray needs Ray Data: pip install 'heimdex-clip[ray]'") from exc

__all__ = ["ClipBatchEmbedder", "embed_dataset", "init_ray"]


class ClipBatchEmbedder:
    """``map_batches`` callable: loads the artifact once per actor, embeds each batch.

    ``model_dir`` is the artifact directory (it must be readable by every actor: baked into
    the image or on a shared volume); ``settings`` are ``ClipConfig`` fields (for example
    ``{"cpu_threads": 1}``), applied over the actor's CLIP_* environment; ``frame_root``
    resolves relative frame paths.
    """

    def __init__(
        self,
        model_dir: str,
        settings: Mapping[str, Any] | None = None,
        frame_root: str | None = None,
    ) -> None:
        config = ClipConfig.from_env().replace(model_dir=Path(model_dir), **(settings or {}))
        self.embedder = ClipEmbedder(config=config).load()
        self.frame_root = Path(frame_root) if frame_root else None

    def _sources(self, batch: Mapping[str, np.ndarray]) -> tuple[list[Any], list[str | None]]:
        if "image" in batch:
            names: list[str | None] = (
                [str(p) for p in batch["frame_path"]]
                if "frame_path" in batch
                else [None] * len(batch["image"])
            )
            return [bytes(b) for b in batch["image"]], names
        paths = [str(p) for p in batch["frame_path"]]
        if self.frame_root is None:
            return list(paths), list(paths)
        resolved = [p if os.path.isabs(p) else str(self.frame_root / p) for p in paths]
        return list(resolved), list(paths)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources, names = self._sources(batch)
        results = self.embedder.embed_frames(sources, frame_paths=names)
        dim = self.embedder.embed_dim
        vectors = np.zeros((len(results), dim), dtype=np.float32)
        for i, result in enumerate(results):
            if result.embedding is not None:
                vectors[i] = result.embedding
        out = {k: v for k, v in batch.items() if k != "image"}
        out["embedding"] = vectors
        out["ok"] = np.array([r.embedding is not None for r in results], dtype=bool)
        out["error"] = np.array([r.metadata.get("error") or "" for r in results], dtype=object)
        out["metadata"] = np.array([json.dumps(r.metadata) for r in results], dtype=object)
        out["artifact_id"] = np.array([self.embedder.artifact_id] * len(results), dtype=object)
        return out


def embed_dataset(
    dataset: ray.data.Dataset,
    model_dir: str | Path,
    *,
    actors: int = 1,
    batch_size: int = 32,
    cpus_per_actor: float = 1.0,
    settings: Mapping[str, Any] | None = None,
    frame_root: str | Path | None = None,
) -> ray.data.Dataset:
    """``dataset`` mapped through an actor pool of ``actors`` :class:`ClipBatchEmbedder`.

    Each actor runs ONNX Runtime on ``cpus_per_actor`` threads (unless ``settings`` says
    otherwise), so ``actors * cpus_per_actor`` should not exceed the cores Ray may use. An
    actor that dies (killed, out of memory) is restarted and its batch retried, so a run
    loses no frame to a dead actor.
    """
    threads = {"cpu_threads": max(1, int(cpus_per_actor))}
    return dataset.map_batches(
        ClipBatchEmbedder,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "settings": {**threads, **(settings or {})},
            "frame_root": str(frame_root) if frame_root else None,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        # No remote args: Ray Data's actor pools already replace a dead actor and run its
        # batch again (max_restarts=-1, max_task_retries=-1 by default; a test kills one).
    )


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray (idempotent)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
