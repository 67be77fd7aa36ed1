"""A rate limit on video time: which frames of a stream to take, at most ``fps`` a second.

Both the analysis rate (:func:`.decode.analysed_frames`) and the candidate pictures
(:mod:`.segments`) take "the first frame at or after each 1/fps seconds of video time".
Timestamps are often rounded (WebM and Matroska count whole milliseconds: 30 fps is
0, 33, 67, 100 ms), so a frame up to ``slack_s`` early still counts as on time;
otherwise 100 ms would miss the tick at 100.0 and every third frame would be dropped.
"""

from __future__ import annotations

import math

#: The slack both clocks of a video run use: a tenth of the analysis period, far above
#: millisecond rounding and far below a frame of the analysed rate.
SLACK_OF_ANALYSIS_PERIOD = 0.1


class FrameClock:
    """Ticks on the first frame at or after each 1/``fps`` seconds of video time (``slack_s``
    early counts). Frames are fed in presentation order, each once."""

    def __init__(self, fps: float, slack_s: float) -> None:
        if not fps > 0 or not 0 <= slack_s < 0.5 / fps:
            raise ValueError(
                f"a frame clock needs fps > 0 and slack below half a period: {fps}, {slack_s}"
            )
        self.period = 1.0 / fps
        self.slack_s = slack_s
        self._next_s = -math.inf

    def tick(self, time_s: float) -> bool:
        """Whether the frame at ``time_s`` is taken."""
        if time_s < self._next_s - self.slack_s:
            return False
        self._next_s = (math.floor((time_s + self.slack_s) / self.period) + 1) * self.period
        return True


def analysis_slack(max_analysis_fps: float) -> float:
    """The slack of a run analysing at most ``max_analysis_fps`` frames a second."""
    return SLACK_OF_ANALYSIS_PERIOD / max_analysis_fps
