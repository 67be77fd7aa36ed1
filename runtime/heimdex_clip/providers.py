"""Which execution provider and which graph run the model here: the one module that decides.

ONNX Runtime is the one inference API. Two execution providers can run a graph:

* ``cpu``: ONNX Runtime's own CPU provider (always there).
* ``openvino``: the OpenVINO EP plugin (``pip install 'heimdex-clip[openvino]'``), loaded
  into ONNX Runtime with ``register_execution_provider_library`` and attached to a session
  through the plugin's CPU device; its settings go through the plugin's ``load_config``.

Everything that decides lives here: whether each provider can run (:func:`available_providers`,
:func:`openvino_status`), which artifact graph a provider runs (:func:`graph_key`), what
CLIP_PROVIDER resolves to (:func:`choose_provider`), and CLIP_PROVIDER=auto's decision, measured
once per (CPU, artifact, library versions) and remembered in a small JSON file
(:func:`resolve_auto`) so that a normal start never measures. :class:`ProviderSetup` holds
how one session runs (provider, options, thread count), in the spirit of immich's
``OrtSession``; :mod:`heimdex_clip.session` builds the session from it.

This module builds no session and times nothing: :func:`choose_provider` is handed the
function that measures a provider (the model loader passes one that builds a session with
:mod:`heimdex_clip.session` and times it with :mod:`heimdex_clip.bench`).
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .artifact import Manifest, write_json_atomic
from .config import ClipConfig
from .cpu import cpu_features, has_native_bf16, physical_cores

log = logging.getLogger(__name__)

PROVIDERS = ("cpu", "openvino")
OPENVINO_EP = "OpenVINOExecutionProvider"
OPENVINO_PLUGIN = "onnxruntime_ep_openvino"
OPENVINO_DIST = "onnxruntime-ep-openvino"
#: The PCI vendor id the plugin's device discovery accepts (it offers Intel hardware only).
INTEL_VENDOR_ID = 0x8086
#: The decision cache of CLIP_PROVIDER=auto, inside CLIP_CACHE_DIR.
AUTO_CACHE_NAME = "providers.json"

# --- the OpenVINO EP plugin -------------------------------------------------------------


@dataclass(frozen=True)
class OpenVinoStatus:
    """Whether the OpenVINO EP can run here; ``reason`` says why not when it cannot."""

    device: Any | None  # onnxruntime.OrtEpDevice
    reason: str | None
    plugin_version: str | None


_REGISTERED: set[str] = set()


def plugin_version() -> str | None:
    """The installed OpenVINO EP plugin's version (None: not installed); loads nothing."""
    try:
        return version(OPENVINO_DIST)
    except PackageNotFoundError:
        return None


def plugin_installed() -> bool:
    """Whether the openvino extra is installed (cheap: nothing is loaded)."""
    return importlib.util.find_spec(OPENVINO_PLUGIN) is not None


@lru_cache(maxsize=1)
def openvino_status() -> OpenVinoStatus:
    """Register the plugin once per process and find its CPU device (never raises)."""
    try:
        import onnxruntime_ep_openvino as plugin  # optional extra
    except ImportError as exc:
        return OpenVinoStatus(
            None,
            f"the openvino extra is not installed (pip install 'heimdex-clip[openvino]'): {exc}",
            plugin_version(),
        )
    try:
        library = plugin.get_library_path()
        if library not in _REGISTERED:  # registering twice in one process is an error
            ort.register_execution_provider_library(
                f"heimdex_clip_openvino_{len(_REGISTERED)}", library
            )
            _REGISTERED.add(library)
        devices = ort.get_ep_devices()
    except Exception as exc:  # a broken wheel or an incompatible onnxruntime
        return OpenVinoStatus(
            None,
            f"the OpenVINO EP plugin {plugin_version()} could not be "
            f"loaded into onnxruntime {ort.__version__}: {exc}",
            plugin_version(),
        )
    cpus = [
        d for d in devices if d.ep_name == OPENVINO_EP and d.ep_metadata.get("ov_device") == "CPU"
    ]
    if not cpus:
        others = sorted(
            {
                d.device.vendor
                for d in devices
                if d.device.type == ort.OrtHardwareDeviceType.CPU
                and d.device.vendor_id != INTEL_VENDOR_ID
            }
        )
        why = (
            f" (the plugin claims Intel devices only; this CPU's vendor is {', '.join(others)})"
            if others
            else ""
        )
        return OpenVinoStatus(
            None,
            f"the OpenVINO EP plugin {plugin_version()} offers no CPU device on this machine{why}",
            plugin_version(),
        )
    return OpenVinoStatus(cpus[0], None, plugin_version())


def available_providers() -> dict[str, str | None]:
    """Every provider name -> None when it can run here, else the reason it cannot."""
    return {"cpu": None, "openvino": openvino_status().reason}


def openvino_precision_hint(exact: bool) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT: bf16 where the CPU computes bf16 natively and
    the caller accepted approximation (CLIP_PRECISION=int8); else f32.

    bf16 applies to the fp32 graph and to the QDQ graph's unquantized operators alike. On
    the trained ViT proxy through the OpenVINO EP on an Intel Xeon with AMX, the QDQ graph
    with the f32 hint missed the top-5 gate (0.946, min cosine 0.99246) where bf16 met it
    (0.954, 0.99654) and ran 5% faster at batch 1, 12% at batch 32 (docs/providers.md).
    """
    return "bf16" if has_native_bf16() and not exact else "f32"


# --- how one session runs ---------------------------------------------------------------


def resolve_providers(device: str) -> tuple[list[str], str]:
    """Providers for CLIP_DEVICE; ``cuda`` without the CUDA provider falls back to the CPU."""
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
        log.warning(
            "CLIP_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu); running on the CPU"
        )
    return ["CPUExecutionProvider"], "cpu"


def session_options(*, threads: int | None = None, memory_arena: bool = True) -> ort.SessionOptions:
    """The options every heimdex-clip session runs with (also used by the profiler).

    One session per process, intra-op threads = physical cores unless CLIP_CPU_THREADS says
    otherwise (hyper-threads and oversubscription slow GEMMs down and inflate memory).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = memory_arena
    options.log_severity_level = 3  # ORT warnings about unused initializers are noise here
    return options


@dataclass(frozen=True)
class ProviderSetup:
    """How one ONNX Runtime session runs: provider, its options, threads (one log line).

    ``provider`` is a CLIP_PROVIDER name (``cpu`` or ``openvino``); ``device`` is CLIP_DEVICE.
    """

    provider: str = "cpu"
    device: str = "cpu"
    threads: int | None = None
    memory_arena: bool = True
    precision_hint: str = "f32"

    @property
    def intra_op_threads(self) -> int:
        """Intra-op threads: CLIP_CPU_THREADS, else this process's physical cores."""
        return self.threads or physical_cores()

    @property
    def provider_options(self) -> dict[str, Any] | None:
        """The OpenVINO plugin's ``load_config`` (None on the CPU provider)."""
        if self.provider != "openvino":
            return None
        return {
            "CPU": {
                "INFERENCE_NUM_THREADS": str(self.intra_op_threads),
                "INFERENCE_PRECISION_HINT": self.precision_hint,
                "PERFORMANCE_HINT": "LATENCY",
            }
        }

    def session_options(self) -> ort.SessionOptions:
        """Fresh session options; for OpenVINO with the plugin's CPU device attached
        (raises RuntimeError, with the reason, when the plugin cannot run here)."""
        options = session_options(threads=self.intra_op_threads, memory_arena=self.memory_arena)
        if self.provider == "openvino":
            status = openvino_status()
            if status.device is None:
                raise RuntimeError(status.reason)
            options.add_provider_for_devices(
                [status.device], {"load_config": json.dumps(self.provider_options)}
            )
        return options

    def on_cpu(self) -> ProviderSetup:
        """The same setup on ONNX Runtime's CPU provider (the fallback)."""
        return replace(self, provider="cpu", precision_hint="f32")

    def describe(self) -> str:
        """What gets logged when a session is built from this setup."""
        extra = f", openvino={self.provider_options}" if self.provider == "openvino" else ""
        return (
            f"provider={self.provider}, device={self.device}, "
            f"intra_op_threads={self.intra_op_threads}, "
            f"memory_arena={self.memory_arena}{extra}"
        )


# --- which graph, which provider ---------------------------------------------------------


def graph_key(
    provider: str, precision: str, manifest: Manifest, artifact_dir: Path | None = None
) -> str | None:
    """The artifact file ``provider`` runs best, or None when it has none worth running.

    OpenVINO gains nothing on ONNX Runtime's dynamically quantized graph, so it runs the
    statically quantized ``visual.qdq`` (or the fp32 graph); CLIP_PRECISION=fp32 means the
    fp32 graph on any provider. With ``artifact_dir``, OpenVINO's graphs count only where
    their files are there: an image may bake the INT8 graph alone while the manifest still
    lists the others (docs/docker.md), and OpenVINO must then not be chosen.
    """
    if precision == "fp32" or "visual.int8" not in manifest.files:
        # An export whose ladder found no INT8 graph that passes ships only the fp32 one.
        return "visual.fp32"
    if provider == "openvino":
        return next(
            (
                key
                for key in ("visual.qdq", "visual.fp32")
                if key in manifest.files
                and (artifact_dir is None or has_graph(manifest, artifact_dir, key))
            ),
            None,
        )
    return f"visual.{precision}"


def has_graph(manifest: Manifest, artifact_dir: Path, key: str) -> bool:
    """Whether the manifest lists ``key`` and its file is in ``artifact_dir`` (an image may
    leave listed graphs out)."""
    return key in manifest.files and (artifact_dir / manifest.files[key].path).is_file()


def unusable(config: ClipConfig, artifact_dir: Path, manifest: Manifest) -> dict[str, str | None]:
    """Provider -> why it cannot run this artifact here (None: it can). Loads the plugin."""
    why_not = available_providers()
    for name in PROVIDERS:
        if (
            why_not[name] is None
            and graph_key(name, config.precision, manifest, artifact_dir) is None
        ):
            why_not[name] = (
                f"the artifact in {artifact_dir} has no graph for it (OpenVINO "
                "gains nothing on the dynamic INT8 graph: re-export with "
                "--openvino for visual.qdq, or with --keep-fp32; an image that "
                "leaves those files out runs cpu)"
            )
    return why_not


def choose_provider(
    config: ClipConfig, artifact_dir: Path, manifest: Manifest, measure: Callable[[str], float]
) -> str:
    """CLIP_PROVIDER resolved to a provider that can run this artifact here (logged).

    ``measure(provider)`` returns ms/image; it is called only for CLIP_PROVIDER=auto with
    no remembered decision and more than one provider that can run.
    """
    if config.device != "cpu" or config.provider == "cpu":
        return "cpu"
    if config.provider != "auto":
        why_not = unusable(config, artifact_dir, manifest)
        if why_not[config.provider] is None:
            return config.provider
        log.warning(
            "CLIP_PROVIDER=%s cannot run here, using cpu: %s",
            config.provider,
            why_not[config.provider],
        )
        return "cpu"
    if not plugin_installed():
        return "cpu"  # nothing to compare, nothing to load

    def candidates() -> dict[str, Callable[[], float]]:
        why_not = unusable(config, artifact_dir, manifest)
        if any(why_not.values()):
            log.info(
                "CLIP_PROVIDER=auto: not available here: %s",
                {k: v for k, v in why_not.items() if v},
            )
        return {
            name: functools.partial(measure, name) for name in PROVIDERS if why_not[name] is None
        }

    choice, why = resolve_auto(*auto_cache(config, manifest), candidates)
    log.info("CLIP_PROVIDER=auto -> %s (%s)", choice, why)
    if choice == "openvino" and (gone := unusable(config, artifact_dir, manifest)["openvino"]):
        log.warning(
            "CLIP_PROVIDER=auto: the cached choice openvino cannot run here now, using cpu: %s",
            gone,
        )
        return "cpu"
    return choice


# --- CLIP_PROVIDER=auto's remembered decision --------------------------------------------


def auto_cache_key(
    artifact_id: str, threads: int, batch: int, precision: str = "int8"
) -> dict[str, Any]:
    """What an auto decision depends on: the CPU, the artifact, the libraries, the load,
    and which graphs are compared how (CLIP_PRECISION picks the graphs; OpenVINO's
    precision hint is in the key so that a change to its rule measures again)."""
    cpu = cpu_features()
    return {
        "cpu_model": cpu["cpu_model"],
        "flags": sorted(f for f, on in cpu["flags"].items() if on),
        "artifact_id": artifact_id,
        "onnxruntime": ort.__version__,
        "openvino_plugin": plugin_version(),
        "threads": threads,
        "batch": batch,
        "precision": precision,
        "openvino_hint": openvino_precision_hint(exact=precision == "fp32"),
    }


def auto_cache(config: ClipConfig, manifest: Manifest) -> tuple[Path, dict]:
    """Where CLIP_PROVIDER=auto's decision is cached, and the key it is cached under."""
    return (
        config.cache_dir / AUTO_CACHE_NAME,
        auto_cache_key(
            manifest.artifact_id,
            config.cpu_threads or physical_cores(),
            config.batch_size,
            config.precision,
        ),
    )


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def read_auto_cache(path: Path) -> dict[str, Any]:
    """The cache's entries (an unreadable or malformed file counts as empty)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return dict(data["entries"])
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the provider cache %s: %s", path, exc)
        return {}


def remember_auto_choice(
    path: Path, key: dict[str, Any], choice: str, figures: dict[str, float]
) -> bool:
    """Store a decision atomically; False (and a log line) when the cache is not writable."""
    entries = read_auto_cache(path)
    entries[_key_text(key)] = {
        "choice": choice,
        "ms_per_image": figures,
        "decided_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"version": 1, "entries": entries})
    except OSError as exc:
        log.warning("cannot write the provider cache %s: %s", path, exc)
        return False
    return True


def remember_measured(
    config: ClipConfig, manifest: Manifest, figures: dict[str, float], *, write: bool = True
) -> tuple[str, Path, dict[str, Any], bool]:
    """Decide from ms/image measured elsewhere (``heimdex-clip bench``); remember it if
    ``write``. Returns (choice, cache path, cache key, whether the cache was written)."""
    choice = min(figures, key=figures.__getitem__) if figures else "cpu"
    path, key = auto_cache(config, manifest)
    written = write and bool(figures) and remember_auto_choice(path, key, choice, figures)
    return choice, path, key, written


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


#: Providers whose figures are within this fraction of each other are measured twice.
CLOSE_CALL = 0.15


def _close_call(figures: dict[str, float]) -> bool:
    fastest, slowest = min(figures.values()), max(figures.values())
    return slowest <= fastest * (1 + CLOSE_CALL)


def _measure_each(candidates: dict[str, Callable[[], float]]) -> dict[str, float]:
    """ms/image of each candidate, in order; one that fails to run is left out (logged)."""
    figures = {}
    for name, measure in candidates.items():
        try:
            figures[name] = round(measure(), 2)
        except Exception as exc:  # a provider that fails to run is not a candidate
            log.warning("CLIP_PROVIDER=auto: measuring %s failed: %s", name, exc)
    return figures


def resolve_auto(
    cache_path: Path,
    key: dict[str, Any],
    find_candidates: Callable[[], dict[str, Callable[[], float]]],
) -> tuple[str, str]:
    """(provider, why) for CLIP_PROVIDER=auto.

    A decision cached for ``key`` is used as it is: discovering the OpenVINO device alone
    loads OpenVINO (hundreds of ms), which a normal start must not pay to run on cpu.
    Otherwise ``find_candidates()`` maps each provider that can run here to a function
    measuring it (ms/image); with several, each is measured once and the fastest wins
    (within :data:`CLOSE_CALL` of each other, twice, the second time in the other order).
    The decision is remembered either way. A cache directory that cannot be written
    would mean measuring on every start: then the cpu provider is used, and the log says
    how to fix it.
    """
    cached = read_auto_cache(cache_path).get(_key_text(key))
    if cached and cached.get("choice") in PROVIDERS:
        return cached["choice"], f"decided {cached.get('decided_at')} (cache {cache_path})"
    candidates = find_candidates()
    writable = _writable_dir(cache_path.parent)
    if len(candidates) > 1 and not writable:
        log.warning(
            "CLIP_PROVIDER=auto: the cache directory %s is not writable, so the "
            "providers are not measured on every start; using cpu. Set "
            "CLIP_CACHE_DIR to a writable directory (or run `heimdex-clip bench` "
            "where it is), or set CLIP_PROVIDER explicitly",
            cache_path.parent,
        )
        return "cpu", f"cache directory {cache_path.parent} not writable"
    figures: dict[str, float] = {}
    if len(candidates) > 1:
        figures = _measure_each(candidates)
    if len(figures) > 1 and _close_call(figures):
        # A load change between the two measurements can decide a close call: measure
        # again in the other order and keep each provider's faster figure.
        again = _measure_each({name: candidates[name] for name in reversed(list(figures))})
        figures = {name: min(ms, again.get(name, ms)) for name, ms in figures.items()}
    choice = min(figures, key=figures.__getitem__) if figures else "cpu"
    if writable:
        remember_auto_choice(cache_path, key, choice, figures)
    if not figures:
        return choice, "cpu is the only provider that runs here"
    log.info("CLIP_PROVIDER=auto measured %s ms/image: using %s", figures, choice)
    return choice, f"measured now: {figures} ms/image"
