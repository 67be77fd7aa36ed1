"""The export, end to end: load -> ONNX fp32 -> parity gate -> INT8 -> accuracy gates -> manifest.

Everything is written into a hidden working directory next to the destination and moved
into place only after every gate passed, so a failed export leaves no half-written artifact
(and an existing artifact stays untouched).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import torch

from heimdex_clip.artifact import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    FileEntry,
    Manifest,
    ModelInfo,
    PreprocessSpec,
    TensorSpec,
    artifact_dir_name,
    sha256_file,
    write_json_atomic,
)

from . import evaluation as ev
from . import static_qdq
from .onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, export_visual
from .quantize import QuantRecipe, quantize_visual
from .weights import LoadedModel, load_model

log = logging.getLogger(__name__)

EVAL_BATCH = 32
ODD_BATCH = 7
BATCH1_IMAGES = 16


class GateError(RuntimeError):
    """A measured figure missed its gate; the export was abandoned."""


@dataclass(frozen=True)
class Gates:
    """The accuracy an artifact must show before it is written (DESIGN.md targets)."""

    fp32_min_cosine: float = 0.99999
    int8_mean_cosine: float = 0.995
    int8_min_cosine: float = 0.98
    int8_top5_agreement: float = 0.9
    batch_invariance_min_cosine: float = 0.999
    min_eval_images: int = 100


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_embed(session: ort.InferenceSession) -> ev.EmbedFn:
    return lambda pixels: session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def _torch_embed(model: torch.nn.Module) -> ev.EmbedFn:
    def embed(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
    return embed


def evaluation_pixels(loaded: LoadedModel) -> np.ndarray:
    """The evaluation set through open_clip's own eval transform (the reference)."""
    transform = open_clip.image_transform(
        loaded.image_size, is_train=False, mean=loaded.mean, std=loaded.std,
        resize_mode=loaded.resize_mode, interpolation=loaded.interpolation,
        fill_color=loaded.fill_color)
    return torch.stack([transform(img) for img in ev.evaluation_images()]).numpy()


def fp32_parity(torch_ref: np.ndarray, fp32: ev.EmbedFn, pixels: np.ndarray) -> dict:
    """fp32 ONNX vs PyTorch at batch 1 and at an odd batch size, over the whole set."""
    batch1 = ev.embed_batched(fp32, pixels[:BATCH1_IMAGES], 1)
    odd = ev.embed_batched(fp32, pixels, ODD_BATCH)
    cos1 = ev.row_cosines(torch_ref[:BATCH1_IMAGES], batch1)
    cos_odd = ev.row_cosines(torch_ref, odd)
    return {
        "images": len(pixels),
        "batch1_min_cosine": float(cos1.min()),
        f"batch{ODD_BATCH}_min_cosine": float(cos_odd.min()),
        "min_cosine": float(min(cos1.min(), cos_odd.min())),
        "max_abs_diff": float(np.abs(torch_ref - odd).max()),
    }


def _tensor_specs(values: list) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        specs.append(TensorSpec(name=v.name, shape=shape,
                                dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    return specs


def _file_entry(path: Path, precision: str) -> FileEntry:
    graph = onnx.load(str(path), load_external_data=False).graph
    return FileEntry(path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size,
                     role="visual", precision=precision, inputs=_tensor_specs(graph.input),
                     outputs=_tensor_specs(graph.output))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime", "numpy",
                 "pillow", "heimdex-clip"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def _install(work: Path, final: Path) -> None:
    """Move the finished working directory into place, replacing an older artifact."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{dt.datetime.now().timestamp():.0f}")
        final.rename(old)
    work.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_artifact(model_name: str, pretrained: str, models_dir: Path, *, seed: int = 0,
                    keep_fp32: bool = False, cache_dir: str | None = None,
                    recipe: QuantRecipe | None = None, gates: Gates | None = None,
                    rewrites: bool = True, openvino: bool = False) -> Path:
    """Export, verify and write ``models_dir/<MODEL>__<PRETRAINED>/``; returns that path."""
    gates = gates or Gates()
    loaded = load_model(model_name, pretrained, seed=seed, cache_dir=cache_dir)
    if loaded.random_init:
        log.warning("RANDOM INITIALISATION (seed %d): this artifact is for tests; its "
                    "embeddings carry no meaning", seed)
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / artifact_dir_name(model_name, pretrained)
    work = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".{final.name}.tmp-"))
    work.chmod(0o755)  # mkdtemp makes 0700; the runtime may run as another user
    try:
        manifest = _export_into(loaded, work, keep_fp32, recipe or QuantRecipe(), gates,
                                rewrites, openvino)
        write_json_atomic(work / MANIFEST_NAME, manifest.to_dict())
        _install(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("artifact written to %s", final)
    return final


def _export_into(loaded: LoadedModel, work: Path, keep_fp32: bool, recipe: QuantRecipe,
                 gates: Gates, rewrites: bool, openvino: bool = False) -> Manifest:
    fp32_path, int8_path = work / "visual.fp32.onnx", work / "visual.int8.onnx"
    applied = export_visual(loaded.model, loaded.image_size, fp32_path, rewrites=rewrites)

    pixels = evaluation_pixels(loaded)
    if len(pixels) < gates.min_eval_images:
        raise GateError(f"evaluation set has {len(pixels)} images < {gates.min_eval_images}")
    log.info("evaluating on %d photographs and crops", len(pixels))
    torch_ref = ev.embed_batched(_torch_embed(loaded.model), pixels, EVAL_BATCH)

    fp32_embed = _onnx_embed(_session(fp32_path))
    fp32_report = fp32_parity(torch_ref, fp32_embed, pixels)
    log.info("fp32 ONNX vs PyTorch: %s", fp32_report)
    failures: list[str] = []
    ev.check_min("fp32 vs torch min cosine", fp32_report["min_cosine"],
                 gates.fp32_min_cosine, failures)
    _raise_if(failures, "fp32 parity")

    recipe_record = quantize_visual(fp32_path, int8_path, recipe)
    fp32_emb = ev.embed_batched(fp32_embed, pixels, EVAL_BATCH)
    int8_embed = _onnx_embed(_session(int8_path))
    int8_emb = ev.embed_batched(int8_embed, pixels, EVAL_BATCH)
    int8_vs_fp32 = ev.agreement(fp32_emb, int8_emb)
    int8_vs_torch = ev.agreement(torch_ref, int8_emb)
    invariance = ev.batch_invariance(int8_embed, pixels, EVAL_BATCH)
    log.info("INT8 vs fp32: %s; batch invariance min cosine %.6f", int8_vs_fp32, invariance)
    ev.check_min("INT8 mean cosine", int8_vs_fp32.mean_cosine, gates.int8_mean_cosine, failures)
    ev.check_min("INT8 min cosine", int8_vs_fp32.min_cosine, gates.int8_min_cosine, failures)
    ev.check_min("INT8 top-5 agreement", int8_vs_fp32.top5_agreement,
                 gates.int8_top5_agreement, failures)
    ev.check_min("batch invariance min cosine", invariance,
                 gates.batch_invariance_min_cosine, failures)
    _raise_if(failures, "INT8 accuracy")

    files = {"visual.int8": _file_entry(int8_path, "int8")}
    qdq_parity = _openvino_graph(loaded, fp32_path, work, pixels, fp32_emb, gates) \
        if openvino else {}
    if qdq_parity:
        files[static_qdq.QDQ_KEY] = _file_entry(work / static_qdq.QDQ_FILE, "int8")
    if keep_fp32:
        files["visual.fp32"] = _file_entry(fp32_path, "fp32")
    else:
        fp32_path.unlink()
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(name=loaded.model_name, pretrained=loaded.pretrained,
                        embed_dim=loaded.embed_dim, random_init=loaded.random_init,
                        seed=loaded.seed, quick_gelu=loaded.quick_gelu),
        preprocess=PreprocessSpec(image_size=loaded.image_size, mean=loaded.mean,
                                  std=loaded.std, interpolation=loaded.interpolation,
                                  resize_mode=loaded.resize_mode,
                                  fill_color=loaded.fill_color),
        files=files,
        quantization=recipe_record,
        parity={
            "evaluation_set": {"source": "scikit-image photographs + crops",
                               "images": len(pixels)},
            "gates": asdict(gates),
            "fp32_vs_torch": fp32_report,
            "int8_vs_fp32": int8_vs_fp32.to_dict(),
            "int8_vs_torch": int8_vs_torch.to_dict(),
            "int8_batch_invariance": {"batch_size": EVAL_BATCH, "min_cosine": invariance},
            "measured_with": {"onnxruntime": ort.__version__, "cpu": platform.processor()
                              or platform.machine()},
            **qdq_parity,
        },
        versions=_versions(),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"export": {"exporter": "torch.onnx dynamo", "opset": OPSET,
                          "rewrites": applied.to_dict()}},
    )


# --- OpenVINO's graph (--openvino): static QDQ INT8, calibrated on real photographs -------

def _openvino_graph(loaded: LoadedModel, fp32_path: Path, work: Path, pixels: np.ndarray,
                    fp32_emb: np.ndarray, gates: Gates) -> dict:
    """Write and gate visual.qdq.onnx (static_qdq.py); returns its manifest parity figures."""
    recipe = static_qdq.QdqRecipe()
    transform = open_clip.image_transform(
        loaded.image_size, is_train=False, mean=loaded.mean, std=loaded.std,
        resize_mode=loaded.resize_mode, interpolation=loaded.interpolation,
        fill_color=loaded.fill_color)
    qdq_path = work / static_qdq.QDQ_FILE
    static_qdq.quantize_qdq(fp32_path, qdq_path, INPUT_NAME,
                            static_qdq.calibration_pixels(transform, recipe), recipe)
    qdq_gates = {"mean_cosine": gates.int8_mean_cosine, "min_cosine": gates.int8_min_cosine,
                 "top5_agreement": gates.int8_top5_agreement,
                 "batch_invariance_min_cosine": gates.batch_invariance_min_cosine}
    report = static_qdq.evaluate_qdq(qdq_path, INPUT_NAME, OUTPUT_NAME, pixels, fp32_emb,
                                     qdq_gates, EVAL_BATCH)
    _raise_if(report.failures, "QDQ (OpenVINO graph) accuracy")
    return report.parity(recipe, qdq_gates)


def _raise_if(failures: list[str], stage: str) -> None:
    if failures:
        raise GateError(f"{stage} gate failed; no artifact written: " + "; ".join(failures))
