"""The evaluation set and the figures the export gates on.

Real photographs shipped inside scikit-image (no downloads) plus deterministic crops and
flips of them: enough distinct images (>= 100) for nearest-neighbour agreement to mean
something.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

#: scikit-image's real photographs (drawings, masks and synthetic images left out).
PHOTO_NAMES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
CROPS_PER_PHOTO = 5
#: Calibration crops come from another random stream than the evaluation crops.
CALIBRATION_SEED = 1
CALIBRATION_CROPS_PER_PHOTO = 2

#: A function from a float32 [N, 3, S, S] batch to unit-norm embeddings [N, D].
EmbedFn = Callable[[np.ndarray], np.ndarray]


def sample_photos() -> list[tuple[str, Image.Image]]:
    """The photographs as RGB PIL images, with their names."""
    from skimage import data

    photos = [(name, Image.fromarray(getattr(data, name)()).convert("RGB")) for name in PHOTO_NAMES]
    left, right, _ = data.stereo_motorcycle()
    photos += [
        ("motorcycle_left", Image.fromarray(left)),
        ("motorcycle_right", Image.fromarray(right)),
    ]
    return photos


def _crops(photo: Image.Image, rng: np.random.Generator, count: int) -> list[Image.Image]:
    """``count`` random crops (35-80% of each side, some mirrored) of ``photo``."""
    crops = []
    w, h = photo.size
    for _ in range(count):
        cw, ch = int(w * rng.uniform(0.35, 0.8)), int(h * rng.uniform(0.35, 0.8))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.3:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(crop)
    return crops


def evaluation_images(seed: int = 0, crops_per_photo: int = CROPS_PER_PHOTO) -> list[Image.Image]:
    """Every photograph plus ``crops_per_photo`` random crops (some mirrored) of each."""
    rng = np.random.default_rng(seed)
    images = []
    for _, photo in sample_photos():
        images.append(photo)
        images += _crops(photo, rng, crops_per_photo)
    return images


def calibration_images(
    crops_per_photo: int = CALIBRATION_CROPS_PER_PHOTO, seed: int = CALIBRATION_SEED
) -> list[Image.Image]:
    """Crops only (other windows than the evaluation set's), for quantization calibration."""
    rng = np.random.default_rng(seed)
    return [crop for _, photo in sample_photos() for crop in _crops(photo, rng, crops_per_photo)]


def embed_batched(embed: EmbedFn, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [embed(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    )


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (explicitly normalised: no trust in the inputs)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 5) -> float:
    """Mean overlap of each image's k nearest neighbours (itself excluded) in both spaces."""

    def neighbours(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    ref_nn, cand_nn = neighbours(reference), neighbours(candidate)
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(ref_nn, cand_nn, strict=True)]))


@dataclass(frozen=True)
class Agreement:
    """How closely one model's embeddings follow a reference's on the same pixels."""

    images: int
    mean_cosine: float
    min_cosine: float
    top5_agreement: float

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    cos = row_cosines(reference, candidate)
    return Agreement(
        images=len(cos),
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        top5_agreement=topk_agreement(reference, candidate),
    )


def batch_invariance(embed: EmbedFn, pixels: np.ndarray, batch_size: int = 32) -> float:
    """Min cosine between each image embedded alone and inside one batch of ``batch_size``.

    Dynamic quantization picks one activation scale per tensor, so batch-mates can move an
    image's embedding; this measures by how much.
    """
    batch = pixels[:batch_size]
    together = embed(batch)
    alone = np.concatenate([embed(batch[i : i + 1]) for i in range(len(batch))])
    return float(row_cosines(alone, together).min())


def check_min(name: str, value: float, minimum: float, failures: list[str]) -> None:
    if not value >= minimum:  # also catches NaN
        failures.append(f"{name} = {value:.6f} < required {minimum}")
