"""ONNX Runtime sessions: which execution provider runs them, and the CPU facts behind that.

ONNX Runtime is the one inference API. Two execution providers can run a graph:

* ``cpu``: ONNX Runtime's own CPU provider (always there).
* ``openvino``: the OpenVINO EP plugin (``pip install 'heimdex-clip[openvino]'``), loaded
  into ONNX Runtime with ``register_execution_provider_library`` and attached to a session
  through the plugin's CPU device. Its settings go through the plugin's ``load_config``.

``CLIP_PROVIDER=auto`` picks the faster of the available ones by measuring both once per
(CPU, artifact, library versions) and remembering the answer in a small JSON file
(:func:`resolve_auto`), so a normal start never measures. Whatever was asked for, a
provider that cannot run falls back to ``cpu`` with one log line saying why, and
:attr:`SessionInfo.provider` says what really runs.

One session per process, intra-op threads = physical cores unless CLIP_CPU_THREADS says
otherwise (hyper-threads and oversubscription slow GEMMs down and inflate memory), and the
arena configurable (it keeps peak activation memory reserved).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

#: CPU flags that change which INT8 kernels ONNX Runtime can use.
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")

PROVIDERS = ("cpu", "openvino")
OPENVINO_EP = "OpenVINOExecutionProvider"
OPENVINO_PLUGIN = "onnxruntime_ep_openvino"
OPENVINO_DIST = "onnxruntime-ep-openvino"
#: The PCI vendor id the plugin's device discovery accepts (it offers Intel hardware only).
INTEL_VENDOR_ID = 0x8086
#: The decision cache of CLIP_PROVIDER=auto, inside CLIP_CACHE_DIR.
AUTO_CACHE_NAME = "providers.json"


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def physical_cores() -> int:
    """Physical cores available to this process (hyper-thread siblings counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def cpu_features() -> dict[str, Any]:
    """CPU model and the SIMD flags relevant to INT8 inference (AVX-512 VNNI, AMX...)."""
    model, vendor = "unknown", "unknown"
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
        elif line.startswith("vendor_id") and vendor == "unknown":
            vendor = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return {
        "cpu_model": model,
        "vendor": vendor,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "flags": {f: f in flags for f in INTERESTING_FLAGS},
    }


@dataclass(frozen=True)
class SessionInfo:
    providers: list[str]
    device: str
    intra_op_threads: int
    memory_arena: bool
    #: ``cpu`` or ``openvino``: the execution provider that really runs the graph.
    provider: str = "cpu"
    #: The OpenVINO load_config the session was built with (None on the CPU provider).
    openvino_config: dict[str, Any] | None = None


def resolve_providers(device: str) -> tuple[list[str], str]:
    """Providers for CLIP_DEVICE; ``cuda`` without the CUDA provider falls back to the CPU."""
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
        log.warning("CLIP_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
                    "(install onnxruntime-gpu); running on the CPU")
    return ["CPUExecutionProvider"], "cpu"


def session_options(*, threads: int | None = None, memory_arena: bool = True) -> ort.SessionOptions:
    """The options every heimdex-clip session runs with (also used by the profiler)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = memory_arena
    options.log_severity_level = 3  # ORT warnings about unused initializers are noise here
    return options


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


@lru_cache(maxsize=1)
def openvino_status() -> OpenVinoStatus:
    """Register the plugin once per process and find its CPU device (never raises)."""
    try:
        import onnxruntime_ep_openvino as plugin  # optional extra
    except ImportError as exc:
        return OpenVinoStatus(None, "the openvino extra is not installed (pip install "
                              f"'heimdex-clip[openvino]'): {exc}", plugin_version())
    try:
        library = plugin.get_library_path()
        if library not in _REGISTERED:  # registering twice in one process is an error
            ort.register_execution_provider_library(f"heimdex_clip_openvino_{len(_REGISTERED)}",
                                                    library)
            _REGISTERED.add(library)
        devices = ort.get_ep_devices()
    except Exception as exc:  # a broken wheel or an incompatible onnxruntime
        return OpenVinoStatus(None, f"the OpenVINO EP plugin {plugin_version()} could not be "
                              f"loaded into onnxruntime {ort.__version__}: {exc}",
                              plugin_version())
    cpus = [d for d in devices
            if d.ep_name == OPENVINO_EP and d.ep_metadata.get("ov_device") == "CPU"]
    if not cpus:
        others = sorted({d.device.vendor for d in devices
                         if d.device.type == ort.OrtHardwareDeviceType.CPU
                         and d.device.vendor_id != INTEL_VENDOR_ID})
        why = (f" (the plugin claims Intel devices only; this CPU's vendor is "
               f"{', '.join(others)})" if others else "")
        return OpenVinoStatus(None, f"the OpenVINO EP plugin {plugin_version()} offers no CPU "
                              f"device on this machine{why}", plugin_version())
    return OpenVinoStatus(cpus[0], None, plugin_version())


def available_providers() -> dict[str, str | None]:
    """Every provider name -> None when it can run here, else the reason it cannot."""
    return {"cpu": None, "openvino": openvino_status().reason}


def openvino_precision_hint(graph_precision: str, exact: bool) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT: bf16 for an fp32 graph where the CPU computes
    bf16 natively and the caller accepted approximation (CLIP_PRECISION=int8); else f32."""
    flags = cpu_features()["flags"]
    has_bf16 = flags.get("amx_bf16") or flags.get("avx512_bf16")
    return "bf16" if graph_precision == "fp32" and has_bf16 and not exact else "f32"


def _openvino_options(options: ort.SessionOptions, threads: int,
                      precision_hint: str) -> dict[str, Any]:
    status = openvino_status()
    if status.device is None:
        raise RuntimeError(status.reason)
    config = {"CPU": {"INFERENCE_NUM_THREADS": str(threads),
                      "INFERENCE_PRECISION_HINT": precision_hint,
                      "PERFORMANCE_HINT": "LATENCY"}}
    options.add_provider_for_devices([status.device], {"load_config": json.dumps(config)})
    return config


def create_session(model: Path | bytes, *, device: str = "cpu", threads: int | None = None,
                   memory_arena: bool = True, provider: str = "cpu",
                   precision_hint: str = "f32") -> tuple[ort.InferenceSession, SessionInfo]:
    """An inference session for ``model`` (a path or the verified bytes of the graph).

    ``provider="openvino"`` that cannot run here falls back to the CPU provider with a
    warning naming the reason; :attr:`SessionInfo.provider` says which one runs.
    """
    source = str(model) if isinstance(model, Path) else model
    if provider == "openvino" and device == "cpu":
        options = session_options(threads=threads, memory_arena=memory_arena)
        try:
            config = _openvino_options(options, options.intra_op_num_threads, precision_hint)
            session = ort.InferenceSession(source, options)
        except Exception as exc:  # the plugin refuses this device or this graph
            log.warning("CLIP_PROVIDER=openvino cannot run here, using the cpu provider: %s",
                        exc)
        else:
            ran = session.get_providers()
            if OPENVINO_EP in ran:
                return session, SessionInfo(providers=ran, device="cpu",
                                            intra_op_threads=options.intra_op_num_threads,
                                            memory_arena=memory_arena, provider="openvino",
                                            openvino_config=config)
            log.warning("the OpenVINO EP took no part of the graph; using the cpu provider")
    providers, actual_device = resolve_providers(device)
    options = session_options(threads=threads, memory_arena=memory_arena)
    session = ort.InferenceSession(source, options, providers=providers)
    info = SessionInfo(providers=session.get_providers(), device=actual_device,
                       intra_op_threads=options.intra_op_num_threads, memory_arena=memory_arena)
    return session, info


# --- measuring, and CLIP_PROVIDER=auto ------------------------------------------------------

def ms_per_image(session: ort.InferenceSession, batch: int, *, repeats: int = 3,
                 image_size: int | None = None) -> float:
    """Median wall time per image of ``repeats`` runs at ``batch`` (after one warm-up run).

    The input is seeded noise: speed does not depend on pixel values (accuracy is gated
    at export time on real photographs, not here).
    """
    inp = session.get_inputs()[0]
    size = image_size or next((d for d in inp.shape[2:] if isinstance(d, int)), 224)
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size), np.float32)
    session.run(None, {inp.name: pixels})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {inp.name: pixels})
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000 / batch


def auto_cache_key(artifact_id: str, threads: int, batch: int) -> dict[str, Any]:
    """What an auto decision depends on: the CPU, the artifact, the libraries, the load."""
    cpu = cpu_features()
    return {"cpu_model": cpu["cpu_model"],
            "flags": sorted(f for f, on in cpu["flags"].items() if on),
            "artifact_id": artifact_id, "onnxruntime": ort.__version__,
            "openvino_plugin": plugin_version(),
            "threads": threads, "batch": batch}


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


def remember_auto_choice(path: Path, key: dict[str, Any], choice: str,
                         figures: dict[str, float]) -> bool:
    """Store a decision atomically; False (and a log line) when the cache is not writable."""
    from .artifact import write_json_atomic  # the one atomic JSON writer of the project

    entries = read_auto_cache(path)
    entries[_key_text(key)] = {"choice": choice, "ms_per_image": figures,
                               "decided_at": dt.datetime.now(dt.timezone.utc)
                               .isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"version": 1, "entries": entries})
    except OSError as exc:
        log.warning("cannot write the provider cache %s: %s", path, exc)
        return False
    return True


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def plugin_installed() -> bool:
    """Whether the openvino extra is installed (cheap: nothing is loaded)."""
    return importlib.util.find_spec(OPENVINO_PLUGIN) is not None


def resolve_auto(cache_path: Path, key: dict[str, Any],
                 find_candidates: Callable[[], dict[str, Callable[[], float]]]
                 ) -> tuple[str, str]:
    """(provider, why) for CLIP_PROVIDER=auto.

    A decision cached for ``key`` is used as it is: discovering the OpenVINO device alone
    loads OpenVINO (hundreds of ms), which a normal start must not pay to run on cpu.
    Otherwise ``find_candidates()`` maps each provider that can run here to a function
    measuring it (ms/image); with several, each is measured once and the fastest wins.
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
        log.warning("CLIP_PROVIDER=auto: the cache directory %s is not writable, so the "
                    "providers are not measured on every start; using cpu. Set "
                    "CLIP_CACHE_DIR to a writable directory (or run `heimdex-clip bench` "
                    "where it is), or set CLIP_PROVIDER explicitly", cache_path.parent)
        return "cpu", f"cache directory {cache_path.parent} not writable"
    figures: dict[str, float] = {}
    if len(candidates) > 1:
        for name, measure in candidates.items():
            try:
                figures[name] = round(measure(), 2)
            except Exception as exc:  # a provider that fails to run is not a candidate
                log.warning("CLIP_PROVIDER=auto: measuring %s failed: %s", name, exc)
    choice = min(figures, key=figures.__getitem__) if figures else "cpu"
    if writable:
        remember_auto_choice(cache_path, key, choice, figures)
    if not figures:
        return choice, "cpu is the only provider that runs here"
    log.info("CLIP_PROVIDER=auto measured %s ms/image: using %s", figures, choice)
    return choice, f"measured now: {figures} ms/image"
