"""Artifact files reach ONNX Runtime only as the bytes the manifest vouches for."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import heimdex_clip.verified as verified_module
from heimdex_clip import ArtifactError
from heimdex_clip.artifact import load_manifest
from heimdex_clip.session import create_session
from heimdex_clip.verified import read_verified, verified_source


@pytest.fixture()
def graph_copy(artifact_dir, tmp_path):
    """The test artifact's INT8 graph copied out, with its manifest entry."""
    entry = load_manifest(artifact_dir).file("visual.int8")
    copy = tmp_path / "visual.int8.onnx"
    shutil.copy(artifact_dir / entry.path, copy)
    return copy, entry


def test_the_source_holds_the_checked_bytes_and_loads(graph_copy):
    path, entry = graph_copy
    with verified_source(path, entry) as source:
        assert isinstance(source, Path) and source.is_relative_to("/proc/self/fd")
        assert hashlib.sha256(source.read_bytes()).hexdigest() == entry.sha256
        session, _ = create_session(source, threads=1)
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 224, 224), np.float32)})[
        0
    ]
    assert out.shape[0] == 1


def test_a_file_replaced_at_its_path_after_the_check_is_not_what_gets_loaded(graph_copy):
    """The descriptor pins the checked inode: an install (or an attacker) renaming another
    file over the path meanwhile changes nothing for this load."""
    path, entry = graph_copy
    impostor = path.with_name("impostor.onnx")
    impostor.write_bytes(b"not the checked graph")
    with verified_source(path, entry) as source:
        os.replace(impostor, path)
        assert hashlib.sha256(source.read_bytes()).hexdigest() == entry.sha256
    assert path.read_bytes() == b"not the checked graph"


def test_a_write_into_the_file_during_the_load_is_refused(graph_copy):
    path, entry = graph_copy
    os.utime(path, (1_700_000_000, 1_700_000_000))  # installed long ago, as artifacts are
    with (
        pytest.raises(ArtifactError, match="written to while it was being loaded"),
        verified_source(path, entry),
        open(path, "r+b") as f,
    ):
        f.seek(1000)  # same size, same inode: only the modification time tells
        f.write(b"\x00")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "bytes, the manifest says"),
        (
            lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]),
            "sha256 mismatch",
        ),
        (lambda p: p.unlink(), "is missing"),
    ],
)
def test_damaged_files_are_refused_before_anything_parses_them(graph_copy, damage, message):
    path, entry = graph_copy
    damage(path)
    with pytest.raises(ArtifactError, match=message):
        read_verified(path, entry)
    with pytest.raises(ArtifactError, match=message), verified_source(path, entry):
        pytest.fail("a damaged file was handed on")


def test_without_proc_the_checked_bytes_are_handed_on(graph_copy, monkeypatch):
    """Outside Linux there is no /proc/self/fd (simulated: it cannot be removed for real)."""
    path, entry = graph_copy
    monkeypatch.setattr(verified_module, "fd_path", lambda fd: None)
    with verified_source(path, entry) as source:
        assert isinstance(source, bytes)
        assert hashlib.sha256(source).hexdigest() == entry.sha256


PEAK_SCRIPT = """
import sys
from pathlib import Path
from heimdex_clip.artifact import load_manifest
from heimdex_clip.session import create_session
from heimdex_clip.verified import read_verified, verified_source
artifact = Path(sys.argv[1])
entry = load_manifest(artifact).file("visual.int8")
path = artifact / entry.path
if sys.argv[2] == "bytes":
    create_session(read_verified(path, entry), threads=1)
else:
    with verified_source(path, entry) as source:
        create_session(source, threads=1)
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def test_loading_through_the_descriptor_does_not_hold_the_graph_twice(artifact_dir):
    """Peak memory of a load, each way in a fresh process: the descriptor saves at least
    most of one copy of the graph (a memory figure, not a timing: the same on any load)."""
    graph_bytes = load_manifest(artifact_dir).file("visual.int8").bytes
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "runtime"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    peaks = {}
    for way in ("bytes", "descriptor"):
        proc = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(artifact_dir), way],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        peaks[way] = int(proc.stdout.split()[-1]) * 1024
    assert peaks["bytes"] - peaks["descriptor"] > 0.75 * graph_bytes, peaks


def test_pinned_files_stay_readable_after_deletion_until_closed(graph_copy):
    path, entry = graph_copy
    pinned = verified_module.PinnedFiles(path.parent, [path.name, "not-there.onnx"])
    assert pinned.fd("not-there.onnx") is None  # missing now: reported when used
    path.unlink()  # an install removed the version
    with verified_source(path, entry, pinned.fd(path.name)) as source:
        assert hashlib.sha256(source.read_bytes()).hexdigest() == entry.sha256
    data = read_verified(path, entry, pinned.fd(path.name))
    assert hashlib.sha256(data).hexdigest() == entry.sha256
    fd = pinned.fd(path.name)
    pinned.close()
    pinned.close()  # idempotent
    assert pinned.fd(path.name) is None
    with pytest.raises(OSError):
        os.fstat(fd)
