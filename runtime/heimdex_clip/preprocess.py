"""open_clip's eval transform, reproduced exactly with Pillow and numpy (no torch).

open_clip (``image_transform(..., is_train=False)``, the ``preprocess`` returned by
``create_model_and_transforms``) runs torchvision transforms on PIL images, and
torchvision's PIL backend is a thin layer over Pillow. The exact result is therefore
reached by making the same Pillow calls with the same arguments, in the same order:

* ``shortest`` (CLIP's default): ``Resize(S)`` — torchvision's
  ``_compute_resized_output_size``: shorter side to S, longer side ``int(S * long / short)``
  (truncated, evaluated in that order), no call at all when the size already matches, PIL
  ``Image.resize(size, resample)`` otherwise — then ``CenterCrop(S)``: offsets
  ``int(round((dim - S) / 2.0))`` (Python's round: half to even), after padding with 0
  when a side is short (``ImageOps.expand``, the palette put back for mode P);
* ``longest``: open_clip's ``ResizeKeepRatio(S, longest=1)`` (sizes ``round(dim / ratio)``
  with ``ratio = max(h / S, w / S)``) then ``CenterCropOrPad(S, fill_color)``;
* ``squash``: ``Resize((S, S))``.

torchvision adds nothing for PIL images: ``antialias`` is ignored (Pillow always
antialiases bilinear/bicubic), ``max_size`` is None in open_clip, and the modes Pillow
resizes specially are Pillow's business, so they match by construction — ``1`` and ``P``
are resized with NEAREST whatever is asked, ``LA``/``RGBA`` through premultiplied alpha,
``I;16``/``I``/``F`` in their own integer/float domain.

Then the image is converted to RGB — AFTER resize and crop, as open_clip's
``MaybeConvertMode`` does; converting first changes pixels for P, LA/RGBA, I;16, I, F and 1
images — scaled by 1/255 in float32 and normalised ``(x - mean) / std`` with float32 mean
and std, the same IEEE operations as torchvision's ``ToTensor`` and ``Normalize``. The
result equals open_clip's tensor bit for bit. No EXIF rotation (open_clip applies none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from .artifact import PreprocessSpec
from .errors import ArtifactError, ImageError

#: torchvision's ``pil_modes_mapping`` for the interpolations a spec may name.
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``_compute_resized_output_size`` for a scalar size: (new_w, new_h).

    ``int(size * long / short)`` in exactly this order: ``int(long / short * size)`` or
    ``round(...)`` give a different long side for some sizes.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def keep_ratio_size(width: int, height: int, size: int, longest: float) -> tuple[int, int]:
    """open_clip's ``ResizeKeepRatio.get_params`` without its random parts: (new_w, new_h)."""
    ratio_h, ratio_w = height / size, width / size
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(width / ratio), round(height / ratio)


def _parse_fill(image: Image.Image, fill: int) -> int | float | tuple[int | float, ...]:
    """torchvision's ``_parse_fill``: one value per band, cast to int unless the mode is F."""
    bands = len(image.getbands())
    value: int | float | tuple[int | float, ...] = (fill,) * bands if bands > 1 else fill
    if image.mode != "F":
        value = tuple(int(v) for v in value) if isinstance(value, tuple) else int(value)
    return value


def pad(image: Image.Image, ltrb: tuple[int, int, int, int], fill: int = 0) -> Image.Image:
    """torchvision's PIL constant padding: ``ImageOps.expand``, palette put back for P."""
    # Pillow's stubs type fill as int/tuple[int]; torchvision passes floats for mode F.
    expanded = ImageOps.expand(image, border=ltrb, fill=_parse_fill(image, fill))  # type: ignore[arg-type]
    if image.mode == "P" and (palette := image.getpalette()) is not None:
        expanded.putpalette(palette)
    return expanded


def center_crop_or_pad(image: Image.Image, size: int, fill: int = 0) -> Image.Image:
    """torchvision's ``center_crop`` (fill 0) and open_clip's ``center_crop_or_pad`` (fill).

    A side shorter than ``size`` is padded first (left/top get the smaller half); then the
    crop box starts at ``int(round((dim - size) / 2.0))``.
    """
    width, height = image.size
    if size > width or size > height:
        ltrb = (
            (size - width) // 2 if size > width else 0,
            (size - height) // 2 if size > height else 0,
            (size - width + 1) // 2 if size > width else 0,
            (size - height + 1) // 2 if size > height else 0,
        )
        image = pad(image, ltrb, fill)
        width, height = image.size
        if width == size and height == size:
            return image
    # torchvision's exact expression: round() is half to even, so 0.5 -> 0 and 2.5 -> 2.
    top = int(round((height - size) / 2.0))  # noqa: RUF046
    left = int(round((width - size) / 2.0))  # noqa: RUF046
    return image.crop((left, top, left + size, top + size))


def resize(image: Image.Image, width: int, height: int, resample: int) -> Image.Image:
    """torchvision's ``F.resize`` on a PIL image: untouched when the size already matches."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample)


class Preprocessor:
    """Turns PIL images into the model's float32 input exactly as open_clip's eval transform.

    Built from the artifact's :class:`~heimdex_clip.artifact.PreprocessSpec`, never from
    constants of its own. Stateless after construction, so one instance can be shared by
    threads.
    """

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.size = spec.image_size
        self._resample = _RESAMPLE[spec.interpolation]
        # ToTensor then Normalize map each uint8 value v of channel c to
        # (float32(v) / 255 - mean[c]) / std[c], in float32 (Normalize makes float32 tensors
        # of mean and std). There are only 3 x 256 such values: compute them once with those
        # very operations, then look them up (same bits, a fraction of the passes).
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1)
        scaled = np.arange(256, dtype=np.float32) / np.float32(255)
        with np.errstate(all="ignore"):
            lut = np.ascontiguousarray((scaled - mean) / std, dtype=np.float32)  # [3, 256]
        if not np.isfinite(lut).all():  # PreprocessSpec bounds mean/std; never trust alone
            raise ArtifactError(
                f"preprocess mean {spec.mean} / std {spec.std} give "
                "non-finite model inputs; the artifact is corrupt or hostile"
            )
        self._lut = lut

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) of the resized image before the crop or pad: what the resize allocates."""
        size, mode = self.size, self.spec.resize_mode
        if mode == "squash":
            return size, size
        if mode == "longest":
            return keep_ratio_size(width, height, size, longest=1.0)
        return shortest_side_size(width, height, size)

    def check_resize_cost(self, width: int, height: int, label: str, max_pixels: int) -> None:
        """Refuse a frame whose resize would build an image of more than ``max_pixels``.

        The pixel limit bounds the input, not the output: keeping the aspect ratio, the
        shorter side of a 20000x1 sliver goes to S and its longer side to S * 20000.
        """
        new_w, new_h = self.resized_size(width, height)
        if new_w * new_h > max_pixels:
            raise ImageError(
                f"{label} is {width}x{height}: resizing it for the model would build a "
                f"{new_w}x{new_h} image ({new_w * new_h} pixels), over the limit of "
                f"{max_pixels} (CLIP_MAX_RESIZE_PIXELS); refused before decoding"
            )

    def geometry(self, image: Image.Image, *, fast: bool = False) -> Image.Image:
        """Resize and crop/pad to S x S, still in the image's own mode (no RGB yet).

        ``fast`` (CLIP_FAST_DECODE's path, which changes pixels anyway): when the
        shortest-side resize shrinks the image before a centre crop, only the crop's own
        S x S pixels are computed (Pillow's resize of the crop's box in the source), not
        the whole resized image. On 300 random sizes of photographs it differed from
        resize-then-crop by at most 3 levels of 255 (docs/preprocessing.md). Enlargements
        (small frames) stay exact: nothing to save.
        """
        size, mode = self.size, self.spec.resize_mode
        new_w, new_h = self.resized_size(image.width, image.height)
        if fast and mode == "shortest" and image.width > new_w:  # a shrink: the costly case
            return self._resize_crop_box(image, new_w, new_h)
        if mode == "squash":
            return resize(image, new_w, new_h, self._resample)
        if mode == "longest":
            if new_w < 1 or new_h < 1:
                # open_clip fails here too (Pillow: "height and width must be > 0").
                raise ImageError(
                    f"a {image.width}x{image.height} image is too thin for resize_mode "
                    f"'longest': it would be resized to {new_w}x{new_h} pixels"
                )
            return center_crop_or_pad(
                resize(image, new_w, new_h, self._resample), size, self.spec.fill_color
            )
        return center_crop_or_pad(resize(image, new_w, new_h, self._resample), size)

    def _resize_crop_box(self, image: Image.Image, new_w: int, new_h: int) -> Image.Image:
        """The centre S x S crop of ``image`` resized to (new_w, new_h), resized directly
        from the crop's box in source coordinates (the same offsets as the crop)."""
        size = self.size
        top = int(round((new_h - size) / 2.0))  # noqa: RUF046  (as center_crop_or_pad)
        left = int(round((new_w - size) / 2.0))  # noqa: RUF046
        sx, sy = image.width / new_w, image.height / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return image.resize((size, size), self._resample, box=box)

    def transform(self, image: Image.Image, *, fast: bool = False) -> np.ndarray:
        """One image -> C-contiguous float32 [3, S, S]; ImageError if it cannot be processed.

        ``fast``: the fast-decode geometry (:meth:`geometry`), not open_clip's exact one.
        """
        out = np.empty((3, self.size, self.size), dtype=np.float32)
        self._transform_into(image, out, fast)
        return out

    def __call__(self, images: Sequence[Image.Image], *, fast: bool = False) -> np.ndarray:
        """Images -> C-contiguous float32 [N, 3, S, S] (the model's input batch).

        ``fast``: the fast-decode geometry (:meth:`geometry`), not open_clip's exact one.
        """
        out = np.empty((len(images), 3, self.size, self.size), dtype=np.float32)
        for i, image in enumerate(images):
            self._transform_into(image, out[i], fast)
        return out

    def _transform_into(self, image: Image.Image, out: np.ndarray, fast: bool = False) -> None:
        if not isinstance(image, Image.Image):
            raise ImageError(
                f"Preprocessor takes PIL images, got {type(image).__name__} "
                "(decode it with heimdex_clip.images.load_image)"
            )
        if image.width < 1 or image.height < 1:
            raise ImageError(f"a {image.width}x{image.height} image has no pixels")
        try:
            rgb = self.geometry(image, fast=fast).convert("RGB")  # RGB after resize and crop
        except ImageError:
            raise
        except (ValueError, OSError) as exc:  # e.g. a mode Pillow cannot resize or convert
            raise ImageError(
                f"cannot preprocess a {image.mode} {image.width}x{image.height} image: {exc}"
            ) from None
        pixels = np.asarray(rgb, dtype=np.uint8)  # S x S x 3
        for c in range(3):
            # mode="clip" lets numpy write straight into ``out`` (uint8 indices are in range).
            np.take(self._lut[c], pixels[:, :, c], out=out[c], mode="clip")
