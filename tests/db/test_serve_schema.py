"""Schemathesis over the service's OpenAPI document: generated requests to every route
(valid and invalid ones) find no 5xx and no answer outside the document. Bounded in
examples and time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from .serve_helpers import add_owner, distinct, patient_embedder, serve

pytest.importorskip("schemathesis")
pytestmark = [pytest.mark.db, pytest.mark.slow]


@pytest.fixture(scope="module")
def embedder(artifact_dir):
    return patient_embedder(artifact_dir)


CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance"
)


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_schema(module_pool, embedder, photos):
    media = Path(tempfile.mkdtemp(prefix="heimdex-schema-media-"))
    owner = add_owner(module_pool, embedder, distinct(photos, 3), media, uuid.uuid4())
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is not installed in this environment (dev extra)"
    with serve(module_pool, embedder, media) as server:
        run = subprocess.run(
            [
                cli,
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                CHECKS,
                "-H",
                f"Authorization: Bearer {owner.key}",
                "--max-examples",
                "10",
                "--max-time",
                "60",
                "--seed",
                "26",
                "--workers",
                "1",
                "--phases",
                "examples,coverage,fuzzing",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=media,
        )  # its .schemathesis/ too
    shutil.rmtree(media, ignore_errors=True)
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout.lower()
