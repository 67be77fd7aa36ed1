"""open_clip's eval transform, reproduced exactly with Pillow and numpy (no torch).

open_clip (``image_transform(..., is_train=False)``) runs torchvision on PIL images, and
torchvision's PIL backend is a thin layer over Pillow, so the exact result is reachable by
making the same Pillow calls with the same arguments:

* ``shortest`` (CLIP's default): ``Resize(S)`` — shorter side to S, longer side
  ``int(S * long / short)`` (truncated, as torchvision does), skipped when the size already
  matches — then ``CenterCrop(S)`` with offsets ``int(round((dim - S) / 2.0))``, padding with
  0 first if a side is short;
* ``longest``: ``ResizeKeepRatio(S, longest=1)`` (sizes ``round(dim / ratio)``) then
  ``CenterCropOrPad(S, fill)``;
* ``squash``: ``Resize((S, S))``.

Then the image is converted to RGB — after resize and crop, as open_clip does; doing it
first changes pixels for palette, alpha, 16-bit and float images — scaled by 1/255 in
float32 and normalised ``(x - mean) / std`` in float32, the same IEEE operations as
torchvision's ``ToTensor`` and ``Normalize``. No EXIF rotation (open_clip applies none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from .artifact import PreprocessSpec

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``_compute_resized_output_size`` for a scalar size: (new_w, new_h)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def keep_ratio_size(width: int, height: int, size: int, longest: float) -> tuple[int, int]:
    """open_clip's ``ResizeKeepRatio.get_params`` without randomness: (new_w, new_h)."""
    ratio_h, ratio_w = height / size, width / size
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(width / ratio), round(height / ratio)


def _fill_for(image: Image.Image, fill: int) -> int | float | tuple:
    """torchvision's ``_parse_fill``: one value per band, int unless the mode is float."""
    bands = len(image.getbands())
    value: int | float | tuple = (fill,) * bands if bands > 1 else fill
    if image.mode != "F":
        value = tuple(int(v) for v in value) if isinstance(value, tuple) else int(value)
    return value


def _pad(image: Image.Image, ltrb: tuple[int, int, int, int], fill: int) -> Image.Image:
    """torchvision's PIL constant padding (``ImageOps.expand``, palette preserved)."""
    if image.mode == "P":
        palette = image.getpalette()
        padded = ImageOps.expand(image, border=ltrb, fill=_fill_for(image, fill))
        padded.putpalette(palette)
        return padded
    return ImageOps.expand(image, border=ltrb, fill=_fill_for(image, fill))


def center_crop_or_pad(image: Image.Image, size: int, fill: int = 0) -> Image.Image:
    """torchvision's ``center_crop`` (fill 0) and open_clip's ``center_crop_or_pad``."""
    width, height = image.size
    if size > width or size > height:
        ltrb = (
            (size - width) // 2 if size > width else 0,
            (size - height) // 2 if size > height else 0,
            (size - width + 1) // 2 if size > width else 0,
            (size - height + 1) // 2 if size > height else 0,
        )
        image = _pad(image, ltrb, fill)
        width, height = image.size
        if width == size and height == size:
            return image
    # torchvision's exact expression (round half to even on .5 offsets).
    top = int(round((height - size) / 2.0))  # noqa: RUF046
    left = int(round((width - size) / 2.0))  # noqa: RUF046
    return image.crop((left, top, left + size, top + size))


def _resize(image: Image.Image, new_w: int, new_h: int, resample: int) -> Image.Image:
    if image.size == (new_w, new_h):  # torchvision returns the image untouched
        return image
    return image.resize((new_w, new_h), resample)


class Preprocessor:
    """Turns PIL images into the model's float32 input, as open_clip's eval transform does."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.size = spec.image_size
        self._resample = _RESAMPLE[spec.interpolation]
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)

    def geometry(self, image: Image.Image) -> Image.Image:
        """Resize and crop/pad to S x S in the image's own mode (no colour conversion yet)."""
        size, mode = self.size, self.spec.resize_mode
        if mode == "squash":
            return _resize(image, size, size, self._resample)
        if mode == "longest":
            new_w, new_h = keep_ratio_size(*image.size, size, longest=1.0)
            return center_crop_or_pad(_resize(image, new_w, new_h, self._resample), size,
                                      self.spec.fill_color)
        new_w, new_h = shortest_side_size(*image.size, size)
        return center_crop_or_pad(_resize(image, new_w, new_h, self._resample), size)

    def transform(self, image: Image.Image) -> np.ndarray:
        """One image -> float32 [3, S, S]."""
        rgb = self.geometry(image).convert("RGB")
        pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
        pixels /= np.float32(255)
        pixels -= self._mean
        pixels /= self._std
        return pixels

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Images -> C-contiguous float32 [N, 3, S, S]."""
        out = np.empty((len(images), 3, self.size, self.size), dtype=np.float32)
        for i, image in enumerate(images):
            out[i] = self.transform(image)
        return out
