"""Video indexing speed and memory: the whole pipeline against PyAV's bare decode, where the
time goes, peak RSS on a long file, and our cut detector against PySceneDetect's.

    python benchmarks/video_bench.py --artifact models/ViT-B-32__none [--seconds 60]
        [--long-minutes 10] [--size 1920x1080] [--threads 2] [--work DIR]

The test video is made from scikit-image's photographs (heimdex_clip_export.video_samples,
H.264 at 30 fps, hard cuts, dissolves and fades at known times); the long file is the same
video remuxed end to end (no re-encode). Results: benchmarks/results/video.{json,md}.
PySceneDetect (scenedetect + opencv-python-headless) is only needed for its rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).parent))
from run import machine_info, write_results

OWNER = uuid.UUID("00000000-0000-4000-a000-00000000be7c")


def make_videos(
    work: Path, seconds: float, size: tuple[int, int], long_minutes: float
) -> tuple[Path, Path, dict]:
    from heimdex_clip_export.video_samples import default_shots, write_video

    work.mkdir(parents=True, exist_ok=True)
    short = work / f"photos_{size[0]}x{size[1]}_{int(seconds)}s.mp4"
    truth_file = short.with_suffix(".json")
    if not truth_file.is_file():
        started = time.perf_counter()
        truth = write_video(short, default_shots(seconds), size=size, fps=30, black_intro_s=1.0)
        truth_file.write_text(
            json.dumps(
                {
                    "cuts": truth.cuts,
                    "dissolves": truth.dissolves,
                    "fades": truth.fades,
                    "shots": truth.shots,
                    "encode_s": time.perf_counter() - started,
                }
            )
        )
    long = work / f"photos_{size[0]}x{size[1]}_{long_minutes:g}min.mp4"
    if long_minutes and not long.is_file():
        repeat_file(short, long, max(1, round(long_minutes * 60 / seconds)))
    return short, long, json.loads(truth_file.read_text())


def repeat_file(src: Path, dst: Path, times: int) -> None:
    """``src`` played ``times`` times in one file, by remuxing its packets (no re-encode)."""
    with av.open(str(src)) as probe:
        stream = probe.streams.video[0]
        span = stream.duration or 0
        if span <= 0:
            raise SystemExit(f"{src}: no stream duration")
        time_base = stream.time_base
    with av.open(str(dst), "w") as out:
        for i in range(times):
            with av.open(str(src)) as inp:
                in_stream = inp.streams.video[0]
                if i == 0:
                    out_stream = out.add_stream_from_template(in_stream)
                for packet in inp.demux(in_stream):
                    if packet.dts is None:
                        continue
                    packet.pts += i * span
                    packet.dts += i * span
                    packet.time_base = time_base
                    packet.stream = out_stream
                    out.mux(packet)


def bare_decode(path: Path, threads: int) -> dict:
    """PyAV decoding every frame, nothing else: the floor for any pipeline."""
    cpu_started, started = cpu_seconds(), time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        frames = sum(1 for _ in container.decode(stream))
    wall = time.perf_counter() - started
    return {
        "frames": frames,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu_seconds() - cpu_started, 3),
        "fps": round(frames / wall, 1),
    }


def cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Pipeline:
    """index_video into one embedded PostgreSQL with one embedder, run after run: each run
    under a fresh video id (nothing is "unchanged"), its wall time and where it went."""

    def __init__(self, artifact: Path, threads: int, media: Path) -> None:
        from heimdex_clip import ClipConfig, ClipEmbedder
        from heimdex_clip.db.connection import open_pool, start_embedded
        from heimdex_clip.db.migrate import migrate
        from heimdex_clip.video.pipeline import model_threads

        # No embedding cache: the long file repeats the short one, and cached repeats would
        # skip the model. The model's threads as index-video gives them (the cores the
        # decoder's threads leave, at least one).
        self.embedder = ClipEmbedder(
            config=ClipConfig(
                pretrained="none",
                model_dir=artifact,
                cpu_threads=model_threads(threads),
                embed_cache_size=0,
            )
        ).load()
        url = start_embedded(Path(tempfile.mkdtemp(prefix="video-bench-pg-")) / "pgdata")
        self.pool = open_pool(url)
        migrate(self.pool)
        self.threads, self.media = threads, media

    def run(self, path: Path, analysis_fps: float | None = None) -> dict:
        from heimdex_clip.db.videos import index_video
        from heimdex_clip.video import VideoSettings, content_hash

        settings = VideoSettings(threads=self.threads)
        if analysis_fps is not None:
            settings = dataclasses.replace(settings, max_analysis_fps=analysis_fps)
        hash_started = time.perf_counter()
        content_hash(path)
        hash_s = time.perf_counter() - hash_started
        cpu_started, started = cpu_seconds(), time.perf_counter()
        done = index_video(
            self.pool,
            self.embedder,
            path,
            OWNER,
            media_dir=self.media,
            settings=settings,
            video_id=uuid.uuid4(),
        )
        wall = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_started  # this process's threads; the database's are not in it
        report = done.report
        breakdown = {"hash": round(hash_s, 3), **report["timings_s"]}
        breakdown["storage"] = round(wall - breakdown.pop("total") - hash_s, 3)
        with self.pool.connection() as conn:
            starts = conn.execute(
                "SELECT start_s, visual_clip_metadata->'video'->>'starts_at' FROM scenes "
                "WHERE owner_id = %s AND video_id = %s ORDER BY scene_index",
                (OWNER, done.video_id),
            ).fetchall()
        return {
            "analysis_fps": settings.max_analysis_fps,
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "scenes": done.scenes,
            "cuts_s": [round(t, 4) for t, kind in starts if kind == "cut"],
            "model_threads": self.embedder.config.cpu_threads,
            "model_provider": self.embedder.session_info.provider,
            "breakdown_s": breakdown,
            "report": report,
        }

    def close(self) -> None:
        self.pool.close()


def pipeline(path: Path, artifact: Path, threads: int, media: Path) -> dict:
    """One run of the default settings (a fresh database and embedder)."""
    runner = Pipeline(artifact, threads, media)
    try:
        return runner.run(path)
    finally:
        runner.close()


def peak_rss(path: Path, artifact: Path, threads: int, media: Path) -> dict:
    """The pipeline in a child process; its peak RSS (the child's own ru_maxrss)."""
    code = (
        "import sys, json, resource; sys.path.insert(0, sys.argv[5]); "
        "from video_bench import pipeline; from pathlib import Path; "
        "r = pipeline(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), "
        "Path(sys.argv[4])); print(json.dumps({'wall_s': r['wall_s'], "
        "'scenes': r['scenes'], 'breakdown_s': r['breakdown_s'], 'own_peak_rss_mb': "
        "round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(path),
            str(artifact),
            str(threads),
            str(media),
            str(Path(__file__).parent),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # RUSAGE_CHILDREN's peak is the largest child so far; the child reports its own.
    return {
        **result,
        "peak_rss_mb": result.pop("own_peak_rss_mb"),
        "largest_child_so_far_mb": round(max(before, after) / 1024, 1),
    }


def f1(detected: list[float], cuts: list[float], dissolves: list, tol: float) -> dict:
    found = [t for t in detected if not any(a - tol <= t <= b + tol for a, b in dissolves)]
    left, hits = list(found), 0
    for cut in cuts:
        near = [t for t in left if abs(t - cut) <= tol]
        if near:
            left.remove(min(near, key=lambda t: abs(t - cut)))
            hits += 1
    p = hits / len(found) if found else 0.0
    r = hits / len(cuts) if cuts else 0.0
    return {
        "f1": round(2 * p * r / (p + r), 4) if hits else 0.0,
        "precision": round(p, 4),
        "recall": round(r, 4),
        "dissolves_found": sum(
            any(a - tol <= t <= b + tol for t in detected) for a, b in dissolves
        ),
    }


def ours_cuts(path: Path, threads: int, analysis_fps: float) -> tuple[list[float], float]:
    """Our detector alone (decode + detection, no pictures, no model), decoded the way the
    pipeline decodes (pieces side by side on ``threads`` decoders)."""
    from heimdex_clip.video.cuts import CutDetector, CutSettings, Features, frame_features
    from heimdex_clip.video.decode import (
        DecodeStats,
        Scalers,
        analysed_frames,
        open_video,
        small_planes,
    )

    settings = CutSettings()

    def features_only(_stats: DecodeStats):
        scalers = Scalers()

        def analyse(frame, time_s: float) -> Features:
            feat = frame_features(small_planes(frame, scalers.small), settings)
            feat.time_s = time_s
            return feat

        return analyse

    started = time.perf_counter()
    container, info = open_video(path, max_pixels=64_000_000)
    fps = min(info.fps or analysis_fps, analysis_fps)
    detector, cuts = CutDetector(settings, fps), []
    with container:
        frames = analysed_frames(
            container,
            info,
            DecodeStats(),
            threads=threads,
            max_pixels=64_000_000,
            max_analysis_fps=analysis_fps,
            analyser=features_only,
        )
        for index, feat in enumerate(frames):
            cuts += [d.time_s for d in detector.push(index, feat.time_s, feat) if d.cut]
    cuts += [d.time_s for d in detector.finish() if d.cut]
    return cuts, time.perf_counter() - started


def pyscenedetect_cuts(path: Path, detector: str, backend: str) -> tuple[list[float], float]:
    import scenedetect

    make = {"adaptive": scenedetect.AdaptiveDetector, "content": scenedetect.ContentDetector}
    started = time.perf_counter()
    scenes = scenedetect.detect(str(path), make[detector](), backend=backend)
    return [s[0].seconds for s in scenes[1:]], time.perf_counter() - started


def site_size(*names: str) -> float:
    """MB on disk of these top-level entries of site-packages."""
    import site

    total = 0
    for root in site.getsitepackages():
        for name in names:
            for p in Path(root).glob(name):
                total += (
                    sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                    if p.is_dir()
                    else p.stat().st_size
                )
    return round(total / 1e6, 1)


def detectors(path: Path, truth: dict, threads: int, rates: list[float]) -> list[dict]:
    tol = 2 / 30
    rows = []
    for rate in rates:
        cuts, secs = ours_cuts(path, threads, rate)
        rows.append(
            {
                "detector": f"heimdex-content-v2 (PyAV + numpy), {rate:g} frames/s analysed",
                "seconds": round(secs, 2),
                **f1(cuts, truth["cuts"], truth["dissolves"], tol),
                "install_mb": 0.0,
                "needs": "numpy (already a runtime dependency)",
            }
        )
    try:
        import cv2
        import scenedetect
    except ImportError as exc:
        rows.append({"detector": "PySceneDetect", "error": f"not installed: {exc}"})
        return rows
    cv_mb = site_size("cv2", "opencv_python_headless*")
    sd_mb = site_size("scenedetect", "scenedetect-*")
    for name in ("adaptive", "content"):
        for backend in ("pyav", "opencv"):
            cuts, secs = pyscenedetect_cuts(path, name, backend)
            rows.append(
                {
                    "detector": f"PySceneDetect {scenedetect.__version__} "
                    f"{name.title()}Detector, {backend} backend (OpenCV {cv2.__version__})",
                    "seconds": round(secs, 2),
                    **f1(cuts, truth["cuts"], truth["dissolves"], tol),
                    "install_mb": round(cv_mb + sd_mb, 1),
                    "needs": "opencv-python-headless + scenedetect (+ click)",
                }
            )
    return rows


def main() -> int:
    from heimdex_clip.video import VideoSettings

    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "video-bench")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--analysis-fps",
        type=float,
        nargs="+",
        default=[VideoSettings().max_analysis_fps, 30.0],
        help="the pipeline's analysis rates to measure (default: index-video's, and 30)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    parser.add_argument(
        "--rss-only",
        action="store_true",
        help="only the peak-RSS runs (short file, then the long one)",
    )
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    short, long, truth = make_videos(args.work, args.seconds, size, args.long_minutes)
    media = args.work / "media"
    if args.rss_only:
        rss = {
            "machine": machine_info(args.threads),
            "short": {"file": short.name, **peak_rss(short, args.artifact, args.threads, media)},
            "long": {
                "file": long.name,
                "minutes": args.long_minutes,
                **peak_rss(long, args.artifact, args.threads, media),
            },
        }
        write_results(args.out, "video_rss", rss, rss_table(rss))
        return 0
    result = {
        "machine": machine_info(args.threads),
        "video": {
            "file": short.name,
            "size": args.size,
            "fps": 30,
            "seconds": args.seconds,
            "cuts": len(truth["cuts"]),
            "dissolves": len(truth["dissolves"]),
            "fades": len(truth["fades"]),
            "bytes": short.stat().st_size,
        },
    }
    # Interleaved: bare decode, then the pipeline at each analysis rate, repeats times, and
    # a last bare decode; medians (the machine is shared, its load drifts).
    runner = Pipeline(args.artifact, args.threads, media)
    bare_runs, runs = [], {rate: [] for rate in args.analysis_fps}
    try:
        for _ in range(args.repeats):
            bare_runs.append(bare_decode(short, args.threads))
            for rate in args.analysis_fps:
                runs[rate].append(runner.run(short, rate))
        bare_runs.append(bare_decode(short, args.threads))
    finally:
        runner.close()
    bare_wall = round(statistics.median(b["wall_s"] for b in bare_runs), 3)
    result["bare_decode"] = bare_runs
    result["bare_decode_median_s"] = bare_wall
    result["pipelines"] = []
    for rate, rate_runs in runs.items():
        walls = [r["wall_s"] for r in rate_runs]
        median = sorted(rate_runs, key=lambda r: r["wall_s"])[len(rate_runs) // 2]
        result["pipelines"].append(
            {
                "analysis_fps": rate,
                "walls_s": walls,
                "median": median,
                "ratio_to_bare_decode": round(statistics.median(walls) / bare_wall, 3),
                "realtime_factor": round(args.seconds / statistics.median(walls), 2),
                # With every core busy the pipeline cannot take less wall time than its CPU
                # seconds spread over the cores: the ratio that alone allows.
                "cpu_bound_ratio": round(
                    statistics.median(r["cpu_s"] for r in rate_runs)
                    / (os.cpu_count() or 1)
                    / bare_wall,
                    3,
                ),
                "hard_cuts": f1(median["cuts_s"], truth["cuts"], truth["dissolves"], 2 / 30),
            }
        )
    result["detectors"] = detectors(short, truth, args.threads, args.analysis_fps)
    result["install_mb"] = {
        "av (PyAV + FFmpeg libs)": site_size("av", "av.libs"),
        "opencv-python-headless": site_size("cv2", "opencv_python_headless*"),
    }
    write_results(args.out, "video", result, table(result))
    return 0


def table(r: dict) -> str:
    m, v, pipes = r["machine"], r["video"], r["pipelines"]
    first = pipes[0]["median"]
    bare = ", ".join(f"{b['wall_s']}" for b in r["bare_decode"])
    lines = [
        f"# Video indexing ({v['size']} H.264 {v['fps']} fps, {v['seconds']:g} s of "
        f"photographs; {v['cuts']} hard cuts, {v['dissolves']} dissolves, {v['fades']} "
        "black stretches)",
        "",
        f"{m.get('cpu_model', '?')}, {m['threads_used']} decoder threads (the file in "
        f"{first['report'].get('pieces', 1)} pieces), model threads "
        f"{first.get('model_threads')} ({first.get('model_provider')}), load average at "
        f"start {m['load_average_at_start']} (shared machine), {m['date']}. Runs "
        "interleaved (bare decode, then the pipeline at each analysis rate), medians.",
        "",
        f"Bare PyAV decode: {bare} s (median {r['bare_decode_median_s']} s, "
        f"{r['bare_decode'][0].get('cpu_s')} CPU s).",
        "",
        "| analysis frames/s | pipeline wall s (runs) | scenes | pipeline / bare decode "
        "| realtime factor | CPU s | CPU-bound ratio | hard-cut F1 (2 frames) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in pipes:
        med = p["median"]
        lines.append(
            f"| {p['analysis_fps']:g} | {', '.join(str(w) for w in p['walls_s'])} | "
            f"{med['scenes']} | **{p['ratio_to_bare_decode']}x** | {p['realtime_factor']} | "
            f"{med['cpu_s']} | {p['cpu_bound_ratio']}x | {p['hard_cuts']['f1']} |"
        )
    stages = list(first["breakdown_s"])
    lines += [
        "",
        "Where the time went in each rate's median run (seconds; decode, scaling, "
        "detection and quality are summed over the decoder threads, and the model thread "
        "runs beside them, so the stages add up to more than the wall time):",
        "",
        "| analysis frames/s | " + " | ".join(stages) + " |",
        "|---" * (len(stages) + 1) + "|",
    ]
    for p in pipes:
        b = p["median"]["breakdown_s"]
        lines.append(f"| {p['analysis_fps']:g} | " + " | ".join(str(b[k]) for k in stages) + " |")
    lines += [
        "",
        "| detector | seconds | hard-cut F1 | precision | recall | dissolves found | install MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in r["detectors"]:
        if "error" in d:
            lines.append(f"| {d['detector']} | {d['error']} | | | | | |")
            continue
        lines.append(
            f"| {d['detector']} | {d['seconds']} | {d['f1']} | {d['precision']} | "
            f"{d['recall']} | {d['dissolves_found']}/{v['dissolves']} | "
            f"{d['install_mb']} |"
        )
    return "\n".join(lines) + "\n"


def rss_table(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Peak RSS of index-video (one process per file, shortest first)",
        "",
        f"{m.get('cpu_model', '?')}, {m['threads_used']} threads, load average at start "
        f"{m['load_average_at_start']} (shared machine), {m['date']}",
        "",
        "| file | wall s | scenes | peak RSS MB |",
        "|---|---|---|---|",
    ]
    for key in ("short", "long"):
        x = r[key]
        lines.append(f"| {x['file']} | {x['wall_s']} | {x['scenes']} | {x['peak_rss_mb']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
