"""Artifact files checked against the manifest (size and sha256) before anything parses them.

Every file is opened through :func:`open_inside`: links resolved, the real file inside the
artifact directory, a regular file (never a FIFO, a device or a directory), of the listed
size, then read at most ``bytes + 1`` bytes, so a manifest cannot make the runtime read
outside its artifact, block, or read without bound (:func:`check_files` applies the same
rules to every listed file when the manifest is loaded).

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
import stat
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Protocol

from .errors import ArtifactError
from .manifest_schema import safe_relative_path


class ListedFile(Protocol):
    """What this module needs of a manifest's file entry (artifact.FileEntry is one): kept
    structural so that the manifest module can use this one without an import cycle."""

    @property
    def path(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def sha256(self) -> str: ...


_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _missing(path: Path) -> ArtifactError:
    return ArtifactError(f"artifact file {path} is missing; re-export the model")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_inside(artifact_dir: Path, relative: str) -> int:
    """A read-only descriptor on the regular file ``relative`` names inside ``artifact_dir``.

    Links are resolved first, and the real file must still be inside the artifact
    directory; an absolute path, ``..``, a link out of the directory, a FIFO, a device or a
    directory is an :class:`ArtifactError` naming the entry. Opening never blocks (a FIFO
    is opened non-blocking, then refused). FileNotFoundError if it does not exist.
    """
    safe_relative_path(relative, "a file entry's path")
    root = Path(artifact_dir).resolve()
    try:
        real = (root / relative).resolve(strict=True)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as exc:  # a link loop, a component that is a file...
        raise ArtifactError(f"artifact file entry {relative!r} cannot be resolved: {exc}") from None
    if not real.is_relative_to(root):
        raise ArtifactError(
            f"artifact file entry {relative!r} resolves to {real}, outside "
            f"the artifact directory {root}; refused"
        )
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:  # e.g. the link was swapped for another after resolving
        raise ArtifactError(f"cannot open artifact file entry {relative!r}: {exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ArtifactError(
            f"artifact file entry {relative!r} ({real}) is {_kind(mode)}, "
            "not a regular file; refused"
        )
    return fd


def _root_of(path: Path, entry: ListedFile) -> Path:
    """The artifact directory of ``path`` = ``<artifact dir>/<entry.path>``."""
    parts = PurePosixPath(safe_relative_path(entry.path, "a file entry's path")).parts
    if Path(path).parts[-len(parts) :] != parts:
        raise ArtifactError(f"{path} is not the file of the entry {entry.path!r}")
    return Path(*Path(path).parts[: -len(parts)])  # Path() is "." for a bare file name


def open_entry(path: Path, entry: ListedFile) -> int:
    """:func:`open_inside` for ``path`` (= artifact dir / ``entry.path``), size checked."""
    try:
        fd = open_inside(_root_of(path, entry), entry.path)
    except FileNotFoundError:
        raise _missing(path) from None
    try:
        _check_size(path, os.fstat(fd).st_size, entry)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_files(artifact_dir: Path, entries: Iterable[ListedFile]) -> None:
    """Every file the manifest lists that exists must be a regular file inside the artifact
    directory, of the size the manifest says (a missing one is reported when it is used).
    Cheap (no file is read): run at manifest load, before any hashing or pinning."""
    for entry in entries:
        try:
            fd = open_inside(Path(artifact_dir), entry.path)
        except FileNotFoundError:
            continue  # e.g. a graph an image leaves out: reported if it is ever used
        try:
            _check_size(Path(artifact_dir) / entry.path, os.fstat(fd).st_size, entry)
        finally:
            os.close(fd)


def _check_size(path: Path, size: int, entry: ListedFile) -> None:
    if size != entry.bytes:
        raise ArtifactError(
            f"{path} has {size} bytes, the manifest says {entry.bytes}: "
            "truncated or replaced; re-export the model"
        )


def _check_digest(path: Path, digest: str, size: int, entry: ListedFile) -> None:
    if size != entry.bytes or digest != entry.sha256:
        raise ArtifactError(
            f"sha256 mismatch for {path}: expected {entry.sha256}, got "
            f"{digest}; the file was modified or corrupted; re-export"
        )


def _chunks(fd: int, limit: int) -> Iterator[bytes]:
    """The file's bytes from offset 0, at most ``limit`` of them (a file that grew while
    being read is then caught by its size, never read without bound)."""
    offset = 0
    while offset < limit and (chunk := os.pread(fd, min(_CHUNK, limit - offset), offset)):
        yield chunk
        offset += len(chunk)


def _pread_all(fd: int, limit: int) -> bytes:
    return b"".join(_chunks(fd, limit))


def read_verified(path: Path, entry: ListedFile, fd: int | None = None) -> bytes:
    """The file's bytes, read once, after checking size and sha256 against the manifest.

    ``fd``: an open descriptor of the file (see :class:`PinnedFiles`) to read instead of
    ``path``, which then only names the file in errors.
    """
    owned = fd is None
    fd = open_entry(path, entry) if fd is None else fd
    try:
        _check_size(path, os.fstat(fd).st_size, entry)
        data = _pread_all(fd, entry.bytes + 1)
    finally:
        if owned:
            os.close(fd)
    _check_digest(path, hashlib.sha256(data).hexdigest(), len(data), entry)
    return data


def fd_path(fd: int) -> Path | None:
    """A path that opens the file of ``fd`` (Linux's /proc/self/fd/N), None without /proc."""
    path = Path(f"/proc/self/fd/{fd}")
    return path if path.exists() else None


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def verified_source(path: Path, entry: ListedFile, fd: int | None = None) -> Iterator[Path | bytes]:
    """Something ONNX Runtime can load that holds exactly the checked bytes of ``path``.

    Use it around the session's creation: the file is re-checked for writes when the block
    ends. ``fd``: an open descriptor of the file to use instead of opening ``path``. Raises
    :class:`ArtifactError` for a missing, truncated, modified or concurrently written file.
    """
    owned = fd is None
    fd = open_entry(path, entry) if fd is None else fd
    try:
        proc_path = fd_path(fd)
        if proc_path is None:  # no /proc: hand over the checked bytes instead
            yield read_verified(path, entry, fd)
            return
        before = os.fstat(fd)
        _check_size(path, before.st_size, entry)
        digest, size = hashlib.sha256(), 0
        for chunk in _chunks(fd, entry.bytes + 1):
            digest.update(chunk)
            size += len(chunk)
        _check_digest(path, digest.hexdigest(), size, entry)
        yield proc_path
        if _stamp(os.fstat(fd)) != _stamp(before):
            raise ArtifactError(
                f"{path} was written to while it was being loaded; load again, "
                "and do not modify an installed artifact (re-export instead)"
            )
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
    (using it later reports it missing); one that is not a regular file inside the artifact
    is an ArtifactError (see :func:`open_inside`)."""

    def __init__(self, artifact_dir: Path, relative_paths: Iterable[str]) -> None:
        self._fds: dict[str, int] = {}
        try:
            for relative in relative_paths:
                with contextlib.suppress(FileNotFoundError):
                    self._fds[relative] = open_inside(artifact_dir, relative)
        except BaseException:
            _close_all(list(self._fds.values()))
            raise
        self._close = weakref.finalize(self, _close_all, list(self._fds.values()))

    def fd(self, relative_path: str) -> int | None:
        """The descriptor of ``relative_path``, if it was pinned and is still open."""
        return self._fds.get(relative_path) if self._close.alive else None

    def close(self) -> None:
        """Close every descriptor now (idempotent)."""
        self._close()
