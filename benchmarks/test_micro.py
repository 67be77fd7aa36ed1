"""Micro benchmarks (pytest-benchmark): the runtime's hot paths, one at a time.

    make bench-micro     # .venv/bin/pytest benchmarks/test_micro.py --benchmark-only

Not part of `make test`: timings are measurements, never assertions.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.artifact import load_manifest
from heimdex_clip.images import load_image
from heimdex_clip.preprocess import Preprocessor
from heimdex_clip.session import create_session

ARTIFACT = Path(os.environ.get("HEIMDEX_TEST_MODEL_DIR", "models/ViT-B-32__none"))


@pytest.fixture(scope="module")
def hd_jpeg() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((1920, 1080)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def preprocessor() -> Preprocessor:
    return Preprocessor(load_manifest(ARTIFACT).preprocess)


@pytest.fixture(scope="module")
def embedder() -> ClipEmbedder:
    return ClipEmbedder(
        config=ClipConfig(pretrained="none", model_dir=ARTIFACT, embed_cache_size=0, timeout_s=60)
    ).load()


def test_decode_and_preprocess_1080p_exact(benchmark, hd_jpeg, preprocessor):
    benchmark(lambda: preprocessor([load_image(hd_jpeg, max_pixels=10**8)]))


def test_decode_and_preprocess_1080p_fast(benchmark, hd_jpeg, preprocessor):
    benchmark(
        lambda: preprocessor(
            [load_image(hd_jpeg, max_pixels=10**8, min_side_for_draft=224)], fast=True
        )
    )


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_int8_inference(benchmark, batch):
    # The INT8 graph in a runtime-built session, fed under the names its manifest records.
    manifest = load_manifest(ARTIFACT)
    int8 = manifest.files["visual.int8"]
    session = create_session(ARTIFACT / int8.path)[0]
    size = manifest.preprocess.image_size
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    benchmark(session.run, [int8.outputs[0].name], {int8.inputs[0].name: pixels})


def test_embed_frame_1080p(benchmark, embedder, hd_jpeg):
    benchmark(embedder.embed_frame, hd_jpeg)
