"""From the detector's decisions to scenes: boundaries, windows and candidate frames.

A *shot* runs from one cut (or the end of a black stretch) to the next cut (or the start
of a black stretch). A shot longer than ``window_s`` is split into windows of that length,
each its own scene row, so a long shot is found by its later content too.

A window ends at the first tick of the candidate clock ``window_s`` or more after its
start, so every window starts on the clock (a shot's last window is at least a clock
step long) or at a cut.

Candidate frames are sampled on the video's clock, ``candidate_fps`` times a second of
video time (:class:`.clock.FrameClock`), and a window's first frame when it has a picture
(a start at a hard cut, after black, or on the clock; not mid-dissolve), scored
(:mod:`.quality`) and the best ``max_candidates`` kept. The clock runs on the video's
time, not the window's, so whether a frame is a candidate is known as it is decoded: the
decoder threads make pictures of those frames and of possible scene starts only, and give
every decoded frame back at once (holding a second of decoded 1080p frames slowed decoding
by a sixth). When a window closes, the candidates are ranked: black and blank frames never
count; a frame darker than ``fade_ratio`` times the window's brightest is mid-fade and
only used if nothing else is; frames within ``edge_guard_s`` of a cut or fade (a
dissolve's blend) come after the rest.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .cuts import Decision
from .quality import FrameQuality

_EPS_S = 1e-6  # timestamps are sums of fractions: 5.333 - 3.333 may fall short of 2.0


@dataclass(frozen=True)
class SegmentSettings:
    window_s: float = 10.0
    candidate_fps: float = 2.0
    max_candidates: int = 8
    fade_ratio: float = 0.7
    edge_guard_s: float = 0.3


class Picture(NamedTuple):
    """A frame's upright RGB picture (uint8 [H, W, 3]) and its quality scores."""

    rgb: np.ndarray
    quality: FrameQuality


@dataclass(order=True)
class Candidate:
    score: float
    time_s: float = field(compare=False)
    quality: FrameQuality = field(compare=False)
    rgb: np.ndarray = field(compare=False, repr=False)


@dataclass
class Segment:
    """One scene row to be: a window of a shot, its times and its ranked candidates."""

    index: int
    shot: int
    window: int
    start_s: float
    end_s: float = 0.0
    starts_at: str = "start"  # start | cut | black | window
    ends_at: str = "end"  # cut | black | window | end
    frames: int = 0
    max_luma: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)  # a min-heap by score

    def ranked(self, guard_s: float, fade_ratio: float) -> list[Candidate]:
        """Usable candidates, best first (see the module docstring)."""

        def near_edge(c: Candidate) -> bool:
            return (self.starts_at in ("cut", "black") and c.time_s - self.start_s < guard_s) or (
                self.ends_at in ("cut", "black") and self.end_s - c.time_s < guard_s
            )

        def key(c: Candidate) -> tuple:
            faded = c.quality.luma < fade_ratio * self.max_luma
            return (not faded, not near_edge(c), c.score)

        return sorted((c for c in self.candidates if c.quality.usable), key=key, reverse=True)


class Segmenter:
    """Feed :class:`Decision` s (with whether the frame ticked the candidate clock, and
    its picture if it has one) in order; closed segments come out of :meth:`add` and
    :meth:`finish`."""

    def __init__(self, settings: SegmentSettings) -> None:
        self.settings = settings
        self._open: Segment | None = None
        self._indices = itertools.count()
        self._shot = -1
        self._window = 0
        self._last_time = 0.0
        self._last_gap = 0.0
        self._pending_start = "start"  # how the next segment starts

    def add(
        self,
        decision: Decision,
        on_clock: bool,
        picture: Picture | None,
    ) -> list[Segment]:
        """Place one frame; ``picture`` is None when the frame has none (it can then be
        no candidate)."""
        s, t, closed = self.settings, decision.time_s, []
        if t > self._last_time:
            self._last_gap = t - self._last_time
        self._last_time = t
        seg = self._open
        if decision.black:
            if seg is not None:
                closed.append(self._close(t, "black"))
            self._pending_start = "black"
            return closed
        if seg is not None and decision.cut:
            closed.append(self._close(t, "cut"))
            self._pending_start = "cut"
        elif seg is not None and on_clock and t - seg.start_s >= s.window_s - _EPS_S:
            closed.append(self._close(t, "window"))
            self._pending_start = "window"
        if self._open is None:
            new_shot = self._pending_start != "window"
            self._shot += new_shot
            self._window = 0 if new_shot else self._window + 1
            self._open = Segment(
                index=next(self._indices),
                shot=self._shot,
                window=self._window,
                start_s=t,
                starts_at=self._pending_start,
            )
        self._observe(self._open, decision, on_clock, picture)
        return closed

    def _observe(
        self,
        seg: Segment,
        decision: Decision,
        on_clock: bool,
        picture: Picture | None,
    ) -> None:
        s = self.settings
        seg.frames += 1
        seg.max_luma = max(seg.max_luma, decision.luma)
        if picture is None or not (on_clock or seg.frames == 1):
            return
        if not picture.quality.usable:
            return
        item = Candidate(picture.quality.score, decision.time_s, picture.quality, picture.rgb)
        if len(seg.candidates) < s.max_candidates:
            heapq.heappush(seg.candidates, item)
        elif item.score > seg.candidates[0].score:
            heapq.heapreplace(seg.candidates, item)

    def _close(self, end_s: float, reason: str) -> Segment:
        seg = self._open
        assert seg is not None
        seg.end_s, seg.ends_at = end_s, reason
        self._open = None
        return seg

    def finish(self) -> list[Segment]:
        """Close the open segment at the end of the last frame."""
        if self._open is None:
            return []
        return [self._close(self._last_time + self._last_gap, "end")]
