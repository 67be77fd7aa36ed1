"""The export, end to end: load -> preprocessing proof -> ONNX fp32 -> parity gate -> INT8 ->
accuracy gates -> manifest.

Everything is written into a hidden working directory next to the destination and put in
place (:mod:`.install`, atomically) only after every gate passed, so a failed export leaves
no half-written artifact and an existing artifact stays untouched. The gates run the graphs
in sessions built by the runtime's own ``create_session`` and feed them pixels the runtime's
own ``Preprocessor`` reproduces bit for bit from the spec the manifest records.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import platform
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import torch
from PIL import Image

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
from heimdex_clip.preprocess import Preprocessor
from heimdex_clip.session import cpu_features, create_session

from . import evaluation as ev
from . import ladder, static_qdq
from .gates import RANDOM_INIT_GATES, GateError, Gates, raise_if
from .install import install, working_directory
from .onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, export_visual
from .quantize import SHIPPED_RECIPE
from .recipes import QuantRecipe
from .text_export import TextGateError, export_text_tower
from .visual_tower import VisualTower
from .weights import LoadedModel, load_model

log = logging.getLogger(__name__)

#: Re-exported: callers import the gates from the pipeline they configure.
__all__ = ["RANDOM_INIT_GATES", "GateError", "Gates", "export_artifact"]

EVAL_BATCH = 32
ODD_BATCH = 7
BATCH1_IMAGES = 16


def _session(path: Path) -> ort.InferenceSession:
    """The graph in a session built exactly as the runtime builds it (gate what production runs)."""
    return create_session(path)[0]


def _onnx_embed(session: ort.InferenceSession) -> ev.EmbedFn:
    return lambda pixels: session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def _torch_embed(model: torch.nn.Module) -> ev.EmbedFn:
    def embed(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()

    return embed


def preprocess_spec(loaded: LoadedModel) -> PreprocessSpec:
    """The preprocessing the manifest records: the model's own open_clip eval transform."""
    return PreprocessSpec(
        image_size=loaded.image_size,
        mean=loaded.mean,
        std=loaded.std,
        interpolation=loaded.interpolation,
        resize_mode=loaded.resize_mode,
        fill_color=loaded.fill_color,
    )


def open_clip_pixels(loaded: LoadedModel, images: list[Image.Image]) -> np.ndarray:
    """``images`` through open_clip's own eval transform for this model (the reference)."""
    transform = open_clip.image_transform(
        loaded.image_size,
        is_train=False,
        mean=loaded.mean,
        std=loaded.std,
        resize_mode=loaded.resize_mode,
        interpolation=loaded.interpolation,
        fill_color=loaded.fill_color,
    )
    return torch.stack([transform(img) for img in images]).numpy()


def prove_runtime_preprocessing(
    spec: PreprocessSpec, images: list[Image.Image], reference: np.ndarray
) -> dict:
    """The runtime's Preprocessor, built from ``spec``, must give ``reference`` bit for bit.

    GateError otherwise: an artifact whose recorded preprocessing the runtime would apply
    differently from open_clip is never written.
    """
    try:
        ours = Preprocessor(spec)(images)
    except Exception as exc:  # e.g. ArtifactError/ImageError: a spec the runtime cannot apply
        raise GateError(
            f"runtime preprocessing gate failed; no artifact written: the "
            f"runtime cannot apply {spec}: {exc}"
        ) from exc
    differing = [i for i in range(len(images)) if not np.array_equal(ours[i], reference[i])]
    if ours.shape != reference.shape or differing:
        worst = float(np.abs(ours - reference).max()) if ours.shape == reference.shape else None
        raise GateError(
            "runtime preprocessing gate failed; no artifact written: heimdex_clip's "
            f"Preprocessor from the manifest's spec ({spec}) differs from open_clip's "
            f"transform on {len(differing)} of {len(images)} evaluation images "
            f"(shapes {ours.shape} vs {reference.shape}, max abs diff {worst})"
        )
    return {
        "images": len(images),
        "bit_exact": True,
        "compared": "heimdex_clip.preprocess.Preprocessor(manifest preprocess) vs "
        "open_clip.image_transform(is_train=False)",
    }


def evaluation_pixels(loaded: LoadedModel, spec: PreprocessSpec) -> tuple[np.ndarray, dict]:
    """The evaluation set's model input, proven identical under open_clip and the runtime.

    Returns open_clip's pixels and the proof's record; GateError if the runtime's
    preprocessing from ``spec`` differs in a single bit.
    """
    images = ev.evaluation_images()
    reference = open_clip_pixels(loaded, images)
    return reference, prove_runtime_preprocessing(spec, images, reference)


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
        specs.append(
            TensorSpec(
                name=v.name,
                shape=shape,
                dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            )
        )
    return specs


def _file_entry(path: Path, precision: str | None, role: str = "visual") -> FileEntry:
    entry = FileEntry(
        path=path.name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        role=role,
        precision=precision,
    )
    if path.suffix != ".onnx":
        return entry
    graph = onnx.load(str(path), load_external_data=False).graph
    return replace(entry, inputs=_tensor_specs(graph.input), outputs=_tensor_specs(graph.output))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "torch",
        "open_clip_torch",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "numpy",
        "pillow",
        "heimdex-clip",
        "heimdex-clip-export",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def export_artifact(
    model_name: str,
    pretrained: str,
    models_dir: Path,
    *,
    seed: int = 0,
    keep_fp32: bool = False,
    cache_dir: str | None = None,
    recipe: QuantRecipe | None = None,
    gates: Gates | None = None,
    rewrites: bool = True,
    text: bool = True,
    openvino: bool = False,
    strict: bool = False,
) -> Path:
    """Export, verify and write ``models_dir/<MODEL>__<PRETRAINED>/``; returns that path.

    ``text=False`` leaves the text tower out (an image-only artifact); ``openvino=True`` also
    writes ``visual.qdq.onnx``, the static INT8 graph the OpenVINO provider runs best.
    A recipe that misses a gate climbs the ladder (``ladder.py``); ``strict=True`` fails
    instead, as the export did before the ladder.
    """
    loaded = load_model(model_name, pretrained, seed=seed, cache_dir=cache_dir)
    gates = gates or (RANDOM_INIT_GATES if loaded.random_init else Gates())
    if loaded.random_init:
        log.warning(
            "RANDOM INITIALISATION (seed %d): this artifact is for tests; its "
            "embeddings carry no meaning",
            seed,
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / artifact_dir_name(model_name, pretrained)
    with working_directory(final) as work:
        manifest = _export_into(
            loaded,
            work,
            keep_fp32,
            recipe or SHIPPED_RECIPE,
            gates,
            rewrites,
            text,
            openvino,
            strict,
        )
        write_json_atomic(work / MANIFEST_NAME, manifest.to_dict())
        install(work, final)
    log.info("artifact written to %s", final)
    return final


def _export_into(
    loaded: LoadedModel,
    work: Path,
    keep_fp32: bool,
    recipe: QuantRecipe,
    gates: Gates,
    rewrites: bool,
    with_text: bool,
    openvino: bool = False,
    strict: bool = False,
) -> Manifest:
    fp32_path, int8_path = work / "visual.fp32.onnx", work / "visual.int8.onnx"
    spec = preprocess_spec(loaded)
    pixels, preprocess_report = evaluation_pixels(loaded, spec)  # first: it fails in seconds
    if len(pixels) < gates.min_eval_images:
        raise GateError(f"evaluation set has {len(pixels)} images < {gates.min_eval_images}")
    log.info(
        "runtime preprocessing equals open_clip's bit for bit on %d photographs and crops",
        len(pixels),
    )
    applied = export_visual(loaded.model, loaded.image_size, fp32_path, rewrites=rewrites)
    torch_ref = ev.embed_batched(_torch_embed(loaded.model), pixels, EVAL_BATCH)

    fp32_embed = _onnx_embed(_session(fp32_path))
    fp32_report = fp32_parity(torch_ref, fp32_embed, pixels)
    log.info("fp32 ONNX vs PyTorch: %s", fp32_report)
    failures: list[str] = []
    ev.check_min(
        "fp32 vs torch min cosine", fp32_report["min_cosine"], gates.fp32_min_cosine, failures
    )
    raise_if(failures, "fp32 parity")

    calibration = open_clip_pixels(loaded, ev.calibration_images())  # not in the eval set
    fp32_emb = ev.embed_batched(fp32_embed, pixels, EVAL_BATCH)
    tower = VisualTower(fp32_path, pixels, fp32_emb, calibration, gates)
    climbed = ladder.climb(tower, recipe, fp32_path, int8_path, strict=strict)
    if climbed.rung == ladder.FP32_GRAPH and strict:
        raise_if(climbed.attempts[0].failures, "INT8 accuracy")
    figures = climbed.figures
    int8_vs_fp32 = ev.Agreement(**{k: figures[k] for k in ev.Agreement.__dataclass_fields__})
    int8_vs_torch = ev.agreement(torch_ref, tower.last_embeddings)
    invariance = figures["batch_invariance_min_cosine"]
    log.info(
        "INT8 vs fp32 (ladder rung %s): %s; batch invariance min cosine %.6f",
        climbed.rung,
        int8_vs_fp32,
        invariance,
    )

    shipped_int8 = climbed.rung != ladder.FP32_GRAPH
    files = {"visual.int8": _file_entry(int8_path, "int8")} if shipped_int8 else {}
    qdq_parity = (
        _openvino_graph(loaded, fp32_path, work, pixels, fp32_emb, gates) if openvino else {}
    )
    if qdq_parity:
        files[static_qdq.QDQ_KEY] = _file_entry(work / static_qdq.QDQ_FILE, "int8")
    if keep_fp32 or not shipped_int8:
        files["visual.fp32"] = _file_entry(fp32_path, "fp32")
    else:
        fp32_path.unlink()
    try:
        text = (
            export_text_tower(
                loaded.model,
                loaded.model_name,
                work,
                torch_ref,
                keep_fp32=keep_fp32,
                gates=gates,
                strict=strict,
            )
            if with_text
            else None
        )
    except TextGateError as exc:
        raise GateError(f"text fp32 parity gate failed; no artifact written: {exc}") from exc
    if text is not None:
        files.update(
            {
                key: _file_entry(path, precision, role)
                for key, (path, precision, role) in text.files.items()
            }
        )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(
            name=loaded.model_name,
            pretrained=loaded.pretrained,
            embed_dim=loaded.embed_dim,
            random_init=loaded.random_init,
            seed=loaded.seed,
            quick_gelu=loaded.quick_gelu,
        ),
        preprocess=spec,
        files=files,
        quantization=climbed.record or {"ladder_rung": climbed.rung},
        parity={
            "evaluation_set": {"source": "scikit-image photographs + crops", "images": len(pixels)},
            "gates": asdict(gates),
            "runtime_preprocessing": preprocess_report,
            "fp32_vs_torch": fp32_report,
            "int8_vs_fp32": int8_vs_fp32.to_dict(),
            "int8_vs_torch": int8_vs_torch.to_dict(),
            "int8_batch_invariance": {"batch_size": EVAL_BATCH, "min_cosine": invariance},
            "ladder": climbed.to_dict(),
            "measured_with": {"onnxruntime": ort.__version__, "cpu": cpu_features()},
            **({"text": text.parity} if text is not None else {}),
            **qdq_parity,
        },
        versions=_versions(),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        extra={
            "export": {
                "exporter": "torch.onnx dynamo",
                "opset": OPSET,
                "rewrites": applied.to_dict(),
            },
            **({"text": text.spec} if text is not None else {}),
        },
    )


# --- OpenVINO's graph (--openvino): static QDQ INT8, calibrated on real photographs -------


def _openvino_graph(
    loaded: LoadedModel,
    fp32_path: Path,
    work: Path,
    pixels: np.ndarray,
    fp32_emb: np.ndarray,
    gates: Gates,
) -> dict:
    """Write and gate visual.qdq.onnx (static_qdq.py); returns its manifest parity figures."""
    recipe = QuantRecipe.static_qdq()
    transform = open_clip.image_transform(
        loaded.image_size,
        is_train=False,
        mean=loaded.mean,
        std=loaded.std,
        resize_mode=loaded.resize_mode,
        interpolation=loaded.interpolation,
        fill_color=loaded.fill_color,
    )
    qdq_path = work / static_qdq.QDQ_FILE
    record = static_qdq.quantize_qdq(
        fp32_path,
        qdq_path,
        INPUT_NAME,
        OUTPUT_NAME,
        static_qdq.calibration_pixels(transform, recipe),
        recipe,
    )
    qdq_gates = {
        "mean_cosine": gates.int8_mean_cosine,
        "min_cosine": gates.int8_min_cosine,
        "top5_agreement": gates.int8_top5_agreement,
        "batch_invariance_min_cosine": gates.batch_invariance_min_cosine,
    }
    report = static_qdq.evaluate_qdq(
        qdq_path, INPUT_NAME, OUTPUT_NAME, pixels, fp32_emb, qdq_gates, EVAL_BATCH
    )
    raise_if(report.failures, "QDQ (OpenVINO graph) accuracy")
    return report.parity(record, qdq_gates)
