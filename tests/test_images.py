"""Frame loading: every input kind, hostile inputs refused with precise errors, fast decode."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from heimdex_clip import ImageError
from heimdex_clip.images import content_hash, load_image

LIMIT = 64_000_000


@pytest.fixture(scope="module")
def photo(photos) -> Image.Image:
    return dict(photos)["coffee"]


@pytest.fixture()
def jpeg_path(photo, tmp_path) -> Path:
    path = tmp_path / "frame.jpg"
    photo.save(path, quality=90)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny IDAT: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_every_input_kind_decodes_to_the_same_pixels(jpeg_path):
    reference = np.asarray(load_image(jpeg_path, max_pixels=LIMIT))
    pil = Image.open(jpeg_path)
    sources = [str(jpeg_path), jpeg_path, jpeg_path.read_bytes(),
               bytearray(jpeg_path.read_bytes()), memoryview(jpeg_path.read_bytes()), pil,
               reference.copy()]
    for source in sources:
        np.testing.assert_array_equal(np.asarray(load_image(source, max_pixels=LIMIT)),
                                      reference)


def test_original_mode_is_kept(photo, tmp_path):
    path = tmp_path / "p.png"
    photo.convert("P").save(path)
    assert load_image(path, max_pixels=LIMIT).mode == "P"  # converted to RGB after the crop
    gray = np.zeros((5, 6), np.uint8)
    assert load_image(gray, max_pixels=LIMIT).mode == "L"
    assert load_image(np.zeros((5, 6, 4), np.uint8), max_pixels=LIMIT).mode == "RGBA"


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: b"", "empty (0 bytes)"),
    (lambda tmp: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
     "cannot identify an image format"),
    (lambda tmp: tmp / "missing.jpg", "does not exist"),
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: np.zeros((4, 4, 2), np.uint8), "shape (4, 4, 2)"),
    (lambda tmp: np.zeros((4, 4, 3), np.float32), "dtype float32"),
    (lambda tmp: np.zeros((0, 4, 3), np.uint8), "must not be empty"),
    (lambda tmp: 42, "unsupported image source type int"),
])
def test_hostile_and_wrong_inputs_are_precise_image_errors(tmp_path, make, message):
    with pytest.raises(ImageError) as info:
        load_image(make(tmp_path), max_pixels=LIMIT)
    assert message in str(info.value)


def test_empty_file_on_disk(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageError, match="empty"):
        load_image(path, max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_fail_at_decode_not_later(photo, fmt):
    buf = io.BytesIO()
    photo.save(buf, format=fmt)
    data = buf.getvalue()
    with pytest.raises(ImageError, match=r"cannot decode|cannot identify|cannot open"):
        load_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_decompression_bomb_is_refused_from_the_header_before_decoding():
    bomb = _png_header_only(100_000, 100_000)  # 10^10 pixels, 30 GB if decoded
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"over the limit.*10000000000 pixels"):
        load_image(bomb, max_pixels=LIMIT)
    moderate = _png_header_only(12_000, 10_000)  # under Pillow's own guard, over ours
    with pytest.raises(ImageError, match=r"12000x10000 = 120000000 pixels, over the limit"):
        load_image(moderate, max_pixels=LIMIT)
    assert time.perf_counter() - started < 1.0


def test_pixel_limit_applies_to_in_memory_images_too():
    with pytest.raises(ImageError, match="over the limit of 100 pixels"):
        load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=100)


def test_fast_decode_shrinks_a_1080p_jpeg_but_keeps_the_model_size(photo, tmp_path):
    path = tmp_path / "hd.jpg"
    photo.resize((1920, 1080)).save(path, quality=90)
    exact = load_image(path, max_pixels=LIMIT)
    fast = load_image(path, max_pixels=LIMIT, min_side_for_draft=224)
    assert exact.size == (1920, 1080)
    assert min(fast.size) >= 224 and fast.size[0] <= 1920 // 4
    png = tmp_path / "hd.png"
    photo.resize((1920, 1080)).save(png)
    reduced = load_image(png, max_pixels=LIMIT, min_side_for_draft=224)
    assert min(reduced.size) >= 224 and reduced.size == (1920 // 4, 1080 // 4)
    small = load_image(photo, max_pixels=LIMIT, min_side_for_draft=224)
    assert small.size == photo.size  # nothing to gain: untouched


def test_content_hash_tracks_content_not_source_kind(jpeg_path, photo):
    data = jpeg_path.read_bytes()
    assert content_hash(jpeg_path) == content_hash(data) == content_hash(str(jpeg_path))
    assert content_hash(data) != content_hash(data[:-1] + b"\x00")
    array = np.asarray(photo)
    assert content_hash(array) == content_hash(array.copy())
    assert content_hash(array) != content_hash(array[::-1].copy())
    assert content_hash(photo) == content_hash(photo.copy())
    assert content_hash(photo) != content_hash(photo.convert("L"))
    assert content_hash(Path("/nonexistent/x.jpg")) is None
