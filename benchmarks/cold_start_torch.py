"""One cold open_clip + PyTorch process, the reference for ``run.py``'s cold start and RSS.

    python benchmarks/cold_start_torch.py CHECKPOINT.pt FRAME.jpg THREADS

Times import + load + first embedding from the first line of this file, then embeds the
frame 99 more times and prints one JSON line: cold start and peak RSS (VmHWM).
"""

import time

STARTED = time.perf_counter()  # before importing torch: the import is part of cold start

import json  # noqa: E402
import sys  # noqa: E402

import open_clip  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def main(checkpoint: str, frame: str, threads: str) -> None:
    torch.set_num_threads(int(threads))
    model, _, transform = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=checkpoint, force_quick_gelu=True
    )
    model.eval()

    def embed(path: str) -> torch.Tensor:
        with torch.inference_mode():
            return model.encode_image(transform(Image.open(path)).unsqueeze(0), normalize=True)

    embed(frame)
    cold = time.perf_counter() - STARTED
    for _ in range(99):
        embed(frame)
    print(json.dumps({"cold_start_s": cold, "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
