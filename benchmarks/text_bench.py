"""The text tower's benchmark (part of ``benchmarks/run.py``): tokenizer time, one query
and 32 queries -> vectors, ours (ONNX Runtime INT8 / fp32) vs open_clip + PyTorch, int32
vs int64 token ids, and INT8 accuracy against fp32 and PyTorch.

Same rules as the rest of run.py: same thread count for every engine, cases taking turns
(``interleaved_medians``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bench_utils import REPO, interleaved_medians, machine_info, ms

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.artifact import load_manifest
from heimdex_clip.gemm_floor import GemmFloor, artifact_gemms, describe
from heimdex_clip.session import create_session
from heimdex_clip.text import INPUT_NAME, OUTPUT_NAME, active_length

#: Search-box queries: short, as users type them.
QUERIES = [
    "sunset over the sea",
    "a red car at night",
    "a cat sleeping on a sofa",
    "people dancing at a wedding",
    "a dog catching a frisbee",
    "snow covered mountains",
    "a man giving a speech",
    "kids playing football in the park",
    "fireworks over a city",
    "a close-up of a coffee cup",
    "an astronaut in space",
    "a crowded train station",
    "rain on a window",
    "a birthday cake with candles",
    "a boat on a lake",
    "a woman riding a bicycle",
    "an aerial view of a forest",
    "a chef cooking in a kitchen",
    "a lighthouse in a storm",
    "two people shaking hands",
    "a baby laughing",
    "a motorcycle on a highway",
    "the moon in the night sky",
    "a concert crowd with lights",
    "a white horse running",
    "a street market at dusk",
    "an old black and white photo",
    "a plane taking off",
    "a laptop on a desk",
    "a waterfall in the jungle",
    "a family having dinner",
    "a robot walking",
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def _int64_variant(graph: Path, out: Path) -> Path:
    """The same graph taking int64 ids (its first Cast then casts int64 to int64)."""
    import onnx

    model = onnx.load(str(graph))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    onnx.save(model, str(out))
    return out


def bench_text(artifact: Path, threads: int, quick: bool, workdir: Path) -> dict:
    """The text tower's figures (see the module docstring); {} for an artifact without it."""
    import open_clip
    import torch

    manifest = load_manifest(artifact)
    if "tokenizer" not in manifest.files:
        return {}
    torch.set_num_threads(threads)
    torch.manual_seed(manifest.model.seed or 0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    base = ClipConfig(
        pretrained="none", model_dir=artifact, cpu_threads=threads, embed_cache_size=0
    )
    ours = {
        p: ClipEmbedder(config=base.replace(precision=p)).load()
        for p in ("int8", "fp32")
        if f"text.{p}" in manifest.files
    }
    for embedder in ours.values():
        embedder.embed_texts(QUERIES[:1])  # loads the text tower outside the timings
    query, batch = QUERIES[1], QUERIES
    int8 = ours.get("int8") or ours["fp32"]
    repeats = 10 if quick else 30
    ids = int8.tokenize([query])
    cut = ids[:, : active_length(ids)]
    # The query's INT8 GEMMs (its own token count) as MatMulInteger alone.
    floor = None
    if "text.int8" in manifest.files:
        dtype = manifest.extra["text"].get("token_dtype", "int64")
        gemms = artifact_gemms(
            artifact / manifest.file("text.int8").path,
            lambda b: {INPUT_NAME: np.repeat(cut, b, 0).astype(dtype)},
            threads,
        )
        floor = GemmFloor(gemms, 1, threads)

    def reference(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_text(open_clip.tokenize(texts), normalize=True).numpy()

    tokenizer = interleaved_medians(
        {
            "open_clip_1": lambda: open_clip.tokenize([query]),
            "ours_1": lambda: int8.tokenize([query]),
            "open_clip_32": lambda: open_clip.tokenize(batch),
            "ours_32": lambda: int8.tokenize(batch),
        },
        repeats * 3,
    )
    cases = {"open_clip_pytorch": lambda: reference([query])}
    cases.update({f"ours_{p}": (lambda e=e: e.embed_texts([query])) for p, e in ours.items()})
    if floor is not None:
        cases["int8_gemm_floor"] = floor.run
    one = interleaved_medians(cases, repeats, pause_s=0.1)
    cases = {"open_clip_pytorch": lambda: reference(batch)}
    cases.update(
        {f"ours_{p}": (lambda e=e: e.embed_texts(batch, batch_size=32)) for p, e in ours.items()}
    )
    many = interleaved_medians(cases, max(3, repeats // 5), pause_s=0.1)

    graph = artifact / manifest.file("text.int8" if "int8" in ours else "text.fp32").path
    s32 = create_session(graph, threads=threads)[0]
    s64 = create_session(_int64_variant(graph, workdir / "text.int64.onnx"), threads=threads)[0]
    dtypes = interleaved_medians(
        {
            "int32": lambda: s32.run([OUTPUT_NAME], {INPUT_NAME: cut.astype(np.int32)}),
            "int64": lambda: s64.run([OUTPUT_NAME], {INPUT_NAME: cut.astype(np.int64)}),
        },
        repeats * 2,
        pause_s=0.02,
    )

    ref = reference(batch)
    accuracy = {
        f"{p}_vs_pytorch_min_cosine": round(float(_cosines(ref, e.embed_texts(batch)).min()), 6)
        for p, e in ours.items()
    }
    if len(ours) == 2:
        cos = _cosines(ours["fp32"].embed_texts(batch), ours["int8"].embed_texts(batch))
        accuracy.update(
            int8_vs_fp32_mean_cosine=round(float(cos.mean()), 6),
            int8_vs_fp32_min_cosine=round(float(cos.min()), 6),
        )
    return {
        "queries": len(batch),
        "query": query,
        "query_tokens": int(cut.shape[1]),
        "tokenizer_ms": {k: ms(v) for k, v in tokenizer.items()},
        "query_to_vector_ms": {k: ms(v) for k, v in one.items()},
        "int8_gemm_floor_shapes": describe(floor.gemms) if floor is not None else None,
        "batch32_ms_per_text": {k: ms(v / len(batch)) for k, v in many.items()},
        "token_ids_graph_ms": {k: ms(v) for k, v in dtypes.items()},
        "accuracy": accuracy,
        "export_gates": manifest.parity.get("text", {}).get("int8_vs_fp32"),
    }


def text_markdown(t: dict) -> list[str]:
    """The text tower's rows of latest.md."""
    if not t:
        return ["", "Text tower: not in this artifact."]
    one, many, tok = t["query_to_vector_ms"], t["batch32_ms_per_text"], t["tokenizer_ms"]
    ref1, ref32 = one["open_clip_pytorch"], many["open_clip_pytorch"]
    lines = [
        "",
        f"| text tower | open_clip + PyTorch (reference) | "
        f"{' | '.join(k.removeprefix('ours_') for k in one if k.startswith('ours'))} |",
        "|---|---|" + "---|" * sum(k.startswith("ours") for k in one),
    ]
    lines.append(
        f"| one query -> vector, ms | {ref1} | "
        + " | ".join(f"{v} ({v / ref1:.2f}x)" for k, v in one.items() if k.startswith("ours"))
        + " |"
    )
    floor = one.get("int8_gemm_floor")
    if floor:
        lines.append(
            f"| one query, x its INT8 GEMM floor ({floor} ms) | "
            f"{ref1 / floor:.2f}x | "
            + " | ".join(f"{v / floor:.2f}x" for k, v in one.items() if k.startswith("ours"))
            + " |"
        )
    lines.append(
        f"| 32 queries, ms/text | {ref32} | "
        + " | ".join(f"{v} ({v / ref32:.2f}x)" for k, v in many.items() if k.startswith("ours"))
        + " |"
    )
    d = t["token_ids_graph_ms"]
    lines += [
        "",
        f"Tokenizer, ms: one query {tok['ours_1']} (open_clip {tok['open_clip_1']}), "
        f"32 queries {tok['ours_32']} (open_clip {tok['open_clip_32']}). Token ids "
        f"int32 {d['int32']} ms vs int64 {d['int64']} ms for the query's graph run "
        f"({t['query_tokens']} positions). Accuracy on {t['queries']} queries: "
        + ", ".join(f"{k} {v}" for k, v in t["accuracy"].items())
        + ".",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Only the text tower: ``python benchmarks/text_bench.py [--quick] [--artifact DIR]``."""
    import argparse
    import json
    import tempfile

    from heimdex_clip.session import physical_cores

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--artifact", type=Path, default=REPO / "models" / "ViT-B-32__none")
    parser.add_argument("--threads", type=int, default=physical_cores())
    args = parser.parse_args(argv)
    machine = machine_info(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_text(args.artifact, args.threads, args.quick, Path(tmp))
    print(json.dumps({"machine": machine, "text": result}, indent=2))
    print("\n".join(text_markdown(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
