"""The export's atomic install: a crash at any step leaves a complete artifact in place.

Torch-free: the artifacts here are small hand-made ones (a manifest and one hashed file), and
"complete" is checked the way the runtime checks it (resolve the directory, parse the
manifest, every listed file present with its recorded sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from heimdex_clip.artifact import load_manifest, resolve_artifact_dir
from heimdex_clip_export import install as install_mod
from heimdex_clip_export.install import current_version, install, versions, working_directory

NAME = "ViT-B-32__none"
REPO = Path(__file__).resolve().parents[1]


def _finished_work_dir(models: Path, generation: str) -> Path:
    """A working directory holding a complete artifact whose graph bytes name ``generation``."""
    work = models / f".{NAME}.tmp-{generation}"
    work.mkdir(parents=True)
    graph = f"graph of generation {generation}".encode()
    (work / "visual.int8.onnx").write_bytes(graph)
    manifest = {
        "schema_version": 1,
        "model": {
            "name": "ViT-B-32",
            "pretrained": "none",
            "embed_dim": 512,
            "random_init": True,
            "seed": 0,
        },
        "preprocess": {"image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "files": {
            "visual.int8": {
                "path": "visual.int8.onnx",
                "role": "visual",
                "sha256": hashlib.sha256(graph).hexdigest(),
                "bytes": len(graph),
            }
        },
        "created_at": generation,
    }
    (work / "manifest.json").write_text(json.dumps(manifest))
    return work


def _installed_generation(models: Path) -> str:
    """Which complete artifact the runtime finds under ``models`` (fails if none is complete)."""
    found = resolve_artifact_dir(models, "ViT-B-32", "none")
    manifest = load_manifest(found)
    for entry in manifest.files.values():
        data = (found / entry.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256 and len(data) == entry.bytes
    return manifest.created_at


def test_install_switches_the_symlink_and_removes_the_old_version(tmp_path):
    models = tmp_path / "models"
    first = install(_finished_work_dir(models, "old"), models / NAME)
    assert (models / NAME).is_symlink() and current_version(models / NAME) == first
    assert not Path(os.readlink(models / NAME)).is_absolute()  # the tree can be copied
    assert _installed_generation(models) == "old"

    second = install(_finished_work_dir(models, "new"), models / NAME)
    assert _installed_generation(models) == "new"
    assert current_version(models / NAME) == second and versions(models / NAME) == [second]
    assert not first.exists()
    assert sorted(p.name for p in models.iterdir()) == sorted([NAME, second.name, f".{NAME}.lock"])
    # The artifact directory itself, through the symlink (CLIP_MODEL_DIR pointing at it):
    # resolved to the version it points at, so one load never reads from two versions.
    assert resolve_artifact_dir(models / NAME, "ViT-B-32", "none") == second.resolve()
    # Make's file target `$(TEST_MODEL_DIR)/manifest.json` stats through the symlink.
    assert (models / NAME / "manifest.json").is_file()


def test_a_copy_of_the_models_tree_keeps_working(tmp_path):
    """Docker's COPY of the models directory copies the symlink as a symlink, like this."""
    models = tmp_path / "models"
    install(_finished_work_dir(models, "v1"), models / NAME)
    copied = tmp_path / "image" / "models"
    shutil.copytree(models, copied, symlinks=True)
    assert (copied / NAME).is_symlink()
    assert _installed_generation(copied) == "v1"


def test_an_artifact_from_before_versioned_installs_is_replaced(tmp_path):
    models = tmp_path / "models"
    legacy = _finished_work_dir(models, "legacy")
    legacy.rename(models / NAME)  # a real directory, as the old install left it
    version = install(_finished_work_dir(models, "new"), models / NAME)
    assert _installed_generation(models) == "new" and versions(models / NAME) == [version]


def test_install_refuses_an_unfinished_or_distant_work_dir(tmp_path):
    models = tmp_path / "models"
    empty = models / ".empty"
    empty.mkdir(parents=True)
    with pytest.raises(ValueError, match="not a finished artifact"):
        install(empty, models / NAME)
    elsewhere = _finished_work_dir(tmp_path / "elsewhere", "x")
    with pytest.raises(ValueError, match="atomic install"):
        install(elsewhere, models / NAME)


# The filesystem calls install makes, in order, when it replaces a versioned artifact:
# rename (work -> version), symlink (temporary link), replace (the switch), rmtree of the
# old version and the two unlinks of its files inside rmtree. A fault is injected before
# the n-th of them; n = len(STEPS) is the control case without a fault.
STEPS = ("rename", "symlink", "replace", "rmtree", "unlink", "unlink")


class _Fault(Exception):
    pass


def _count_calls_and_fail_at(monkeypatch, n: int, fail) -> None:
    calls = {"count": 0}

    def wrap(module, name):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == n + 1:
                fail()
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    for name in ("rename", "symlink", "replace", "unlink"):
        wrap(install_mod.os, name)
    wrap(install_mod.shutil, "rmtree")


@pytest.mark.parametrize("step", range(len(STEPS) + 1))
def test_an_exception_at_any_step_leaves_a_complete_artifact(tmp_path, monkeypatch, step):
    models = tmp_path / "models"
    install(_finished_work_dir(models, "old"), models / NAME)
    work = _finished_work_dir(models, "new")

    def fail():
        raise _Fault(f"injected before call {step}")

    _count_calls_and_fail_at(monkeypatch, step, fail)
    if step < len(STEPS):
        with pytest.raises(_Fault):
            install(work, models / NAME)
    else:
        install(work, models / NAME)
    monkeypatch.undo()
    assert _installed_generation(models) == ("old" if step <= STEPS.index("replace") else "new")
    # The next install finishes the job: one version left, no temporary links.
    final = install(_finished_work_dir(models, "next"), models / NAME)
    assert _installed_generation(models) == "next" and versions(models / NAME) == [final]
    assert not list(models.glob(f".{NAME}.link-*"))


KILL_SCRIPT = """
import os, shutil, sys
from pathlib import Path
from heimdex_clip_export import install as m
step, calls = int(sys.argv[3]), [0]
def wrap(module, name):
    real = getattr(module, name)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step + 1:
            os._exit(9)  # like SIGKILL: no exception handler, no finally block runs
        return real(*args, **kwargs)
    setattr(module, name, wrapped)
for name in ("rename", "symlink", "replace", "unlink"):
    wrap(m.os, name)
wrap(m.shutil, "rmtree")
m.install(Path(sys.argv[1]), Path(sys.argv[2]))
"""


@pytest.mark.parametrize("step", range(len(STEPS)))
def test_a_process_killed_at_any_step_leaves_a_complete_artifact(tmp_path, step):
    models = tmp_path / "models"
    install(_finished_work_dir(models, "old"), models / NAME)
    work = _finished_work_dir(models, "new")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "runtime"), str(REPO / "export"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(work), str(models / NAME), str(step)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 9, proc.stderr
    assert _installed_generation(models) == ("old" if step <= STEPS.index("replace") else "new")


HOLD_WORK_SCRIPT = """
import sys, time
from pathlib import Path
from heimdex_clip_export.install import working_directory
with working_directory(Path(sys.argv[1])) as work:
    (work / "partial.onnx").write_bytes(b"half an export")
    print(work, flush=True)
    time.sleep(600)  # an export in progress, until the test kills it
"""


def _start_export_holding_work(models: Path) -> tuple[subprocess.Popen, Path]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "runtime"), str(REPO / "export"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_WORK_SCRIPT, str(models / NAME)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    work = Path(proc.stdout.readline().strip())
    assert work.is_dir() and (work / "partial.onnx").is_file()
    return proc, work


def test_a_killed_exports_working_directory_is_removed_by_the_next_one(tmp_path):
    models = tmp_path / "models"
    install(_finished_work_dir(models, "old"), models / NAME)
    killed, abandoned = _start_export_holding_work(models)
    running, live = _start_export_holding_work(models)
    try:
        killed.kill()  # SIGKILL: its own cleanup never runs
        killed.wait(timeout=30)
        assert abandoned.is_dir()
        with working_directory(models / NAME) as work:
            assert work.is_dir() and work != live
            assert not abandoned.exists()  # its owner is dead
            assert (live / "partial.onnx").is_file()  # a running export's is kept
        assert work.is_dir()  # a block that succeeds leaves the directory for install()
    finally:
        running.kill()
        running.wait(timeout=30)
    assert _installed_generation(models) == "old"


def test_a_failed_export_deletes_its_own_working_directory(tmp_path):
    models = tmp_path / "models"
    with pytest.raises(RuntimeError, match="gate"), working_directory(models / NAME) as work:
        (work / "visual.int8.onnx").write_bytes(b"x")
        raise RuntimeError("gate failed")
    assert not work.exists() and not list(models.glob(f".{NAME}.tmp-*"))
