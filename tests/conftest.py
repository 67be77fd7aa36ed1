"""Shared fixtures: the test artifact (ViT-B-32, seeded random init, same graph as production)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEST_MODEL_DIR = REPO / "models" / "ViT-B-32__none"


def _ensure_test_artifact() -> Path:
    path = Path(os.environ.get("HEIMDEX_TEST_MODEL_DIR", DEFAULT_TEST_MODEL_DIR))
    if not path.is_absolute():
        path = REPO / path
    if not (path / "manifest.json").is_file() or not (path / "visual.fp32.onnx").is_file():
        # `make test` builds it first; a bare `pytest` builds it here (about 90 s).
        subprocess.run([sys.executable, "-m", "heimdex_clip_export", "--pretrained", "none",
                        "--keep-fp32", "--models-dir", str(path.parent), "-q"], check=True)
    return path


@pytest.fixture(scope="session")
def artifact_dir() -> Path:
    """The exported random-init ViT-B-32 artifact (INT8 + fp32 graphs)."""
    return _ensure_test_artifact()


@pytest.fixture(scope="session")
def photos():
    """Real photographs shipped with scikit-image, as (name, RGB PIL image)."""
    skimage = pytest.importorskip("skimage")  # noqa: F841  (dev extra)
    from heimdex_clip_export.evaluation import sample_photos

    return sample_photos()
