"""Artifact files checked against the manifest (size and sha256) before anything parses them.

Two ways to hand a checked file on:

* :func:`read_verified`: the bytes themselves, read once. For small files (the tokenizer)
  and wherever the next point is not a Linux ``/proc``.
* :func:`verified_source`: for graphs. The file is hashed through one open descriptor and
  ONNX Runtime reads that same descriptor (``/proc/self/fd/N``), so a graph is never in
  memory twice (Python's copy and ONNX Runtime's) at load, the largest part of a worker's
  peak memory. The descriptor pins the inode: a rename or a new install over the path
  cannot swap the file in between. A write into the file itself between the check and the
  end of the load changes its size or modification time, and the load is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .artifact import FileEntry
from .errors import ArtifactError

_CHUNK = 1 << 20


def _missing(path: Path) -> ArtifactError:
    return ArtifactError(f"artifact file {path} is missing; re-export the model")


def _check_size(path: Path, size: int, entry: FileEntry) -> None:
    if size != entry.bytes:
        raise ArtifactError(f"{path} has {size} bytes, the manifest says {entry.bytes}: "
                            "truncated or replaced; re-export the model")


def _check_digest(path: Path, digest: str, size: int, entry: FileEntry) -> None:
    if size != entry.bytes or digest != entry.sha256:
        raise ArtifactError(f"sha256 mismatch for {path}: expected {entry.sha256}, got "
                            f"{digest}; the file was modified or corrupted; re-export")


def read_verified(path: Path, entry: FileEntry) -> bytes:
    """The file's bytes, read once, after checking size and sha256 against the manifest."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _missing(path) from None
    _check_size(path, size, entry)
    data = path.read_bytes()
    _check_digest(path, hashlib.sha256(data).hexdigest(), len(data), entry)
    return data


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def verified_source(path: Path, entry: FileEntry) -> Iterator[Path | bytes]:
    """Something ONNX Runtime can load that holds exactly the checked bytes of ``path``.

    Use it around the session's creation: the file is re-checked for writes when the block
    ends. Raises :class:`ArtifactError` for a missing, truncated, modified or concurrently
    written file.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _missing(path) from None
    try:
        proc_path = Path(f"/proc/self/fd/{fd}")
        if not proc_path.exists():  # no /proc: hand over the checked bytes instead
            yield read_verified(path, entry)
            return
        before = os.fstat(fd)
        _check_size(path, before.st_size, entry)
        digest, size = hashlib.sha256(), 0
        while chunk := os.pread(fd, _CHUNK, size):
            digest.update(chunk)
            size += len(chunk)
        _check_digest(path, digest.hexdigest(), size, entry)
        yield proc_path
        if _stamp(os.fstat(fd)) != _stamp(before):
            raise ArtifactError(f"{path} was written to while it was being loaded; load again, "
                                "and do not modify an installed artifact (re-export instead)")
    finally:
        os.close(fd)
