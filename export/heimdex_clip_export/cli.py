"""Command line of the export (what ``make export-model`` runs)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

DESCRIPTION = """Export an open_clip model's image and text towers to a verified INT8 ONNX
artifact.
PRETRAINED is an open_clip tag (default 'openai'; needs a model hub), a path to a local
checkpoint, or 'none' for a seeded random initialisation (tests; not semantic)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m heimdex_clip_export", description=DESCRIPTION)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    p.add_argument(
        "--pretrained",
        default="openai",
        help="open_clip tag, checkpoint path, or 'none' (default: openai)",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        default=Path("models"),
        help="where <MODEL>__<PRETRAINED>/ is written (default: models)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a random init (default: 0)")
    p.add_argument(
        "--keep-fp32", action="store_true", help="also keep visual.fp32.onnx in the artifact"
    )
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("CLIP_CACHE_DIR"),
        help="download cache for weights (default: $CLIP_CACHE_DIR)",
    )
    p.add_argument(
        "--no-rewrites",
        action="store_true",
        help="export the image tower as traced, without the exact graph rewrites "
        "(lean attention, patch embedding as MatMul, class-token last block)",
    )
    p.add_argument(
        "--no-ort-fusions",
        action="store_true",
        help="leave the INT8 graph's attention unfused (to compare; the shipped "
        "graph runs it as one ONNX Attention op per block)",
    )
    p.add_argument(
        "--no-text",
        action="store_true",
        help="leave the text tower (text search) out of the artifact",
    )
    p.add_argument(
        "--openvino",
        action="store_true",
        help="also write visual.qdq.onnx, the statically quantized graph the "
        "OpenVINO execution provider runs best (calibrated on photographs)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail when the shipped INT8 recipe misses a gate, instead of climbing "
        "the ladder (some MatMuls in fp32, then the fp32 graph)",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # ONNX Runtime's quantizer logs one INFO line per tensor on the root logger: keep the
    # root at WARNING and show our own progress.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.quiet:
        logging.getLogger("heimdex_clip_export").setLevel(logging.INFO)
    # Imported here so that --help answers without loading torch.
    from .pipeline import GateError, export_artifact
    from .quantize import SHIPPED_RECIPE
    from .weights import WeightsError

    started = time.perf_counter()
    try:
        path = export_artifact(
            args.model,
            args.pretrained,
            args.models_dir,
            seed=args.seed,
            keep_fp32=args.keep_fp32,
            cache_dir=args.cache_dir,
            rewrites=not args.no_rewrites,
            text=not args.no_text,
            openvino=args.openvino,
            strict=args.strict,
            recipe=replace(SHIPPED_RECIPE, ort_fusions=False) if args.no_ort_fusions else None,
        )
    except (WeightsError, GateError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return 0
