"""Reading frames safely: every input kind, hostile files refused before they cost memory.

Images come back in their ORIGINAL mode: open_clip converts to RGB after resize and crop,
and doing it earlier changes pixels (palette, alpha, 16-bit and float images). No EXIF
rotation is applied, as in open_clip. Animated files give their first frame.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

#: What the runtime accepts as a frame.
ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

_ARRAY_MODES = {2: "L", 3: "RGB", 4: "RGBA"}  # channels (or ndim 2) -> PIL mode


def _open_bytes_or_path(source: ImageSource) -> tuple[Image.Image, str]:
    """Open lazily (header only) and say what was opened, for error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("image data is empty (0 bytes)")
        label = f"<{len(data)} bytes>"
        stream: io.BytesIO | Path = io.BytesIO(data)
    else:
        path = Path(os.fspath(source))
        label = str(path)
        if not path.exists():
            raise ImageError(f"image file {path} does not exist")
        if path.is_dir():
            raise ImageError(f"{path} is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(f"image file {path} is empty (0 bytes)")
        stream = path
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; Pillow's bomb warning must not leak or pre-empt it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except UnidentifiedImageError:
        raise ImageError(f"cannot identify an image format in {label}") from None
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fired first (over twice its MAX_IMAGE_PIXELS).
        raise ImageError(f"{label} has too many pixels, over the limit: {exc}") from None
    except OSError as exc:
        raise ImageError(f"cannot open {label}: {exc}") from None
    return image, label


def _draft(image: Image.Image, min_side: int) -> None:
    """JPEG DCT scaling (1/2, 1/4, 1/8) keeping the shorter side >= ``min_side``."""
    if image.format != "JPEG":
        return
    w, h = image.size
    scale = min(w, h) / min_side
    if scale >= 2:
        # draft picks the largest reduction that still yields at least the requested size.
        image.draft(image.mode, (max(1, int(w / scale)), max(1, int(h / scale))))


def _reduce(image: Image.Image, min_side: int) -> Image.Image:
    """Integer box reduction for non-JPEG formats keeping the shorter side >= ``min_side``."""
    factor = min(image.size) // min_side
    if factor < 2 or image.mode in ("P", "1"):
        return image
    try:
        return image.reduce(factor)
    except ValueError:  # a mode Pillow cannot reduce (e.g. I;16): keep the exact path
        return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or not (
            array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(
            f"a numpy frame must be HxWx3 (RGB), HxWx4 (RGBA) or HxW (gray) uint8; got shape "
            f"{array.shape} dtype {array.dtype}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"a numpy frame must not be empty; got shape {array.shape}")
    mode = _ARRAY_MODES[2 if array.ndim == 2 else array.shape[2]]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def load_image(source: ImageSource, *, max_pixels: int,
               min_side_for_draft: int | None = None) -> Image.Image:
    """Decode ``source`` fully into a PIL image (original mode), or raise ImageError.

    ``max_pixels`` is checked on the header, before any pixel is decoded. With
    ``min_side_for_draft`` (fast decode), large frames are shrunk cheaply while their
    shorter side stays >= that value: JPEG DCT scaling during decode, integer box reduction
    for other formats. That changes pixels slightly; it is a setting, not the default.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        image, label = _open_bytes_or_path(source)
        w, h = image.size
        if w < 1 or h < 1:
            raise ImageError(f"{label} has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise ImageError(f"{label} is {w}x{h} = {w * h} pixels, over the limit of "
                             f"{max_pixels} (CLIP_MAX_IMAGE_PIXELS); refusing to decode it")
        if min_side_for_draft:
            _draft(image, min_side_for_draft)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # Truncated or corrupt data: Pillow reports these as OSError/SyntaxError.
            raise ImageError(f"cannot decode {label}: {exc}") from None
    else:
        raise ImageError(f"unsupported image source type {type(source).__name__}")
    if image.width * image.height > max_pixels:
        raise ImageError(f"image is {image.width}x{image.height}, over the limit of "
                         f"{max_pixels} pixels (CLIP_MAX_IMAGE_PIXELS)")
    if min_side_for_draft:
        image = _reduce(image, min_side_for_draft)
    return image


def content_hash(source: ImageSource) -> str | None:
    """A content hash for the embedding cache: encoded bytes, or mode+size+pixels.

    None when the source cannot be hashed cheaply (e.g. a missing file): the cache is
    skipped and decoding reports the real error.
    """
    h = hashlib.blake2b(digest_size=20)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            h.update(b"bytes:")
            h.update(source)
        elif isinstance(source, (str, os.PathLike)):
            h.update(b"bytes:")
            h.update(Path(os.fspath(source)).read_bytes())
        elif isinstance(source, np.ndarray):
            h.update(f"array:{source.shape}:{source.dtype}:".encode())
            h.update(np.ascontiguousarray(source).tobytes())
        elif isinstance(source, Image.Image):
            h.update(f"pil:{source.mode}:{source.size}:".encode())
            h.update(source.tobytes())
        else:
            return None
    except (OSError, ValueError):
        return None
    return h.hexdigest()
