"""heimdex_clip: torch-free CPU runtime for CLIP visual embeddings.

Importing this package never imports torch (a test proves it in a torch-free venv).
"""

from .artifact import Manifest, PreprocessSpec, load_manifest
from .config import ClipConfig
from .errors import (
    ArtifactError,
    ClipError,
    ClipTimeoutError,
    ConfigError,
    DimensionError,
    ImageError,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "ClipConfig",
    "ClipError",
    "ClipTimeoutError",
    "ConfigError",
    "DimensionError",
    "ImageError",
    "Manifest",
    "PreprocessSpec",
    "__version__",
    "load_manifest",
]
