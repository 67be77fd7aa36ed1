"""What a decoder thread makes of each analysed frame, before the frame goes back to the
decoder: the small planes and the cut detector's features, and an upright picture with
its quality scores for the frames that may be needed (on the candidate clock, or a
possible scene start). Runs beside the decoder in each piece of the video
(:func:`.decode.analysed_frames`), so this work is spread over the decoder threads."""

from __future__ import annotations

import time
from dataclasses import dataclass

import av

from .clock import FrameClock
from .cuts import CutSettings, Features, StartWatch, frame_features
from .decode import AnalyserFactory, DecodeStats, Scalers, frame_picture, small_planes
from .quality import frame_quality
from .segments import Picture


@dataclass
class AnalysedFrame:
    """One analysed frame: its time, the detector's features, and its picture if kept."""

    time_s: float
    features: Features
    picture: Picture | None


@dataclass(frozen=True)
class PictureRules:
    """Which frames get a picture, and how large."""

    cuts: CutSettings
    candidate_fps: float
    clock_slack_s: float
    long_side: int

    def analyser(self) -> AnalyserFactory[AnalysedFrame]:
        """A fresh :class:`FrameAnalyser` for each piece of the video."""
        return lambda stats: FrameAnalyser(self, stats)


class FrameAnalyser:
    """One piece's frames, in order. Its candidate clock and scene-start watch start
    afresh with the piece; the video's clock may tick on the piece's second frame where
    this one ticked on the first, and the watch keeps the first ``window + 2`` frames'
    pictures for that reason among others (:class:`.cuts.StartWatch`)."""

    def __init__(self, rules: PictureRules, stats: DecodeStats) -> None:
        self.rules, self.stats = rules, stats
        self._scalers = Scalers()
        self._clock = FrameClock(rules.candidate_fps, rules.clock_slack_s)
        self._starts = StartWatch(rules.cuts)

    def __call__(self, frame: av.VideoFrame, time_s: float) -> AnalysedFrame:
        stats, started = self.stats, time.perf_counter()
        small = small_planes(frame, self._scalers.small)
        scaled = time.perf_counter()
        features = frame_features(small, self.rules.cuts)
        may_start = self._starts.push(features)
        on_clock = self._clock.tick(time_s)
        done = time.perf_counter()
        stats.scale_s += scaled - started
        stats.features_s += done - scaled
        picture = None
        if (on_clock or may_start) and not features.black:  # black frames are no candidate
            rgb = frame_picture(frame, self.rules.long_side, self._scalers.picture)
            pictured = time.perf_counter()
            quality = frame_quality(rgb, black_luma=self.rules.cuts.black_luma)
            stats.picture_s += pictured - done
            stats.quality_s += time.perf_counter() - pictured
            picture = Picture(rgb, quality)
        return AnalysedFrame(time_s, features, picture)
