"""Facts about this machine's CPU: model name, vendor, SIMD flags, physical cores.

Read from /proc/cpuinfo and /sys once (nothing is loaded or measured). They decide how many
intra-op threads a session runs, which OpenVINO precision hint is worth asking for, and they
key CLIP_PROVIDER=auto's remembered decision (:mod:`heimdex_clip.providers`).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["INTERESTING_FLAGS", "cpu_features", "has_native_bf16", "physical_cores"]

#: CPU flags that change which INT8 kernels ONNX Runtime can use.
INTERESTING_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


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
    model, vendor, flags = "unknown", "unknown", set[str]()
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


def has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX-512 BF16)."""
    flags = cpu_features()["flags"]
    return bool(flags.get("amx_bf16") or flags.get("avx512_bf16"))
