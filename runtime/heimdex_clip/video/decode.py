"""Streaming video decode with PyAV: one frame at a time, bounded, never the whole video.

:func:`open_video` checks a file before any frame is decoded (a container PyAV can open,
a video stream, a codec it can decode, a frame size within the pixel limit) and raises
:class:`VideoError` with one clear line otherwise. :func:`analysed_frames` then decodes
packet by packet: a packet that fails to decode is skipped and counted (a corrupt middle
keeps what it can), a frame larger than the pixel limit is skipped, and at most
``max_analysis_fps`` frames per second of video are handed on (a stream of a million tiny
frames costs decode time, not analysis time).

Where the file seeks by its index, the video is cut at keyframes into pieces that
single-threaded decoders take side by side. FFmpeg's own frame threads on one stream
wait for each other (each frame refers to the one before), so any other work on a core
stalls both; separate pieces do not (docs/video.md has the figures).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from ..errors import ClipError
from .clock import FrameClock, analysis_slack

#: The size of the small frames cut detection compares (width, height).
ANALYSIS_SIZE = (64, 36)


class Timed(Protocol):
    time_s: float


T = TypeVar("T", bound=Timed)
#: What a piece's decoder does with each analysed frame (the frame, its time in seconds).
Analyser = Callable[[av.VideoFrame, float], T]
#: A fresh analyser for each piece, given the piece's stats (for its timings).
AnalyserFactory = Callable[["DecodeStats"], Analyser[T]]


class VideoError(ClipError, ValueError):
    """A video cannot be indexed: not a video, truncated, no frames, unsupported codec..."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream."""

    path: Path
    container: str
    codec: str
    width: int
    height: int
    fps: float | None
    duration_s: float | None
    frames: int | None


@dataclass
class DecodeStats:
    """What decoding did: frames seen, handed on and skipped, and where the time went."""

    packets: int = 0
    frames_decoded: int = 0
    frames_analysed: int = 0
    corrupt_packets: int = 0
    oversized_frames: int = 0
    #: (start_s, end_s) of the stretches lost to corrupt packets (merged, at most 100).
    skipped_ranges: list[list[float]] = field(default_factory=list)
    # Seconds, summed over the decoder threads (they run side by side).
    decode_s: float = 0.0  # demuxing and decoding
    scale_s: float = 0.0  # the small frames for detection
    picture_s: float = 0.0  # the candidate pictures
    features_s: float = 0.0  # the detector's per-frame features
    quality_s: float = 0.0  # the candidates' quality scores
    pieces: int = 1  # stretches decoded side by side (1: one decoder on FFmpeg's threads)

    def note_skip(self, at_s: float | None) -> None:
        if at_s is None:
            return
        if self.skipped_ranges and at_s - self.skipped_ranges[-1][1] < 1.0:
            self.skipped_ranges[-1][1] = at_s
        elif len(self.skipped_ranges) < 100:
            self.skipped_ranges.append([at_s, at_s])

    def add(self, other: DecodeStats) -> None:
        """Add the counts and seconds of a stretch decoded after this one."""
        for name in (
            "packets",
            "frames_decoded",
            "corrupt_packets",
            "oversized_frames",
            "decode_s",
            "scale_s",
            "picture_s",
            "features_s",
            "quality_s",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for first, last in other.skipped_ranges:
            self.note_skip(first)
            self.note_skip(last)


class Scalers:
    """FFmpeg scalers kept for a whole stream: ``VideoFrame.reformat`` builds a new one for
    every frame, and setting one up (its filter taps, and a pool of threads unless told
    one) costs more than the scaling itself. One per kind of output, so each keeps its
    context; one thread each (the decoder has the others)."""

    __slots__ = ("picture", "small")

    def __init__(self) -> None:
        self.small = VideoReformatter()
        self.picture = VideoReformatter()


def frame_picture(frame: av.VideoFrame, long_side: int, scaler: VideoReformatter) -> np.ndarray:
    """The frame as uint8 RGB [H, W, 3], its longer side at most ``long_side``, turned
    upright by the stream's display rotation."""
    rotation = round((frame.rotation or 0) / 90) % 4
    scale = min(1.0, long_side / max(frame.width, frame.height))
    width = max(2, round(frame.width * scale))
    height = max(2, round(frame.height * scale))
    rgb: np.ndarray = scaler.reformat(
        frame, width=width, height=height, format="rgb24", interpolation="AREA", threads=1
    ).to_ndarray()
    if rotation:  # PyAV's rotation is counter-clockwise degrees, as np.rot90's k
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation))
    return rgb


#: 8-bit planar YUV: its planes are read in place (no scaler, no conversion).
_PLANAR_YUV = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"})
_ROWS, _COLS = 2, 8  # points averaged per output pixel: from 2 rows, 8 columns in each


def small_planes(frame: av.VideoFrame, scaler: VideoReformatter | None = None) -> np.ndarray:
    """The frame's Y, U and V at :data:`ANALYSIS_SIZE`, uint8 [3, h, w].

    Each output pixel is the mean of 16 points over its area (2 rows of 8), read straight
    from the decoder's planes: at 1080p that reads 72 of every plane's rows, where a
    scaler reads them all (the detector needs the gist of a frame, not its detail). Rows,
    not points, are what reading a plane costs (a row's samples share cache lines), so
    a cell takes its points from 2 rows rather than 4 (see docs/video.md).
    Other pixel formats go through FFmpeg's scaler (``scaler``, kept by the caller).
    """
    width, height = ANALYSIS_SIZE
    planes = frame.planes[:3]
    if frame.format.name not in _PLANAR_YUV or any(
        p.line_size < p.width or p.buffer_size < p.line_size * p.height for p in planes
    ):
        small = (scaler or VideoReformatter()).reformat(
            frame, width=width, height=height, format="yuv444p", threads=1
        )
        return small.to_ndarray()
    out = np.empty((3, height, width), np.uint8)
    for i, plane in enumerate(planes):
        # A plane is a buffer (PyAV's stubs do not say so).
        samples = np.frombuffer(plane, np.uint8)[: plane.line_size * plane.height]  # type: ignore[call-overload]
        samples = samples.reshape(plane.height, plane.line_size)
        rows, cols = _grids(plane.height, plane.width)
        # The sampled rows, each cell's summed (uint16: 16 x 255 fits), then its points:
        # ``cols`` lists every cell's k-th column before the (k+1)-th (one sum, not eight).
        picked = samples.take(rows, axis=0).reshape(height, _ROWS, plane.line_size)
        sums = picked.sum(axis=1, dtype=np.uint16)
        points = sums.take(cols, axis=1).reshape(height, _COLS, width)
        cells = points.sum(axis=1, dtype=np.uint16)
        out[i] = (cells + _ROWS * _COLS // 2) // (_ROWS * _COLS)
    return out


@functools.lru_cache(maxsize=32)
def _grids(plane_height: int, plane_width: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampled rows of a plane of this size, and its sampled columns: the first point
    of every cell, then the second of every cell, and so on."""
    width, height = ANALYSIS_SIZE
    cols = _grid(plane_width, width, _COLS).reshape(width, _COLS).T.ravel()
    return _grid(plane_height, height, _ROWS), np.ascontiguousarray(cols)


def _grid(size: int, cells: int, per_cell: int) -> np.ndarray:
    """Sample positions: ``per_cell`` evenly spaced points in each of ``cells`` cells."""
    points = cells * per_cell
    return ((np.arange(points) + 0.5) * size / points).astype(np.intp)


def open_video(
    path: str | Path, *, max_pixels: int
) -> tuple[av.container.InputContainer, VideoInfo]:
    """Open ``path`` and describe its first video stream; VideoError if it cannot be
    indexed. The caller closes the container."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: not a file" if path.exists() else f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file")
    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoError(f"{path}: not a readable video ({_reason(exc)})") from None
    try:
        info = _describe(container, path, max_pixels)
    except BaseException:
        container.close()
        raise
    return container, info


def _describe(container: av.container.InputContainer, path: Path, max_pixels: int) -> VideoInfo:
    if not container.streams.video:
        kinds: list[str] = sorted({s.type for s in container.streams}) or ["no"]
        raise VideoError(f"{path}: no video stream ({', '.join(kinds)} streams only)")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None or ctx.codec is None:
        raise VideoError(f"{path}: unsupported video codec")
    width, height = ctx.width or 0, ctx.height or 0
    if width <= 0 or height <= 0:
        raise VideoError(f"{path}: the video stream has no frame size (codec {ctx.codec.name})")
    if width * height > max_pixels:
        raise VideoError(
            f"{path}: frames of {width}x{height} = {width * height} pixels "
            f"exceed the limit of {max_pixels} (CLIP_MAX_IMAGE_PIXELS)"
        )
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate and float(rate) > 0 else None
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    return VideoInfo(
        path=path,
        container=container.format.name,
        codec=ctx.codec.name,
        width=width,
        height=height,
        fps=fps,
        duration_s=duration,
        frames=stream.frames or None,
    )


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(":")[0].strip() if ": '" in text else text.strip()


def analysed_frames(
    container: av.container.InputContainer,
    info: VideoInfo,
    stats: DecodeStats,
    *,
    threads: int,
    max_pixels: int,
    max_analysis_fps: float,
    analyser: AnalyserFactory[T],
) -> Iterator[T]:
    """What ``analyser`` makes of each analysed frame, in presentation order: the first
    frame at or after every 1/``max_analysis_fps`` s of video time.

    With ``threads`` >= 2 and a file that seeks by its index (MP4/MOV, Matroska/WebM; see
    :func:`plan_pieces`), the video is decoded in pieces that start at keyframes, each by
    a single-threaded decoder, ``threads`` pieces side by side, and the results are handed
    on in order. Otherwise ``container`` is decoded in one piece on ``threads`` FFmpeg
    threads. Either way ``analyser`` is called (on the thread that decoded the frame)
    with a fresh stats object per piece; the decoded frame is given back to the decoder
    right after, so a piece holds only what the analyser kept.

    Corrupt packets and oversized frames are skipped and counted in ``stats``; a file that
    ends early simply ends.
    """
    plan = plan_pieces(info, threads)
    pieces = (
        _side_by_side(info, plan, stats, threads, max_pixels, max_analysis_fps, analyser)
        if plan is not None
        else _one_piece(container, stats, threads, max_pixels, max_analysis_fps, analyser)
    )
    clock = FrameClock(max_analysis_fps, analysis_slack(max_analysis_fps))
    last_time = -math.inf
    # A piece's clock starts afresh at its first frame; this one decides for the video.
    for item in pieces:
        if item.time_s <= last_time or not clock.tick(item.time_s):
            continue
        last_time = item.time_s
        stats.frames_analysed += 1
        yield item


#: Pieces are at least this long (seconds): a shorter video is decoded in one piece.
MIN_PIECE_S = 2.0
#: ... and at most this long, which bounds what a finished piece holds until its turn.
MAX_PIECE_S = 10.0
#: Analysed frames a piece may hold for the consumer before its decoder waits.
PIECE_QUEUE = 128
#: Containers that seek exactly by their index (a seek lands on the keyframe asked for).
_SEEKABLE = ("mov", "mp4", "matroska", "webm")


def plan_pieces(info: VideoInfo, threads: int) -> tuple[int, list[int]] | None:
    """The first frame's timestamp and the keyframe timestamps (stream time base) where
    pieces 2, 3, ... start, about ``duration / (4 threads)`` apart (2-10 s); or None
    when the video is decoded in one piece: fewer than 2 threads, a short or unknown
    duration, a container that does not seek by index, or no keyframe found."""
    duration = info.duration_s or 0.0
    if threads < 2 or duration < 2 * MIN_PIECE_S:
        return None
    if not any(name in _SEEKABLE for name in info.container.split(",")):
        return None
    step = min(MAX_PIECE_S, max(MIN_PIECE_S, duration / (4 * threads)))
    try:
        with av.open(str(info.path), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            base = _first_pts(container, stream)
            if base is None or stream.time_base is None:
                return None
            ticks = 1 / stream.time_base
            starts: list[int] = []
            target = step
            while target < duration - step / 2:
                key = _keyframe_at_or_before(container, stream, base + int(target * ticks))
                if key is not None and key - (starts[-1] if starts else base) >= ticks:
                    starts.append(key)
                target += step
    except (av.FFmpegError, OSError, IndexError):
        return None
    return (base, starts) if starts else None


def _first_pts(container: av.container.InputContainer, stream: av.VideoStream) -> int | None:
    """The first decoded frame's timestamp: the video's zero."""
    for packet in itertools.islice(container.demux(stream), 256):
        for frame in packet.decode():
            if frame.pts is not None:
                return int(frame.pts)
    return None


def _keyframe_at_or_before(
    container: av.container.InputContainer, stream: av.VideoStream, pts: int
) -> int | None:
    """Seek to the keyframe at or before ``pts``; its timestamp if the seek landed on a
    keyframe that seeking to it again finds too (so a piece's decoder lands there)."""
    found: list[int] = []
    for target in (pts, None):
        container.seek(found[0] if target is None else target, stream=stream, backward=True)
        packet = next(
            (p for p in itertools.islice(container.demux(stream), 8) if p.pts is not None), None
        )
        if packet is None or packet.pts is None or not packet.is_keyframe:
            return None
        found.append(int(packet.pts))
    return found[0] if found[0] == found[1] else None


def _one_piece(
    container: av.container.InputContainer,
    stats: DecodeStats,
    threads: int,
    max_pixels: int,
    max_analysis_fps: float,
    analyser: AnalyserFactory[T],
) -> Iterator[T]:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame and slice threads
    stream.codec_context.thread_count = threads
    yield from _decode_piece(
        container, stats, None, -math.inf, math.inf, max_pixels, max_analysis_fps, analyser(stats)
    )


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # Windows: no handle for the process itself
        return None


def _give_back_free_memory() -> None:
    """Hand freed heap pages back to the OS. The decoder threads allocate pictures that
    the main thread frees later, and glibc keeps such pages in each thread's arena: peak
    RSS of decoding alone was 185, 226 and 251 MB for 1, 10 and 30 minutes of 1080p
    without this, 179, 194 and 204 MB with it after every piece (2-core Xeon,
    2026-12-07)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _End:
    """A piece's last item: its counts, and the error that ended it if any."""

    def __init__(self, stats: DecodeStats, error: BaseException | None = None) -> None:
        self.stats, self.error = stats, error


class _Stopped(Exception):
    """The consumer has gone: a piece's decoder stops."""


def _side_by_side(
    info: VideoInfo,
    plan: tuple[int, list[int]],
    stats: DecodeStats,
    threads: int,
    max_pixels: int,
    max_analysis_fps: float,
    analyser: AnalyserFactory[T],
) -> Iterator[T]:
    """Decode the planned pieces on ``threads`` threads (one FFmpeg thread each: pieces
    do not wait for each other as frame threads do) and yield their items in order. At
    most ``threads + 1`` pieces are decoded or waiting at a time, each holding at most
    PIECE_QUEUE items, so memory does not grow with the video's length."""
    base, starts = plan
    bounds = list(zip([-math.inf, *starts], [*starts, math.inf], strict=True))
    stats.pieces = len(bounds)
    queues: list[queue.Queue] = [queue.Queue(PIECE_QUEUE) for _ in bounds]
    order = iter(range(len(bounds)))
    order_lock, room, stop = threading.Lock(), threading.Semaphore(threads + 1), threading.Event()

    def put(q: queue.Queue, item: object) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                q.put(item, timeout=0.05)
                return
        raise _Stopped

    def work() -> None:
        while True:
            while not room.acquire(timeout=0.05):
                if stop.is_set():
                    return
            with order_lock:
                index = next(order, None)
            if index is None or stop.is_set():
                return
            piece = DecodeStats()
            try:
                for item in _decode_file_piece(
                    info, piece, base, *bounds[index], max_pixels, max_analysis_fps, analyser
                ):
                    put(queues[index], item)
                put(queues[index], _End(piece))
            except _Stopped:
                return
            except BaseException as exc:  # handed to the consumer, raised there
                with contextlib.suppress(_Stopped):
                    put(queues[index], _End(piece, exc))

    workers = [
        threading.Thread(target=work, name=f"heimdex-video-decode-{i}", daemon=True)
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    try:
        for q in queues:
            while not isinstance(item := q.get(), _End):
                yield item
            stats.add(item.stats)
            room.release()
            _give_back_free_memory()
            if item.error is not None:
                raise item.error
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def _decode_file_piece(
    info: VideoInfo,
    stats: DecodeStats,
    base: int,
    start: float,
    stop: float,
    max_pixels: int,
    max_analysis_fps: float,
    analyser: AnalyserFactory[T],
) -> Iterator[T]:
    """One piece on its own container and single-threaded decoder."""
    started = time.perf_counter()
    try:
        container = av.open(str(info.path), metadata_errors="ignore")
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{info.path}: cannot be read again ({_reason(exc)})") from None
    with container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        if start > -math.inf:
            try:
                container.seek(int(start), stream=stream, backward=True)
            except av.FFmpegError:  # it sought in the plan: treat the piece as lost
                stats.corrupt_packets += 1
                stats.note_skip(float((start - base) * (stream.time_base or 0)))
                return
        stats.decode_s += time.perf_counter() - started
        yield from _decode_piece(
            container, stats, base, start, stop, max_pixels, max_analysis_fps, analyser(stats)
        )


def _decode_piece(
    container: av.container.InputContainer,
    stats: DecodeStats,
    base: int | None,
    start: float,
    stop: float,
    max_pixels: int,
    max_analysis_fps: float,
    analyse: Analyser[T],
) -> Iterator[T]:
    """The analysed frames whose timestamps are in [start, stop) (stream time base),
    decoding from where ``container`` stands. Frames before ``start`` belong to the piece
    before and are dropped. Packets are counted until the one at ``stop`` (the next
    piece's keyframe); decoding goes on until a frame at ``stop`` comes out, so frames
    shown before it but stored after it (an open GOP's leading B-frames) are decoded
    here, with their references."""
    stream = container.streams.video[0]
    clock = FrameClock(max_analysis_fps, analysis_slack(max_analysis_fps))
    last_time = -math.inf
    ours = True  # whether the packets are still this piece's
    packets = container.demux(stream)
    while True:
        started = time.perf_counter()
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError:  # the container itself is broken from here on
            if ours:
                stats.corrupt_packets += 1
                stats.note_skip(last_time if last_time > -math.inf else 0.0)
            break
        if packet.pts is not None and packet.pts >= stop:
            ours = False
        stats.packets += ours
        try:
            frames = packet.decode()
        except av.FFmpegError:
            frames = []
            if ours:
                stats.corrupt_packets += 1
                stats.note_skip(_packet_time(packet, base))
        stats.decode_s += time.perf_counter() - started
        for frame in frames:
            if frame.pts is None or frame.time_base is None:
                stats.frames_decoded += ours
                continue
            if frame.pts >= stop:
                return
            base = frame.pts if base is None else base
            if frame.pts < start:
                continue
            stats.frames_decoded += 1
            if frame.width * frame.height > max_pixels:
                stats.oversized_frames += 1
                continue
            t = float((frame.pts - base) * frame.time_base)
            if t <= last_time or not clock.tick(t):  # a timestamp going back: skipped
                continue
            last_time = t
            yield analyse(frame, t)


def _packet_time(packet: av.Packet, base: int | None) -> float | None:
    if packet.pts is None or packet.time_base is None:
        return None
    return float((packet.pts - (base or 0)) * packet.time_base)
