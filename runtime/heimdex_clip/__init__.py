"""heimdex_clip: torch-free CPU runtime for CLIP visual embeddings.

Importing this package never imports torch (a test proves it in a torch-free venv).
"""

from .artifact import Manifest, PreprocessSpec, load_manifest
from .config import ClipConfig
from .embedder import ClipEmbedder, EmbeddingResult
from .errors import (
    ArtifactError,
    ClipError,
    ClipTimeoutError,
    ConfigError,
    DimensionError,
    ImageError,
    QueryError,
    TextError,
)
from .query import QueryPart, combine
from .singleton import get_embedder, reset_embedder
from .worker_api import WorkerEmbedder

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "ClipConfig",
    "ClipEmbedder",
    "ClipError",
    "ClipTimeoutError",
    "ConfigError",
    "DimensionError",
    "EmbeddingResult",
    "ImageError",
    "Manifest",
    "PreprocessSpec",
    "QueryError",
    "QueryPart",
    "TextError",
    "WorkerEmbedder",
    "__version__",
    "combine",
    "get_embedder",
    "load_manifest",
    "reset_embedder",
]
