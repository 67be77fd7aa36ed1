"""Building ONNX Runtime sessions, and nothing else.

Which provider, which graph, which options and how many threads is decided by
:mod:`heimdex_clip.providers` (a :class:`~heimdex_clip.providers.ProviderSetup`); this module
turns a setup and a graph (a path or verified bytes) into an ``InferenceSession``. A setup
that cannot run here (the OpenVINO plugin refuses the device or the graph, or takes no part
of it) falls back to ONNX Runtime's CPU provider with one warning naming the reason, and
:attr:`SessionInfo.provider` says what really runs.

For code written before the split, the names it imported from here keep working:
``cpu_features`` and ``physical_cores`` (now :mod:`heimdex_clip.cpu`), ``session_options``,
``available_providers`` and ``openvino_status`` (now :mod:`heimdex_clip.providers`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .artifact import FileEntry
from .cpu import cpu_features, physical_cores
from .errors import ArtifactError
from .providers import (
    OPENVINO_EP,
    ProviderSetup,
    available_providers,
    openvino_status,
    resolve_providers,
    session_options,
)
from .verified import verified_source

log = logging.getLogger(__name__)

__all__ = [
    "SessionInfo",
    "available_providers",
    "build_session",
    "cpu_features",
    "create_session",
    "open_graph",
    "openvino_status",
    "physical_cores",
    "session_options",
]


@dataclass(frozen=True)
class SessionInfo:
    """What a built session really runs with."""

    providers: list[str]
    device: str
    intra_op_threads: int
    memory_arena: bool
    #: ``cpu`` or ``openvino``: the execution provider that really runs the graph.
    provider: str = "cpu"
    #: The OpenVINO load_config the session was built with (None on the CPU provider).
    openvino_config: dict[str, Any] | None = None


def build_session(
    model: Path | bytes, setup: ProviderSetup
) -> tuple[ort.InferenceSession, SessionInfo]:
    """An inference session for ``model`` (a path or the verified bytes of the graph)."""
    source = str(model) if isinstance(model, Path) else model
    if setup.provider == "openvino" and setup.device == "cpu":
        try:
            session = ort.InferenceSession(source, setup.session_options())
        except Exception as exc:  # the plugin refuses this device or this graph
            log.warning("CLIP_PROVIDER=openvino cannot run here, using the cpu provider: %s", exc)
        else:
            ran = session.get_providers()
            if OPENVINO_EP in ran:
                log.debug("ONNX Runtime session: %s", setup.describe())
                return session, SessionInfo(
                    providers=ran,
                    device="cpu",
                    intra_op_threads=setup.intra_op_threads,
                    memory_arena=setup.memory_arena,
                    provider="openvino",
                    openvino_config=setup.provider_options,
                )
            log.warning("the OpenVINO EP took no part of the graph; using the cpu provider")
    setup = setup.on_cpu()  # ONNX Runtime's own providers (CPU, or CUDA for CLIP_DEVICE=cuda)
    providers, actual_device = resolve_providers(setup.device)
    options = setup.session_options()
    session = ort.InferenceSession(source, options, providers=providers)
    log.debug("ONNX Runtime session: %s", setup.describe())
    info = SessionInfo(
        providers=session.get_providers(),
        device=actual_device,
        intra_op_threads=options.intra_op_num_threads,
        memory_arena=setup.memory_arena,
    )
    return session, info


def create_session(
    model: Path | bytes,
    *,
    device: str = "cpu",
    threads: int | None = None,
    memory_arena: bool = True,
    provider: str = "cpu",
    precision_hint: str = "f32",
) -> tuple[ort.InferenceSession, SessionInfo]:
    """:func:`build_session` with the setup given as keywords (the historical signature)."""
    return build_session(
        model,
        ProviderSetup(
            provider=provider,
            device=device,
            threads=threads,
            memory_arena=memory_arena,
            precision_hint=precision_hint,
        ),
    )


def open_graph(
    artifact_dir: Path, entry: FileEntry, setup: ProviderSetup
) -> tuple[ort.InferenceSession, SessionInfo]:
    """A session for one artifact file, from bytes verified against the manifest (size,
    sha256) before ONNX Runtime parses them; ArtifactError when it cannot be loaded."""
    path = artifact_dir / entry.path
    with verified_source(path, entry) as graph:
        try:
            return build_session(graph, setup)
        except Exception as exc:  # ONNX Runtime raises its own types for graphs it rejects
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}") from exc
