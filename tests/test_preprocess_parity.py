"""Preprocessing parity: our Pillow+numpy path against open_clip's own eval transform.

Ground truth is open_clip itself (torchvision on PIL images), computed in the test; the
bound is the design's 1e-6 max abs difference on the float32 tensors (we measure 0.0: the
same Pillow calls and the same float32 operations give the same bits).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from heimdex_clip.artifact import PreprocessSpec
from heimdex_clip.errors import ImageError
from heimdex_clip.images import load_image
from heimdex_clip.preprocess import Preprocessor, center_crop_or_pad, shortest_side_size

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")
tv = pytest.importorskip("torchvision.transforms")
tvf = pytest.importorskip("torchvision.transforms.functional")

pytestmark = pytest.mark.parity

TOLERANCE = 1e-6
S = 224
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "motorcycle_left")

#: Every mode Pillow's decoders produce (TIFF gives the exotic ones), plus P with a
#: transparency index. Built from real photos with values that stress each conversion.
MODES = [
    "RGB",
    "RGBA",
    "LA",
    "L",
    "P",
    "P+transparency",
    "PA",
    "CMYK",
    "YCbCr",
    "LAB",
    "RGBX",
    "I;16",
    "I;16B",
    "I",
    "F",
    "1",
]

#: Awkward sizes (w, h): 1x1, slivers, one pixel over the model size, odd 1080p, and sizes
#: where the long side's int() truncation, its evaluation order, and the crop offset's
#: round-half-to-even all matter (test_the_sizes_exercise_every_rounding_trap proves it).
SIZES = [
    (1, 1),
    (2, 900),
    (900, 2),
    (225, 224),
    (224, 225),
    (392, 427),
    (427, 392),
    (1920, 1080),
    (1080, 1920),
    (223, 223),
    (224, 224),
    (227, 224),
    (224, 229),
    (231, 224),
    (233, 224),
    (300, 307),
    (336, 345),
    (333, 501),
    (501, 333),
    (1000, 997),
    (645, 224),
    (7, 61),
]
#: 2x900 and 900x2 resize to 224x100800 (~0.5 s a transform): half the modes, one per kind.
SLIVERS, SLIVER_MODES = [(2, 900), (900, 2)], ["RGB", "RGBA", "LA", "P", "PA", "I;16", "F", "1"]
GRID = [
    (mode, size) for size in SIZES for mode in MODES if size not in SLIVERS or mode in SLIVER_MODES
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The reference's tensor ops are tiny: torch's thread pool only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit_b32():
    """open_clip's eval preprocess for ViT-B-32 and the spec read from open_clip's config."""
    model, _, transform = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, force_quick_gelu=True
    )
    cfg = model.visual.preprocess_cfg
    spec = PreprocessSpec(
        image_size=cfg["size"][0],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
        fill_color=cfg["fill_color"],
    )
    # The grid below is about CLIP's default; make sure that is what we compare.
    assert (spec.image_size, spec.interpolation, spec.resize_mode) == (S, "bicubic", "shortest")
    return transform, Preprocessor(spec)


@pytest.fixture(scope="module")
def other_modes():
    """open_clip's ``longest`` and ``squash`` transforms (odd size, mean, std and fill)."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = {}
    for resize_mode in ("longest", "squash"):
        for interpolation in ("bicubic", "bilinear"):
            transform = open_clip.image_transform(
                193,
                is_train=False,
                mean=mean,
                std=std,
                resize_mode=resize_mode,
                interpolation=interpolation,
                fill_color=7,
            )
            spec = PreprocessSpec(
                image_size=193,
                mean=mean,
                std=std,
                interpolation=interpolation,
                resize_mode=resize_mode,
                fill_color=7,
            )
            out[resize_mode, interpolation] = (transform, Preprocessor(spec))
    return out


@pytest.fixture(scope="module")
def sources(photos):
    return [img for name, img in photos if name in PHOTO_NAMES]


# --------------------------------------------------------------------------- helpers


def photo_at(sources: list[Image.Image], size: tuple[int, int], index: int) -> Image.Image:
    """A real photograph of exactly ``size``: a crop when it fits, else a resize."""
    photo = sources[index % len(sources)]
    w, h = size
    if w <= photo.width and h <= photo.height:
        x0, y0 = (photo.width - w) // 3, (photo.height - h) // 2
        return photo.crop((x0, y0, x0 + w, y0 + h))
    return photo.resize(size, Image.Resampling.BICUBIC)


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _alpha(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 7 + yy * 13) % 256).astype(np.uint8)  # every alpha value, 0 included


#: 64 colours in a shuffled order: palette indices are not intensities, so resampling them
#: with anything but NEAREST (or converting before the resize) shows.
_PALETTE_ORDER = np.random.default_rng(7).permutation(64)
_PALETTE = np.array(
    [[(c >> 4) * 85, ((c >> 2) & 3) * 85, (c & 3) * 85] for c in _PALETTE_ORDER], dtype=np.uint8
)


def _palette_image(arr: np.ndarray) -> Image.Image:
    code = (arr[..., 0] >> 6) * 16 + (arr[..., 1] >> 6) * 4 + (arr[..., 2] >> 6)
    index = np.argsort(_PALETTE_ORDER)[code].astype(np.uint8)
    p = Image.fromarray(index, mode="P")
    p.putpalette(_PALETTE.tobytes())
    return p


def to_mode(rgb: Image.Image, mode: str) -> Image.Image:
    """``rgb`` in ``mode``, with alpha, 16-bit, negative and fractional values that make
    converting before the resize visibly wrong."""
    if mode in ("RGB", "L", "CMYK", "YCbCr", "LAB", "RGBX", "1"):
        return rgb.convert(mode)
    arr = np.asarray(rgb.convert("RGB"))
    h, w = arr.shape[:2]
    gray = np.asarray(rgb.convert("L"))
    if mode == "RGBA":
        return Image.fromarray(np.dstack([arr, _alpha(h, w)]))
    if mode == "LA":
        return Image.merge("LA", (Image.fromarray(gray), Image.fromarray(_alpha(h, w))))
    if mode in ("P", "P+transparency", "PA"):
        p = _palette_image(arr)
        if mode == "P+transparency":
            p.info["transparency"] = 3
        if mode == "PA":
            p = Image.merge("PA", (p, Image.fromarray(_alpha(h, w))))
        return p
    if mode in ("I;16", "I;16B"):
        wide = gray.astype(np.uint16) * 257 ^ (_alpha(h, w).astype(np.uint16) & 0x3F)
        return Image.fromarray(wide if mode == "I;16" else wide.astype(">u2"))
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * 300 - 20_000)
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) * 1.37 - 40.25)
    raise AssertionError(mode)


def assert_parity(ours: np.ndarray, reference) -> float:
    reference = reference.numpy() if hasattr(reference, "numpy") else reference
    assert ours.dtype == np.float32 and ours.flags["C_CONTIGUOUS"]
    assert ours.shape == reference.shape
    diff = float(np.abs(ours - reference).max())
    assert diff <= TOLERANCE, f"max abs diff {diff}"
    return diff


def _crop_offset(long_side: int) -> float:
    return (long_side - S) / 2.0


# --------------------------------------------------------------------------- shortest (CLIP)


def test_the_sizes_exercise_every_rounding_trap():
    """The size list must keep hitting the places where a near-copy of torchvision differs."""
    rows = []
    for w, h in SIZES:
        short, long = min(w, h), max(w, h)
        rows.append((short, long, max(shortest_side_size(w, h, S))))
    # int() truncation, not round(), of the long side
    assert any(int(S * lo / sh) != round(S * lo / sh) for sh, lo, _ in rows)
    # S * long / short, not long / short * S (float evaluation order)
    assert any(int(S * lo / sh) != int(lo / sh * S) for sh, lo, _ in rows)
    # crop offsets at .5: half to even differs from half up (0.5, 2.5, 4.5 ...)
    assert any(_crop_offset(L) % 2 == 0.5 for *_, L in rows)
    # ... and from floor (1.5, 3.5 ...)
    assert any(_crop_offset(L) % 2 == 1.5 for *_, L in rows)
    # 392x427 is the example of the design: 244 by torchvision, 243 by the naive order
    assert shortest_side_size(392, 427, S) == (224, 244) and int(427 / 392 * S) == 243


@pytest.mark.parametrize(("mode", "size"), GRID, ids=[f"{w}x{h}-{mode}" for mode, (w, h) in GRID])
def test_every_mode_and_awkward_size_matches_open_clip(vit_b32, sources, mode, size):
    transform, ours = vit_b32
    image = to_mode(photo_at(sources, size, SIZES.index(size)), mode)
    assert_parity(ours.transform(image), transform(image))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16", "F", "1"])
def test_noise_images_match_open_clip(vit_b32, mode):
    """Uniform noise: every pixel matters to the resampling filter."""
    transform, ours = vit_b32
    for seed, size in enumerate([(5, 300), (640, 361), (225, 226)]):
        image = to_mode(noise(size, seed), mode)
        assert_parity(ours.transform(image), transform(image))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 640),
    height=st.integers(1, 640),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_random_sizes_and_modes_match_open_clip(vit_b32, width, height, mode, seed):
    transform, ours = vit_b32
    assume(max(width, height) <= 24 * min(width, height))  # slivers are covered above
    image = to_mode(noise((width, height), seed), mode)
    assert_parity(ours.transform(image), transform(image))


def test_batch_is_the_stack_of_single_transforms(vit_b32, sources):
    transform, ours = vit_b32
    images = [
        to_mode(photo_at(sources, (320 + i, 240), i), m)
        for i, m in enumerate(["RGB", "P", "RGBA", "I;16", "L"])
    ]
    batch = ours(images)
    assert batch.dtype == np.float32 and batch.flags["C_CONTIGUOUS"]
    assert batch.shape == (5, 3, S, S)
    reference = torch.stack([transform(img) for img in images]).numpy()
    assert_parity(batch, reference)
    assert ours([]).shape == (0, 3, S, S)


def test_tensors_are_bit_identical_not_just_close(vit_b32, sources):
    """The same Pillow calls and the same float32 operations give the same bits (our
    normalisation is a lookup table computed with torchvision's very operations)."""
    transform, ours = vit_b32
    for i, mode in enumerate(["RGB", "P", "RGBA", "LA", "I;16", "F", "CMYK", "1"]):
        image = to_mode(photo_at(sources, (640 + i, 427), i), mode)
        np.testing.assert_array_equal(ours.transform(image), transform(image).numpy())
    everything = Image.fromarray(np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3))
    np.testing.assert_array_equal(ours.transform(everything), transform(everything).numpy())


def test_converting_to_rgb_first_would_break_parity(vit_b32, sources):
    """Why the RGB conversion comes last: doing it first changes these modes' pixels."""
    transform, ours = vit_b32
    for mode in ("P", "RGBA", "LA", "I;16", "F", "1"):
        image = to_mode(photo_at(sources, (333, 501), 1), mode)
        early = ours.transform(image.convert("RGB"))
        assert float(np.abs(early - transform(image).numpy()).max()) > 1e-3, mode


# --------------------------------------------------------------------------- longest, squash


@pytest.mark.parametrize("resize_mode", ["longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    "size",
    [(640, 427), (100, 333), (193, 193), (194, 193), (7, 3), (1, 1), (1920, 1080), (387, 2000)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
def test_longest_and_squash_match_open_clip(other_modes, sources, resize_mode, interpolation, size):
    transform, ours = other_modes[resize_mode, interpolation]
    for mode in ("RGB", "L", "P", "RGBA", "LA", "I;16", "F", "1", "CMYK"):
        image = to_mode(photo_at(sources, size, 2), mode)
        assert_parity(ours.transform(image), transform(image))


def test_longest_refuses_slivers_that_open_clip_cannot_resize(other_modes):
    transform, ours = other_modes["longest", "bicubic"]
    image = noise((2, 900), 0)  # 2 / (900 / 193) rounds to a width of 0
    with pytest.raises(ValueError, match="height and width must be > 0"):
        transform(image)
    with pytest.raises(ImageError, match=r"2x900 image is too thin .* 0x193"):
        ours.transform(image)


@pytest.mark.parametrize("interpolation", ["nearest", "lanczos", "box", "hamming"])
def test_other_interpolations_match_torchvision(sources, interpolation):
    """open_clip only uses bicubic/bilinear; a spec may name the rest, as torchvision does."""
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    reference = tv.Compose(
        [
            tv.Resize(S, interpolation=tv.InterpolationMode(interpolation)),
            tv.CenterCrop(S),
            lambda im: im.convert("RGB"),
            tv.ToTensor(),
            tv.Normalize(mean, std),
        ]
    )
    ours = Preprocessor(PreprocessSpec(S, mean, std, interpolation=interpolation))
    for i, mode in enumerate(["RGB", "RGBA", "P", "I;16", "F"]):
        image = to_mode(photo_at(sources, (517, 389), i), mode)
        assert_parity(ours.transform(image), reference(image))


@pytest.mark.parametrize("mode", MODES)
def test_center_crop_pads_like_torchvision_when_the_image_is_smaller(sources, mode):
    """torchvision's CenterCrop pads with 0 first (never reached by Resize(S) + CenterCrop(S),
    but part of the arithmetic we copy); open_clip's CenterCropOrPad with its fill."""
    image = to_mode(photo_at(sources, (150, 90), 3), mode)
    for size in (151, 160, 201):
        theirs = tvf.center_crop(image, [size])
        ours = center_crop_or_pad(image, size)
        assert (ours.mode, ours.size) == (theirs.mode, theirs.size)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
        assert ours.getpalette() == theirs.getpalette()
        filled = open_clip.transform.center_crop_or_pad(image, [size], fill=9)
        ours = center_crop_or_pad(image, size, fill=9)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(filled))
    for box in ((150, 91), (151, 90), (149, 89)):  # pad one side, crop the other
        np.testing.assert_array_equal(
            np.asarray(center_crop_or_pad(image.resize(box), 150)),
            np.asarray(tvf.center_crop(image.resize(box), [150])),
        )


# --------------------------------------------------------------------------- formats


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


FORMATS = [
    ("JPEG", "RGB"),
    ("JPEG", "L"),
    ("JPEG", "CMYK"),
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "LA"),
    ("PNG", "L"),
    ("PNG", "P"),
    ("PNG", "P+transparency"),
    ("PNG", "I;16"),
    ("PNG", "1"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
    ("GIF", "P"),
    ("GIF", "L"),
    ("TIFF", "RGB"),
    ("TIFF", "RGBA"),
    ("TIFF", "CMYK"),
    ("TIFF", "YCbCr"),
    ("TIFF", "LAB"),
    ("TIFF", "I;16"),
    ("TIFF", "I;16B"),
    ("TIFF", "I"),
    ("TIFF", "F"),
    ("TIFF", "1"),
    ("TIFF", "PA"),
    ("TIFF", "LA"),
    ("BMP", "RGB"),
    ("BMP", "P"),
    ("BMP", "L"),
    ("BMP", "1"),
]


@pytest.mark.parametrize(("fmt", "mode"), FORMATS, ids=lambda v: v)
def test_every_format_through_load_image_matches_open_clip(vit_b32, sources, fmt, mode):
    transform, ours = vit_b32
    image = to_mode(photo_at(sources, (391, 283), FORMATS.index((fmt, mode))), mode)
    data = _encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    loaded = load_image(data, max_pixels=10**8)
    reference_image = Image.open(io.BytesIO(data))  # what a user of open_clip feeds it
    assert loaded.mode == reference_image.mode  # the original mode, not RGB
    assert_parity(ours.transform(loaded), transform(reference_image))


def _animated(fmt: str, frames: list[Image.Image]) -> bytes:
    kwargs = {"save_all": True, "append_images": frames[1:]}
    if fmt == "WEBP":
        kwargs["lossless"] = True
    return _encode(frames[0], fmt, **kwargs)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF"])
def test_animated_and_multipage_files_use_the_first_frame_like_open_clip(vit_b32, sources, fmt):
    transform, ours = vit_b32
    frames = [photo_at(sources, (300, 200), i) for i in range(3)]
    if fmt == "GIF":
        frames = [to_mode(f, "P") for f in frames]
    data = _animated(fmt, frames)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    got = ours.transform(load_image(data, max_pixels=10**8))
    assert_parity(got, transform(Image.open(io.BytesIO(data))))
    # ... and that really is frame 0, not a later one
    later = Image.open(io.BytesIO(data))
    later.seek(2)
    assert float(np.abs(got - transform(later).numpy()).max()) > 0.1


def test_exif_orientation_is_ignored_like_open_clip(vit_b32, sources):
    transform, ours = vit_b32
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW": open_clip does not apply it, neither do we
    data = _encode(photo_at(sources, (320, 240), 0), "JPEG", exif=exif)
    loaded = load_image(data, max_pixels=10**8)
    assert loaded.size == (320, 240)
    assert_parity(ours.transform(loaded), transform(Image.open(io.BytesIO(data))))
