"""Putting a finished artifact in place atomically: versioned directories behind a symlink.

Layout of a models directory::

    ViT-B-32__none -> .ViT-B-32__none@20261125T153400123456Z-1a2b3c4d5e6f   (relative symlink)
    .ViT-B-32__none@20261125T153400123456Z-1a2b3c4d5e6f/                   (complete artifact)

:func:`install` takes a working directory that already holds the complete artifact and

1. renames it to a new version directory (a rename in the same directory: atomic);
2. creates a temporary symlink to that version;
3. renames the temporary symlink onto ``<name>`` with one ``os.replace`` (rename(2) swaps a
   symlink atomically): a reader opening ``<name>/manifest.json`` sees the old artifact or
   the new one, never neither and never a mix of directories;
4. deletes the versions ``<name>`` no longer points to, and stray temporary symlinks.

A crash before step 3 leaves the old artifact in place (plus a complete, unreferenced
version that the next install deletes); from step 3 on, the new one. An artifact installed
before this layout (a real directory at ``<name>``) is moved to a version directory first:
that one-time migration is two renames, with a moment between them when ``<name>`` does
not exist. Installs of the same name are serialised by a lock file.

An export builds its artifact in a working directory ``.<name>.tmp-*`` made by
:func:`working_directory`, which holds an ``flock`` on the directory for as long as the
export runs. A process killed outright (SIGKILL, the OOM killer) cannot clean up, so every
new working directory first deletes the ones whose lock nobody holds any more: their
owner is dead. Exports running side by side keep their locks and are left alone.

The runtime needs nothing for this: it opens ``<name>/manifest.json`` through the symlink.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from heimdex_clip.artifact import MANIFEST_NAME


def version_prefix(final: Path) -> str:
    """Version directories of ``final`` are named ``.<name>@<UTC time>-<manifest hash>``."""
    return f".{final.name}@"


def versions(final: Path) -> list[Path]:
    """Every version directory of ``final`` present on disk, oldest first."""
    prefix = version_prefix(final)
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix))


def current_version(final: Path) -> Path | None:
    """The version directory ``final`` points to (None if ``final`` is not such a symlink)."""
    if not final.is_symlink():
        return None
    return final.parent / os.readlink(final)


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _new_version_name(work: Path, final: Path) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    digest = hashlib.sha256((work / MANIFEST_NAME).read_bytes()).hexdigest()[:12]
    return f"{version_prefix(final)}{stamp}-{digest}"


@contextlib.contextmanager
def working_directory(final: Path) -> Iterator[Path]:
    """A new, locked working directory beside ``final`` for building its next version.

    Stale working directories of ``final`` (left by killed exports) are deleted first. The
    directory is deleted when the block raises; on success the caller has installed it.
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_work(final)
    work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.tmp-"))
    work.chmod(0o755)  # mkdtemp makes 0700; the runtime may run as another user
    # The lock is on the directory's inode, so it follows the directory through install's
    # rename and ends with this process, however it ends.
    fd = os.open(work, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _remove_abandoned_work(final: Path) -> None:
    """Delete ``final``'s working directories whose owner no longer holds their lock."""
    for work in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            fd = os.open(work, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not a directory we can open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live export's
        else:
            shutil.rmtree(work, ignore_errors=True)
        finally:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a crash of the machine, not just ours)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(work: Path, final: Path) -> Path:
    """Make the complete artifact in ``work`` the one at ``final``; returns its version dir.

    ``work`` must be in ``final``'s parent directory (so every step is a rename) and hold
    ``manifest.json``. Older versions are deleted once ``final`` points to the new one.
    """
    if work.parent.resolve() != final.parent.resolve():
        raise ValueError(f"{work} must be in {final.parent} for an atomic install")
    if not (work / MANIFEST_NAME).is_file():
        raise ValueError(f"{work} holds no {MANIFEST_NAME}: not a finished artifact")
    parent = final.parent
    with _locked(final):
        version = parent / _new_version_name(work, final)
        os.rename(work, version)  # step 1
        if final.is_dir() and not final.is_symlink():  # the layout before versioned installs
            os.rename(final, parent / f"{version_prefix(final)}00000000-pre-versioned")
        temporary = parent / f".{final.name}.link-{version.name}"
        os.symlink(version.name, temporary)  # step 2: relative, so the tree can be copied
        os.replace(temporary, final)  # step 3: the switch
        _fsync_dir(parent)
        _remove_stale(final, keep=version)  # step 4
    return version


def _remove_stale(final: Path, keep: Path) -> None:
    for old in versions(final):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    for link in final.parent.glob(f".{final.name}.link-*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
