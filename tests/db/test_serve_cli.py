"""``heimdex-clip db api-key`` and ``heimdex-clip serve`` as an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from .serve_helpers import free_port

pytestmark = [pytest.mark.db, pytest.mark.slow]


def env(db_url, artifact_dir, **extra) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": db_url,
        "CLIP_PRETRAINED": "none",
        "CLIP_MODEL_DIR": str(artifact_dir),
        **extra,
    }


def cli(args, db_url, artifact_dir, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "heimdex_clip.cli", *args],
        text=True,
        env=env(db_url, artifact_dir, **extra),
        capture_output=True,
        timeout=300,
    )


def test_api_key_commands(pool, db_url, artifact_dir):
    owner = uuid.uuid4()
    created = cli(
        ["db", "api-key", "create", "--owner", str(owner), "--label", "ci", "-q"],
        db_url,
        artifact_dir,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("hck_") and "\n" not in key  # stdout is the key alone
    assert "not shown again" in created.stderr
    listed = cli(
        ["db", "api-key", "list", "--owner", str(owner), "--json", "-q"], db_url, artifact_dir
    )
    rows = json.loads(listed.stdout)
    assert [(r["owner_id"], r["prefix"], r["label"], r["revoked_at"]) for r in rows] == [
        (str(owner), key[:12], "ci", None)
    ]
    assert key not in listed.stdout
    revoked = cli(["db", "api-key", "revoke", rows[0]["id"], "-q"], db_url, artifact_dir)
    assert revoked.returncode == 0 and f"revoked API key {rows[0]['id']}" in revoked.stdout
    again = json.loads(cli(["db", "api-key", "list", "--json", "-q"], db_url, artifact_dir).stdout)
    assert again[0]["revoked_at"] is not None
    missing = cli(["db", "api-key", "revoke", str(uuid.uuid4()), "-q"], db_url, artifact_dir)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no API key with id")
    assert "Traceback" not in missing.stderr


def test_serve_starts_answers_and_stops_on_sigterm(db_url, artifact_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "heimdex_clip.cli", "serve", "--migrate", "--port", str(port)],
        env=env(db_url, artifact_dir),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert ready is not None and ready.status_code == 200, "the service never got ready"
        assert "heimdex-clip scene search" in httpx.get(base + "/").text
        key = cli(
            ["db", "api-key", "create", "--owner", str(uuid.uuid4()), "-q"], db_url, artifact_dir
        ).stdout.strip()
        found = httpx.post(
            f"{base}/v1/search/text",
            json={"query": "a dog"},
            timeout=60,
            headers={"Authorization": f"Bearer {key}"},
        )
        assert found.status_code == 200 and found.json()["results"] == []  # no scenes yet
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal (status 143 in a shell).
    assert proc.returncode == -signal.SIGTERM, err
    assert f"on http://127.0.0.1:{port}" in err and "Traceback" not in err


def test_serve_refuses_bad_settings_in_one_line(db_url, artifact_dir):
    short = cli(["serve"], db_url, artifact_dir, CLIP_SERVE_JWT_SECRET="short")
    assert short.returncode == 2
    assert short.stderr.strip() == (
        "error: CLIP_SERVE_JWT_SECRET must be at least 32 bytes (HS256)"
    )
    port = cli(["serve"], db_url, artifact_dir, CLIP_SERVE_PORT="eighty")
    assert port.returncode == 2 and "CLIP_SERVE_PORT='eighty' is not a number" in port.stderr
    # Without --migrate, an unmigrated database is refused with the fix named.
    unmigrated = cli(["serve"], db_url, artifact_dir)
    assert unmigrated.returncode == 2 and "heimdex-clip db migrate" in unmigrated.stderr
