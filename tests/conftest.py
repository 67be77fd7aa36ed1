"""Shared fixtures: the test artifact (ViT-B-32, seeded random init, same graph as production).

Under ``CI=true`` a skip is a failure: a missing extra (torch, open_clip, psycopg...) or a
missing server would otherwise turn whole suites into skips and leave the run green.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEST_MODEL_DIR = REPO / "models" / "ViT-B-32__none"


def _skips_fail() -> bool:
    return os.environ.get("CI") == "true"


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    # A skip's longrepr is (file, line, "Skipped: reason").
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2])
    return str(report.longrepr)


def _fail_the_skip(report: pytest.CollectReport | pytest.TestReport, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{what} was skipped under CI=true, where a skip fails the run (it "
        f"would hide a missing extra or feature): {_skip_reason(report)}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A skipped test (skip, skipif, importorskip inside a test or fixture) fails under CI."""
    outcome = yield
    report = outcome.get_result()
    if _skips_fail() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_the_skip(report, f"test {item.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module skipped at import (a module-level importorskip) fails under CI."""
    outcome = yield
    report = outcome.get_result()
    if _skips_fail() and report.skipped:
        _fail_the_skip(report, f"module {collector.nodeid}")


def _ensure_test_artifact() -> Path:
    path = Path(os.environ.get("HEIMDEX_TEST_MODEL_DIR", DEFAULT_TEST_MODEL_DIR))
    if not path.is_absolute():
        path = REPO / path
    if not (path / "manifest.json").is_file() or not (path / "visual.fp32.onnx").is_file():
        # `make test` builds it first; a bare `pytest` builds it here (about 90 s).
        subprocess.run(
            [
                sys.executable,
                "-m",
                "heimdex_clip_export",
                "--pretrained",
                "none",
                "--keep-fp32",
                "--openvino",  # as `make export-test-model`: visual.qdq, OpenVINO's graph
                "--models-dir",
                str(path.parent),
                "-q",
            ],
            check=True,
        )
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
