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

:class:`PinnedFiles` holds descriptors on files an artifact may need later (the text tower,
loaded on the first text query): an install removes the version a process loaded, and an
unlinked file stays readable through a descriptor opened before, so the late load still
reads the same version as the image tower.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from collections.abc import Iterable, Iterator
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


def _pread_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, _CHUNK, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_verified(path: Path, entry: FileEntry, fd: int | None = None) -> bytes:
    """The file's bytes, read once, after checking size and sha256 against the manifest.

    ``fd``: an open descriptor of the file (see :class:`PinnedFiles`) to read instead of
    ``path``, which then only names the file in errors.
    """
    if fd is not None:
        _check_size(path, os.fstat(fd).st_size, entry)
        data = _pread_all(fd)
    else:
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
def verified_source(path: Path, entry: FileEntry,
                    fd: int | None = None) -> Iterator[Path | bytes]:
    """Something ONNX Runtime can load that holds exactly the checked bytes of ``path``.

    Use it around the session's creation: the file is re-checked for writes when the block
    ends. ``fd``: an open descriptor of the file to use instead of opening ``path``. Raises
    :class:`ArtifactError` for a missing, truncated, modified or concurrently written file.
    """
    owned = fd is None
    if fd is None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _missing(path) from None
    try:
        proc_path = Path(f"/proc/self/fd/{fd}")
        if not proc_path.exists():  # no /proc: hand over the checked bytes instead
            yield read_verified(path, entry, fd)
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
        if owned:
            os.close(fd)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class PinnedFiles:
    """Read-only descriptors on some files of one artifact version, opened now, closed when
    this object is closed or garbage-collected. A file missing now is simply not pinned
    (using it later reports it missing)."""

    def __init__(self, artifact_dir: Path, relative_paths: Iterable[str]) -> None:
        self._fds: dict[str, int] = {}
        for relative in relative_paths:
            with contextlib.suppress(FileNotFoundError):
                self._fds[relative] = os.open(artifact_dir / relative, os.O_RDONLY)
        self._close = weakref.finalize(self, _close_all, list(self._fds.values()))

    def fd(self, relative_path: str) -> int | None:
        """The descriptor of ``relative_path``, if it was pinned and is still open."""
        return self._fds.get(relative_path) if self._close.alive else None

    def close(self) -> None:
        """Close every descriptor now (idempotent)."""
        self._close()
