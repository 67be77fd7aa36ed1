"""The operators' commands end to end: db migrate, index, search (table and HTML), stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

pytestmark = [pytest.mark.db, pytest.mark.slow]


def run(args, db_url, artifact_dir, check=True, **env_extra):
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "CLIP_PRETRAINED": "none",
        "CLIP_MODEL_DIR": str(artifact_dir),
        **env_extra,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "heimdex_clip.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_index_search_html_and_stats(db_url, artifact_dir, photos, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name, image in photos[:6]:
        image.save(folder / f"{name}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    owner, stranger = uuid.uuid4(), uuid.uuid4()

    migrated = run(["db", "migrate"], db_url, artifact_dir)
    assert "applied: 001_scenes.sql, 002" in migrated.stdout
    assert "database: DATABASE_URL (" in migrated.stderr  # says which database it uses
    assert "up to date" in run(["db", "migrate"], db_url, artifact_dir).stdout
    index = run(
        ["index", str(folder), "--owner", str(owner), "--quiet"], db_url, artifact_dir, check=False
    )
    assert index.returncode == 1  # one frame failed, and says so
    assert "indexed 6 of 7 frames (1 failed, 0 skipped)" in index.stdout
    # Indexing again updates the same scenes instead of duplicating them.
    run(["index", str(folder), "--owner", str(owner), "--quiet"], db_url, artifact_dir, check=False)

    query = folder / f"{photos[2][0]}.jpg"
    html = tmp_path / "results.html"
    out = run(
        [
            "search",
            "--image",
            str(query),
            "--owner",
            str(owner),
            "--count",
            "3",
            "--html",
            str(html),
        ],
        db_url,
        artifact_dir,
    ).stdout
    lines = [line for line in out.splitlines() if str(folder) in line]
    # The same frame: 1.0 up to INT8 batch dependence (indexed in a batch, queried alone).
    assert len(lines) == 3 and float(lines[0].split()[1]) > 0.999 and str(query) in lines[0]
    page = html.read_text()
    assert page.count("data:image/jpeg;base64,") == 4  # the query + three results
    assert "not semantic" in page

    hits = json.loads(
        run(
            ["search", "--image", str(query), "--owner", str(owner), "--json"], db_url, artifact_dir
        ).stdout
    )
    assert len(hits) == 6
    similar = json.loads(
        run(
            ["search", "--scene", hits[0]["id"], "--owner", str(owner), "--json", "--count", "2"],
            db_url,
            artifact_dir,
        ).stdout
    )
    assert len(similar) == 2 and hits[0]["id"] not in {h["id"] for h in similar}
    assert (
        json.loads(
            run(
                ["search", "--image", str(query), "--owner", str(stranger), "--json"],
                db_url,
                artifact_dir,
            ).stdout
        )
        == []
    )

    stats = run(["stats", "--all-owners"], db_url, artifact_dir).stdout
    assert "CLIP availability:  85.7% (6 of 7 scenes embedded)" in stats
    assert "Failure rate:       14.3% (1 of 7 attempted)" in stats
    assert "Inference latency:  mean" in stats and "Timeout rate:       0.0%" in stats
    assert "ViT-B-32:none:" in stats and ": 6 + 0 = 85.7%" in stats  # rows per artifact
    figures = json.loads(
        run(["stats", "--json", "--owner", str(stranger)], db_url, artifact_dir).stdout
    )
    assert figures["scenes"] == 0 and figures["availability"] is None
    no_scope = run(["stats"], db_url, artifact_dir, check=False)
    assert no_scope.returncode == 2 and "--all-owners" in no_scope.stderr
