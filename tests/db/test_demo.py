"""The README's main job (`make demo`): sample frames -> migrate, index two owners, every kind of
search, stats and the HTML pages, on real PostgreSQL + pgvector with the test artifact."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.db, pytest.mark.slow]


def test_the_demo_runs_end_to_end_and_never_crosses_owners(db_url, artifact_dir, tmp_path):
    frames, html = tmp_path / "frames", tmp_path / "results.html"
    env = {**os.environ, "DATABASE_URL": db_url, "CLIP_PRETRAINED": "none"}
    subprocess.run(
        [sys.executable, "-m", "heimdex_clip_export.samples", str(frames)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "heimdex_clip.db.demo",
            str(frames),
            "--model-dir",
            str(artifact_dir),
            "--html",
            str(html),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "RANDOM-INITIALISATION MODEL" in out  # the test artifact is flagged loudly
    assert "migrations applied: 001" in out
    for owner, folder in (("a", "owner_a"), ("b", "owner_b")):
        count = len(list((frames / folder).glob("*.jpg")))
        assert f"-00000000000{owner}: indexed {count} of {count} frames (0 failed)" in out
    sections = re.split(r"\n(?=Search by|Scenes similar|Composed query|Monitoring)", out)
    titles = [s.splitlines()[0] for s in sections[1:]]
    assert [t.split()[0] for t in titles] == [
        "Search",
        "Scenes",
        "Search",
        "Composed",
        "Monitoring",
    ], titles
    for section in sections[1:-1]:  # each search: five of owner A's frames, ranked
        rows = [line for line in section.splitlines() if re.match(r"\s+\d+\s+-?\d\.\d{4}", line)]
        assert len(rows) == 5, section
        assert all(f"{frames}/owner_a/" in row for row in rows), section
    assert "CLIP availability:  100.0%" in sections[-1]
    assert "Failure rate:       0.0%" in sections[-1]
    assert html.read_text().count("data:image/jpeg;base64,") == 5 + 1  # results + query
    text_page = html.with_name("results_text.html").read_text()
    assert text_page.count("data:image/jpeg;base64,") == 5 and "MEANINGLESS" in text_page
