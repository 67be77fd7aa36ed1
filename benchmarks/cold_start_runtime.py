"""One cold worker process of ours, for ``run.py``'s cold start and peak RSS figures.

    python benchmarks/cold_start_runtime.py ARTIFACT_DIR FRAME.jpg THREADS [PROVIDER]

Times import + load + first embedding from the first line of this file, then embeds the
frame 99 more times and prints one JSON line: cold start, peak RSS (VmHWM), whether torch
was imported, the provider that ran. PROVIDER is a CLIP_PROVIDER value (default ``auto``,
what ``run.py`` measures).
"""

import time

STARTED = time.perf_counter()  # before any import of ours: the import is part of cold start

import json  # noqa: E402
import sys  # noqa: E402

from heimdex_clip import ClipConfig, ClipEmbedder  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def main(artifact: str, frame: str, threads: str, provider: str = "auto") -> None:
    emb = ClipEmbedder(
        config=ClipConfig(
            pretrained="none",
            model_dir=artifact,
            cpu_threads=int(threads),
            embed_cache_size=0,
            provider=provider,
        )
    )
    first = emb.embed_frame(frame)
    cold = time.perf_counter() - STARTED
    assert first.ok, first.error
    with open(frame, "rb") as f:
        data = f.read()
    for _ in range(99):
        assert emb.embed_frame(data).ok
    print(
        json.dumps(
            {
                "cold_start_s": cold,
                "peak_rss_mb": peak_rss_mb(),
                "torch_imported": "torch" in sys.modules,
                "provider": emb.session_info.provider,  # what really ran (auto's choice)
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
