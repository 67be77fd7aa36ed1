"""ONNX Runtime session construction and the facts about this CPU that decide its speed.

One session per process, intra-op threads = physical cores unless CLIP_CPU_THREADS says
otherwise (hyper-threads and oversubscription slow GEMMs down and inflate memory), and the
arena configurable (it keeps peak activation memory reserved).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

#: CPU flags that change which INT8 kernels ONNX Runtime can use.
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


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


def cpu_features() -> dict[str, object]:
    """CPU model and the SIMD flags relevant to INT8 inference (AVX-512 VNNI, AMX...)."""
    model, flags = "unknown", set()
    for line in _cpuinfo().splitlines():
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return {
        "cpu_model": model,
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


def create_session(model: Path | bytes, *, device: str = "cpu", threads: int | None = None,
                   memory_arena: bool = True) -> tuple[ort.InferenceSession, SessionInfo]:
    """An inference session for ``model`` (a path or the verified bytes of the graph)."""
    providers, actual_device = resolve_providers(device)
    options = session_options(threads=threads, memory_arena=memory_arena)
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, options, providers=providers)
    info = SessionInfo(providers=session.get_providers(), device=actual_device,
                       intra_op_threads=options.intra_op_num_threads, memory_arena=memory_arena)
    return session, info
