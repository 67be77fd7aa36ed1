"""Under CI=true a skip fails the run: the hook in tests/conftest.py, run on a tiny suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SKIPPING_TESTS = """
import pytest

def test_passes():
    pass

def test_skips_itself():
    pytest.skip("the feature is not installed")

@pytest.mark.skipif(True, reason="a condition that is true here")
def test_skipif():
    pass

@pytest.mark.xfail(reason="a known failure is not a skip", strict=True)
def test_expected_failure():
    assert False
"""

SKIPPING_MODULE = """
import pytest

pytest.importorskip("heimdex_no_such_module")

def test_never_collected():
    pass
"""


def _run_tiny_suite(tmp_path: Path, module: str, ci: str | None) -> subprocess.CompletedProcess:
    suite = tmp_path / f"suite-{ci}"
    suite.mkdir()
    shutil.copy(TESTS / "conftest.py", suite / "conftest.py")
    (suite / "test_tiny.py").write_text(module)
    (suite / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(suite),
            "-c",
            str(suite / "pytest.ini"),
            "--rootdir",
            str(suite),
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_skipped_tests_fail_under_ci(tmp_path):
    proc = _run_tiny_suite(tmp_path, SKIPPING_TESTS, "true")
    out = proc.stdout
    assert proc.returncode == 1, out
    # skip() in the test body fails it; a skipif (decided at setup) errors it.
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in out, out
    assert out.count("skipped under CI=true") >= 2
    assert "the feature is not installed" in out and "a condition that is true here" in out


def test_a_module_skipped_at_import_fails_under_ci(tmp_path):
    proc = _run_tiny_suite(tmp_path, SKIPPING_MODULE, "true")
    out = proc.stdout
    assert proc.returncode != 0, out
    assert "skipped under CI=true" in out and "heimdex_no_such_module" in out, out


def test_skips_are_skips_outside_ci(tmp_path):
    for ci in (None, "false"):
        proc = _run_tiny_suite(tmp_path, SKIPPING_TESTS, ci)
        assert proc.returncode == 0, proc.stdout
        assert "1 passed, 2 skipped, 1 xfailed" in proc.stdout, proc.stdout
    proc = _run_tiny_suite(tmp_path, SKIPPING_MODULE, "0")
    # Its only module skipped: pytest's "no tests ran" status, not a failure.
    assert proc.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, proc.stdout
    assert "1 skipped" in proc.stdout, proc.stdout
