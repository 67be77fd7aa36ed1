"""Videos made from scikit-image's real photographs, with their ground truth.

    python -m heimdex_clip_export.video_samples OUT.mp4 [--seconds 20] [--size 640x360]

Each shot shows one photograph with a camera move (pan, zoom, still, sensor noise); shots
are joined by hard cuts, dissolves or fades through black, at known times. Tests, the demo
and the video benchmark use them (encoded with PyAV: the ``video`` extra).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from .evaluation import sample_photos


@dataclass(frozen=True)
class Shot:
    photo: str
    seconds: float
    motion: str = "pan"  # pan | zoom | still | noise
    enter: str = "cut"  # how it begins: cut | dissolve | fade (through black)


@dataclass
class Truth:
    """Where things happen, in seconds of presentation time."""

    cuts: list[float] = field(default_factory=list)  # first frame of a shot after a hard cut
    dissolves: list[tuple[float, float]] = field(default_factory=list)
    fades: list[tuple[float, float]] = field(default_factory=list)  # black stretches
    shots: list[tuple[str, float, float]] = field(default_factory=list)  # photo, start, end
    frame_times: list[float] = field(default_factory=list)


def _view(
    photo: np.ndarray, size: tuple[int, int], progress: float, motion: str, rng: np.random.Generator
) -> np.ndarray:
    """The photo as the camera sees it at ``progress`` in [0, 1] of the shot."""
    h, w = photo.shape[:2]
    aspect = size[0] / size[1]
    ch = min(h, w / aspect) * (0.8 if motion != "zoom" else 1.0 - 0.35 * progress)
    cw = ch * aspect
    if motion == "pan":
        x0, y0 = (w - cw) * progress, (h - ch) * 0.5
    else:
        x0, y0 = (w - cw) * 0.5, (h - ch) * 0.5
    crop = Image.fromarray(photo).resize(
        size, Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)
    )
    out = np.asarray(crop, dtype=np.float32)
    if motion == "noise":
        out = out + rng.normal(0, 10, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def default_shots(seconds: float = 20.0) -> list[Shot]:
    """Every photograph once (cycled to fill ``seconds``), motions and transitions mixed."""
    names = [n for n, _ in sample_photos()]
    motions, enters = (
        ("pan", "zoom", "still", "noise"),
        ("cut", "cut", "cut", "dissolve", "cut", "fade"),
    )
    shots, total, i = [], 0.0, 0
    while total < seconds - 0.5:
        length = min(2.0 + (i % 3) * 0.75, seconds - total)
        shots.append(
            Shot(
                names[i % len(names)],
                length,
                motions[i % 4],
                "cut" if i == 0 else enters[i % len(enters)],
            )
        )
        total += length
        i += 1
    return shots


def write_video(
    path: str | Path,
    shots: list[Shot],
    *,
    size: tuple[int, int] = (320, 180),
    fps: int = 30,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    black_intro_s: float = 0.0,
    transition_s: float = 0.5,
    rotation: int | None = None,
    variable_rate: bool = False,
    bit_rate: int | None = None,
    seed: int = 0,
    x264_params: str | None = None,
) -> Truth:
    """Encode ``shots`` to ``path``; returns where the cuts, dissolves and fades are.

    ``variable_rate`` alternates frame durations (1/fps and 2/fps); ``rotation`` stores
    display rotation metadata (degrees, counter-clockwise); ``x264_params`` is passed to
    libx264 (e.g. ``"open-gop=1:keyint=20"``).
    """
    import av

    photos = {n: np.asarray(p) for n, p in sample_photos()}
    rng = np.random.default_rng(seed)
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
    if bit_rate:
        stream.bit_rate = bit_rate
    if codec == "libx264":
        stream.options = {"preset": "ultrafast" if size[0] >= 1280 else "veryfast"}
        if x264_params:
            stream.options["x264-params"] = x264_params
    elif codec.startswith("libvpx"):
        stream.options = {"deadline": "realtime", "cpu-used": "8"}
    time_base = Fraction(1, fps * 2)
    stream.time_base = time_base
    if rotation is not None:
        stream.set_display_rotation(rotation)
    truth, ticks = Truth(), 0

    def emit(rgb: np.ndarray) -> None:
        nonlocal ticks
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = ticks, time_base
        truth.frame_times.append(float(ticks * time_base))
        step = 2 if not variable_rate or len(truth.frame_times) % 3 else 4
        ticks += step
        for packet in stream.encode(frame):
            container.mux(packet)

    def now() -> float:
        return float(ticks * time_base)

    black = np.zeros((size[1], size[0], 3), np.uint8)
    while now() < black_intro_s - 1e-9:
        emit(black)
    if black_intro_s:
        truth.fades.append((0.0, now()))
    previous: tuple[np.ndarray, int] | None = None
    for shot in shots:
        photo = photos[shot.photo]
        n = max(2, round(shot.seconds * fps))
        t_count = max(2, round(transition_s * fps))
        if shot.enter == "fade" and previous is not None:
            start = now()
            for k in range(t_count):  # fade out the previous shot's last view
                emit((previous[0] * (1 - (k + 1) / t_count)).astype(np.uint8))
            for _ in range(t_count // 2):
                emit(black)
            truth.fades.append((start, now()))
        if shot.enter == "dissolve" and previous is not None:
            start = now()
            for k in range(t_count):
                a = (k + 1) / (t_count + 1)
                view = _view(photo, size, 0.0, shot.motion, rng).astype(np.float32)
                emit((previous[0] * (1 - a) + view * a).astype(np.uint8))
            truth.dissolves.append((start, now()))
        elif shot.enter == "cut" and previous is not None:
            truth.cuts.append(now())
        start, last = now(), None
        for k in range(n):
            last = _view(photo, size, k / (n - 1), shot.motion, rng)
            if shot.enter == "fade" and previous is not None and k < t_count:
                last = (last * ((k + 1) / t_count)).astype(np.uint8)  # fade in
            emit(last)
        truth.shots.append((shot.photo, start, now()))
        previous = (last.astype(np.float32), n)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heimdex_clip_export.video_samples")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--fps", type=int, default=30)
    args = parser.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    truth = write_video(
        args.out, default_shots(args.seconds), size=(w, h), fps=args.fps, black_intro_s=1.0
    )
    print(
        f"wrote {args.out}: {len(truth.shots)} shots, {len(truth.cuts)} hard cuts, "
        f"{len(truth.dissolves)} dissolves, {len(truth.fades)} black stretches, "
        f"{math.ceil(truth.frame_times[-1])} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
