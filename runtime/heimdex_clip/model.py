"""Loading the visual tower: manifest checked, bytes verified, then (only then) parsed.

:func:`load_visual_model` returns a :class:`VisualModel`, an immutable bundle of everything
one loaded artifact needs (manifest, session, preprocessor, tensor names). The embedder
holds it in a single attribute, so swapping or dropping a model is one assignment and a
call in flight keeps the model it started with.

The order of checks is the point: the manifest is validated against what this runtime can
do, the graph file's size and sha256 are checked against the manifest, and only those
verified bytes reach ONNX Runtime's parser (see :mod:`heimdex_clip.verified`). The
session's real input and output tensors are then checked against the manifest, so a
manifest that lies (``image_size: 100000``) is refused at load instead of failing every
frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import providers
from .artifact import FileEntry, Manifest, load_manifest, resolve_artifact_dir
from .bench import ms_per_image
from .config import DEFAULT_MODEL_DIRS, ClipConfig
from .errors import ArtifactError
from .metadata import ModelIdentity
from .preprocess import Preprocessor
from .providers import ProviderSetup, auto_cache, graph_key, openvino_precision_hint
from .session import SessionInfo, open_graph
from .verified import PinnedFiles

log = logging.getLogger("heimdex_clip")

# auto_cache and graph_key are imported from here by code written before heimdex_clip.providers.
__all__ = [
    "VisualModel",
    "auto_cache",
    "check_supported",
    "choose_provider",
    "graph_key",
    "load_visual_model",
]

#: Bounds a manifest must respect: a larger input would allocate absurd tensors per frame.
MAX_INPUT_SIDE = 1024
MAX_EMBED_DIM = 16384


@dataclass(frozen=True)
class VisualModel:
    """One loaded, verified image tower and what running it needs."""

    artifact_dir: Path
    manifest: Manifest
    session: ort.InferenceSession
    session_info: SessionInfo
    preprocessor: Preprocessor
    input_name: str
    output_name: str
    identity: ModelIdentity
    load_time_ms: float
    #: Descriptors on the text tower's files of this version, for its lazy load.
    pinned: PinnedFiles | None = None

    @property
    def embed_dim(self) -> int:
        return self.manifest.model.embed_dim

    def run(self, pixels: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """float32 [N, 3, S, S] -> float32 [N, D] (raises what ONNX Runtime raises)."""
        out = self.session.run([self.output_name], {self.input_name: pixels}, run_options)[0]
        return np.ascontiguousarray(out, dtype=np.float32)


def check_supported(manifest: Manifest, *, normalize: bool) -> None:
    """Refuse an artifact that asks for what this runtime cannot do, or is out of bounds."""
    spec, model = manifest.preprocess, manifest.model
    if spec.crop != "center":
        raise ArtifactError(
            f"the manifest asks for crop={spec.crop!r}; this runtime "
            "implements open_clip's centre crop only"
        )
    if not 1 <= spec.image_size <= MAX_INPUT_SIDE:
        raise ArtifactError(
            f"the manifest's image_size {spec.image_size} is outside "
            f"1..{MAX_INPUT_SIDE}; the artifact is corrupt or hostile"
        )
    if not 1 <= model.embed_dim <= MAX_EMBED_DIM:
        raise ArtifactError(
            f"the manifest's embed_dim {model.embed_dim} is outside 1..{MAX_EMBED_DIM}"
        )
    if normalize and not model.normalized_in_graph:
        raise ArtifactError(
            "the artifact's graph does not L2-normalise its output "
            "(normalized_in_graph is false) and CLIP_NORMALIZE=true relies "
            "on it; re-export the model with this version of heimdex-clip"
        )


def _output_name(entry: FileEntry, normalize: bool) -> str:
    """outputs[0] is the unit-norm embedding, outputs[1] the raw features (manifest order)."""
    wanted = 0 if normalize else 1
    if len(entry.outputs) <= wanted:
        raise ArtifactError(
            f"{entry.path} lists {len(entry.outputs)} output(s) in the "
            f"manifest; CLIP_NORMALIZE={str(normalize).lower()} needs output "
            f"#{wanted}; re-export the model"
        )
    return entry.outputs[wanted].name


def _check_graph(
    session: ort.InferenceSession, manifest: Manifest, input_name: str, output_name: str, path: Path
) -> None:
    """The graph's real tensors must be the ones the manifest describes."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if set(inputs) != {input_name}:
        raise ArtifactError(
            f"{path} takes inputs {sorted(inputs)}, the manifest says {input_name!r}"
        )
    if output_name not in outputs:
        raise ArtifactError(
            f"{path} has no output {output_name!r} (outputs: "
            f"{sorted(outputs)}); re-export the model"
        )
    size = manifest.preprocess.image_size
    expected = [3, size, size]
    actual = inputs[input_name][1:]
    # A symbolic dimension (a string) accepts any size; a fixed one must match.
    if len(actual) != 3 or any(
        isinstance(a, int) and a != e for a, e in zip(actual, expected, strict=True)
    ):
        raise ArtifactError(
            f"{path} takes [N, {', '.join(map(str, actual))}] images, the "
            f"manifest says [N, 3, {size}, {size}]; the manifest does not "
            "belong to this graph"
        )
    dim = outputs[output_name][-1]
    if isinstance(dim, int) and dim != manifest.model.embed_dim:
        raise ArtifactError(
            f"{path} outputs {dim} dimensions, the manifest says {manifest.model.embed_dim}"
        )


def _session_for(
    config: ClipConfig, artifact_dir: Path, manifest: Manifest, provider: str, key: str
) -> tuple[ort.InferenceSession, SessionInfo]:
    """A session running artifact file ``key`` on ``provider`` with ``config``'s options."""
    entry = manifest.file(key)
    hint = openvino_precision_hint(exact=config.precision == "fp32")
    setup = ProviderSetup(
        provider=provider,
        device=config.device,
        threads=config.cpu_threads,
        memory_arena=config.memory_arena,
        precision_hint=hint,
    )
    return open_graph(artifact_dir, entry, setup)


def _measurer(config: ClipConfig, artifact_dir: Path, manifest: Manifest) -> Callable[[str], float]:
    """What CLIP_PROVIDER=auto measures a provider with: its own graph, ms/image."""

    def measure(provider: str) -> float:
        key = graph_key(provider, config.precision, manifest, artifact_dir) or "visual.int8"
        session, info = _session_for(config, artifact_dir, manifest, provider, key)
        if info.provider != provider:
            raise RuntimeError(f"{provider} fell back to {info.provider}")
        return ms_per_image(session, config.batch_size)

    return measure


def choose_provider(config: ClipConfig, artifact_dir: Path, manifest: Manifest) -> str:
    """CLIP_PROVIDER resolved for this artifact: :func:`heimdex_clip.providers.choose_provider`,
    measuring (only when auto has nothing remembered) with this artifact's own graphs."""
    return providers.choose_provider(
        config, artifact_dir, manifest, _measurer(config, artifact_dir, manifest)
    )


def load_visual_model(config: ClipConfig, model_dir: Path | None) -> VisualModel:
    """Find, verify and load the image tower for ``config``; raises ArtifactError."""
    started = time.perf_counter()
    artifact_dir = resolve_artifact_dir(
        model_dir, config.model_name, config.pretrained, search=DEFAULT_MODEL_DIRS
    )
    manifest = load_manifest(artifact_dir)
    if manifest.model.name != config.model_name:
        log.warning(
            "the artifact in %s holds %s, not CLIP_MODEL_NAME=%s; using the artifact",
            artifact_dir,
            manifest.model.name,
            config.model_name,
        )
    check_supported(manifest, normalize=config.normalize)
    provider = choose_provider(config, artifact_dir, manifest)
    key = graph_key(provider, config.precision, manifest, artifact_dir) or "visual.int8"
    entry = manifest.file(key)
    if len(entry.inputs) != 1:
        raise ArtifactError(
            f"{entry.path}: the manifest lists {len(entry.inputs)} inputs, an image tower takes one"
        )
    input_name, output_name = entry.inputs[0].name, _output_name(entry, config.normalize)
    path = artifact_dir / entry.path
    session, info = _session_for(config, artifact_dir, manifest, provider, key)
    if info.provider != provider:  # the plugin refused at session creation (logged)
        key = graph_key(info.provider, config.precision, manifest, artifact_dir) or key
        entry = manifest.file(key)
        path = artifact_dir / entry.path
        session, info = _session_for(config, artifact_dir, manifest, info.provider, key)
    _check_graph(session, manifest, input_name, output_name, path)
    identity = ModelIdentity(
        model_name=manifest.model.name,
        pretrained=manifest.model.pretrained,
        embed_dim=manifest.model.embed_dim,
        device=info.device,
        normalized=config.normalize,
        artifact_id=manifest.artifact_id,
        provider=info.provider,
    )
    # The text tower loads on its first query, perhaps after a new install has deleted this
    # version: descriptors opened now keep its files readable (see verified.PinnedFiles).
    pinned = PinnedFiles(
        artifact_dir,
        [e.path for k, e in manifest.files.items() if k.startswith("text.") or k == "tokenizer"],
    )
    return VisualModel(
        artifact_dir=artifact_dir,
        manifest=manifest,
        session=session,
        session_info=info,
        preprocessor=Preprocessor(manifest.preprocess),
        input_name=input_name,
        output_name=output_name,
        identity=identity,
        load_time_ms=(time.perf_counter() - started) * 1000,
        pinned=pinned,
    )
