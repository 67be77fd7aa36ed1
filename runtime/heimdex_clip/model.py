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

from .artifact import FileEntry, Manifest, load_manifest, resolve_artifact_dir
from .config import DEFAULT_MODEL_DIRS, ClipConfig
from .errors import ArtifactError
from .metadata import ModelIdentity
from .preprocess import Preprocessor
from .session import (
    AUTO_CACHE_NAME,
    PROVIDERS,
    SessionInfo,
    auto_cache_key,
    available_providers,
    create_session,
    ms_per_image,
    openvino_precision_hint,
    physical_cores,
    plugin_installed,
    resolve_auto,
)
from .verified import PinnedFiles, verified_source

log = logging.getLogger("heimdex_clip")

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
        raise ArtifactError(f"the manifest asks for crop={spec.crop!r}; this runtime "
                            "implements open_clip's centre crop only")
    if not 1 <= spec.image_size <= MAX_INPUT_SIDE:
        raise ArtifactError(f"the manifest's image_size {spec.image_size} is outside "
                            f"1..{MAX_INPUT_SIDE}; the artifact is corrupt or hostile")
    if not 1 <= model.embed_dim <= MAX_EMBED_DIM:
        raise ArtifactError(f"the manifest's embed_dim {model.embed_dim} is outside "
                            f"1..{MAX_EMBED_DIM}")
    if normalize and not model.normalized_in_graph:
        raise ArtifactError("the artifact's graph does not L2-normalise its output "
                            "(normalized_in_graph is false) and CLIP_NORMALIZE=true relies "
                            "on it; re-export the model with this version of heimdex-clip")


def _output_name(entry: FileEntry, normalize: bool) -> str:
    """outputs[0] is the unit-norm embedding, outputs[1] the raw features (manifest order)."""
    wanted = 0 if normalize else 1
    if len(entry.outputs) <= wanted:
        raise ArtifactError(f"{entry.path} lists {len(entry.outputs)} output(s) in the "
                            f"manifest; CLIP_NORMALIZE={str(normalize).lower()} needs output "
                            f"#{wanted}; re-export the model")
    return entry.outputs[wanted].name


def _check_graph(session: ort.InferenceSession, manifest: Manifest, input_name: str,
                 output_name: str, path: Path) -> None:
    """The graph's real tensors must be the ones the manifest describes."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if set(inputs) != {input_name}:
        raise ArtifactError(f"{path} takes inputs {sorted(inputs)}, the manifest says "
                            f"{input_name!r}")
    if output_name not in outputs:
        raise ArtifactError(f"{path} has no output {output_name!r} (outputs: "
                            f"{sorted(outputs)}); re-export the model")
    size = manifest.preprocess.image_size
    expected = [3, size, size]
    actual = inputs[input_name][1:]
    # A symbolic dimension (a string) accepts any size; a fixed one must match.
    if len(actual) != 3 or any(isinstance(a, int) and a != e
                               for a, e in zip(actual, expected, strict=True)):
        raise ArtifactError(f"{path} takes [N, {', '.join(map(str, actual))}] images, the "
                            f"manifest says [N, 3, {size}, {size}]; the manifest does not "
                            "belong to this graph")
    dim = outputs[output_name][-1]
    if isinstance(dim, int) and dim != manifest.model.embed_dim:
        raise ArtifactError(f"{path} outputs {dim} dimensions, the manifest says "
                            f"{manifest.model.embed_dim}")


def graph_key(provider: str, precision: str, manifest: Manifest) -> str | None:
    """The artifact file ``provider`` runs best, or None when it has none worth running.

    OpenVINO gains nothing on ONNX Runtime's dynamically quantized graph, so it runs the
    statically quantized ``visual.qdq`` (or the fp32 graph); CLIP_PRECISION=fp32 means the
    fp32 graph on any provider.
    """
    if precision == "fp32" or "visual.int8" not in manifest.files:
        # An export whose ladder found no INT8 graph that passes ships only the fp32 one.
        return "visual.fp32"
    if provider == "openvino":
        return next((k for k in ("visual.qdq", "visual.fp32") if k in manifest.files), None)
    return f"visual.{precision}"


def _session_for(config: ClipConfig, artifact_dir: Path, manifest: Manifest, provider: str,
                 key: str) -> tuple[ort.InferenceSession, SessionInfo]:
    entry = manifest.file(key)
    path = artifact_dir / entry.path
    hint = openvino_precision_hint(entry.precision or "int8", exact=config.precision == "fp32")
    with verified_source(path, entry) as graph:
        try:
            return create_session(graph, device=config.device, threads=config.cpu_threads,
                                  memory_arena=config.memory_arena, provider=provider,
                                  precision_hint=hint)
        except Exception as exc:  # ONNX Runtime raises its own types for graphs it rejects
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def auto_cache(config: ClipConfig, manifest: Manifest) -> tuple[Path, dict]:
    """Where CLIP_PROVIDER=auto's decision is cached, and the key it is cached under."""
    return (config.cache_dir / AUTO_CACHE_NAME,
            auto_cache_key(manifest.artifact_id, config.cpu_threads or physical_cores(),
                           config.batch_size))


def _unusable(config: ClipConfig, artifact_dir: Path, manifest: Manifest) -> dict[str, str | None]:
    """Provider -> why it cannot run this artifact here (None: it can). Loads the plugin."""
    why_not = available_providers()
    for name in PROVIDERS:
        if why_not[name] is None and graph_key(name, config.precision, manifest) is None:
            why_not[name] = (f"the artifact in {artifact_dir} has no graph for it (OpenVINO "
                             "gains nothing on the dynamic INT8 graph: re-export with "
                             "--openvino for visual.qdq, or with --keep-fp32)")
    return why_not


def choose_provider(config: ClipConfig, artifact_dir: Path, manifest: Manifest) -> str:
    """CLIP_PROVIDER resolved to a provider that can run this artifact here (logged)."""
    if config.device != "cpu" or config.provider == "cpu":
        return "cpu"
    if config.provider != "auto":
        why_not = _unusable(config, artifact_dir, manifest)
        if why_not[config.provider] is None:
            return config.provider
        log.warning("CLIP_PROVIDER=%s cannot run here, using cpu: %s", config.provider,
                    why_not[config.provider])
        return "cpu"
    if not plugin_installed():
        return "cpu"  # nothing to compare, nothing to load

    def measure(provider: str) -> float:
        key = graph_key(provider, config.precision, manifest) or "visual.int8"
        session, info = _session_for(config, artifact_dir, manifest, provider, key)
        if info.provider != provider:
            raise RuntimeError(f"{provider} fell back to {info.provider}")
        return ms_per_image(session, config.batch_size)

    def candidates() -> dict[str, Callable[[], float]]:
        why_not = _unusable(config, artifact_dir, manifest)
        if any(why_not.values()):
            log.info("CLIP_PROVIDER=auto: not available here: %s",
                     {k: v for k, v in why_not.items() if v})
        return {name: (lambda name=name: measure(name))
                for name in PROVIDERS if why_not[name] is None}

    choice, why = resolve_auto(*auto_cache(config, manifest), candidates)
    log.info("CLIP_PROVIDER=auto -> %s (%s)", choice, why)
    if choice == "openvino" and (why := _unusable(config, artifact_dir, manifest)["openvino"]):
        log.warning("CLIP_PROVIDER=auto: the cached choice openvino cannot run here now, "
                    "using cpu: %s", why)
        return "cpu"
    return choice


def load_visual_model(config: ClipConfig, model_dir: Path | None) -> VisualModel:
    """Find, verify and load the image tower for ``config``; raises ArtifactError."""
    started = time.perf_counter()
    artifact_dir = resolve_artifact_dir(model_dir, config.model_name, config.pretrained,
                                        search=DEFAULT_MODEL_DIRS)
    manifest = load_manifest(artifact_dir)
    if manifest.model.name != config.model_name:
        log.warning("the artifact in %s holds %s, not CLIP_MODEL_NAME=%s; using the artifact",
                    artifact_dir, manifest.model.name, config.model_name)
    check_supported(manifest, normalize=config.normalize)
    provider = choose_provider(config, artifact_dir, manifest)
    key = graph_key(provider, config.precision, manifest) or "visual.int8"
    entry = manifest.file(key)
    if len(entry.inputs) != 1:
        raise ArtifactError(f"{entry.path}: the manifest lists {len(entry.inputs)} inputs, "
                            "an image tower takes one")
    input_name, output_name = entry.inputs[0].name, _output_name(entry, config.normalize)
    path = artifact_dir / entry.path
    session, info = _session_for(config, artifact_dir, manifest, provider, key)
    if info.provider != provider:  # the plugin refused at session creation (logged)
        key = graph_key(info.provider, config.precision, manifest) or key
        entry = manifest.file(key)
        path = artifact_dir / entry.path
        session, info = _session_for(config, artifact_dir, manifest, info.provider, key)
    _check_graph(session, manifest, input_name, output_name, path)
    identity = ModelIdentity(model_name=manifest.model.name,
                             pretrained=manifest.model.pretrained,
                             embed_dim=manifest.model.embed_dim, device=info.device,
                             normalized=config.normalize, artifact_id=manifest.artifact_id,
                             provider=info.provider)
    # The text tower loads on its first query, perhaps after a new install has deleted this
    # version: descriptors opened now keep its files readable (see verified.PinnedFiles).
    pinned = PinnedFiles(artifact_dir, [e.path for k, e in manifest.files.items()
                                        if k.startswith("text.") or k == "tokenizer"])
    return VisualModel(artifact_dir=artifact_dir, manifest=manifest, session=session,
                       session_info=info, preprocessor=Preprocessor(manifest.preprocess),
                       input_name=input_name, output_name=output_name, identity=identity,
                       load_time_ms=(time.perf_counter() - started) * 1000, pinned=pinned)
