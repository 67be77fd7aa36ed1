"""Exceptions of the heimdex_clip runtime.

Every failure the runtime can report is a subclass of :class:`ClipError`, so callers can
catch one type. The worker path (``ClipEmbedder.embed_frame``) never raises: it turns these
into ``error`` strings in the embedding metadata.
"""

from __future__ import annotations


class ClipError(Exception):
    """Base class for every heimdex_clip error."""


class ConfigError(ClipError, ValueError):
    """A CLIP_* setting has an invalid value (raised at start-up, not at the first frame)."""


class ArtifactError(ClipError):
    """The model artifact is missing, incomplete, tampered with or incompatible."""


class ImageError(ClipError, ValueError):
    """An input image cannot be read: missing, empty, corrupt, hostile or of a bad shape."""


class ClipTimeoutError(ClipError, TimeoutError):
    """Embedding one scene took longer than CLIP_TIMEOUT_S; the work was stopped."""


class DimensionError(ClipError, ValueError):
    """A vector's dimension does not match the model or the database column."""


class TextError(ClipError, ValueError):
    """A query text cannot be embedded (not a string, too long), or the artifact has no text
    tower."""


class QueryError(ClipError, ValueError):
    """A composed query cannot be searched: no parts, a bad part or weight, or parts whose
    weighted sum has no direction (they cancel out)."""


class InvalidVectorError(ClipError, ValueError):
    """A vector that must never be returned, stored or searched: it holds NaN or infinity,
    or its norm is zero or denormal (it has no direction, so every similarity is NaN)."""
