"""Frame loading: every input kind, hostile inputs refused with precise errors, fast decode,
content hashes. Runs without torch (the expected tensors come from our own Preprocessor,
whose parity with open_clip is tests/test_preprocess_parity.py's job)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hostile import encode
from hostile import png_with_size as png_bomb
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

import heimdex_clip.images as images_module
from heimdex_clip import ImageError
from heimdex_clip.artifact import PreprocessSpec
from heimdex_clip.images import load_image
from heimdex_clip.preprocess import Preprocessor

LIMIT = 64_000_000
#: ViT-B-32's preprocessing (open_clip's OPENAI_DATASET_MEAN/STD), as the manifest holds it.
SPEC = PreprocessSpec(
    image_size=224,
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
)


@pytest.fixture(scope="module")
def photo(photos) -> Image.Image:
    return dict(photos)["coffee"]


@pytest.fixture(scope="module")
def preprocess() -> Preprocessor:
    return Preprocessor(SPEC)


# --------------------------------------------------------------------------- input kinds


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_every_input_kind_gives_the_same_tensor(photo, preprocess, tmp_path, mode):
    image = photo.convert(mode)
    if mode == "RGBA":
        alpha = np.fromfunction(lambda y, x: (x * 3 + y) % 256, image.size[::-1])
        image.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    path = tmp_path / f"frame-{mode}.png"
    image.save(path)  # lossless: every kind must give the very same pixels
    data = path.read_bytes()
    array = np.asarray(image)
    sources = {
        "str": str(path),
        "Path": path,
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "PIL (lazy, unloaded)": Image.open(path),
        "PIL (loaded)": image.copy(),
        "numpy": array.copy(),
        "numpy (strided view)": np.ascontiguousarray(array[:, ::-1])[:, ::-1],
    }
    reference = preprocess.transform(image)
    assert np.abs(reference).max() > 0.5  # a real picture, not a blank tensor
    for kind, source in sources.items():
        loaded = load_image(source, max_pixels=LIMIT)
        assert loaded.mode == mode, kind
        np.testing.assert_array_equal(preprocess.transform(loaded), reference, err_msg=kind)


def test_original_mode_is_kept_not_converted_to_rgb(photo, tmp_path):
    """open_clip converts to RGB after resize and crop; converting here would change pixels."""
    cases = {
        "P": photo.quantize(32),
        "LA": photo.convert("LA"),
        "1": photo.convert("1"),
        "I;16": Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257),
        "CMYK": photo.convert("CMYK"),
    }
    for mode, image in cases.items():
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        assert load_image(encode(image, fmt), max_pixels=LIMIT).mode == mode
    assert load_image(np.zeros((5, 6), np.uint8), max_pixels=LIMIT).mode == "L"
    assert load_image(np.zeros((5, 6, 4), np.uint8), max_pixels=LIMIT).size == (6, 5)


def test_a_loaded_frame_no_longer_needs_its_file(photo, preprocess, tmp_path):
    """Fully decoded and the file closed: deleting it afterwards changes nothing."""
    frames = [photo.rotate(a).quantize(64) for a in (0, 90, 180)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = load_image(path, max_pixels=LIMIT)
    path.unlink()
    assert preprocess.transform(image).shape == (3, 224, 224)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_no_file_descriptor_is_left_open(photo, tmp_path):
    """Pillow keeps multi-frame files open after load(); we read through a file we close."""
    frames = [photo.rotate(a).quantize(64) for a in (0, 90)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    before = len(os.listdir("/proc/self/fd"))
    kept = [load_image(path, max_pixels=LIMIT) for _ in range(20)]
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(kept) == 20


def test_a_file_rewritten_after_loading_does_not_change_the_frame(tmp_path):
    """Image.open(path) memory-maps raw formats: a frame rewritten on disk changes (or, if
    truncated, crashes) the image. We never map the file."""
    path = tmp_path / "gray.pgm"
    Image.fromarray(np.full((400, 500), 10, np.uint8)).save(path)
    ours = load_image(path, max_pixels=LIMIT)
    mapped = Image.open(path)
    mapped.load()
    with open(path, "r+b") as f:
        f.seek(-500, os.SEEK_END)
        f.write(b"\xff" * 500)
    assert np.asarray(ours)[-1].max() == 10
    if getattr(mapped, "map", None) is not None:  # the hazard we avoid, where Pillow maps
        assert np.asarray(mapped)[-1].max() == 255


# --------------------------------------------------------------------------- hostile input


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(image: Image.Image, fmt: str, fraction: float = 0.5) -> bytes:
    data = encode(image, fmt)
    return data[: int(len(data) * fraction)]


HOSTILE = {
    "zero bytes": (lambda tmp, img: b"", r"^image data is empty \(0 bytes\)$"),
    "random bytes": (
        lambda tmp, img: bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)),
        r"<4096 bytes of image data> is not an image \(unknown format",
    ),
    "html error page": (
        lambda tmp, img: b"<html><body>404 Not Found</body></html>",
        r"is not an image \(unknown format",
    ),
    "truncated JPEG": (
        lambda tmp, img: _truncated(img, "JPEG"),
        r"is a truncated JPEG file \(data ends early",
    ),
    "truncated PNG": (
        lambda tmp, img: _truncated(img, "PNG"),
        r"is a truncated PNG file \(data ends early",
    ),
    "truncated WebP": (lambda tmp, img: _truncated(img, "WEBP"), r"is a truncated WebP file"),
    "truncated GIF": (
        lambda tmp, img: _truncated(img.quantize(64), "GIF"),
        r"is a truncated GIF file",
    ),
    "truncated TIFF": (lambda tmp, img: _truncated(img, "TIFF"), r"is a truncated TIFF file"),
    "truncated BMP": (lambda tmp, img: _truncated(img, "BMP"), r"is a truncated BMP file"),
    "PNG cut inside its header": (
        lambda tmp, img: encode(img, "PNG")[:14],
        r"starts like a PNG file but its header cannot be read: the file is truncated",
    ),
    "corrupt PNG data": (
        lambda tmp, img: (lambda d: d[:5000] + b"\x00" * 200 + d[5200:])(encode(img, "PNG")),
        r"is a corrupt PNG file \(OSError: .*data stream",
    ),
    "empty file": (
        lambda tmp, img: _file(tmp / "empty.jpg", b""),
        r"image file .*empty\.jpg is empty \(0 bytes\)$",
    ),
    "a directory": (lambda tmp, img: tmp, r"is a directory, not an image file$"),
    "a missing file": (
        lambda tmp, img: tmp / "missing.jpg",
        r"image file .*missing\.jpg does not exist$",
    ),
    "a path through a file": (
        lambda tmp, img: _file(tmp / "f.jpg", b"x") / "x.jpg",
        r"image file .*f\.jpg/x\.jpg does not exist$",
    ),
    "an empty path": (lambda tmp, img: "", r"^image path is empty$"),
    "a device": (lambda tmp, img: Path("/dev/zero"), r"/dev/zero is not a regular file"),
    "numpy 2 channels": (
        lambda tmp, img: np.zeros((4, 4, 2), np.uint8),
        r"got shape \(4, 4, 2\) dtype uint8$",
    ),
    "numpy 1 channel": (
        lambda tmp, img: np.zeros((4, 4, 1), np.uint8),
        r"got shape \(4, 4, 1\) dtype uint8$",
    ),
    "numpy float": (
        lambda tmp, img: np.zeros((4, 4, 3), np.float32),
        r"must be uint8 HxWx3 \(RGB\).*got shape \(4, 4, 3\) dtype float32$",
    ),
    "numpy uint16 gray": (
        lambda tmp, img: np.zeros((4, 4), np.uint16),
        r"got shape \(4, 4\) dtype uint16$",
    ),
    "numpy bool": (lambda tmp, img: np.zeros((4, 4), bool), r"got shape \(4, 4\) dtype bool$"),
    "numpy 1-D": (lambda tmp, img: np.zeros(12, np.uint8), r"got shape \(12,\) dtype uint8$"),
    "numpy 4-D": (
        lambda tmp, img: np.zeros((1, 4, 4, 3), np.uint8),
        r"got shape \(1, 4, 4, 3\) dtype uint8$",
    ),
    "numpy empty": (
        lambda tmp, img: np.zeros((0, 4, 3), np.uint8),
        r"must not be empty; got shape \(0, 4, 3\)$",
    ),
    "PIL 0x0": (lambda tmp, img: Image.new("RGB", (0, 0)), r"has no pixels \(0x0\)$"),
    "unsupported type": (lambda tmp, img: 42, r"^unsupported image source type int$"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_and_wrong_inputs_are_precise_image_errors(photo, tmp_path, case):
    make, message = HOSTILE[case]
    if case == "a device" and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero on this system")
    source = make(tmp_path, photo)
    started = time.perf_counter()
    with pytest.raises(ImageError, match=message):
        load_image(source, max_pixels=LIMIT)
    assert time.perf_counter() - started < 2.0
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on to "cope"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "frame.jpg"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(result, fifo), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "load_image blocked on a FIFO"
    assert isinstance(result[0], ImageError) and "not a regular file" in str(result[0])


def _capture(result: list[BaseException], source: Path) -> None:
    try:
        load_image(source, max_pixels=LIMIT)
    except BaseException as exc:
        result.append(exc)


def test_a_truncated_lazy_pil_image_is_an_image_error(photo):
    lazy = Image.open(io.BytesIO(_truncated(photo, "JPEG")))
    with pytest.raises(
        ImageError,
        match=r"^the RGB PIL image is a truncated JPEG file "
        r"\(data ends early; OSError: image file is truncated",
    ):
        load_image(lazy, max_pixels=LIMIT)


def test_someone_elses_load_truncated_images_is_reported(photo, monkeypatch, caplog):
    """We never set Pillow's global; if other code did, truncation goes undetected: say so."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(images_module, "_warned_truncated_global", False)
    with caplog.at_level("WARNING", logger="heimdex_clip.images"):
        load_image(_truncated(photo, "JPEG", 0.9), max_pixels=LIMIT)
    assert "LOAD_TRUNCATED_IMAGES was set to True outside heimdex_clip" in caplog.text


# --------------------------------------------------------------------------- bombs


def test_decompression_bomb_is_refused_from_the_header_quickly_and_silently(monkeypatch):
    # Any decode attempt fails the test: the refusal must come before ImageFile.load.
    def no_decoding(self):
        raise AssertionError("a bomb reached the decoder")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    filters = list(warnings.filters)
    cases = [
        # 10^10 pixels (30 GB): Pillow's own error fires first; our message, our limit.
        (
            png_bomb(100_000, 100_000),
            r"is 10000000000 pixels, over the limit of 64000000 pixels \(CLIP_MAX_IMAGE_PIXELS\)",
        ),
        # 120 M pixels: Pillow would only warn (and decode); we refuse.
        (
            png_bomb(12_000, 10_000),
            r"is 12000x10000 = 120000000 pixels, over the limit of 64000000 pixels",
        ),
        # 72 M pixels: under Pillow's threshold, so our guard is the only one.
        (png_bomb(9_000, 8_000), r"is 9000x8000 = 72000000 pixels, over the limit of 64000000"),
    ]
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data, message in cases:
            with pytest.raises(ImageError, match=message):
                load_image(data, max_pixels=LIMIT)
    assert time.perf_counter() - started < 0.5
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert warnings.filters == filters  # no filter left behind


def test_pillows_hard_limit_still_applies_above_a_generous_setting():
    with pytest.raises(
        ImageError,
        match=r"is 10000000000 pixels, over Pillow's hard limit of "
        r"\d+ pixels .*cannot raise",
    ):
        load_image(png_bomb(100_000, 100_000), max_pixels=10**12)


def test_pixel_limit_applies_to_in_memory_frames_too():
    with pytest.raises(
        ImageError,
        match=r"numpy frame is 20x20 = 400 pixels, over the limit "
        r"of 100 pixels",
    ):
        load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=100)
    with pytest.raises(ImageError, match=r"RGB PIL image is 20x10 = 200 pixels"):
        load_image(Image.new("RGB", (20, 10)), max_pixels=100)


_RSS_PROBE = """
import re, sys
from heimdex_clip.errors import ImageError
from heimdex_clip.images import load_image
data = open(sys.argv[1], "rb").read()
def peak_mb():  # this process's own peak RSS (ru_maxrss would include the forking parent's)
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]) / 1024
base = peak_mb()
try:
    load_image(data, max_pixels=10_000_000)
    raise SystemExit("the bomb was not refused")
except ImageError:
    pass
refused = peak_mb()
load_image(data, max_pixels=64_000_000)  # control: decoding it really costs memory
print(base, refused, peak_mb())
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_a_real_bomb_is_refused_before_its_memory_is_allocated(tmp_path):
    """8000x6000 zero pixels compress to ~140 KB and decode to ~190 MB: peak memory proves
    the refusal happened before allocation (the control decode shows the probe works)."""
    bomb = png_bomb(8_000, 6_000, rows=6_000)
    assert len(bomb) < 400_000
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    base, refused, decoded = (float(x) for x in out.stdout.split())
    assert refused - base < 10, (base, refused)
    assert decoded - base > 150, (base, decoded)


# --------------------------------------------------------------------------- fast decode


@pytest.fixture(scope="module")
def hd_jpeg(photo) -> bytes:
    return encode(photo.resize((1920, 1080), Image.Resampling.BICUBIC), "JPEG", quality=90)


def test_fast_decode_shrinks_a_1080p_jpeg_by_dct_scaling(hd_jpeg, preprocess, tmp_path):
    path = tmp_path / "hd.jpg"
    path.write_bytes(hd_jpeg)
    exact = load_image(path, max_pixels=LIMIT)
    fast = load_image(path, max_pixels=LIMIT, min_side_for_draft=224)
    assert exact.size == (1920, 1080)
    # 1/4 keeps 270 >= 224 (1/8 would give 135): 16x fewer pixels, same mode
    assert fast.size == (480, 270) and fast.mode == exact.mode
    assert min(fast.size) >= 224 and fast.width * fast.height * 16 <= 1920 * 1080
    # 1/8 then an integer reduce when even that leaves more than needed
    assert load_image(hd_jpeg, max_pixels=LIMIT, min_side_for_draft=100).size == (240, 135)
    assert load_image(hd_jpeg, max_pixels=LIMIT, min_side_for_draft=60).size == (120, 68)
    # the measured price: small pixel changes in the model input (documented, opt-in)
    a, b = preprocess.transform(exact), preprocess.transform(fast, fast=True)
    diff = np.abs(a - b)
    assert 0 < diff.mean() < 0.05 and diff.max() < 1.0
    cosine = float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine > 0.995


@pytest.mark.parametrize(
    "size", [(480, 270), (1920, 1080), (270, 480), (300, 225), (225, 224), (4000, 3000)]
)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_fast_geometry_computes_only_the_crop_and_stays_within_one_level(
    photo, preprocess, size, mode, monkeypatch
):
    """CLIP_FAST_DECODE's shrink makes only the S x S crop (not the whole resized image),
    and its pixels stay within 3 levels of open_clip's resize-then-crop (the most seen on
    300 random sizes; the DCT-scaled decode itself moves pixels far more)."""
    image = photo.convert(mode).resize(size, Image.Resampling.BICUBIC)
    exact = np.asarray(preprocess.geometry(image), dtype=np.int16)
    asked: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        asked.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    fast = preprocess.geometry(image, fast=True)
    monkeypatch.undo()

    assert fast.size == (224, 224) and fast.mode == image.mode
    assert set(asked) == (set() if min(size) == 224 else {(224, 224)})  # RGBA: twice
    assert np.abs(np.asarray(fast, dtype=np.int16) - exact).max() <= 3


def test_fast_geometry_leaves_the_other_resize_modes_and_small_frames_exact(photo):
    for resize_mode in ("longest", "squash"):
        pre = Preprocessor(
            PreprocessSpec(image_size=224, mean=SPEC.mean, std=SPEC.std, resize_mode=resize_mode)
        )
        image = photo.resize((640, 360))
        assert np.array_equal(pre.transform(image, fast=True), pre.transform(image))
    small = photo.resize((200, 150))  # an enlargement: nothing to save, exact
    pre = Preprocessor(SPEC)
    assert np.array_equal(pre.transform(small, fast=True), pre.transform(small))


def test_fast_decode_reduces_other_formats_by_the_largest_safe_factor(photo):
    hd = photo.resize((1920, 1080))
    assert load_image(encode(hd, "PNG"), max_pixels=LIMIT, min_side_for_draft=224).size == (
        480,
        270,
    )
    # Image.reduce rounds up: 447 / 2 -> 224 still fits, so the factor is 2, not 1
    assert load_image(
        encode(photo.resize((447, 600)), "PNG"), max_pixels=LIMIT, min_side_for_draft=224
    ).size == (224, 300)
    assert load_image(
        encode(photo.resize((446, 600)), "PNG"), max_pixels=LIMIT, min_side_for_draft=224
    ).size == (446, 600)
    # palette indices and bits cannot be averaged: those stay exact
    for image in (hd.quantize(64), hd.convert("1")):
        assert load_image(encode(image, "PNG"), max_pixels=LIMIT, min_side_for_draft=224).size == (
            1920,
            1080,
        )
    # a small frame has nothing to gain
    assert load_image(photo, max_pixels=LIMIT, min_side_for_draft=224).size == photo.size
    with pytest.raises(ValueError, match="min_side_for_draft"):
        load_image(photo, max_pixels=LIMIT, min_side_for_draft=0)


def test_fast_decode_never_modifies_a_pil_image_it_is_given(hd_jpeg):
    lazy = Image.open(io.BytesIO(hd_jpeg))
    reduced = load_image(lazy, max_pixels=LIMIT, min_side_for_draft=224)
    assert lazy.size == (1920, 1080) and reduced is not lazy
    assert reduced.size == (480, 270)


@settings(max_examples=300, deadline=None)
@given(short=st.integers(1, 5000), min_side=st.integers(1, 1000))
def test_draft_and_reduce_factors_are_the_largest_that_keep_the_short_side(short, min_side):
    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    k = images_module._reduce_factor(short, short + 7, min_side)
    assert k >= 1
    if short >= min_side:
        assert ceil_div(short, k) >= min_side
    if short >= min_side > 1:  # maximal (with min_side 1 every k qualifies: k = short)
        assert ceil_div(short, k + 1) < min_side
    scale = images_module._draft_scale(short + 3, short, min_side)
    assert scale in (1, 2, 4, 8)
    assert scale == 1 or ceil_div(short, scale) >= min_side
    assert scale == 8 or ceil_div(short, scale * 2) < min_side


@pytest.mark.parametrize("size", [(1000, 563), (450, 800), (449, 224), (3000, 1700)])
def test_jpeg_draft_lands_on_the_planned_scale(photo, size):
    data = encode(photo.resize(size), "JPEG")
    scale = images_module._draft_scale(*size, 224)
    fast = load_image(data, max_pixels=LIMIT, min_side_for_draft=224)
    if images_module._reduce_factor(*fast.size, 224) == 1:  # no reduce stacked on top
        assert fast.size == tuple(-(-d // scale) for d in size)
    assert min(fast.size) >= min(224, min(size))


# --------------------------------------------------------------------------- concurrency


def test_concurrent_loads_are_correct_and_leave_no_warning_filter(photo, preprocess):
    good = encode(photo, "PNG")
    bad = [b"", _truncated(photo, "JPEG"), png_bomb(12_000, 10_000)]
    expected = preprocess.transform(photo)
    filters = list(warnings.filters)

    def job(i: int) -> bool:
        if i % 2:
            with pytest.raises(ImageError):
                load_image(bad[i % 3], max_pixels=LIMIT)
            return True
        return np.array_equal(preprocess.transform(load_image(good, max_pixels=LIMIT)), expected)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(job, range(48)))
    assert warnings.filters == filters


# --------------------------------------------------------------------------- preprocessor


def test_preprocessor_refuses_what_it_cannot_process_with_image_errors(preprocess, photo):
    with pytest.raises(ImageError, match=r"takes PIL images, got ndarray"):
        preprocess.transform(np.asarray(photo))  # type: ignore[arg-type]
    with pytest.raises(ImageError, match=r"a 0x0 image has no pixels"):
        preprocess([Image.new("RGB", (0, 0))])
    premultiplied = photo.convert("RGBa").convert("La")  # a mode Pillow cannot resize
    with pytest.raises(ImageError, match=r"cannot preprocess a La 600x400 image"):
        preprocess.transform(premultiplied)
