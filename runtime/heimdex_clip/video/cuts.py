"""Scene-cut detection on small YUV frames: hard cuts, dissolves, and fades through black.

Each frame is compared with the one before as a *content distance* in [0, 1]: half the
mean absolute pixel change of the Y, U and V planes (64x36), half the change of their
histograms. Pixel change alone fires on pans and zooms, histogram change alone misses two
shots of similar colours; together a cut scores high on both and motion on one.

* **Hard cut** before frame t: its distance is at least ``min_cut`` and ``cut_ratio``
  times the mean distance of the ``window`` frames on either side (the adaptive rule of
  PySceneDetect's AdaptiveDetector: steady camera motion raises the neighbours too).
* **Dissolve**: the distance between frame t and the frame ``gradual_s`` earlier peaks
  above ``min_gradual``, the frame halfway between is their blend (its difference from the
  two frames' mean is below ``max_blend_residual`` of their difference: a pan or a zoom is
  not a blend), and no hard cut is nearby; the cut goes at the midpoint.
* **Black**: a frame whose mean luma is below ``black_luma`` and nearly uniform. Black
  frames belong to no scene: a fade to black ends a scene at its first black frame and the
  next scene starts at the first frame that is not black (so a black intro is no scene).

Decisions lag the input by ``lag`` frames (the window after a frame); memory is bounded
by that lag, never by the video's length.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

_BINS = 16  # histogram bins of each plane (uint8 >> 4)
_LUMA_EPS = 0.01  # luma jitter tolerated on a fade's ramp
_RAMP_STEP = 0.002  # the least a fade in brightens a frame


@dataclass(frozen=True)
class CutSettings:
    """The detector's settings (stored with every scene it cut)."""

    min_cut: float = 0.06
    cut_ratio: float = 3.0
    window: int = 2
    gradual_s: float = 0.5
    min_gradual: float = 0.15
    max_blend_residual: float = 0.3
    black_luma: float = 0.08
    black_std: float = 0.04
    min_scene_s: float = 0.4

    def as_dict(self) -> dict:
        # v2: cells of 2 rows of 8 points (v1: 4 of 4), the same rules.
        return {"detector": "heimdex-content-v2", **asdict(self)}


@dataclass(frozen=True)
class Decision:
    """One frame's verdict: black or not, and whether a new scene starts at it."""

    index: int
    time_s: float
    black: bool
    cut: bool
    luma: float


@dataclass
class Features:
    """What the detector compares of one frame (made by :func:`frame_features`)."""

    planes: np.ndarray  # float32 [3, h, w] in [0, 1]
    hist: np.ndarray  # float32 [3 * _BINS], each plane's histogram summing to 1
    luma: float
    black: bool
    index: int = -1
    time_s: float = 0.0
    distance: float = 0.0  # to the previous frame
    gradual: float = 0.0  # histogram distance to the frame gradual_s earlier


def frame_features(small: np.ndarray, settings: CutSettings) -> Features:
    """A frame's features from its small uint8 YUV planes [3, h, w]."""
    planes = small.astype(np.float32) / 255.0
    # 16 equal bins of [0, 1] over v / 255: bin v >> 4 (exactly np.histogram's bins).
    bins = (small.reshape(3, -1) >> 4) + np.arange(0, 3 * _BINS, _BINS, dtype=np.uint8)[:, None]
    hist = np.bincount(bins.ravel(), minlength=3 * _BINS).astype(np.float32) / planes[0].size
    luma = float(planes[0].mean())
    black = luma < settings.black_luma and float(planes[0].std()) < settings.black_std
    return Features(planes, hist, luma, black)


class StartWatch:
    """Whether a frame may start a scene, known as it is decoded (the detector decides
    ``lag`` frames later): the decoder threads make pictures only of such frames and of
    the candidate clock's. A frame may start a scene after black, or at a jump: its
    distance to the frame before reaches ``min_cut`` and ``cut_ratio`` times the mean the
    adaptive rule would take if the frames after it did not move at all. A piece of the
    video starts without the frames before it, so its first ``window + 2`` frames may
    always start one. A dissolve's midpoint cannot be told yet."""

    def __init__(self, settings: CutSettings) -> None:
        self.settings = settings
        self._last: Features | None = None
        self._distances: deque[float] = deque(maxlen=settings.window)
        self._seen = 0

    def push(self, feat: Features) -> bool:
        s, last = self.settings, self._last
        self._seen += 1
        self._last = feat
        if last is None:
            return True
        distance = _distance(last, feat)
        past = sum(self._distances)
        self._distances.append(distance)
        if self._seen <= s.window + 2 or (last.black and not feat.black):
            return True
        return distance >= max(s.min_cut, s.cut_ratio * past / (2 * s.window) - 1e-9)


class CutDetector:
    """Feed frames with :meth:`push`, collect :class:`Decision` s in order; :meth:`finish`
    flushes the last ones."""

    def __init__(self, settings: CutSettings, fps: float) -> None:
        self.settings = settings
        self.span = max(2, round(settings.gradual_s * fps))  # frames back for dissolves
        self.lag = max(settings.window, 2 * self.span)  # a dissolve's peak and its span
        self._frames: deque[Features] = deque()  # the last span + lag + window frames
        self._last_cut_s: float | None = None
        self._ramp: tuple[float, float] | None = None  # since a black frame: (time, luma)

    def push(self, index: int, time_s: float, frame: np.ndarray | Features) -> list[Decision]:
        """Add one frame (uint8 YUV [3, h, w], or its :func:`frame_features`); returns the
        decisions now final."""
        feat = frame if isinstance(frame, Features) else frame_features(frame, self.settings)
        feat.index, feat.time_s = index, time_s
        if self._last_cut_s is None:  # the first frame starts the first scene
            self._last_cut_s = time_s
        if self._frames:
            prev = self._frames[-1]
            feat.distance = _distance(prev, feat)
        if len(self._frames) >= self.span:
            feat.gradual = self._blend_distance(
                self._frames[-self.span], self._frames[-(self.span // 2)], feat
            )
        self._frames.append(feat)
        decided = []
        position = len(self._frames) - 1 - self.lag
        if position >= 0:
            decided.append(self._decide(position))
        while len(self._frames) > self.span + self.lag + self.settings.window + 1:
            self._frames.popleft()
        return decided

    def finish(self) -> list[Decision]:
        """The decisions of the frames still inside the look-ahead window."""
        count = len(self._frames)
        start = max(0, count - self.lag) if count > self.lag else 0
        return [self._decide(p) for p in range(start, count)]

    def _blend_distance(self, a: Features, middle: Features, b: Features) -> float:
        """a-to-b distance if ``middle`` is their blend (a dissolve), else 0."""
        change = float(np.abs(a.planes - b.planes).mean())
        if change < 1e-3:
            return 0.0
        residual = float(np.abs(middle.planes - 0.5 * (a.planes + b.planes)).mean())
        return _distance(a, b) if residual < self.settings.max_blend_residual * change else 0.0

    def _decide(self, position: int) -> Decision:
        frames, s = self._frames, self.settings
        f = frames[position]
        cut = False
        if position > 0 and not f.black and not frames[position - 1].black:
            cut = self._hard_cut(position) or self._gradual_cut(position)
        if cut and f.time_s - (self._last_cut_s or 0.0) < s.min_scene_s:
            cut = False
        if cut and (self._fading_out(position) or self._fading_in(f)):
            cut = False  # a fade's ramp: the black frames end or start the scene
        if cut or f.black:  # black frames are boundaries too
            self._last_cut_s = f.time_s
        if f.black:
            self._ramp = (f.time_s, f.luma)
        elif self._ramp is not None:
            # A fade in brightens every frame; a steady shot ends the ramp.
            rising = f.luma > self._ramp[1] + _RAMP_STEP and f.time_s - self._ramp[0] < 2.0
            self._ramp = (self._ramp[0], f.luma) if rising else None
        return Decision(f.index, f.time_s, f.black, cut, f.luma)

    def _fading_out(self, position: int) -> bool:
        """Whether the frames from ``position`` on darken steadily into a black frame."""
        first = self._frames[position]
        start = luma = first.luma
        for g in itertools.islice(self._frames, position + 1, None):
            if g.black:  # a ramp (it halved on the way), or too short to be a scene
                return luma < 0.5 * start or g.time_s - first.time_s < self.settings.min_scene_s
            if g.luma > luma + _LUMA_EPS:
                return False
            luma = g.luma
        return False

    def _fading_in(self, f: Features) -> bool:
        """Whether ``f`` is still on the steady brightening that followed a black frame."""
        return self._ramp is not None and f.luma > self._ramp[1] + _RAMP_STEP

    def _hard_cut(self, position: int) -> bool:
        frames, s = self._frames, self.settings
        d = frames[position].distance
        if d < s.min_cut:
            return False
        around = [
            frames[p].distance
            for p in range(position - s.window, position + s.window + 1)
            if p != position and 0 < p < len(frames)
        ]
        return not around or d >= s.cut_ratio * (sum(around) / len(around)) - 1e-9

    def _gradual_cut(self, position: int) -> bool:
        """A dissolve's midpoint: ``position`` is span/2 frames after the peak's end."""
        frames, s = self._frames, self.settings
        half = self.span // 2
        peak = position + half
        if peak >= len(frames) or frames[peak].gradual < s.min_gradual:
            return False
        lo, hi = max(0, peak - self.span), min(len(frames), peak + self.span + 1)
        if any(frames[p].gradual > frames[peak].gradual for p in range(lo, hi)):
            return False
        if any(frames[p].gradual == frames[peak].gradual for p in range(lo, peak)):
            return False  # a plateau: its first frame is the peak
        # A hard cut inside the span explains the change, and a fade through black is cut
        # at its black frames: no second cut for either.
        near = range(max(1, peak - self.span), min(len(frames), peak + self.span + 1))
        return not any(frames[p].black or (p <= peak and self._hard_cut(p)) for p in near)


def _hist_distance(a: Features, b: Features) -> float:
    return float(np.abs(a.hist - b.hist).sum()) / 6.0  # three planes, L1 of each <= 2


def _distance(a: Features, b: Features) -> float:
    pixels = float(np.abs(a.planes - b.planes).mean())
    return 0.5 * min(1.0, pixels * 4.0) + 0.5 * _hist_distance(a, b)
