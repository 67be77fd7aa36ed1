"""Video in, scenes out (no database): decode, cut, pick frames, save the best, embed.

:func:`analyze_video` streams the file once, decoded in pieces side by side where the
container allows (:func:`.decode.analysed_frames`). On each decoder thread, every analysed
frame is reduced to the cut detector's features, and a small upright picture with its
quality scores is made only if the frame may become a candidate (on the candidate clock,
or a possible scene start); the decoded frame goes back to the decoder right away. Here,
in order, the cut detector decides and the segmenter keeps those pictures until the
detector's look-ahead has passed them. Each closed scene keeps at most ``top_k`` small
pictures until its vector is made. Scenes are embedded through
:meth:`ClipEmbedder.embed_scenes` on a model thread, one batch in flight while decoding
goes on: a closed scene is handed over as soon as the model is idle, and while it is busy
scenes queue up to ``embed_batch`` (then the decoder waits), so the model never idles
while scenes wait and little is left for it after the last frame. Memory does not grow
with the video's length: only the vectors and a few numbers per scene are kept to the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..cpu import physical_cores
from ..embedder import ClipEmbedder
from .analyse import PictureRules
from .clock import FrameClock, analysis_slack
from .cuts import CutDetector, CutSettings, Decision
from .decode import DecodeStats, VideoError, VideoInfo, analysed_frames, open_video
from .segments import Picture, Segment, Segmenter, SegmentSettings

#: The model thread's nice value: Linux's lowest priority (see _yield_to_decoder).
_MODEL_NICE = 19
#: How shots become windows and candidates; bumped when the same settings would give other
#: scenes (v2: windows end on the candidate clock), so re-indexing replaces old scenes.
SEGMENTER = "heimdex-windows-v2"
#: Video ids are uuid5 of the content's SHA-256 in this namespace.
VIDEO_NAMESPACE = uuid.UUID("6d1b7a52-2f0e-5c8e-9d3e-7f5e1c0a9b27")


@dataclass(frozen=True)
class VideoSettings:
    """Everything that decides a video's scenes (``key`` names them) plus the thread count."""

    cuts: CutSettings = field(default_factory=CutSettings)
    segments: SegmentSettings = field(default_factory=SegmentSettings)
    top_k: int = 3
    frame_long_side: int = 640
    max_analysis_fps: float = 15.0
    jpeg_quality: int = 90
    embed_batch: int = 8
    threads: int = 2

    def as_dict(self) -> dict[str, Any]:
        """What is stored with the video and each scene (threads change no result)."""
        return {
            "cuts": self.cuts.as_dict(),
            "segments": {"segmenter": SEGMENTER, **asdict(self.segments)},
            "top_k": self.top_k,
            "frame_long_side": self.frame_long_side,
            "max_analysis_fps": self.max_analysis_fps,
            "jpeg_quality": self.jpeg_quality,
        }

    @property
    def key(self) -> str:
        """A short hash of :meth:`as_dict`: the same key, the same scenes."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SceneResult:
    """One scene row: where it is in the video, its best frame, its pooled vector."""

    scene_index: int
    shot: int
    window: int
    start_s: float
    end_s: float
    frame_path: str
    embedding: np.ndarray | None
    metadata: dict[str, Any]


@dataclass
class VideoAnalysis:
    info: VideoInfo
    video_id: uuid.UUID
    sha256: str
    frames_dir: Path
    scenes: list[SceneResult]
    decode: DecodeStats
    timings: dict[str, float]
    unusable_scenes: int = 0

    def report(self) -> dict[str, Any]:
        """What is stored with the video (and printed): counts, skips, seconds spent."""
        d = self.decode
        return {
            "codec": self.info.codec,
            "container": self.info.container,
            "width": self.info.width,
            "height": self.info.height,
            "fps": self.info.fps,
            "frames_decoded": d.frames_decoded,
            "frames_analysed": d.frames_analysed,
            "pieces": d.pieces,
            "corrupt_packets": d.corrupt_packets,
            "oversized_frames": d.oversized_frames,
            "skipped_ranges_s": d.skipped_ranges,
            "scenes": len(self.scenes),
            "scenes_without_usable_frame": self.unusable_scenes,
            "failed_embeddings": sum(s.embedding is None for s in self.scenes),
            "timings_s": {k: round(v, 4) for k, v in self.stage_seconds().items()},
        }

    def stage_seconds(self) -> dict[str, float]:
        """Where the time went: decode, scaling, detection, quality, embedding, saving.
        Decoding, scaling, the detector's features and quality are summed over the
        decoder threads, and the model runs beside them: the stages add up to more than
        the total."""
        t, d = self.timings, self.decode
        return {
            "decode": d.decode_s,
            "scaling": d.scale_s + d.picture_s,
            "detection": d.features_s + t["detect"],
            "quality": d.quality_s + t["segment"],
            "embedding": t["embed"],
            "saving": t["save"],
            "total": t["total"],
        }


def model_threads(decoder_threads: int, cores: int | None = None) -> int:
    """ONNX Runtime intra-op threads for the embedder of a video run: the physical cores
    the video's ``decoder_threads`` decoder threads leave, at least one.

    The model thread runs beside the decoder; given every core it fights the decoder for
    them (its spinning workers included) and both slow down. On 2 cores with 2 decoder
    threads the model gets 1 (see docs/video.md for the measurement).
    """
    return max(1, (cores or physical_cores()) - decoder_threads)


def content_hash(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of the file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def video_id_for(sha256: str) -> uuid.UUID:
    return uuid.uuid5(VIDEO_NAMESPACE, f"sha256:{sha256}")


def frames_dir_for(
    media_dir: Path, owner: uuid.UUID, video_id: uuid.UUID, settings: VideoSettings
) -> Path:
    """Where a video's best frames go: one directory per owner, video and settings."""
    return Path(media_dir).resolve() / str(owner) / str(video_id) / settings.key


def analyze_video(
    path: str | Path,
    embedder: ClipEmbedder,
    *,
    owner: uuid.UUID,
    media_dir: Path,
    settings: VideoSettings | None = None,
    video_id: uuid.UUID | None = None,
    sha256: str | None = None,
) -> VideoAnalysis:
    """Cut ``path`` into scenes, save each scene's best frame under ``media_dir`` and embed
    it. Raises VideoError for a file that cannot be indexed (its frames directory is then
    removed); a corrupt middle is skipped and reported in ``decode``."""
    settings = settings or VideoSettings()
    path = Path(path)
    started = time.perf_counter()
    container, info = open_video(path, max_pixels=embedder.config.max_image_pixels)
    sha = sha256 or content_hash(path)
    vid = video_id or video_id_for(sha)
    out_dir = frames_dir_for(media_dir, owner, vid, settings)
    run = _Run(embedder, settings, info, out_dir)
    try:
        with container:
            run.stream(container)
        if not run.stats.frames_analysed:
            raise VideoError(
                f"{path}: no decodable video frames"
                + (
                    f" ({run.stats.corrupt_packets} corrupt packets)"
                    if run.stats.corrupt_packets
                    else ""
                )
            )
        if not run.scenes:
            raise VideoError(f"{path}: no usable frame (every frame is black or blank)")
    except BaseException:
        _remove_tree(out_dir)
        raise
    run.timings["total"] = time.perf_counter() - started
    return VideoAnalysis(
        info=info,
        video_id=vid,
        sha256=sha,
        frames_dir=out_dir,
        scenes=run.scenes,
        decode=run.stats,
        timings=run.timings,
        unusable_scenes=run.unusable,
    )


class _Run:
    """One pass over one video (state of :func:`analyze_video`)."""

    def __init__(
        self, embedder: ClipEmbedder, settings: VideoSettings, info: VideoInfo, out_dir: Path
    ) -> None:
        self.embedder, self.settings, self.info, self.out_dir = embedder, settings, info, out_dir
        self.stats = DecodeStats()
        self.timings = {"detect": 0.0, "segment": 0.0, "embed": 0.0, "save": 0.0}
        self.scenes: list[SceneResult] = []
        self.unusable = 0
        self._queue: list[tuple[Segment, list]] = []
        self._saved = 0
        self._in_flight: Future | None = None
        self._model_thread: ThreadPoolExecutor

    def stream(self, container) -> None:
        with ThreadPoolExecutor(
            1, thread_name_prefix="heimdex-video-embed", initializer=_yield_to_decoder
        ) as pool:
            self._model_thread = pool
            try:
                self._stream(container)
                self._flush()
            finally:
                self._collect()

    def _stream(self, container) -> None:
        s = self.settings
        fps = min(self.info.fps or s.max_analysis_fps, s.max_analysis_fps)
        detector = CutDetector(s.cuts, fps)
        segmenter = Segmenter(s.segments)
        slack = analysis_slack(s.max_analysis_fps)
        clock = FrameClock(s.segments.candidate_fps, slack)
        rules = PictureRules(s.cuts, s.segments.candidate_fps, slack, s.frame_long_side)
        # The pictures of the frames inside the detector's look-ahead, and whether each
        # ticked the candidate clock, until the detector decides about them.
        waiting: dict[int, tuple[Picture | None, bool]] = {}
        frames = analysed_frames(
            container,
            self.info,
            self.stats,
            threads=s.threads,
            max_pixels=self.embedder.config.max_image_pixels,
            max_analysis_fps=s.max_analysis_fps,
            analyser=rules.analyser(),
        )
        for index, frame in enumerate(frames):
            started = time.perf_counter()
            decisions = detector.push(index, frame.time_s, frame.features)
            self.timings["detect"] += time.perf_counter() - started
            waiting[index] = (frame.picture, clock.tick(frame.time_s))
            for decision in decisions:
                self._segment(segmenter, decision, waiting.pop(decision.index))
        started = time.perf_counter()
        decisions = detector.finish()
        self.timings["detect"] += time.perf_counter() - started
        for decision in decisions:
            self._segment(segmenter, decision, waiting.pop(decision.index))
        for seg in segmenter.finish():
            self._closed(seg)

    def _segment(
        self, segmenter: Segmenter, decision: Decision, waited: tuple[Picture | None, bool]
    ) -> None:
        started = time.perf_counter()
        picture, on_clock = waited
        closed = segmenter.add(decision, on_clock, picture)
        self.timings["segment"] += time.perf_counter() - started
        for seg in closed:
            self._closed(seg)

    def _closed(self, seg: Segment) -> None:
        """Keep the scene's chosen pictures (at most top_k) until they are embedded: at
        once if the model is idle, else with the next batch (at most embed_batch scenes)."""
        seg_settings = self.settings.segments
        ranked = seg.ranked(seg_settings.edge_guard_s, seg_settings.fade_ratio)
        seg.candidates = []
        if not ranked:
            self.unusable += 1
            return
        self._queue.append((seg, ranked[: self.settings.top_k]))
        model_idle = self._in_flight is None or self._in_flight.done()
        if model_idle or len(self._queue) >= self.settings.embed_batch:
            self._flush()

    def _flush(self) -> None:
        """Save the queued scenes' best frames, and hand their embedding to the model thread
        (one batch in flight: the decoder goes on while the model runs)."""
        if not self._queue:
            return
        started = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        batch, self._queue = self._queue, []
        paths = []
        for _, chosen in batch:
            path = self.out_dir / f"scene_{self._saved:05d}.jpg"
            Image.fromarray(chosen[0].rgb).save(path, quality=self.settings.jpeg_quality)
            paths.append(str(path))
            self._saved += 1
        self.timings["save"] += time.perf_counter() - started
        self._collect()
        self._in_flight = self._model_thread.submit(self._embed, batch, paths)

    def _embed(self, batch: list[tuple[Segment, list]], paths: list[str]) -> list:
        started = time.perf_counter()
        results = self.embedder.embed_scenes(
            [[(c.rgb, c.score) for c in chosen] for _, chosen in batch],
            top_k=self.settings.top_k,
            frame_paths=paths,
        )
        self.timings["embed"] += time.perf_counter() - started
        return list(zip(batch, paths, results, strict=True))

    def _collect(self) -> None:
        """Wait for the batch in flight and keep its scenes (never raises: embed_scenes
        turns every failure into a result)."""
        if self._in_flight is None:
            return
        done, self._in_flight = self._in_flight.result(), None
        for (seg, chosen), path, result in done:
            metadata = dict(result.metadata)
            metadata["video"] = {
                "scene_index": len(self.scenes),
                "shot": seg.shot,
                "window": seg.window,
                "start_s": round(seg.start_s, 4),
                "end_s": round(seg.end_s, 4),
                "starts_at": seg.starts_at,
                "ends_at": seg.ends_at,
                "frames": seg.frames,
                "frames_chosen": len(chosen),
                "chosen": [{"time_s": round(c.time_s, 4), **c.quality.as_dict()} for c in chosen],
                "settings": self.settings.as_dict(),
                "settings_key": self.settings.key,
            }
            self.scenes.append(
                SceneResult(
                    scene_index=len(self.scenes),
                    shot=seg.shot,
                    window=seg.window,
                    start_s=seg.start_s,
                    end_s=seg.end_s,
                    frame_path=path,
                    embedding=result.embedding,
                    metadata=metadata,
                )
            )


def _yield_to_decoder() -> None:
    """Give the model thread Linux's lowest priority (nice 19; Linux sets it per thread, and
    the threads it starts inherit it) so that the decoder's threads get the cores when
    both want them and the model fills the time they leave. It is still scheduled (unlike
    SCHED_IDLE, which a busy machine could starve): the decoder waits for it when 8 scenes
    queue up. A 60 s 1080p file on a 2-core Xeon, four alternating runs each: nice 10
    3.79-4.19 s, nice 19 3.66-3.94 s, SCHED_IDLE 3.67-3.90 s (docs/video.md). Elsewhere, or
    if refused, nothing changes."""
    with contextlib.suppress(OSError, AttributeError):  # no per-thread priority here
        thread = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, thread)  # inherited from the caller
        os.setpriority(os.PRIO_PROCESS, thread, max(now, _MODEL_NICE))


def _remove_tree(directory: Path) -> None:
    """Remove a frames directory this run wrote (files only, then the empty directories)."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.is_file() and child.suffix == ".jpg":
            child.unlink(missing_ok=True)
    for parent in (directory, directory.parent):
        try:
            os.rmdir(parent)
        except OSError:
            break
