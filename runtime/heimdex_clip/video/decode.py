"""Streaming video decode with PyAV: one frame at a time, bounded, never the whole video.

:func:`open_video` checks a file before any frame is decoded (a container PyAV can open,
a video stream, a codec it can decode, a frame size within the pixel limit) and raises
:class:`VideoError` with one clear line otherwise. :func:`iter_frames` then decodes packet
by packet with FFmpeg's own threads: a packet that fails to decode is skipped and counted
(a corrupt middle keeps what it can), a frame larger than the pixel limit is skipped, and
at most ``max_analysis_fps`` frames per second of video are handed on (a stream of a
million tiny frames costs decode time, not analysis time).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from ..errors import ClipError
from .clock import FrameClock, analysis_slack

#: The size of the small frames cut detection compares (width, height).
ANALYSIS_SIZE = (64, 36)


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
    decode_s: float = 0.0  # demuxing and decoding
    scale_s: float = 0.0  # the small frames for detection
    picture_s: float = 0.0  # the candidate pictures

    def note_skip(self, at_s: float | None) -> None:
        if at_s is None:
            return
        if self.skipped_ranges and at_s - self.skipped_ranges[-1][1] < 1.0:
            self.skipped_ranges[-1][1] = at_s
        elif len(self.skipped_ranges) < 100:
            self.skipped_ranges.append([at_s, at_s])


class Scalers:
    """FFmpeg scalers kept for a whole stream: ``VideoFrame.reformat`` builds a new one for
    every frame, and setting one up (its filter taps, and a pool of threads unless told
    one) costs more than the scaling itself. One per kind of output, so each keeps its
    context; one thread each (the decoder has the others)."""

    __slots__ = ("picture", "small")

    def __init__(self) -> None:
        self.small = VideoReformatter()
        self.picture = VideoReformatter()


class DecodedFrame:
    """One decoded frame: its time, the small YUV planes for detection, and (on demand) an
    upright RGB picture for quality ranking and embedding."""

    __slots__ = ("_frame", "_scalers", "_stats", "index", "small", "time_s")

    def __init__(
        self,
        frame: av.VideoFrame,
        index: int,
        time_s: float,
        stats: DecodeStats,
        scalers: Scalers | None = None,
    ) -> None:
        self._frame, self.index, self.time_s, self._stats = frame, index, time_s, stats
        self._scalers = scalers or Scalers()
        started = time.perf_counter()
        #: uint8 [3, h, w]: the Y, U and V planes at the analysis size.
        self.small: np.ndarray = small_planes(frame, self._scalers.small)
        stats.scale_s += time.perf_counter() - started

    def picture(self, long_side: int) -> np.ndarray:
        """The frame as uint8 RGB [H, W, 3], its longer side at most ``long_side``, turned
        upright by the stream's display rotation."""
        started = time.perf_counter()
        frame, rotation = self._frame, round((self._frame.rotation or 0) / 90) % 4
        scale = min(1.0, long_side / max(frame.width, frame.height))
        width = max(2, round(frame.width * scale))
        height = max(2, round(frame.height * scale))
        rgb: np.ndarray = self._scalers.picture.reformat(
            frame, width=width, height=height, format="rgb24", interpolation="AREA", threads=1
        ).to_ndarray()
        if rotation:  # PyAV's rotation is counter-clockwise degrees, as np.rot90's k
            rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation))
        self._stats.picture_s += time.perf_counter() - started
        return rgb

    @property
    def kept(self) -> bool:
        """Whether the decoded picture is still here (not released)."""
        return self._frame is not None

    def release(self) -> None:
        """Drop the decoded picture (only the small planes stay): its buffer goes back to
        the decoder."""
        self._frame = None  # type: ignore[assignment]


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


def iter_frames(
    container: av.container.InputContainer,
    info: VideoInfo,
    stats: DecodeStats,
    *,
    threads: int,
    max_pixels: int,
    max_analysis_fps: float,
) -> Iterator[DecodedFrame]:
    """The video's frames in presentation order, at most ``max_analysis_fps`` a second.

    Corrupt packets and oversized frames are skipped and counted in ``stats``; a file that
    ends early simply ends. Decoding runs on ``threads`` FFmpeg threads.
    """
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame and slice threads
    stream.codec_context.thread_count = threads
    clock = FrameClock(max_analysis_fps, analysis_slack(max_analysis_fps))
    scalers = Scalers()
    last_time = -math.inf
    base = None  # the first frame's time: the video's zero
    index = 0
    packets = container.demux(stream)
    while True:
        started = time.perf_counter()
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError:  # the container itself is broken from here on
            stats.corrupt_packets += 1
            stats.note_skip(last_time if last_time > -math.inf else 0.0)
            break
        stats.packets += 1
        try:
            frames = packet.decode()
        except av.FFmpegError:
            stats.corrupt_packets += 1
            stats.note_skip(_packet_time(packet, base))
            frames = []
        stats.decode_s += time.perf_counter() - started
        for frame in frames:
            stats.frames_decoded += 1
            if frame.width * frame.height > max_pixels:
                stats.oversized_frames += 1
                continue
            if frame.pts is None or frame.time_base is None:
                continue
            t = float(frame.pts * frame.time_base)
            base = t if base is None else base
            t -= base
            if t <= last_time or not clock.tick(t):  # a timestamp going back: skipped
                continue
            last_time = t
            stats.frames_analysed += 1
            yield DecodedFrame(frame, index, t, stats, scalers)
            index += 1


def _packet_time(packet: av.Packet, base: float | None) -> float | None:
    if packet.pts is None or packet.time_base is None:
        return None
    return float(packet.pts * packet.time_base) - (base or 0.0)
