"""Video in, scenes out (no database): cuts, frames, times, codecs, hostile files.

Every video is made here with PyAV from scikit-image's photographs
(:mod:`heimdex_clip_export.video_samples`), so where the cuts are is known independently
of the detector.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")  # the video extra

from heimdex_clip import ClipConfig, ClipEmbedder  # noqa: E402
from heimdex_clip.video import (  # noqa: E402
    SegmentSettings,
    VideoError,
    VideoSettings,
    analyze_video,
    content_hash,
)
from heimdex_clip.video.pipeline import VIDEO_NAMESPACE  # noqa: E402
from heimdex_clip_export.video_samples import Shot, Truth, write_video  # noqa: E402

OWNER = uuid.UUID("00000000-0000-4000-a000-0000000000f1")
FPS = 30
SHOTS = [
    Shot("astronaut", 2.0, "pan"),
    Shot("coffee", 1.5, "zoom"),
    Shot("rocket", 2.0, "noise"),
    Shot("chelsea", 1.5, "still"),
    Shot("camera", 2.0, "pan", "dissolve"),
    Shot("brick", 1.5, "zoom"),
    Shot("clock", 2.0, "still", "fade"),
    Shot("page", 1.5, "noise"),
    Shot("moon", 1.5, "pan"),
    Shot("gravel", 1.5, "still"),
    Shot("grass", 1.5, "zoom"),
    Shot("coins", 2.0, "noise", "dissolve"),
]


@pytest.fixture(scope="module")
def embedder(artifact_dir) -> ClipEmbedder:
    return ClipEmbedder(config=ClipConfig(pretrained="none", model_dir=artifact_dir)).load()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Truth]:
    """The main video: hard cuts, two dissolves, a fade through black, a black intro."""
    path = tmp_path_factory.mktemp("video") / "shots.mp4"
    return path, write_video(path, SHOTS, size=(320, 180), fps=FPS, black_intro_s=0.5)


@pytest.fixture(scope="module")
def analysis(made, embedder, tmp_path_factory):
    return analyze_video(made[0], embedder, owner=OWNER, media_dir=tmp_path_factory.mktemp("media"))


def hard_cut_f1(starts: list[tuple[float, str]], truth: Truth, tolerance_s: float) -> float:
    """F1 of the detected cuts against the true hard cuts; a detected cut inside a dissolve
    (a gradual cut, found as it should be) is neither a hit nor a false alarm."""
    detected = [
        t
        for t, kind in starts
        if kind == "cut"
        and not any(a - tolerance_s <= t <= b + tolerance_s for a, b in truth.dissolves)
    ]
    unmatched, hits = list(detected), 0
    for cut in truth.cuts:
        near = [t for t in unmatched if abs(t - cut) <= tolerance_s]
        if near:
            unmatched.remove(min(near, key=lambda t: abs(t - cut)))
            hits += 1
    precision = hits / len(detected) if detected else 0.0
    recall = hits / len(truth.cuts)
    return 2 * precision * recall / (precision + recall) if hits else 0.0


def starts_of(analysis) -> list[tuple[float, str]]:
    return [(s.start_s, s.metadata["video"]["starts_at"]) for s in analysis.scenes]


def test_hard_cuts_are_found_with_f1_at_least_095(made, analysis):
    _, truth = made
    assert len(truth.cuts) == 8
    assert hard_cut_f1(starts_of(analysis), truth, tolerance_s=2 / FPS) >= 0.95


def test_cuts_are_placed_within_a_frame_by_default_and_on_it_at_30_fps(
    made, analysis, embedder, tmp_path
):
    """15 analysed frames a second (the default) see every other frame of a 30 fps video:
    a cut on a skipped frame is placed on the next. At 30 every cut is on its frame, and
    every candidate frame is on the 0.5 s clock or its scene's first frame."""
    _, truth = made
    assert hard_cut_f1(starts_of(analysis), truth, tolerance_s=1 / FPS + 1e-6) == 1.0
    settings = VideoSettings(max_analysis_fps=30)
    at_30 = analyze_video(made[0], embedder, owner=OWNER, media_dir=tmp_path, settings=settings)
    assert at_30.decode.frames_analysed == at_30.decode.frames_decoded
    assert hard_cut_f1(starts_of(at_30), truth, tolerance_s=0.5 / FPS) == 1.0
    for scene in at_30.scenes:
        for chosen in scene.metadata["video"]["chosen"]:
            t = chosen["time_s"]
            assert abs(t * 2 - round(t * 2)) < 1e-3 or abs(t - scene.start_s) < 1e-3


def test_index_video_defaults_are_the_video_settings_defaults():
    """The CLI writes its defaults out (it must not import PyAV to build its parser)."""
    from heimdex_clip.cli import build_parser

    args = build_parser().parse_args(["index-video", "x.mp4", "--owner", str(OWNER)])
    defaults = VideoSettings()
    assert args.analysis_fps == defaults.max_analysis_fps
    assert args.window == defaults.segments.window_s
    assert args.top_k == defaults.top_k
    assert args.threads == defaults.threads


def test_the_frame_clock_takes_millisecond_timestamps_on_time():
    """WebM and Matroska round timestamps to milliseconds (30 fps: 0, 33, 67, 100 ms...):
    none of those frames may count as early and be dropped."""
    from heimdex_clip.video.clock import FrameClock, analysis_slack

    rounded = [round(i * 1000 / 30) / 1000 for i in range(300)]
    at_30 = FrameClock(30, analysis_slack(30))
    assert all(at_30.tick(t) for t in rounded)
    at_15 = FrameClock(15, analysis_slack(15))
    assert [t for t in rounded if at_15.tick(t)] == rounded[::2]
    exact_60 = [i / 60 for i in range(600)]
    at_15 = FrameClock(15, analysis_slack(15))
    assert [t for t in exact_60 if at_15.tick(t)] == exact_60[::4]
    with pytest.raises(ValueError, match="fps > 0"):
        FrameClock(0, 0.0)


def test_only_clock_frames_and_possible_scene_starts_get_pictures(
    made, embedder, tmp_path, monkeypatch
):
    """The decoder threads make pictures only of frames that may be needed (the candidate
    clock's, possible scene starts, a piece's first frames) and give every decoded frame
    back at once (see docs/video.md)."""
    from heimdex_clip.video import pipeline

    frames = []
    real = pipeline.analysed_frames

    def watched(*args, **kwargs):
        for frame in real(*args, **kwargs):
            frames.append(frame)
            yield frame

    monkeypatch.setattr(pipeline, "analysed_frames", watched)
    result = analyze_video(made[0], embedder, owner=OWNER, media_dir=tmp_path)
    assert len(result.scenes) == len(SHOTS)
    pictured = [f.time_s for f in frames if f.picture is not None]
    clock_ticks = 2 * frames[-1].time_s + 1
    pieces = result.decode.pieces
    assert pieces > 1  # decoded side by side
    # the clock's (but black ones), each piece's first 4, one per cut, a few on dissolves
    assert clock_ticks - 4 <= len(pictured) <= clock_ticks + 4 * pieces + 3 * len(SHOTS)
    assert len(pictured) < len(frames) / 3
    assert all(set(vars(f)) == {"time_s", "features", "picture"} for f in frames[:5])
    chosen = {c["time_s"] for s in result.scenes for c in s.metadata["video"]["chosen"]}
    assert chosen <= {round(t, 4) for t in pictured}


def test_pieces_side_by_side_give_the_same_scenes_as_one_decoder(
    made, analysis, embedder, tmp_path
):
    """The default decodes keyframe-aligned pieces on 2 threads; one thread decodes the
    file in one piece. Every scene, time, chosen frame and vector is the same."""
    one = analyze_video(
        made[0], embedder, owner=OWNER, media_dir=tmp_path, settings=VideoSettings(threads=1)
    )
    assert one.decode.pieces == 1 and analysis.decode.pieces > 1
    assert one.decode.frames_decoded == analysis.decode.frames_decoded
    assert one.decode.frames_analysed == analysis.decode.frames_analysed
    assert one.decode.packets == analysis.decode.packets
    assert len(one.scenes) == len(analysis.scenes)
    for a, b in zip(one.scenes, analysis.scenes, strict=True):
        assert (a.start_s, a.end_s, a.shot, a.window) == (b.start_s, b.end_s, b.shot, b.window)
        assert a.metadata["video"]["chosen"] == b.metadata["video"]["chosen"]
        np.testing.assert_array_equal(a.embedding, b.embedding)


def test_a_frame_may_start_a_scene_at_a_jump_or_after_black():
    from heimdex_clip.video.cuts import CutSettings, StartWatch, frame_features

    rng = np.random.default_rng(3)
    black = np.full((3, 36, 64), [[[16]], [[128]], [[128]]], np.uint8)
    picture = rng.integers(40, 220, (3, 36, 64), dtype=np.uint8)
    other = rng.integers(40, 220, (3, 36, 64), dtype=np.uint8)
    settings = CutSettings()
    watch = StartWatch(settings)
    smalls = [picture] * 4 + [black, black, picture, picture, picture, other, other]
    verdicts = [watch.push(frame_features(small, settings)) for small in smalls]
    # a piece's first window + 2 frames; into black; black to picture; the same picture;
    # a different one
    assert verdicts == [True] * 4 + [True, False, True, False, False, True, False]


def test_dissolves_and_fades_become_boundaries(made, analysis):
    _, truth = made
    starts = starts_of(analysis)
    for a, b in truth.dissolves:  # a cut inside each dissolve
        assert any(a - 2 / FPS <= t <= b + 2 / FPS and kind == "cut" for t, kind in starts)
    for a, b in truth.fades[1:]:  # the fade through black: a scene ends in it, one starts
        assert any(
            s.metadata["video"]["ends_at"] == "black" and a <= s.end_s <= b for s in analysis.scenes
        )
        assert any(kind == "black" and b - 2 / FPS <= t <= b + 0.5 for t, kind in starts)
    # One scene per shot: nothing split, nothing merged.
    assert len(analysis.scenes) == len(SHOTS)


def test_black_intro_is_no_scene_and_the_first_frame_is_not_black(made, analysis):
    _, truth = made
    first = analysis.scenes[0]
    assert first.start_s >= truth.fades[0][1] - 1e-6
    assert first.metadata["video"]["starts_at"] == "black"
    for scene in analysis.scenes:  # every best frame is a picture, not black or blank
        luma = np.asarray(Image.open(scene.frame_path).convert("L"), dtype=np.float32)
        assert luma.mean() > 0.1 * 255 and luma.std() > 0.03 * 255


def test_a_scene_after_a_fade_in_never_shows_a_mid_fade_frame(made, analysis):
    _, truth = made
    index = [s.photo for s in SHOTS].index("clock")
    shot_start, shot_end = truth.shots[index][1:]
    scene = next(s for s in analysis.scenes if shot_start - 0.1 <= s.start_s < shot_end)
    # write_video fades in over transition_s = 0.5 s: frame k of 15 at (k + 1) / 15.
    full_brightness = shot_start + 14 / FPS
    chosen = scene.metadata["video"]["chosen"]
    assert chosen and all(c["time_s"] >= full_brightness - 1e-3 for c in chosen)


def test_rows_times_and_ids(made, analysis):
    path, truth = made
    scenes = analysis.scenes
    assert [s.scene_index for s in scenes] == list(range(len(scenes)))
    assert all(s.start_s < s.end_s for s in scenes)
    assert all(a.end_s <= b.start_s + 1e-9 for a, b in itertools.pairwise(scenes))
    assert scenes[-1].end_s == pytest.approx(truth.frame_times[-1] + 1 / FPS, abs=1e-3)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert content_hash(path) == sha
    assert analysis.video_id == uuid.uuid5(VIDEO_NAMESPACE, f"sha256:{sha}")
    for scene in scenes:
        assert scene.embedding is not None and scene.embedding.shape == (512,)
        assert abs(float(np.linalg.norm(scene.embedding)) - 1) < 1e-4
        meta = scene.metadata
        assert meta["error"] is None and meta["frame_path"] == scene.frame_path
        assert meta["frame_quality"]["frames_pooled"] == 3
        assert meta["video"]["settings"]["cuts"]["detector"] == "heimdex-content-v2"
        assert Path(scene.frame_path).parent == analysis.frames_dir
        assert max(Image.open(scene.frame_path).size) == 320  # never upscaled
    assert analysis.report()["corrupt_packets"] == 0


def test_long_shots_are_split_into_windows(tmp_path, embedder):
    path = tmp_path / "long.mp4"
    write_video(path, [Shot("astronaut", 5.0, "pan"), Shot("coffee", 1.0, "still")], size=(160, 96))
    settings = VideoSettings(segments=SegmentSettings(window_s=2.0))
    result = analyze_video(path, embedder, owner=OWNER, media_dir=tmp_path, settings=settings)
    windows = [(s.shot, s.window, round(s.start_s, 3)) for s in result.scenes]
    assert windows == [(0, 0, 0.0), (0, 1, 2.0), (0, 2, 4.0), (1, 0, 5.0)]


def test_windows_start_on_the_candidate_clock(tmp_path, embedder):
    """A window ends at the first candidate-clock frame window_s after its start: its
    successor starts on the clock with a picture, and a shot's last window is never
    shorter than the clock's step (here 5.33 would have left 0.12 s of shot)."""
    path = tmp_path / "tail.mp4"
    write_video(
        path, [Shot("astronaut", 1.3, "still"), Shot("coffee", 4.15, "pan")], size=(160, 96)
    )
    settings = VideoSettings(segments=SegmentSettings(window_s=2.0))
    result = analyze_video(path, embedder, owner=OWNER, media_dir=tmp_path, settings=settings)
    windows = [(s.shot, s.window, round(s.start_s, 3)) for s in result.scenes]
    # 1.333 + 2 = 3.333: the clock's tick is 3.5, its first analysed frame 53/15 s
    assert windows == [(0, 0, 0.0), (1, 0, 1.333), (1, 1, 3.533)]
    assert result.scenes[-1].metadata["video"]["starts_at"] == "window"
    last = result.scenes[-1]
    assert all(last.start_s <= c["time_s"] < last.end_s for c in last.metadata["video"]["chosen"])
    assert result.unusable_scenes == 0


@pytest.mark.parametrize(("suffix", "codec"), [(".avi", "mpeg4"), (".webm", "libvpx-vp9")])
def test_other_codecs_and_containers(tmp_path, embedder, suffix, codec):
    path = tmp_path / f"clip{suffix}"
    shots = SHOTS[:5]
    truth = write_video(path, shots, size=(192, 108), codec=codec, bit_rate=800_000)
    result = analyze_video(path, embedder, owner=OWNER, media_dir=tmp_path)
    assert hard_cut_f1(starts_of(result), truth, tolerance_s=2 / FPS) >= 0.95
    assert result.info.codec in {"mpeg4", "vp9", "libvpx-vp9"}
    # 15 of 30 frames a second, whether timestamps are frame counts (AVI) or rounded
    # milliseconds (WebM)
    decoded = result.decode.frames_decoded
    assert result.decode.frames_analysed == (decoded + 1) // 2


def _rotate_like_a_phone(path: Path) -> None:
    """Give an MP4's video track the display matrix [0 1; -1 0] of a phone held upright:
    players (and ffprobe's "rotation of -90 degrees") turn it 90 degrees clockwise."""
    data = bytearray(path.read_bytes())
    tkhd = data.find(b"tkhd")
    version = data[tkhd + 4]
    matrix = tkhd + 4 + 4 + (8 if version == 0 else 16) + 4 + 4 + (4 if version == 0 else 8) + 8 + 8
    assert struct.unpack(">9i", data[matrix : matrix + 36])[0] == 65536  # identity before
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))


def test_odd_size_and_rotation_metadata(tmp_path, embedder, photos):
    path = tmp_path / "odd.mp4"
    truth = write_video(
        path,
        [Shot("astronaut", 1.0, "still"), Shot("coffee", 1.0, "still")],
        size=(1279, 719),
        pix_fmt="yuv444p",
    )
    _rotate_like_a_phone(path)
    result = analyze_video(path, embedder, owner=OWNER, media_dir=tmp_path)
    assert len(result.scenes) == 2 and len(truth.cuts) == 1
    assert (result.info.width, result.info.height) == (1279, 719)
    frame = Image.open(result.scenes[0].frame_path).convert("L")
    assert frame.size[1] == 640 and frame.size[0] in (359, 360)  # upright: portrait
    view = _still_view(photos, "astronaut", (1279, 719))

    def gray(rgb: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(rgb).convert("L").resize((360, 640)), np.float32)

    seen = np.asarray(frame.resize((360, 640)), np.float32)
    clockwise, counter = gray(np.rot90(view, k=-1)), gray(np.rot90(view, k=1))
    assert np.abs(seen - clockwise).mean() < 0.5 * np.abs(seen - counter).mean()


def _still_view(photos, name: str, size: tuple[int, int]) -> np.ndarray:
    from heimdex_clip_export.video_samples import _view

    photo = np.asarray(dict(photos)[name])
    return _view(photo, size, 0.0, "still", np.random.default_rng(0))


def test_variable_frame_rate_times_come_from_timestamps(tmp_path, embedder):
    path = tmp_path / "vfr.mp4"
    truth = write_video(path, SHOTS[:4], size=(160, 96), variable_rate=True)
    gaps = np.diff(truth.frame_times)
    assert gaps.max() > 1.5 * gaps.min()  # really variable
    result = analyze_video(path, embedder, owner=OWNER, media_dir=tmp_path)
    assert hard_cut_f1(starts_of(result), truth, tolerance_s=2 * gaps.max()) >= 0.95
    for scene, (_, start, _) in zip(result.scenes, truth.shots, strict=True):
        assert scene.start_s == pytest.approx(start, abs=1e-6)


# ------------------------------------------------------------------ hostile files


def _analyze(path, embedder, tmp_path, **config) -> None:
    if config:
        embedder = ClipEmbedder(
            config=ClipConfig(pretrained="none", model_dir=embedder.artifact_dir, **config)
        )
    analyze_video(path, embedder, owner=OWNER, media_dir=tmp_path / "media")


def _no_frames_written(tmp_path) -> bool:
    media = tmp_path / "media"
    return not media.exists() or not any(p.is_file() for p in media.rglob("*"))


def test_not_a_video_empty_and_missing(tmp_path, embedder):
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    (tmp_path / "empty.mp4").write_bytes(b"")
    cases = {
        "notes.mp4": "not a readable video",
        "empty.mp4": "empty file",
        "missing.mp4": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(VideoError, match=message) as err:
            _analyze(tmp_path / name, embedder, tmp_path)
        assert "\n" not in str(err.value)
    assert _no_frames_written(tmp_path)


def test_truncated_file_is_one_clear_error(made, tmp_path, embedder):
    data = made[0].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end
    with pytest.raises(VideoError, match=r"cut\.mp4") as err:
        _analyze(tmp_path / "cut.mp4", embedder, tmp_path)
    assert "\n" not in str(err.value)
    assert _no_frames_written(tmp_path)


def test_audio_only_and_zero_frames(tmp_path, embedder):
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        samples = (np.sin(np.arange(8000) / 5) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    with pytest.raises(VideoError, match="no video stream"):
        _analyze(audio, embedder, tmp_path)
    empty = tmp_path / "zero.avi"
    with av.open(str(empty), "w") as out:  # a header with a video stream, and no frame
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()
    with av.open(str(empty)) as check:
        assert check.streams.video[0].codec_context.width == 64
    with pytest.raises(VideoError, match=r"zero\.avi: no decodable video frames"):
        _analyze(empty, embedder, tmp_path)
    assert _no_frames_written(tmp_path)


def test_unsupported_codec(made, tmp_path, embedder):
    data = bytearray(made[0].read_bytes())
    at = data.find(b"avc1", data.find(b"stsd"))  # the sample entry, not the ftyp brand
    assert at > data.find(b"stsd") > 0
    data[at : at + 4] = b"zzzz"  # a sample entry no decoder knows
    (tmp_path / "odd_codec.mp4").write_bytes(bytes(data))
    with pytest.raises(VideoError, match=r"odd_codec\.mp4") as err:
        _analyze(tmp_path / "odd_codec.mp4", embedder, tmp_path)
    assert "\n" not in str(err.value)
    assert _no_frames_written(tmp_path)


def test_frames_over_the_pixel_limit_are_refused_before_decoding(made, tmp_path, embedder):
    with pytest.raises(VideoError, match="exceed the limit of 10000"):
        _analyze(made[0], embedder, tmp_path, max_image_pixels=10_000)
    assert _no_frames_written(tmp_path)


def test_a_million_tiny_frames_cost_bounded_analysis(tmp_path, embedder, photos):
    path = tmp_path / "tiny.mkv"
    tiny = [np.asarray(p.resize((32, 32))) for _, p in photos[:2]]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=1000)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3000):  # 3 s at 1000 frames a second, one cut in the middle
            frame = av.VideoFrame.from_ndarray(tiny[i >= 1500], format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    result = analyze_video(path, embedder, owner=OWNER, media_dir=tmp_path)
    report = result.report()
    assert report["frames_decoded"] == 3000
    assert report["frames_analysed"] <= 3 * VideoSettings().max_analysis_fps + 1
    assert [round(s.start_s, 1) for s in result.scenes] == [0.0, 1.5]


@pytest.mark.parametrize(
    ("suffix", "codec", "x264_params"),
    [
        # B-frames in open GOPs: an I-frame's leading B-frames refer to the GOP before
        (".mp4", "libx264", "open-gop=1:keyint=20:min-keyint=20:bframes=3:scenecut=0"),
        (".webm", "libvpx-vp9", None),  # Matroska's cues
    ],
)
def test_pieces_stitch_exactly_on_open_gops_and_webm(
    tmp_path, embedder, suffix, codec, x264_params
):
    path = tmp_path / f"gop{suffix}"
    write_video(path, SHOTS[:6], size=(192, 108), codec=codec, x264_params=x264_params)
    runs = {
        threads: analyze_video(
            path,
            embedder,
            owner=OWNER,
            media_dir=tmp_path / str(threads),
            settings=VideoSettings(threads=threads),
        )
        for threads in (1, 2)
    }
    one, pieces = runs[1], runs[2]
    assert one.decode.pieces == 1 and pieces.decode.pieces > 1
    assert pieces.decode.frames_decoded == one.decode.frames_decoded
    assert pieces.decode.frames_analysed == one.decode.frames_analysed
    assert [(s.start_s, s.end_s) for s in pieces.scenes] == [
        (s.start_s, s.end_s) for s in one.scenes
    ]
    for a, b in zip(one.scenes, pieces.scenes, strict=True):
        assert a.metadata["video"]["chosen"] == b.metadata["video"]["chosen"]


def test_decoders_stay_at_most_threads_plus_one_pieces_ahead_of_a_slow_consumer(made):
    """However slow the consumer, at most ``threads + 1`` pieces are decoded or waiting:
    what the decoder threads hold does not grow with the video's length."""
    import time
    from typing import NamedTuple

    from heimdex_clip.video.decode import DecodeStats, analysed_frames, open_video

    class Item(NamedTuple):
        time_s: float
        piece: int

    started: list[int] = []
    lock = threading.Lock()

    def analyser(_stats: DecodeStats):
        with lock:
            piece = len(started)
            started.append(piece)
        return lambda frame, time_s: Item(time_s, piece)

    threads, stats, seen, ahead = 2, DecodeStats(), [], []
    container, info = open_video(made[0], max_pixels=64_000_000)
    with container:
        for item in analysed_frames(
            container,
            info,
            stats,
            threads=threads,
            max_pixels=64_000_000,
            max_analysis_fps=15,
            analyser=analyser,
        ):
            if not seen or seen[-1] != item.piece:
                seen.append(item.piece)
            # pieces before the one being read are done and their room given back
            ahead.append(len(started) - (len(seen) - 1))
            time.sleep(0.002)
    assert stats.pieces >= 5 and len(seen) == stats.pieces == len(started)
    assert 2 <= max(ahead) <= threads + 1


def test_a_failure_mid_video_stops_the_decoder_threads(made, embedder, tmp_path, monkeypatch):
    """An error while the pieces are decoded (here the detector's, after 40 frames) is
    raised, nothing is left behind, and no decoder thread goes on."""
    import threading

    from heimdex_clip.video import cuts

    real, calls = cuts.CutDetector.push, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) > 40:
            raise RuntimeError("detector broke")
        return real(self, *args)

    monkeypatch.setattr(cuts.CutDetector, "push", failing)
    with pytest.raises(RuntimeError, match="detector broke"):
        analyze_video(made[0], embedder, owner=OWNER, media_dir=tmp_path)
    assert not any(t.name.startswith("heimdex-video-decode") for t in threading.enumerate())
    assert not any(tmp_path.rglob("*.jpg"))


def test_a_corrupt_middle_keeps_the_readable_scenes_and_says_what_it_skipped(
    made, tmp_path, embedder
):
    data = bytearray(made[0].read_bytes())
    mdat = data.find(b"mdat")
    size = struct.unpack(">I", data[mdat - 4 : mdat])[0]
    middle = mdat + size // 2
    rng = np.random.default_rng(7)
    data[middle : middle + 20_000] = rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(bytes(data))
    result = analyze_video(path, embedder, owner=OWNER, media_dir=tmp_path / "media")
    report = result.report()
    assert report["corrupt_packets"] > 0 and report["skipped_ranges_s"]
    assert report["pieces"] > 1
    assert len(result.scenes) >= len(SHOTS) // 2


@pytest.mark.parametrize(("size", "pix_fmt"), [((320, 180), "yuv420p"), ((161, 91), "yuv444p")])
def test_detection_planes_match_ffmpegs_area_scaler(tmp_path, size, pix_fmt):
    from heimdex_clip.video.decode import ANALYSIS_SIZE, small_planes

    path = tmp_path / "planes.mp4"
    write_video(path, [Shot("astronaut", 0.2, "pan")], size=size, pix_fmt=pix_fmt)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        ours = small_planes(frame).astype(np.float32)
        scaled = frame.reformat(
            width=ANALYSIS_SIZE[0], height=ANALYSIS_SIZE[1], format="yuv444p", interpolation="AREA"
        ).to_ndarray()
    assert ours.shape == (3, ANALYSIS_SIZE[1], ANALYSIS_SIZE[0])
    assert np.abs(ours - scaled).mean() < 4.0  # of 255: the same picture, other sampling


def test_detection_histograms_are_numpys_bins_of_v_over_255():
    from heimdex_clip.video.cuts import _BINS, CutSettings, frame_features

    small = np.arange(3 * 36 * 64, dtype=np.int64).reshape(3, 36, 64)
    small = ((small * 7919) % 256).astype(np.uint8)  # every value, edges 15/16, 239/240, 255
    feat = frame_features(small, CutSettings())
    expected = np.concatenate(
        [np.histogram(p / 255.0, bins=_BINS, range=(0.0, 1.0))[0] for p in small]
    ) / float(small[0].size)
    assert feat.hist.dtype == np.float32
    np.testing.assert_array_equal(feat.hist, expected.astype(np.float32))


def test_the_model_gets_the_cores_the_decoder_leaves():
    from heimdex_clip.video.pipeline import model_threads

    assert model_threads(2, cores=2) == 1
    assert model_threads(2, cores=8) == 6
    assert model_threads(4, cores=2) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priority is Linux's")
def test_the_model_thread_yields_the_cores_to_the_decoder(made, artifact_dir, tmp_path):
    """The model thread runs at Linux's lowest priority (nice 19, its own thread and the
    threads it starts only): the caller's priority is untouched."""
    seen: list[int] = []

    class Observed(ClipEmbedder):
        def embed_scenes(self, *args, **kwargs):
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return super().embed_scenes(*args, **kwargs)

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    observed = Observed(config=ClipConfig(pretrained="none", model_dir=artifact_dir)).load()
    result = analyze_video(made[0], observed, owner=OWNER, media_dir=tmp_path)
    assert result.scenes and seen
    assert set(seen) == {19}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
