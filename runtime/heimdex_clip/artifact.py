"""The model artifact: ``manifest.json`` plus the files it lists, verified by sha256.

One source of truth shared by the export (which writes it) and the runtime (which reads
it): the runtime takes its preprocessing from here, never from constants of its own, and
refuses to load a file whose hash does not match.

Layout of an artifact directory (``models/<MODEL>__<PRETRAINED>/``)::

    manifest.json
    visual.int8.onnx        always
    visual.fp32.onnx        when exported with --keep-fp32
    (text.*.onnx, tokenizer files: a later schema adds them under "files")
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .manifest_schema import check_manifest, read_manifest_bytes
from .verified import check_files

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
RESIZE_MODES = ("shortest", "longest", "squash")
#: Bounds of the normalisation (pixels are scaled to 0..1 first): a std of 1e-45 or a mean
#: of 1e38 would make every input infinite, and every vector NaN.
MIN_STD, MAX_STD, MAX_ABS_MEAN = 1e-3, 1e3, 1e3
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model's input tensor (open_clip's eval transform)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    #: open_clip always centre-crops (``shortest``) or centre-pads (``longest``).
    crop: str = "center"
    #: Pad value for ``longest`` (open_clip's CenterCropOrPad fill).
    fill_color: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ArtifactError(f"image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ArtifactError(f"mean/std must be 3 values each: {self.mean} {self.std}")
        # `not a <= x <= b` is also true for NaN.
        if not all(MIN_STD <= s <= MAX_STD for s in self.std) or not all(
            -MAX_ABS_MEAN <= m <= MAX_ABS_MEAN for m in self.mean
        ):
            raise ArtifactError(
                f"preprocess mean {self.mean} / std {self.std} out of range: each std must be "
                f"within {MIN_STD:g}..{MAX_STD:g} and each mean within +-{MAX_ABS_MEAN:g} "
                "(finite); the artifact is corrupt or hostile"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ArtifactError(f"unsupported interpolation {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ArtifactError(f"unsupported resize_mode {self.resize_mode!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bicubic")),
            resize_mode=str(d.get("resize_mode", "shortest")),
            crop=str(d.get("crop", "center")),
            fill_color=int(d.get("fill_color", 0)),
        )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int | str]
    dtype: str


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact."""

    path: str
    sha256: str
    bytes: int
    #: ``visual`` (later: ``text``, ``tokenizer``).
    role: str
    #: ``int8`` or ``fp32`` for ONNX graphs.
    precision: str | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        return cls(
            path=str(d["path"]),
            sha256=str(d["sha256"]),
            bytes=int(d["bytes"]),
            role=str(d["role"]),
            precision=d.get("precision"),
            inputs=[TensorSpec(**t) for t in d.get("inputs", [])],
            outputs=[TensorSpec(**t) for t in d.get("outputs", [])],
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    #: ``openai`` (or another open_clip tag), ``none`` (random init) or ``checkpoint-<stem>``
    #: (see :func:`weights_label`).
    pretrained: str
    embed_dim: int
    random_init: bool
    #: The seed of a random initialisation (None for real weights).
    seed: int | None = None
    quick_gelu: bool = False
    #: Normalisation is inside the graph (``encode_image(normalize=True)``).
    normalized_in_graph: bool = True


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``; unknown keys are kept in ``extra``."""

    schema_version: int
    model: ModelInfo
    preprocess: PreprocessSpec
    files: dict[str, FileEntry]
    quantization: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def artifact_id(self) -> str:
        """Which export made a vector: ``<model>:<pretrained>:<visual.int8 sha256[:16]>``.

        Vectors are comparable only with vectors of the same ``artifact_id``; the database
        stores it beside every vector and search never mixes two of them.
        """
        visual = self.files.get("visual.int8") or next(iter(self.files.values()))
        return f"{self.model.name}:{self.model.pretrained}:{visual.sha256[:16]}"

    def file(self, key: str) -> FileEntry:
        """The entry ``key`` (e.g. ``visual.int8``); ArtifactError if the artifact lacks it."""
        try:
            return self.files[key]
        except KeyError:
            raise ArtifactError(
                f"the artifact has no {key!r} file (it has: {', '.join(sorted(self.files))})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "schema_version": self.schema_version,
            "model": asdict(self.model),
            "preprocess": asdict(self.preprocess),
            "files": {k: asdict(v) for k, v in self.files.items()},
            "quantization": self.quantization,
            "parity": self.parity,
            "versions": self.versions,
            "created_at": self.created_at,
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Parse a manifest's JSON object; ArtifactError naming the first field that breaks
        the schema (checked type-exactly: see :mod:`heimdex_clip.manifest_schema`)."""
        check_manifest(d, SCHEMA_VERSION)
        try:
            version = d["schema_version"]
            known = {
                "schema_version",
                "model",
                "preprocess",
                "files",
                "quantization",
                "parity",
                "versions",
                "created_at",
            }
            return cls(
                schema_version=version,
                model=ModelInfo(**d["model"]),
                preprocess=PreprocessSpec.from_dict(d["preprocess"]),
                files={k: FileEntry.from_dict(v) for k, v in d["files"].items()},
                quantization=dict(d.get("quantization", {})),
                parity=dict(d.get("parity", {})),
                versions=dict(d.get("versions", {})),
                created_at=str(d.get("created_at", "")),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"malformed manifest: {type(exc).__name__}: {exc}") from exc


#: File suffixes that make a PRETRAINED value a local checkpoint even without a directory.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_checkpoint_path(pretrained: str) -> bool:
    """Whether PRETRAINED names a local checkpoint file rather than an open_clip tag or none."""
    return "/" in pretrained or os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def weights_label(pretrained: str) -> str:
    """The weights as the manifest records them and the artifact directory is named.

    An open_clip tag as given, ``none`` for a random init (any case), ``checkpoint-<stem>``
    for a checkpoint path (the file stem made file-name safe). The export and the runtime
    both use this one rule, so the directory a runtime looks for is the one the export wrote.
    """
    if is_checkpoint_path(pretrained):
        return "checkpoint-" + _safe_name(Path(pretrained).stem)
    return "none" if pretrained.lower() == "none" else pretrained


def artifact_dir_name(model_name: str, pretrained: str) -> str:
    """``<MODEL>__<weights_label(PRETRAINED)>``, made file-name safe."""
    return _safe_name(f"{model_name}__{weights_label(pretrained)}")


def resolve_artifact_dir(
    model_dir: Path | None, model_name: str, pretrained: str, search: tuple[Path, ...] = ()
) -> Path:
    """Find the artifact directory.

    ``model_dir`` may be the artifact itself (it holds ``manifest.json``) or a models root
    holding ``<MODEL>__<PRETRAINED>/``. With no ``model_dir``, each of ``search`` is tried.
    The symlink an install switches is resolved here, once: a load that spans a new install
    reads the manifest and its files from one version, never from two.
    """
    roots = [model_dir] if model_dir is not None else list(search)
    name = artifact_dir_name(model_name, pretrained)
    tried = []
    for root in roots:
        for candidate in (root, root / name):
            tried.append(str(candidate))
            if (candidate / MANIFEST_NAME).is_file():
                return candidate.resolve()
    raise ArtifactError(
        f"no model artifact for {model_name} (pretrained={pretrained}): no {MANIFEST_NAME} in "
        f"{', '.join(tried) or '(no directory given)'}. Build one with "
        f"`make export-model MODEL={model_name} PRETRAINED={pretrained}` or set CLIP_MODEL_DIR."
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (artifacts are ~100 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(artifact_dir: Path) -> Manifest:
    """Parse and check ``artifact_dir/manifest.json``; ArtifactError if missing or malformed.

    The schema is checked type-exactly, and every file it lists that exists must be a
    regular file inside ``artifact_dir`` of the listed size (no file is read here).
    """
    path = Path(artifact_dir) / MANIFEST_NAME
    try:
        data = json.loads(read_manifest_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object")
    manifest = Manifest.from_dict(data)
    check_files(artifact_dir, manifest.files.values())
    return manifest


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users (the container's) must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
