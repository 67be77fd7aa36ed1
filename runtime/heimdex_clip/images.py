"""Reading frames safely: every input kind, hostile files refused before they cost memory.

:func:`load_image` turns any :data:`ImageSource` into a fully decoded PIL image, or raises
:class:`~heimdex_clip.errors.ImageError` with a message that says what is wrong (missing,
a directory, empty, not an image, truncated, too many pixels, a numpy array of the wrong
shape or dtype).

What comes back is what open_clip would see from ``PIL.Image.open``:

* the ORIGINAL mode (P, LA, RGBA, I;16, F, 1, CMYK...): open_clip converts to RGB after
  the resize and the crop, and converting earlier changes pixels;
* no EXIF rotation (open_clip applies none);
* the first frame of an animated GIF/WebP or a multi-page TIFF.

Decompression bombs are refused from the header, before any pixel is decoded, by our own
``max_pixels`` limit. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``) stays in place as a
ceiling above it: its warning is silenced while we open a file (our limit decides) and its
error, for files over twice that value, becomes an ImageError too. (Rare containers, ICO
and ICNS, only reveal an embedded picture's size while loading: Pillow's limit bounds that
decode and the size is checked again afterwards.) Pillow's global
``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set here: a truncated file is an error, never
a half-grey frame.

Fast decode (``min_side_for_draft``) shrinks large frames cheaply before the exact resize:
JPEG DCT scaling (1/2, 1/4, 1/8) during decoding, integer box reduction (``Image.reduce``)
for other formats, always keeping the shorter side >= ``min_side_for_draft``. It CHANGES
PIXELS slightly (the exact path resizes from the full-resolution image), so it is an opt-in
setting (``CLIP_FAST_DECODE``), never the default.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ImageError

log = logging.getLogger(__name__)

#: What the runtime accepts as a frame.
ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

#: numpy layouts accepted, (ndim, channels) -> PIL mode (what ``Image.fromarray`` infers).
_ARRAY_MODES = {(2, 1): "L", (3, 3): "RGB", (3, 4): "RGBA"}

#: Magic numbers, only to make "Pillow cannot identify it" errors precise.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)

#: Modes whose pixel values are not intensities (palette indices, bits): averaging them
#: with ``Image.reduce`` would be meaningless, so fast decode leaves them at full size.
_NO_REDUCE_MODES = frozenset({"1", "P", "PA"})

#: ``check_size(width, height, label)``: raises ImageError when a frame of that size must
#: not be decoded (the preprocessor's resize-output bound).
SizeCheck = Callable[[int, int, str], None]

# warnings.catch_warnings swaps a process-global filter list; two threads overlapping in
# it can leave a filter behind for good. Opening (header parsing only) is serialised.
_OPEN_LOCK = threading.Lock()
_warned_truncated_global = False


# --------------------------------------------------------------------------- helpers


def _sniff(head: bytes, total: int) -> tuple[str | None, bool]:
    """(format guessed from the magic number, container says bytes are missing)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        # A RIFF header states the file length: a short file is known to be truncated.
        declared = int.from_bytes(head[4:8], "little") + 8
        return "WebP", total < declared
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt, False
    return None, False


def _truncated_or_corrupt(
    label: str, exc: BaseException, head: bytes, total: int, fmt: str | None = None
) -> ImageError:
    sniffed, short = _sniff(head, total)
    fmt = fmt or sniffed
    detail = f"{type(exc).__name__}: {exc}"
    what = f"{fmt} file" if fmt else "image"
    if short or "truncated" in str(exc).lower():
        return ImageError(f"{label} is a truncated {what} (data ends early; {detail})")
    return ImageError(f"{label} is a corrupt {what} ({detail})")


def _too_many_pixels(
    label: str, width: int, height: int, max_pixels: int, when: str = "refused before decoding"
) -> ImageError:
    return ImageError(
        f"{label} is {width}x{height} = {width * height} pixels, over the limit of "
        f"{max_pixels} pixels (CLIP_MAX_IMAGE_PIXELS); {when}"
    )


def _bomb_error(label: str, exc: Image.DecompressionBombError, max_pixels: int) -> ImageError:
    """Pillow's own guard fired while opening (over 2 x Image.MAX_IMAGE_PIXELS)."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(exc))
    if not found:
        return ImageError(f"{label} has too many pixels (Pillow refused it: {exc})")
    pixels, pillow_limit = int(found[1]), int(found[2])
    if pixels > max_pixels:
        return ImageError(
            f"{label} is {pixels} pixels, over the limit of {max_pixels} "
            "pixels (CLIP_MAX_IMAGE_PIXELS); refused before decoding"
        )
    return ImageError(
        f"{label} is {pixels} pixels, over Pillow's hard limit of {pillow_limit} pixels "
        f"(2 x PIL.Image.MAX_IMAGE_PIXELS), which CLIP_MAX_IMAGE_PIXELS={max_pixels} cannot "
        "raise; refused before decoding"
    )


def _check_truncation_guard() -> None:
    """Warn once if some other code told Pillow to accept truncated files."""
    global _warned_truncated_global
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_global:
        _warned_truncated_global = True
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True outside heimdex_clip: "
            "truncated frames can no longer be detected and will be embedded with "
            "grey filling"
        )


def _too_many_bytes(label: str, size: int, max_bytes: int) -> ImageError:
    return ImageError(
        f"{label} is {size} bytes, over the limit of {max_bytes} bytes "
        "(CLIP_MAX_IMAGE_BYTES); refused before reading"
    )


def _open_path(path: Path, max_bytes: int | None) -> tuple[IO[bytes], int]:
    """Open a regular, non-empty file within the size limit; precise errors otherwise."""
    try:
        # stat first: opening a FIFO would block, a device (/dev/zero) would never end.
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError(f"image file {path} does not exist") from None
    except PermissionError:
        raise ImageError(f"image file {path} cannot be read: permission denied") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"image file {path} cannot be read: {exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{path} is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path} is not a regular file (a device, FIFO or socket)")
    if info.st_size == 0:
        raise ImageError(f"image file {path} is empty (0 bytes)")
    if max_bytes is not None and info.st_size > max_bytes:
        raise _too_many_bytes(f"image file {path}", info.st_size, max_bytes)
    try:
        return open(path, "rb"), info.st_size  # closed by the caller (a with block)
    except PermissionError:
        raise ImageError(f"image file {path} cannot be read: permission denied") from None
    except OSError as exc:
        raise ImageError(f"image file {path} cannot be read: {exc}") from None


def _identify(stream: IO[bytes]) -> str | None:
    """The format Pillow would read ``stream`` as (header only), for error messages."""
    stream.seek(0)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(stream) as image:
                return image.format
    except Exception:
        return None
    finally:
        stream.seek(0)


def _format_refused(label: str, fmt: str, formats: Collection[str]) -> ImageError:
    return ImageError(
        f"{label} is a {fmt} image, not an allowed frame format "
        f"({', '.join(sorted(formats))}; CLIP_IMAGE_FORMATS)"
    )


def _open_stream(
    stream: IO[bytes], label: str, total: int, max_pixels: int, formats: Collection[str] | None
) -> tuple[ImageFile.ImageFile, bytes]:
    """Parse the header only (Pillow opens lazily); returns the image and its first bytes.

    With ``formats``, only those Pillow plugins may open the data (Pillow's own allow-list),
    so no other decoder ever sees it.
    """
    head = stream.read(16)
    stream.seek(0)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # Our own limit decides; Pillow's bomb warning must not leak or pre-empt it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream, formats=sorted(formats) if formats else None), head
    except UnidentifiedImageError:
        if formats and (other := _identify(stream)) and other not in formats:
            raise _format_refused(label, other, formats) from None
        fmt, short = _sniff(head, total)
        if fmt:
            state = "truncated" if short else "truncated or corrupt"
            raise ImageError(
                f"{label} starts like a {fmt} file but its header cannot be "
                f"read: the file is {state}"
            ) from None
        raise ImageError(
            f"{label} is not an image (unknown format: Pillow cannot identify "
            f"it; first bytes {head[:8].hex()})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise _bomb_error(label, exc, max_pixels) from None
    except MemoryError:
        raise
    except Exception as exc:  # plugins raise OSError, ValueError, EOFError... on bad headers
        raise _truncated_or_corrupt(label, exc, head, total) from None


def _draft_scale(width: int, height: int, min_side: int) -> int:
    """The largest JPEG DCT scale (8, 4, 2) keeping ceil(short / scale) >= ``min_side``."""
    short = min(width, height)
    for scale in (8, 4, 2):
        if -(-short // scale) >= min_side:
            return scale
    return 1


def _reduce_factor(width: int, height: int, min_side: int) -> int:
    """The largest integer k with ceil(short / k) >= ``min_side`` (Image.reduce rounds up)."""
    short = min(width, height)
    if min_side <= 1:
        return short
    # ceil(s / k) >= m  <=>  s > k * (m - 1)  <=>  k <= (s - 1) // (m - 1)
    return max(1, (short - 1) // (min_side - 1))


def _draft(image: Image.Image, min_side: int) -> None:
    """Ask the JPEG decoder to scale by 1/2, 1/4 or 1/8 (a no-op for other formats)."""
    scale = _draft_scale(image.width, image.height, min_side)
    if scale > 1:
        # Pillow picks the largest scale s in (8, 4, 2, 1) with s <= min(w // rw, h // rh);
        # requesting (w // scale, h // scale) makes that exactly ``scale``.
        image.draft(image.mode, (image.width // scale, image.height // scale))


def _reduce(image: Image.Image, min_side: int) -> Image.Image:
    """Integer box reduction keeping the shorter side >= ``min_side`` (a new image)."""
    factor = _reduce_factor(image.width, image.height, min_side)
    if factor < 2 or image.mode in _NO_REDUCE_MODES:
        return image
    try:
        return image.reduce(factor)
    except ValueError:  # a mode Pillow cannot reduce (I;16...): stay on the exact path
        return image


def _from_array(array: np.ndarray, max_pixels: int, check_size: SizeCheck | None) -> Image.Image:
    channels = array.shape[2] if array.ndim == 3 else 1
    mode = _ARRAY_MODES.get((array.ndim, channels))
    if array.dtype != np.uint8 or mode is None:
        raise ImageError(
            "a numpy frame must be uint8 HxWx3 (RGB), HxWx4 (RGBA) or HxW (gray); got shape "
            f"{array.shape} dtype {array.dtype}"
        )
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ImageError(f"a numpy frame must not be empty; got shape {array.shape}")
    if width * height > max_pixels:
        raise _too_many_pixels("the numpy frame", width, height, max_pixels, "refused")
    if check_size is not None:
        check_size(width, height, "the numpy frame")
    # fromarray copies a strided view (e.g. BGR->RGB via [..., ::-1]) through tobytes().
    return Image.fromarray(array, mode=mode)


def _decode(
    stream: IO[bytes],
    label: str,
    total: int,
    *,
    max_pixels: int,
    min_side: int | None,
    formats: Collection[str] | None,
    check_size: SizeCheck | None,
) -> Image.Image:
    image, head = _open_stream(stream, label, total, max_pixels, formats)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{label} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _too_many_pixels(label, width, height, max_pixels)
    if check_size is not None:
        check_size(width, height, label)
    if min_side:
        _draft(image, min_side)
    _check_truncation_guard()
    try:
        image.load()
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb_error(label, exc, max_pixels) from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise _truncated_or_corrupt(label, exc, head, total) from None
    if image.width * image.height > max_pixels:
        # A container (ICO, ICNS) can hold a bigger picture than its header said; Pillow's
        # own limit bounded that decode, ours still refuses the result.
        raise _too_many_pixels(
            label,
            image.width,
            image.height,
            max_pixels,
            "refused after decoding (its header said less)",
        )
    return image


def _load_pil(
    image: Image.Image,
    max_pixels: int,
    formats: Collection[str] | None,
    check_size: SizeCheck | None,
) -> Image.Image:
    width, height = image.size
    label = f"the {image.mode} PIL image"
    lazy = bool(getattr(image, "tile", None))  # opened but not decoded yet
    if width < 1 or height < 1:
        raise ImageError(f"{label} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _too_many_pixels(
            label, width, height, max_pixels, "refused before decoding" if lazy else "refused"
        )
    # Pillow's JPEG plugin opens MPO files (and names them so).
    plugin = "JPEG" if image.format == "MPO" else image.format
    if lazy and formats and plugin not in formats:
        # Decoding it would run that format's decoder (EPS: Ghostscript).
        raise _format_refused(label, str(image.format), formats)
    if check_size is not None:
        check_size(width, height, label)
    _check_truncation_guard()
    try:
        image.load()  # a no-op if loaded; a lazily opened file is decoded (and checked) here
    except MemoryError:
        raise
    except Exception as exc:  # a lazily opened, truncated or corrupt file; a closed image
        raise _truncated_or_corrupt(label, exc, b"", 0, image.format) from None
    return image


# --------------------------------------------------------------------------- public API


def load_image(
    source: ImageSource,
    *,
    max_pixels: int,
    min_side_for_draft: int | None = None,
    max_bytes: int | None = None,
    formats: Collection[str] | None = None,
    check_size: SizeCheck | None = None,
) -> Image.Image:
    """Decode ``source`` fully into a PIL image in its original mode, or raise ImageError.

    Args:
        source: a path (``str`` or ``os.PathLike``), encoded bytes (``bytes``,
            ``bytearray``, ``memoryview``), a PIL image, or a uint8 numpy array HxWx3
            (RGB), HxWx4 (RGBA) or HxW (gray).
        max_pixels: width * height above which a frame is refused. For files and bytes it is
            checked on the header, before any pixel is decoded.
        min_side_for_draft: fast decode, off when None. Frames are shrunk cheaply (JPEG DCT
            scaling during decoding, ``Image.reduce`` for the rest) while their shorter side
            stays >= this value. This changes pixels slightly: a setting, not the default.
        max_bytes: files and encoded bytes larger than this are refused before reading.
        formats: Pillow format names allowed (None: any format Pillow reads). Files and
            bytes of another format are refused before any decoder runs.
        check_size: called with (width, height, label) once the size is known and before
            any pixel is decoded; raises ImageError to refuse the frame.

    Returns:
        A loaded image (truncated or corrupt data fails here, not later). Files are read
        through a file object we close, never memory-mapped, so a frame rewritten on disk
        afterwards cannot change or crash it. A PIL image passed in is loaded and returned
        as is (never drafted in place); reduction makes a new image. A contiguous gray or
        RGBA array may be shared rather than copied: leave it unchanged until preprocessed.
    """
    if min_side_for_draft is not None and min_side_for_draft < 1:
        raise ValueError(f"min_side_for_draft must be >= 1 or None, got {min_side_for_draft}")
    if isinstance(source, Image.Image):
        image = _load_pil(source, max_pixels, formats, check_size)
    elif isinstance(source, np.ndarray):
        image = _from_array(source, max_pixels, check_size)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        size = memoryview(source).nbytes
        if not size:
            raise ImageError("image data is empty (0 bytes)")
        if max_bytes is not None and size > max_bytes:
            raise _too_many_bytes("the image data", size, max_bytes)
        data = source if isinstance(source, bytes) else bytes(source)
        image = _decode(
            io.BytesIO(data),
            f"<{len(data)} bytes of image data>",
            len(data),
            max_pixels=max_pixels,
            min_side=min_side_for_draft,
            formats=formats,
            check_size=check_size,
        )
    elif isinstance(source, (str, os.PathLike)):
        raw = os.fspath(source)
        if not raw:
            raise ImageError("image path is empty")
        path = Path(os.fsdecode(raw))
        stream, total = _open_path(path, max_bytes)
        with stream:  # frame 0 is in memory after load(); nothing reads the file later
            image = _decode(
                stream,
                str(path),
                total,
                max_pixels=max_pixels,
                min_side=min_side_for_draft,
                formats=formats,
                check_size=check_size,
            )
    else:
        raise ImageError(f"unsupported image source type {type(source).__name__}")
    if min_side_for_draft:
        image = _reduce(image, min_side_for_draft)
    return image
