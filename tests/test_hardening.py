"""Hostile frames cost bounded time and memory, and the worker path never raises.

Each class of attack gets cases of its own: slivers whose resize would explode, files and
arrays too large to touch, lazily opened images, formats no video frame comes in, decodes
that outlive their deadline or run out of memory, and arguments that could not be stored.
Every worker-path result must carry metadata that PostgreSQL can store as jsonb.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hostile import BlockingImage, ExhaustingImage, encode, png_with_size
from PIL import Image

from heimdex_clip import ClipConfig, ClipEmbedder, ConfigError, ImageError

REPO = Path(__file__).resolve().parents[1]


def make_config(artifact_dir: Path, **changes) -> ClipConfig:
    return ClipConfig(enabled=True, pretrained="none", model_dir=artifact_dir, **changes)


@pytest.fixture(scope="module")
def embedder(artifact_dir) -> ClipEmbedder:
    return ClipEmbedder(config=make_config(artifact_dir, timeout_s=2.0)).load()


@pytest.fixture(scope="module")
def good_frame(photos) -> bytes:
    return encode(photos[0][1], "JPEG", quality=90)


def assert_storable(metadata: dict) -> None:
    """What PostgreSQL's jsonb accepts: strict JSON, finite numbers, UTF-8 text, no NUL."""
    text = json.dumps(metadata, allow_nan=False)
    text.encode("utf-8")
    assert "\\u0000" not in text


def assert_fails_fast(embedder: ClipEmbedder, frame, message: str) -> None:
    started = time.perf_counter()
    result = embedder.embed_frame(frame, frame_path="hostile")
    elapsed = time.perf_counter() - started
    assert result.embedding is None
    assert message in result.error, result.error
    assert "Timeout" not in result.error  # refused up front, not abandoned at the deadline
    assert elapsed < embedder.config.timeout_s
    assert_storable(result.metadata)


# --------------------------------------------------------------------------- resize output


@pytest.mark.parametrize("size", [(20000, 1), (1, 30000), (60000, 40), (9000, 30)])
def test_slivers_whose_resize_would_explode_are_refused_before_decoding(embedder, size):
    assert_fails_fast(embedder, png_with_size(*size, rows=size[1]), "CLIP_MAX_RESIZE_PIXELS")


def test_the_resize_bound_is_a_setting_and_ordinary_panoramas_pass(artifact_dir):
    panorama = np.zeros((200, 3000, 3), np.uint8)  # 15:1, resized to 224x3360
    assert ClipEmbedder(config=make_config(artifact_dir)).embed_frame(panorama).ok
    strict = ClipEmbedder(config=make_config(artifact_dir, max_resize_pixels=500_000))
    assert_fails_fast(strict, panorama, "over the limit of 500000 (CLIP_MAX_RESIZE_PIXELS)")


# --------------------------------------------------------------------------- input size


def test_a_huge_sparse_file_is_refused_from_its_size_without_reading(embedder, tmp_path):
    huge = tmp_path / "frame.jpg"
    with open(huge, "wb") as f:
        f.truncate(50 * 1024**3)  # 50 GB, sparse: reading it would take minutes
    assert_fails_fast(embedder, huge, "CLIP_MAX_IMAGE_BYTES")


def test_encoded_bytes_over_the_limit_are_refused(artifact_dir, good_frame, tmp_path):
    small_limit = ClipEmbedder(config=make_config(artifact_dir, max_image_bytes=1000))
    for frame in (good_frame, bytearray(good_frame), memoryview(good_frame)):
        assert_fails_fast(small_limit, frame, "CLIP_MAX_IMAGE_BYTES")
    path = tmp_path / "frame.jpg"
    path.write_bytes(good_frame)
    assert_fails_fast(small_limit, path, "CLIP_MAX_IMAGE_BYTES")


def test_a_broadcast_array_is_refused_without_being_copied(embedder):
    # 30000 x 30000 x 3 = 2.7 GB if anything materialised it; as a view it costs 3 bytes.
    view = np.broadcast_to(np.zeros(3, np.uint8), (30000, 30000, 3))
    assert_fails_fast(embedder, view, "CLIP_MAX_IMAGE_PIXELS")
    assert_fails_fast(
        embedder, np.broadcast_to(np.zeros(3, np.uint8), (1, 30000, 3)), "CLIP_MAX_RESIZE_PIXELS"
    )


def test_a_lazily_opened_large_image_is_refused_before_decoding(embedder, tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_with_size(9000, 8000))  # 72 MP header, a few bytes of data
    lazy = Image.open(path)
    assert_fails_fast(embedder, lazy, "refused before decoding")
    assert lazy.tile  # still not decoded


# --------------------------------------------------------------------------- formats


def test_a_tga_named_jpg_is_refused_as_a_format_no_frame_comes_in(embedder, tmp_path):
    header = bytes([0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + (64).to_bytes(2, "little") * 2
    data = header + bytes([24, 0]) + np.random.default_rng(1).bytes(64 * 64 * 3)
    path = tmp_path / "frame.jpg"
    path.write_bytes(data)
    assert Image.open(path).format == "TGA"  # Pillow would decode it
    assert_fails_fast(embedder, path, "is a TGA image, not an allowed frame format")


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "SGI", "IM"])
def test_formats_outside_the_allow_list_are_refused_by_default(embedder, photos, fmt):
    data = encode(photos[1][1].resize((64, 64)), fmt)
    assert_fails_fast(embedder, data, f"is a {fmt} image, not an allowed frame format")


def test_eps_never_reaches_ghostscript(embedder, tmp_path):
    eps = (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
        b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"
    )
    path = tmp_path / "frame.eps"
    path.write_bytes(eps)
    assert_fails_fast(embedder, path, "is a EPS image, not an allowed frame format")
    lazy = Image.open(path)
    assert_fails_fast(embedder, lazy, "not an allowed frame format")


def test_the_allow_list_is_a_setting(artifact_dir, photos):
    ico = encode(photos[1][1].resize((64, 64)), "ICO")
    config = ClipConfig.from_env({"CLIP_IMAGE_FORMATS": "jpeg, png, ico"})
    assert config.image_formats == {"JPEG", "PNG", "ICO"}
    relaxed = ClipEmbedder(
        config=config.replace(enabled=True, pretrained="none", model_dir=artifact_dir)
    )
    assert relaxed.embed_frame(ico).ok
    assert "not an allowed frame format" in relaxed.embed_frame(encode(photos[1][1], "WEBP")).error
    with pytest.raises(ConfigError, match="no format named NOPE"):
        ClipConfig.from_env({"CLIP_IMAGE_FORMATS": "JPEG,nope"})


def test_the_strict_path_applies_the_same_limits(embedder):
    with pytest.raises(ImageError, match="CLIP_MAX_RESIZE_PIXELS"):
        embedder.embed_images([png_with_size(20000, 1, rows=1)])


# --------------------------------------------------------------------------- deadlines


def test_abandoned_decodes_do_not_starve_later_frames(artifact_dir, good_frame):
    emb = ClipEmbedder(config=make_config(artifact_dir, timeout_s=0.5)).load()
    gate = threading.Event()
    try:
        stuck = emb.embed_frames([BlockingImage(gate) for _ in range(8)])
        assert {r.error for r in stuck} == {"Timeout after 0.5s"}
        assert emb.active_jobs == 8  # all eight decodes still running...
        started = time.perf_counter()
        good = emb.embed_frame(good_frame)  # ...and a good frame still gets through
        assert good.ok and time.perf_counter() - started < 0.5
    finally:
        gate.set()


def test_a_frame_that_exhausts_memory_fails_alone(embedder, good_frame):
    results = embedder.embed_frames([good_frame, ExhaustingImage(), good_frame])
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error.startswith("MemoryError")
    assert embedder.embed_frame(ExhaustingImage()).error.startswith("MemoryError")


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "quality",
    [
        "high",
        [0.5],
        float("nan"),
        float("inf"),
        True,
        {"quality_score": float("nan")},
        {1: 0.5},
        object(),
        {"score": {"deep": [float("-inf")]}},
    ],
)
def test_a_bad_frame_quality_fails_the_frame_with_storable_metadata(embedder, good_frame, quality):
    result = embedder.embed_frame(good_frame, frame_quality=quality)
    assert result.embedding is None and result.error.startswith("Invalid argument: ")
    assert "frame_quality" in result.error
    assert_storable(result.metadata)


@pytest.mark.parametrize(
    "quality", [0.82, 1, np.float32(0.5), {"quality_score": 0.7, "sharpness": [1, 2.5]}]
)
def test_good_frame_qualities_are_kept(embedder, good_frame, quality):
    result = embedder.embed_frame(good_frame, frame_quality=quality)
    assert result.ok
    expected = quality if isinstance(quality, dict) else {"quality_score": float(quality)}
    assert result.metadata["frame_quality"] == expected
    assert_storable(result.metadata)


@pytest.mark.parametrize(
    ("path", "stored"),
    [
        (b"scene_\xff.jpg", "scene_\\xff.jpg"),  # bytes that are not UTF-8
        ("scene_\udcff.jpg", "scene_\\xff.jpg"),  # the same name as Python decodes it
        ("lone_\ud800.jpg", "lone_\\ud800.jpg"),  # a lone surrogate
        ("nul\x00.jpg", "nul\\x00.jpg"),  # PostgreSQL text cannot hold NUL
        (Path("ok/é.jpg"), "ok/é.jpg"),
    ],
)
def test_frame_paths_are_always_storable(embedder, good_frame, path, stored):
    result = embedder.embed_frame(good_frame, frame_path=path)
    assert result.ok and result.metadata["frame_path"] == stored
    assert_storable(result.metadata)


def test_errors_naming_unstorable_paths_are_storable(embedder, tmp_path):
    missing = os.fsdecode(bytes(tmp_path) + b"/missing_\xff.jpg")
    result = embedder.embed_frame(missing)
    assert "does not exist" in result.error
    assert_storable(result.metadata)


def test_calls_whose_arguments_do_not_fit_fail_every_frame_without_raising(embedder, good_frame):
    results = embedder.embed_frames([good_frame, good_frame], frame_paths=["a.jpg"])
    assert len(results) == 2 and all(not r.ok for r in results)
    assert "2 images with 1 frame_paths" in results[0].error
    lone = embedder.embed_frames("frame.jpg")  # a path, not a list of frames
    assert len(lone) == 1 and "takes a sequence of images" in lone[0].error
    assert embedder.embed_frame(good_frame, frame_path=42).error.startswith(
        "Invalid argument: frame_path"
    )


@pytest.mark.parametrize(
    ("frames", "top_k", "message"),
    [
        (None, 3, "sequence"),
        ([b"x"], 0, "top_k"),
        ([b"x"], "3", "top_k"),
        ([(b"x", float("nan"))], 1, "finite"),
        ([(b"x", 1, 2)], 1, "pairs"),
    ],
)
def test_embed_scene_never_raises(embedder, frames, top_k, message):
    result = embedder.embed_scene(frames, top_k=top_k)
    assert result.embedding is None and message in result.error
    assert_storable(result.metadata)


# --------------------------------------------------------------------------- memory


HOSTILE_RUN = textwrap.dedent("""
    import json, sys, time, numpy as np
    sys.path.insert(0, sys.argv[2])
    from hostile import png_with_size
    from heimdex_clip import ClipConfig, ClipEmbedder

    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    emb = ClipEmbedder(config=ClipConfig(enabled=True, pretrained="none",
                                         model_dir=sys.argv[1])).load()
    good = np.zeros((720, 1280, 3), np.uint8)
    for _ in range(3):
        assert emb.embed_frame(good).ok
    baseline = peak_mb()
    sparse = sys.argv[3]
    hostile = [png_with_size(20000, 1, rows=1), png_with_size(1, 30000, rows=30000),
               np.broadcast_to(np.zeros(3, np.uint8), (30000, 30000, 3)),
               png_with_size(9000, 8000), sparse]
    slowest = 0.0
    for frame in hostile:
        started = time.perf_counter()
        result = emb.embed_frame(frame)
        slowest = max(slowest, time.perf_counter() - started)
        assert result.embedding is None, result.metadata
    assert emb.embed_frame(good).ok
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak_mb(), "slowest_s": slowest}))
""")


def test_hostile_frames_cost_bounded_memory(artifact_dir, tmp_path):
    """In a fresh process: the peak RSS after every hostile frame stays near the peak that
    ordinary 720p frames reach (before the fixes a 20000x1 sliver alone peaked at 4.2 GB)."""
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as f:
        f.truncate(50 * 1024**3)
    out = subprocess.run(
        [sys.executable, "-c", HOSTILE_RUN, str(artifact_dir), str(REPO / "tests"), str(sparse)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["peak_mb"] - figures["baseline_mb"] < 100, figures
    assert figures["slowest_s"] < 2.0, figures
