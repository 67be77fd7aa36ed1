"""Preprocessing parity: our Pillow+numpy path against open_clip's own eval transform.

Ground truth is open_clip itself (torchvision on PIL images), computed in the test; the
bound is the design's 1e-6 max abs difference on the float32 tensors.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from heimdex_clip.artifact import PreprocessSpec
from heimdex_clip.images import load_image
from heimdex_clip.preprocess import Preprocessor, shortest_side_size

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.parity
TOLERANCE = 1e-6
MODES = ["RGB", "RGBA", "LA", "L", "P", "PA", "CMYK", "I;16", "I", "F", "1"]
# 1x1 and slivers; one pixel over the model size; sizes where int() of the long side and
# round() of the crop offset (banker's rounding at .5) both matter.
SIZES = [(1, 1), (2, 900), (900, 2), (225, 224), (224, 225), (392, 427), (1920, 1080),
         (333, 501), (501, 333), (223, 223), (224, 224), (227, 300), (300, 227), (448, 451),
         (645, 224), (1000, 997)]


@pytest.fixture(scope="module")
def reference_spec():
    """open_clip's eval transform for ViT-B-32 and the spec read from open_clip's config."""
    model, _, transform = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, force_quick_gelu=True)
    cfg = model.visual.preprocess_cfg
    spec = PreprocessSpec(image_size=cfg["size"][0], mean=tuple(cfg["mean"]),
                          std=tuple(cfg["std"]), interpolation=cfg["interpolation"],
                          resize_mode=cfg["resize_mode"], fill_color=cfg["fill_color"])
    return transform, spec


@pytest.fixture(scope="module")
def base_photo(photos):
    return dict(photos)["astronaut"]


def _convert(image: Image.Image, mode: str) -> Image.Image:
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "PA":  # palette with transparency
        p = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        p.info["transparency"] = 3
        return p
    return image.convert(mode)


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert float(np.abs(ours - ref).max()) <= TOLERANCE


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_mode_and_awkward_size_matches_open_clip(reference_spec, base_photo, mode, size):
    transform, spec = reference_spec
    image = _convert(base_photo.resize(size), mode)
    _assert_close(Preprocessor(spec).transform(image), transform(image).numpy())


@pytest.mark.parametrize(("fmt", "mode"), [
    ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "I;16"),
    ("PNG", "P"), ("PNG", "LA"), ("WEBP", "RGB"), ("WEBP", "RGBA"), ("GIF", "P"),
    ("TIFF", "RGB"), ("TIFF", "F"), ("TIFF", "I"), ("BMP", "RGB"), ("BMP", "1"),
])
def test_every_format_through_load_image_matches_open_clip(reference_spec, base_photo, fmt,
                                                           mode):
    transform, spec = reference_spec
    buf = io.BytesIO()
    _convert(base_photo.resize((391, 283)), mode).save(buf, format=fmt)
    data = buf.getvalue()
    ours = Preprocessor(spec).transform(load_image(data, max_pixels=10**8))
    reference = Image.open(io.BytesIO(data))  # what a user of open_clip would feed it
    _assert_close(ours, transform(reference).numpy())


def test_animated_gif_uses_the_first_frame_like_open_clip(reference_spec, base_photo):
    transform, spec = reference_spec
    frames = [base_photo.resize((300, 200)).rotate(a).convert("P") for a in (0, 90, 180)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    ours = Preprocessor(spec).transform(load_image(buf.getvalue(), max_pixels=10**8))
    _assert_close(ours, transform(Image.open(io.BytesIO(buf.getvalue()))).numpy())


def test_exif_orientation_is_ignored_like_open_clip(reference_spec, base_photo):
    transform, spec = reference_spec
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" - open_clip does not apply it, neither do we
    buf = io.BytesIO()
    base_photo.resize((320, 240)).save(buf, format="JPEG", exif=exif)
    ours = Preprocessor(spec).transform(load_image(buf.getvalue(), max_pixels=10**8))
    _assert_close(ours, transform(Image.open(io.BytesIO(buf.getvalue()))).numpy())


@pytest.mark.parametrize("resize_mode", ["longest", "squash", "shortest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(640, 427), (100, 333), (224, 224), (7, 3)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_other_resize_modes_and_interpolations(base_photo, resize_mode, interpolation, size):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = open_clip.image_transform(256, is_train=False, mean=mean, std=std,
                                          resize_mode=resize_mode, interpolation=interpolation,
                                          fill_color=7)
    spec = PreprocessSpec(image_size=256, mean=mean, std=std, interpolation=interpolation,
                          resize_mode=resize_mode, fill_color=7)
    for mode in ("RGB", "L", "P", "RGBA"):
        image = _convert(base_photo.resize(size), mode)
        _assert_close(Preprocessor(spec).transform(image), transform(image).numpy())


def test_random_images_and_sizes(reference_spec):
    transform, spec = reference_spec
    rng = np.random.default_rng(1)
    ours = Preprocessor(spec)
    for _ in range(40):
        h, w = (int(x) for x in rng.integers(1, 700, size=2))
        array = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(array)
        _assert_close(ours.transform(image), transform(image).numpy())


def test_long_side_uses_torchvisions_truncation():
    # 224 * 427 / 392 = 244.0 exactly in real numbers, 243.99999999999997 in floats.
    assert shortest_side_size(392, 427, 224) == (224, int(224 * 427 / 392))
    assert shortest_side_size(1920, 1080, 224) == (398, 224)


def test_batch_is_the_stack_of_single_transforms(reference_spec, photos):
    _, spec = reference_spec
    pre = Preprocessor(spec)
    images = [img for _, img in photos[:5]]
    batch = pre(images)
    assert batch.flags["C_CONTIGUOUS"] and batch.shape == (5, 3, 224, 224)
    for i, img in enumerate(images):
        np.testing.assert_array_equal(batch[i], pre.transform(img))
