"""A manifest cannot reach outside its artifact: every file it names is a regular file inside
the artifact directory (after resolving links), of the listed size, read with a bound.

Hostile entries (absolute paths, ``..``, FIFOs, /dev/zero, links out of the directory,
directories) used to hash forever, block image-only loads in the file pinning, or read
until MemoryError. Each case here must end quickly with an ArtifactError naming the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from artifact_copies import copy_artifact

from heimdex_clip import ArtifactError, ClipConfig, ClipEmbedder, load_manifest
from heimdex_clip.artifact import Manifest
from heimdex_clip.verified import PinnedFiles, open_inside, read_verified, verified_source

EMPTY_SHA = hashlib.sha256(b"").hexdigest()
DATA = b"the bytes of a small artifact file"


def finishes(fn: Callable[[], object], seconds: float = 20.0) -> BaseException | None:
    """Run ``fn`` on a thread; the exception it raised (None: it returned). Fails the test
    if it is still running after ``seconds`` (a FIFO or /dev/zero that blocks or never ends).
    """
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s: it blocks or reads forever"
    return outcome[0]


def tiny_artifact(
    root: Path, name: str, *, data: bytes = DATA, size: int | None = None, sha: str | None = None
) -> Path:
    """An artifact directory whose manifest lists one file entry ``name`` (not created)."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "schema_version": 1,
        "model": {"name": "ViT-B-32", "pretrained": "none", "embed_dim": 512, "random_init": True},
        "preprocess": {"image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "files": {
            "visual.int8": {
                "path": name,
                "role": "visual",
                "precision": "int8",
                "bytes": len(data) if size is None else size,
                "sha256": sha or hashlib.sha256(data).hexdigest(),
            }
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def assert_refused(artifact: Path, message: str) -> None:
    error = finishes(lambda: load_manifest(artifact))
    assert isinstance(error, ArtifactError), error
    assert message in str(error), str(error)


def test_a_plain_file_and_a_link_inside_the_artifact_are_fine(tmp_path):
    art = tiny_artifact(tmp_path / "a", "sub/graph.onnx")
    (art / "sub").mkdir()
    (art / "real.onnx").write_bytes(DATA)
    (art / "sub" / "graph.onnx").symlink_to("../real.onnx")
    entry = load_manifest(art).file("visual.int8")
    assert read_verified(art / entry.path, entry) == DATA


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "/proc/self/status", "/etc/hostname"])
def test_links_out_of_the_artifact_are_refused(tmp_path, target):
    art = tiny_artifact(tmp_path / "a", "visual.int8.onnx", data=b"", sha=EMPTY_SHA, size=0)
    (art / "visual.int8.onnx").symlink_to(target)
    assert_refused(art, "'visual.int8.onnx' resolves to")


def test_a_link_to_a_sibling_directory_is_outside_too(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "graph.onnx").write_bytes(DATA)
    art = tiny_artifact(tmp_path / "a", "link/graph.onnx")
    (art / "link").symlink_to(tmp_path / "other")
    assert_refused(art, "outside the artifact directory")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    art = tiny_artifact(tmp_path / "a", "visual.int8.onnx", data=b"", sha=EMPTY_SHA, size=0)
    os.mkfifo(art / "visual.int8.onnx")
    assert_refused(art, "is a FIFO, not a regular file")


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.mkdir(),
        lambda p: p.symlink_to("."),
    ],
)
def test_a_directory_is_refused(tmp_path, make):
    art = tiny_artifact(tmp_path / "a", "visual.int8.onnx", data=b"", sha=EMPTY_SHA, size=0)
    make(art / "visual.int8.onnx")
    assert_refused(art, "is a directory, not a regular file")


def test_a_link_loop_is_refused(tmp_path):
    art = tiny_artifact(tmp_path / "a", "visual.int8.onnx")
    (art / "visual.int8.onnx").symlink_to("loop")
    (art / "loop").symlink_to("visual.int8.onnx")
    assert_refused(art, "'visual.int8.onnx' cannot be resolved")


def test_a_file_of_another_size_is_refused_before_it_is_read(tmp_path):
    art = tiny_artifact(tmp_path / "a", "visual.int8.onnx", size=len(DATA) - 1)
    (art / "visual.int8.onnx").write_bytes(DATA)
    assert_refused(art, f"has {len(DATA)} bytes, the manifest says {len(DATA) - 1}")


def test_a_manifest_that_is_a_fifo_or_a_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "manifest.json")
    assert_refused(fifo, "is not a regular file")
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "manifest.json").symlink_to("/dev/zero")
    assert_refused(zero, "is not a regular file")


def test_the_lower_level_readers_apply_the_same_rules(tmp_path):
    """read_verified, verified_source and PinnedFiles each refuse on their own, so that no
    caller that skips load_manifest can be led outside the artifact either."""
    art = tiny_artifact(tmp_path / "a", "visual.int8.onnx", data=b"", sha=EMPTY_SHA, size=0)
    os.mkfifo(art / "visual.int8.onnx")
    entry = Manifest.from_dict(json.loads((art / "manifest.json").read_text())).file("visual.int8")
    path = art / entry.path

    def enter_source() -> None:
        with verified_source(path, entry):
            pass

    for attempt in (
        lambda: read_verified(path, entry),
        enter_source,
        lambda: PinnedFiles(art, ["visual.int8.onnx"]),
        lambda: open_inside(art, "../a/visual.int8.onnx"),
    ):
        error = finishes(attempt)
        assert isinstance(error, ArtifactError), error
        assert "visual.int8.onnx" in str(error)


# --------------------------------------------------------------------------- real loads


def hostile_text_entry(
    artifact_dir: Path, dest: Path, path: str, make: Callable[[Path], None] | None
) -> Path:
    """A runtime copy of the test artifact whose text graph entry is ``path``."""
    art = copy_artifact(artifact_dir, dest)
    manifest = json.loads((art / "manifest.json").read_text())
    entry = manifest["files"]["text.int8"]
    (art / entry["path"]).unlink()
    entry.update(path=path, bytes=0, sha256=EMPTY_SHA)
    (art / "manifest.json").write_text(json.dumps(manifest))
    if make is not None:
        make(art / path)
    return art


@pytest.mark.parametrize(
    ("path", "make", "message"),
    [
        ("/dev/zero", None, "must be a relative path inside the artifact"),
        ("../../../../../../dev/zero", None, "must be a relative path inside the artifact"),
        ("text.int8.onnx", lambda p: os.mkfifo(p), "is a FIFO"),
        ("text.int8.onnx", lambda p: p.symlink_to("/dev/zero"), "outside the artifact"),
        ("text.int8.onnx", lambda p: p.mkdir(), "is a directory"),
    ],
)
def test_an_image_only_load_is_refused_quickly_naming_the_entry(
    artifact_dir, tmp_path, path, make, message
):
    art = hostile_text_entry(artifact_dir, tmp_path / "art", path, make)
    embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=art))
    error = finishes(embedder.load, seconds=60)
    assert isinstance(error, ArtifactError), error
    assert message in str(error), str(error)
    result = embedder.embed_frame(b"\xff\xd8 not read")
    assert result.embedding is None and message in result.error


def test_the_unchanged_copy_still_loads(artifact_dir, tmp_path):
    art = copy_artifact(artifact_dir, tmp_path / "art")
    embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=art)).load()
    assert embedder.embed_text("a dog").ok


def test_a_listed_file_left_out_is_reported_only_where_it_is_used(artifact_dir, tmp_path):
    """An image bakes the INT8 graphs and leaves the fp32 and QDQ graphs out while the
    manifest still lists them (docs/docker.md): the INT8 load must work, and only a load
    that needs a missing graph says it is missing."""
    art = copy_artifact(artifact_dir, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    full = json.loads((artifact_dir / "manifest.json").read_text())["files"]
    left_out = {k: v for k, v in full.items() if k not in manifest["files"]}
    assert "visual.fp32" in left_out  # the copy lacks it
    manifest["files"].update(left_out)
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert not (art / left_out["visual.fp32"]["path"]).exists()

    load_manifest(art)  # listed but absent files are not an error here
    embedder = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=art)).load()
    assert embedder.embed_images([_tiny_png()]).shape == (1, 512)
    fp32 = ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=art, precision="fp32"))
    with pytest.raises(ArtifactError, match=r"visual\.fp32\.onnx is missing"):
        fp32.load()
    # OpenVINO runs the QDQ or fp32 graph, both left out: where its plugin offers a device
    # (Intel CPUs) it must not be chosen, asked for or by auto, and the INT8 graph runs on cpu.
    for provider in ("openvino", "auto"):
        config = ClipConfig(
            pretrained="none", model_dir=art, provider=provider, cache_dir=tmp_path / provider
        )
        embedder = ClipEmbedder(config=config).load()
        assert embedder.session_info.provider == "cpu"
        assert embedder.embed_images([_tiny_png()]).shape == (1, 512)


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 10)).save(buffer, format="PNG")
    return buffer.getvalue()
