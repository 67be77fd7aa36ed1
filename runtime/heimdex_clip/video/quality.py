"""How good a candidate frame is: sharpness, exposure, contrast; black and blank refused.

Scores are in [0, 1] and computed on the candidate picture's luma (a few hundred pixels a
side), so a frame costs well under a millisecond. The combined ``quality_score`` is what
ranks a scene's candidates and what ``frame_quality`` records beside the vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Luma weights (BT.601), as the decoder's YUV.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Laplacian variance (luma in [0, 1]) at which sharpness is 1 - 1/e.
_SHARPNESS_SCALE = 0.004


@dataclass(frozen=True)
class FrameQuality:
    """A candidate frame's scores."""

    sharpness: float
    exposure: float
    contrast: float
    luma: float
    black: bool
    blank: bool

    @property
    def usable(self) -> bool:
        """Black and blank frames are never chosen."""
        return not (self.black or self.blank)

    @property
    def score(self) -> float:
        if not self.usable:
            return 0.0
        return 0.5 * self.sharpness + 0.3 * self.exposure + 0.2 * self.contrast

    def as_dict(self) -> dict[str, float]:
        return {
            "quality_score": round(self.score, 4),
            "sharpness": round(self.sharpness, 4),
            "exposure": round(self.exposure, 4),
            "contrast": round(self.contrast, 4),
            "luma": round(self.luma, 4),
        }


def frame_quality(
    rgb: np.ndarray, *, black_luma: float = 0.08, blank_std: float = 0.02
) -> FrameQuality:
    """Score a uint8 RGB [H, W, 3] picture (every other pixel of each axis: a candidate of
    640x360 is scored on 320x180, a quarter of the work)."""
    luma = (rgb[::2, ::2].astype(np.float32) @ _LUMA) / 255.0
    mean, std = float(luma.mean()), float(luma.std())
    # A 4-neighbour Laplacian on the interior: edges and texture, not noise-free flats.
    lap = 4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:]
    sharpness = 1.0 - float(np.exp(-float(lap.var()) / _SHARPNESS_SCALE))
    clipped = float(np.mean((luma < 0.02) | (luma > 0.98)))
    exposure = max(0.0, 1.0 - 2.0 * abs(mean - 0.5) - clipped)
    contrast = min(1.0, std / 0.25)
    return FrameQuality(
        sharpness=sharpness,
        exposure=exposure,
        contrast=contrast,
        luma=mean,
        black=mean < black_luma and std < 0.05,
        blank=std < blank_std,
    )
