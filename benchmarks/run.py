"""heimdex-clip benchmarks: our runtime side by side with the open_clip/PyTorch reference.

    python benchmarks/run.py [--quick] [--artifact models/ViT-B-32__none] [--out benchmarks/results]

Everything runs in one process run on one machine, with the same thread count for every
engine, so the ratios are comparable; absolute numbers depend on the machine, which the
results record. Results: ``<out>/latest.json``, ``<out>/latest.md`` and
``<out>/latency_vs_batch.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
from bench_utils import REPO, bulk_copy_scenes, interleaved_medians, machine_info, ms, write_results
from PIL import Image
from text_bench import bench_text, text_markdown

from heimdex_clip import ClipConfig, ClipEmbedder
from heimdex_clip.artifact import load_manifest
from heimdex_clip.gemm_floor import GemmFloor, artifact_gemms, describe, image_feed, multiple
from heimdex_clip.images import load_image
from heimdex_clip.preprocess import Preprocessor
from heimdex_clip.providers import available_providers, graph_key, openvino_precision_hint
from heimdex_clip.session import create_session, physical_cores

# --------------------------------------------------------------------------- encoder


def bench_encoder(
    artifact: Path, threads: int, batches: list[int], quick: bool, previous: Path | None = None
) -> dict:
    """ms/image of the visual encoder: PyTorch eager fp32, ORT fp32, ORT INT8, the INT8 GEMM
    floor of the INT8 graph's own shapes (``heimdex_clip.gemm_floor``) and, with
    ``previous`` (another artifact directory), that artifact's INT8 graph: all taking turns."""
    import open_clip
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, 224, 224)).astype(np.float32) for b in batches}
    repeats = {b: max(3, (8 if quick else 24) // b) for b in batches}
    manifest = load_manifest(artifact)
    # Each graph with its tensor names as the manifest records them: the first output is the
    # unit-norm embedding.
    graphs = {
        name: manifest.files[key]
        for key, name in (("visual.fp32", "onnx_fp32"), ("visual.int8", "onnx_int8"))
        if key in manifest.files
    }
    paths = {name: artifact / entry.path for name, entry in graphs.items()}
    if previous is not None:
        graphs["onnx_int8_previous"] = load_manifest(previous).files["visual.int8"]
        paths["onnx_int8_previous"] = previous / graphs["onnx_int8_previous"].path
    sessions = {
        name: (
            create_session(paths[name], threads=threads)[0],
            entry.inputs[0].name,
            entry.outputs[0].name,
        )
        for name, entry in graphs.items()
    }
    # Where the OpenVINO EP runs (Intel CPUs), the graph and precision CLIP_PROVIDER=auto
    # would give it, beside ONNX Runtime's own INT8 graph.
    openvino_key = graph_key("openvino", "int8", manifest, artifact)
    openvino_graph = None
    if available_providers()["openvino"] is None and openvino_key is not None:
        hint = openvino_precision_hint(exact=False)
        entry = manifest.files[openvino_key]
        sessions["openvino"] = (
            create_session(
                artifact / entry.path, threads=threads, provider="openvino", precision_hint=hint
            )[0],
            entry.inputs[0].name,
            entry.outputs[0].name,
        )
        openvino_graph = f"{openvino_key}, {hint}"
    int8 = graphs["onnx_int8"]
    gemms = artifact_gemms(
        paths["onnx_int8"], image_feed(int8.inputs[0].name, manifest.preprocess.image_size), threads
    )
    floors = {b: GemmFloor(gemms, b, threads) for b in batches}
    results: dict[str, dict] = {
        "pytorch_fp32": {},
        **{name: {} for name in sessions},
        "int8_gemm_floor": {},
    }
    for batch in batches:
        tensor, pixels = torch.from_numpy(inputs[batch]), inputs[batch]

        def run_torch(t=tensor):
            with torch.inference_mode():
                model.encode_image(t, normalize=True)

        cases: dict[str, Callable[[], object]] = {"pytorch_fp32": run_torch}
        for name, (session, input_name, output_name) in sessions.items():
            cases[name] = lambda s=session, i=input_name, o=output_name, x=pixels: s.run(
                [o], {i: x}
            )
        cases["int8_gemm_floor"] = floors[batch].run
        # Engines take turns, so a slow spell of the shared machine hits all alike; the
        # pause lets ORT's spinning workers go idle before PyTorch needs the cores.
        for name, median in interleaved_medians(cases, repeats[batch], pause_s=0.1).items():
            results[name][str(batch)] = ms(median / batch)
    for batch in batches:
        print(
            f"  batch {batch:>2}: "
            + ", ".join(f"{n} {results[n].get(str(batch))} ms/img" for n in results),
            flush=True,
        )
    results["int8_gemm_floor_shapes"] = describe(gemms)
    if openvino_graph:
        results["openvino_graph"] = openvino_graph
    return results


# --------------------------------------------------------------------------- preprocessing


def hd_jpeg(photo: Image.Image) -> bytes:
    buf = io.BytesIO()
    photo.resize((1920, 1080), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bench_preprocess(artifact: Path, jpeg: bytes, quick: bool) -> dict:
    """1080p JPEG -> model input: open_clip's transform vs our exact and fast paths."""
    import open_clip

    manifest = load_manifest(artifact)
    spec = manifest.preprocess
    reference = open_clip.image_transform(
        spec.image_size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
        resize_mode=spec.resize_mode,
    )
    ours = Preprocessor(spec)
    repeats = 10 if quick else 30
    cases = {
        "open_clip": lambda: reference(Image.open(io.BytesIO(jpeg))),
        "ours_exact": lambda: ours([load_image(jpeg, max_pixels=10**8)]),
        "ours_fast_decode": lambda: ours(
            [load_image(jpeg, max_pixels=10**8, min_side_for_draft=spec.image_size)], fast=True
        ),
    }
    out = {name: ms(median) for name, median in interleaved_medians(cases, repeats).items()}
    exact = ours([load_image(jpeg, max_pixels=10**8)])[0]
    out["exact_max_abs_diff_vs_open_clip"] = float(
        np.abs(exact - reference(Image.open(io.BytesIO(jpeg))).numpy()).max()
    )
    return out


def bench_end_to_end(artifact: Path, jpegs: list[bytes], threads: int, quick: bool) -> dict:
    """JPEG bytes -> vector, one frame at a time: open_clip + PyTorch vs ours (exact, fast)."""
    import open_clip
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, force_quick_gelu=True
    )
    model.eval()

    def reference(data: bytes) -> np.ndarray:
        with torch.inference_mode():
            x = transform(Image.open(io.BytesIO(data))).unsqueeze(0)
            return model.encode_image(x, normalize=True)[0].numpy()

    repeats = 2 if quick else 5
    ref = np.stack([reference(d) for d in jpegs])
    base = ClipConfig(
        pretrained="none", model_dir=artifact, cpu_threads=threads, embed_cache_size=0, timeout_s=60
    )
    exact = ClipEmbedder(config=base).load()
    fast = ClipEmbedder(config=base.replace(fast_decode=True)).load()
    cases: dict[str, Callable[[], object]] = {
        "open_clip_pytorch": lambda: [reference(d) for d in jpegs],
        "ours_exact": lambda: [exact.embed_frame(d) for d in jpegs],
        "ours_fast_decode": lambda: [fast.embed_frame(d) for d in jpegs],
    }
    out: dict = {
        name: ms(median / len(jpegs))
        for name, median in interleaved_medians(cases, repeats, pause_s=0.1).items()
    }
    out["provider"] = exact.session_info.provider  # what CLIP_PROVIDER=auto chose here
    ex = np.stack([exact.embed_frame(d).embedding for d in jpegs])
    fa = np.stack([fast.embed_frame(d).embedding for d in jpegs])
    out["cosine_exact_int8_vs_pytorch"] = {
        "mean": float(np.mean(np.sum(ex * ref, 1))),
        "min": float(np.min(np.sum(ex * ref, 1))),
    }
    out["cosine_fast_vs_exact"] = {
        "mean": float(np.mean(np.sum(fa * ex, 1))),
        "min": float(np.min(np.sum(fa * ex, 1))),
    }
    return out


# --------------------------------------------------------------------------- processes

# Each measured in a fresh interpreter: real files beside this one (linted like the rest).
RUNTIME_PROCESS = Path(__file__).with_name("cold_start_runtime.py")
TORCH_PROCESS = Path(__file__).with_name("cold_start_torch.py")


def bench_processes(artifact: Path, jpeg_path: Path, threads: int, workdir: Path) -> dict:
    """Cold start (import + load + first embedding) and peak RSS after 100 frames.

    Each in a fresh process; peak RSS is the child's VmHWM (getrusage's ru_maxrss survives
    fork+exec on Linux and would report this, much larger, parent process).
    """
    import open_clip
    import torch

    torch.manual_seed(0)
    checkpoint = workdir / "vit-b-32-seed0.pt"  # the reference loads weights from disk too
    torch.save(
        open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).state_dict(),
        checkpoint,
    )
    out = {}
    cases = [
        ("ours_runtime", RUNTIME_PROCESS, str(artifact), ["auto"]),
        ("open_clip_pytorch", TORCH_PROCESS, str(checkpoint), []),
    ]
    if available_providers()["openvino"] is None:  # auto may pick OpenVINO: cpu's figures too
        cases.insert(1, ("ours_runtime_cpu", RUNTIME_PROCESS, str(artifact), ["cpu"]))
    for name, script, weights, extra in cases:
        runs = []
        for _ in range(2):  # the second run sees warm OS file caches, as a worker restart does
            proc = subprocess.run(
                [sys.executable, str(script), weights, str(jpeg_path), str(threads), *extra],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        out[name] = {
            "cold_start_s": round(min(r["cold_start_s"] for r in runs), 3),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        }
        if "torch_imported" in runs[0]:
            out[name]["torch_imported"] = any(r["torch_imported"] for r in runs)
    return out


# --------------------------------------------------------------------------- footprint


def _closure(root: str) -> set[str]:
    """``root`` and every distribution it requires (base requirements, no extras)."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(
                req.split(";")[0]
                .split("[")[0]
                .split("<")[0]
                .split(">")[0]
                .split("=")[0]
                .split("!")[0]
                .split("~")[0]
                .strip()
            )
    return seen


def _size_mb(dists: set[str]) -> float:
    total = 0
    for name in dists:
        for f in metadata.distribution(name).files or []:
            path = Path(f.locate())
            if path.is_file():
                total += path.stat().st_size
    return round(total / 1e6, 1)


def bench_footprint() -> dict:
    """Installed size of the runtime's dependency closure vs the PyTorch reference's."""
    runtime = {"onnxruntime", "numpy", "pillow", "tokenizers", "ftfy"}
    runtime = set().union(*(_closure(d) for d in runtime))
    reference = set().union(*(_closure(d) for d in ("torch", "torchvision", "open-clip-torch")))
    return {
        "runtime_mb": _size_mb(runtime),
        "runtime_packages": sorted(runtime),
        "pytorch_reference_mb": _size_mb(reference),
        "pytorch_reference_packages": len(reference),
    }


# --------------------------------------------------------------------------- database


def bench_database(rows: int, quick: bool) -> dict:
    """Insert throughput and owner-filtered top-20 search on an embedded PostgreSQL."""
    from heimdex_clip.db.connection import open_pool, start_embedded
    from heimdex_clip.db.migrate import migrate
    from heimdex_clip.db.search_index import (
        DEFAULT_KIND,
        BuildOptions,
        switch_search_index,
    )
    from heimdex_clip.db.store import SceneStore

    data = Path(tempfile.mkdtemp(prefix="heimdex-bench-pg-")) / "pgdata"
    pool = open_pool(start_embedded(data), max_size=2)
    migrate(pool)
    store = SceneStore(pool)
    rng = np.random.default_rng(0)
    dim = store.dimension
    centers = rng.standard_normal((max(50, rows // 250), dim)).astype(np.float32)
    vectors = centers[rng.integers(0, len(centers), rows)] + 0.6 * rng.standard_normal(
        (rows, dim)
    ).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    owners = np.where(rng.random(rows) < 0.01, 0, rng.integers(1, 100, rows))
    owner_ids = [uuid.uuid4() for _ in range(100)]
    artifact = "ViT-B-32:synthetic:0000000000000000"  # every stored vector names its artifact

    n_upserts = 300 if quick else 1000
    started = time.perf_counter()
    for i in range(n_upserts):
        store.upsert_scene(
            owner_ids[owners[i]], f"u{i}.jpg", vectors[i], {"i": i}, artifact=artifact
        )
    upsert_rate = n_upserts / (time.perf_counter() - started)

    with pool.connection() as conn:
        started = time.perf_counter()
        bulk_copy_scenes(
            conn,
            (
                (owner_ids[owners[i]], f"s{i}.jpg", vectors[i], artifact)
                for i in range(n_upserts, rows)
            ),
        )
        conn.commit()
        copy_rate = (rows - n_upserts) / (time.perf_counter() - started)  # COPY + ANALYZE
        started = time.perf_counter()
        switch_search_index(pool, DEFAULT_KIND, BuildOptions(maintenance_work_mem="1GB"))
        index_s = time.perf_counter() - started
        id_by_path = dict(conn.execute("SELECT frame_path, id FROM scenes").fetchall())
    ids = np.array(
        [id_by_path[f"u{i}.jpg" if i < n_upserts else f"s{i}.jpg"] for i in range(rows)],
        dtype=object,
    )
    mine = np.flatnonzero(owners == 0)
    recalls, latencies = [], []
    for _ in range(30 if quick else 100):
        query = vectors[rng.choice(mine)] + 0.5 * rng.standard_normal(dim).astype(np.float32)
        query /= np.linalg.norm(query)
        exact = set(ids[mine[np.argsort(-(vectors[mine] @ query))[:20]]])
        started = time.perf_counter()
        hits = store.search_by_embedding(
            owner_ids[0], query, artifact=artifact, threshold=-1.0, count=20
        )
        latencies.append(time.perf_counter() - started)
        recalls.append(len({h.id for h in hits} & exact) / 20)
    pool.close()
    return {
        "rows": rows,
        "owner_rows": len(mine),
        "upsert_rows_per_s": round(upsert_rate, 1),
        "copy_rows_per_s": round(copy_rate),
        "hnsw_build_s": round(index_s, 1),
        "search_p50_ms": ms(np.median(latencies)),
        "search_p95_ms": ms(np.percentile(latencies, 95)),
        "recall_at_20": round(float(np.mean(recalls)), 4),
    }


# --------------------------------------------------------------------------- report


def ratio(ours: float, reference: float) -> str:
    return f"{ours / reference:.2f}x"


def markdown(r: dict) -> str:
    m, enc = r["machine"], r["encoder"]
    flags = ", ".join(f for f, on in m["flags"].items() if on) or "none"
    lines = [
        f"Measured {m['date']} on {m['cpu_model']} ({m['physical_cores']} physical cores; "
        f"flags: {flags}), {m['threads_used']} threads for every engine; onnxruntime "
        f"{m['versions'].get('onnxruntime')}, torch {m['versions'].get('torch')}, "
        f"open_clip {m['versions'].get('open_clip_torch')}. Mode: {r['mode']}. Load average "
        f"when it started: {m['load_average_at_start']}.",
        "",
        "| visual encoder, ms/image (x floor) | PyTorch fp32 (reference) | ONNX fp32 | "
        + ("previous INT8 graph | " if enc.get("onnx_int8_previous") else "")
        + "ONNX INT8 (ours) | "
        + (f"OpenVINO EP ({enc['openvino_graph']}) | " if enc.get("openvino") else "")
        + "INT8 GEMM floor | INT8 / PyTorch |",
        "|---|---|---|---|---|---|"
        + ("---|" if enc.get("onnx_int8_previous") else "")
        + ("---|" if enc.get("openvino") else ""),
    ]
    for b in enc["pytorch_fp32"]:
        floor = enc.get("int8_gemm_floor", {}).get(b)
        cells = [
            enc[k].get(b)
            for k in ("pytorch_fp32", "onnx_fp32", "onnx_int8_previous", "onnx_int8", "openvino")
            if enc.get(k)
        ]
        shown = " | ".join(f"{v} ({multiple(v, floor)})" for v in cells)
        lines.append(
            f"| batch {b} | {shown} | {floor} | "
            f"{ratio(enc['onnx_int8'][b], enc['pytorch_fp32'][b])} |"
        )
    if "int8_gemm_floor_shapes" in enc:
        f = enc["int8_gemm_floor_shapes"]
        lines += [
            "",
            f"INT8 GEMM floor: the INT8 graph's own {f['gemms_per_image']} GEMMs "
            f"({f['multiply_adds_per_image'] / 1e9:.2f} G multiply-adds per image: "
            f"{'; '.join(f['shapes'])}) as ONNX Runtime MatMulInteger alone, same "
            "threads, taking turns with the engines.",
        ]
    p = r["preprocess"]
    e = r["end_to_end"]
    encoder_of = {"cpu": "onnx_int8", "openvino": "openvino"}
    floor1 = enc.get("int8_gemm_floor", {}).get("1")
    lines += [
        "",
        "| 1080p JPEG | open_clip (reference) | ours, exact | ours, fast decode |",
        "|---|---|---|---|",
        f"| decode + preprocess, ms | {p['open_clip']} | {p['ours_exact']} "
        f"({ratio(p['ours_exact'], p['open_clip'])}) | {p['ours_fast_decode']} "
        f"({ratio(p['ours_fast_decode'], p['open_clip'])}) |",
        f"| JPEG -> vector, ms/frame | {e['open_clip_pytorch']} | {e['ours_exact']} "
        f"({ratio(e['ours_exact'], e['open_clip_pytorch'])}) | {e['ours_fast_decode']} "
        f"({ratio(e['ours_fast_decode'], e['open_clip_pytorch'])}) |",
        f"| JPEG -> vector, x the batch-1 floor | {multiple(e['open_clip_pytorch'], floor1)} | "
        f"{multiple(e['ours_exact'], floor1)} | {multiple(e['ours_fast_decode'], floor1)} |",
        "",
        f"Exact preprocessing vs open_clip: max abs diff {p['exact_max_abs_diff_vs_open_clip']}."
        f" Fast decode vs exact (INT8 embeddings of 1080p frames): mean cosine "
        f"{e['cosine_fast_vs_exact']['mean']:.4f}, min {e['cosine_fast_vs_exact']['min']:.4f}. "
        f"INT8 (exact path) vs PyTorch: mean cosine "
        f"{e['cosine_exact_int8_vs_pytorch']['mean']:.4f}. JPEG -> vector (fast decode, on "
        f"{e.get('provider', 'cpu')}) minus that provider's encoder at batch 1: "
        f"{e['ours_fast_decode'] - enc[encoder_of[e.get('provider', 'cpu')]]['1']:.2f} ms "
        "(issue 25's target: <= 4 ms).",
    ]
    if "processes" in r:  # not in a --speed-only run
        pr = r["processes"]
        ours, ref = pr["ours_runtime"], pr["open_clip_pytorch"]
        fp = r["footprint"]
        lines += [
            "",
            "| process | ours (runtime only) | PyTorch reference | ratio |",
            "|---|---|---|---|",
            f"| cold start: import + load + first embedding, s | {ours['cold_start_s']} | "
            f"{ref['cold_start_s']} | {ratio(ours['cold_start_s'], ref['cold_start_s'])} |",
            f"| peak RSS after 100 frames, MB | {ours['peak_rss_mb']} | {ref['peak_rss_mb']} | "
            f"{ratio(ours['peak_rss_mb'], ref['peak_rss_mb'])} |",
            f"| installed packages, MB | {fp['runtime_mb']} | {fp['pytorch_reference_mb']} | "
            f"{ratio(fp['runtime_mb'], fp['pytorch_reference_mb'])} |",
        ]
        if cpu := pr.get("ours_runtime_cpu"):
            lines += [
                "",
                "Ours is `CLIP_PROVIDER=auto`, which may run OpenVINO here; with "
                f"`CLIP_PROVIDER=cpu`: cold start {cpu['cold_start_s']} s, peak RSS "
                f"{cpu['peak_rss_mb']} MB.",
            ]
    lines += text_markdown(r.get("text", {}))
    if "database" in r:
        d = r["database"]
        lines += [
            "",
            f"Database (embedded PostgreSQL + pgvector, {d['rows']} scenes, queried owner "
            f"holds {d['owner_rows']}): upsert {d['upsert_rows_per_s']} rows/s, COPY "
            f"{d['copy_rows_per_s']} rows/s, HNSW build {d['hnsw_build_s']} s; owner-filtered "
            f"top-20 search p50 {d['search_p50_ms']} ms, p95 {d['search_p95_ms']} ms, "
            f"recall@20 {d['recall_at_20']}.",
        ]
    return "\n".join(lines) + "\n"


def chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("pytorch_fp32", "open_clip PyTorch fp32"),
        ("onnx_fp32", "ONNX Runtime fp32"),
        ("onnx_int8", "ONNX Runtime INT8"),
        ("openvino", "OpenVINO EP"),
        ("int8_gemm_floor", "INT8 GEMM floor"),
    ):
        series = r["encoder"].get(key)
        if series:
            ax.plot([int(b) for b in series], list(series.values()), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per image")
    ax.set_ylim(bottom=0)
    ax.set_title(f"ViT-B-32 image tower, {r['machine']['threads_used']} threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 10 minutes)")
    parser.add_argument("--artifact", type=Path, default=REPO / "models" / "ViT-B-32__none")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--db-rows", type=int, default=None)
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only the timings against the floor: encoder, JPEG, text",
    )
    parser.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="another artifact whose INT8 graph runs beside ours (before/after)",
    )
    args = parser.parse_args(argv)
    from heimdex_clip_export.evaluation import sample_photos

    photos = dict(sample_photos())
    jpegs = [
        hd_jpeg(photos[n])
        for n in (
            "astronaut",
            "coffee",
            "chelsea",
            "rocket",
            "motorcycle_left",
            "hubble_deep_field",
        )
    ]
    results: dict = {
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(args.threads),
        "artifact": str(args.artifact),
    }
    print("visual encoder ...", flush=True)
    results["encoder"] = bench_encoder(
        args.artifact, args.threads, [1, 8, 32], args.quick, args.previous
    )
    print("preprocessing ...", flush=True)
    results["preprocess"] = bench_preprocess(args.artifact, jpegs[0], args.quick)
    print("end to end ...", flush=True)
    results["end_to_end"] = bench_end_to_end(args.artifact, jpegs, args.threads, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.speed_only:
            print("processes (cold start, peak RSS) ...", flush=True)
            frame = Path(tmp) / "frame.jpg"
            frame.write_bytes(jpegs[0])
            results["processes"] = bench_processes(args.artifact, frame, args.threads, Path(tmp))
        print("text tower ...", flush=True)
        results["text"] = bench_text(args.artifact, args.threads, args.quick, Path(tmp))
    if not args.speed_only:
        results["footprint"] = bench_footprint()
        print("database ...", flush=True)
        rows = args.db_rows or (20_000 if args.quick else 100_000)
        results["database"] = bench_database(rows, args.quick)

    write_results(args.out, "latest", results, markdown(results))
    chart(results, args.out / "latency_vs_batch.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
