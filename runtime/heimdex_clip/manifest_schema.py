"""The manifest's schema, checked type-exactly before any of it is used.

A manifest is data from disk, possibly hostile: ``embed_dim: 512.0``, ``normalized_in_graph:
"no"`` (a true string), ``files: {}`` or a file entry ``{"path": "/dev/zero", "bytes": 0}``
must be refused with a message naming the field, not coerced into something that fails
later (or hashes forever). ``True`` is not an integer here, ``512.0`` is not one either, and
a number must be finite.

:func:`check_manifest` validates the whole dictionary; :func:`safe_relative_path` is the rule
every file entry's path obeys (the runtime re-checks it against the disk when it opens the
file, see :mod:`heimdex_clip.verified`); :func:`read_manifest_bytes` reads the file itself
with a bound.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ArtifactError

#: A manifest larger than this is not one (the real ones are a few KB).
MAX_MANIFEST_BYTES = 1 << 20
#: Bytes a listed file may claim (the largest graphs are a few GB).
MAX_FILE_BYTES = 1 << 40
MAX_NAME_CHARS = 4096
#: The runtime's bounds on the model (model.check_supported says the same): a larger input
#: would allocate absurd tensors per frame.
MAX_IMAGE_SIZE = 1024
MAX_EMBED_DIM = 16384
_FILE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _where(where: str, message: str) -> ArtifactError:
    return ArtifactError(f"malformed manifest: {where} {message}")


def _type_name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:120]


def require_int(value: Any, where: str, low: int, high: int) -> int:
    """An ``int`` (not a bool, not a float) within low..high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _where(where, f"must be an integer, got {_type_name(value)}")
    if not low <= value <= high:
        raise _where(where, f"is {value}, outside {low}..{high}")
    return value


def require_number(value: Any, where: str) -> float:
    """A finite ``int`` or ``float`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _where(where, f"must be a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise _where(where, f"must be finite, got {value!r}")
    return float(value)


def require_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _where(where, f"must be true or false, got {_type_name(value)}")
    return value


def require_str(value: Any, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise _where(
            where, f"must be a {'' if empty else 'non-empty '}string, got {_type_name(value)}"
        )
    if len(value) > MAX_NAME_CHARS or "\x00" in value:
        raise _where(where, f"must be at most {MAX_NAME_CHARS} characters without NUL")
    return value


def require_dict(value: Any, where: str, *, empty: bool = True) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _where(where, f"must be an object, got {_type_name(value)}")
    if not empty and not value:
        raise _where(where, "must not be empty")
    return value


def _require_keys(
    d: dict[str, Any], where: str, required: tuple[str, ...], allowed: tuple[str, ...] | None = None
) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise _where(where, f"lacks {', '.join(missing)}")
    if allowed is not None and (unknown := sorted(set(d) - set(required) - set(allowed))):
        raise _where(where, f"has unknown key(s) {', '.join(unknown)}")


def safe_relative_path(value: Any, where: str) -> str:
    """A file entry's path: relative, inside the artifact (no ``..``), plain POSIX text."""
    path = require_str(value, where)
    pure = PurePosixPath(path)
    if (
        pure.is_absolute()
        or "\\" in path
        or any(p in ("..", "") for p in path.split("/"))
        or pure.parts in ((), (".",))
    ):
        raise _where(
            where,
            f"is {path!r}: a file entry must be a relative path inside the "
            "artifact directory (no absolute path, no '..')",
        )
    return path


def _check_tensors(value: Any, where: str) -> None:
    if not isinstance(value, list):
        raise _where(where, f"must be a list, got {_type_name(value)}")
    for i, tensor in enumerate(value):
        at = f"{where}[{i}]"
        tensor = require_dict(tensor, at)
        _require_keys(tensor, at, ("name", "shape", "dtype"), ())
        require_str(tensor["name"], f"{at}.name")
        require_str(tensor["dtype"], f"{at}.dtype")
        shape = tensor["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(
                isinstance(d, str)
                or (isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 20)
                for d in shape
            )
        ):
            raise _where(f"{at}.shape", f"must be a list of sizes or names, got {shape!r}"[:200])


def check_file_entry(entry: Any, where: str) -> None:
    entry = require_dict(entry, where)
    _require_keys(entry, where, ("path", "sha256", "bytes", "role"))
    safe_relative_path(entry["path"], f"{where}.path")
    if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
        raise _where(f"{where}.sha256", "must be 64 lower-case hex digits")
    require_int(entry["bytes"], f"{where}.bytes", 0, MAX_FILE_BYTES)
    require_str(entry["role"], f"{where}.role")
    if entry.get("precision") is not None:
        require_str(entry["precision"], f"{where}.precision")
    for key in ("inputs", "outputs"):
        if key in entry:
            _check_tensors(entry[key], f"{where}.{key}")


def _check_model(model: Any) -> None:
    model = require_dict(model, "model")
    _require_keys(
        model,
        "model",
        ("name", "pretrained", "embed_dim", "random_init"),
        ("seed", "quick_gelu", "normalized_in_graph"),
    )
    require_str(model["name"], "model.name")
    require_str(model["pretrained"], "model.pretrained")
    require_int(model["embed_dim"], "model.embed_dim", 1, MAX_EMBED_DIM)
    require_bool(model["random_init"], "model.random_init")
    if model.get("seed") is not None:
        require_int(model["seed"], "model.seed", -(1 << 63), (1 << 64) - 1)
    for key in ("quick_gelu", "normalized_in_graph"):
        if key in model:
            require_bool(model[key], f"model.{key}")


def _check_preprocess(spec: Any) -> None:
    spec = require_dict(spec, "preprocess")
    _require_keys(spec, "preprocess", ("image_size", "mean", "std"))
    require_int(spec["image_size"], "preprocess.image_size", 1, MAX_IMAGE_SIZE)
    for key in ("mean", "std"):
        values = spec[key]
        if not isinstance(values, list) or len(values) != 3:
            raise _where(
                f"preprocess.{key}", f"must be a list of 3 numbers, got {_type_name(values)}"
            )
        for i, v in enumerate(values):
            require_number(v, f"preprocess.{key}[{i}]")
    for key in ("interpolation", "resize_mode", "crop"):
        if key in spec:
            require_str(spec[key], f"preprocess.{key}")
    if "fill_color" in spec:
        require_int(spec["fill_color"], "preprocess.fill_color", 0, 255)


def check_manifest(d: Any, schema_version: int) -> None:
    """Raise ArtifactError naming the first field of ``d`` that breaks the schema."""
    d = require_dict(d, "the manifest")
    _require_keys(d, "the manifest", ("schema_version", "model", "preprocess", "files"))
    version = require_int(d["schema_version"], "schema_version", 1, 1 << 31)
    if version > schema_version:
        raise ArtifactError(
            f"manifest schema {version} is newer than this runtime "
            f"understands ({schema_version}); upgrade heimdex-clip"
        )
    _check_model(d["model"])
    _check_preprocess(d["preprocess"])
    files = require_dict(d["files"], "files", empty=False)
    for key, entry in files.items():
        if not _FILE_KEY.fullmatch(key):
            raise _where("files", f"has a key {key[:100]!r} that is not a file name")
        check_file_entry(entry, f"files[{key!r}]")
    for key in ("quantization", "parity", "versions"):
        if key in d:
            require_dict(d[key], key)
    if "created_at" in d:
        require_str(d["created_at"], "created_at", empty=True)


def read_manifest_bytes(path: Path) -> bytes:
    """The manifest's bytes, read with a bound; a FIFO or device is refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path} is not a regular file")
        data = os.read(fd, MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes: not a manifest")
    return data
