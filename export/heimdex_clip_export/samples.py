"""Write scikit-image's real photographs (and crops of them) as JPEG frames for the demo.

    python -m heimdex_clip_export.samples OUT_DIR

OUT_DIR/owner_a/ gets the photographs and two crops of each, OUT_DIR/owner_b/ a few of the
same photographs (to show that search never crosses owners), OUT_DIR/query.jpg an unseen
crop of the cat photograph.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from .evaluation import sample_photos


def _crop(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    w, h = image.size
    return image.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))


def write_samples(out: Path) -> None:
    owner_a, owner_b = out / "owner_a", out / "owner_b"
    owner_a.mkdir(parents=True, exist_ok=True)
    owner_b.mkdir(parents=True, exist_ok=True)
    photos = sample_photos()
    for name, photo in photos:
        photo.save(owner_a / f"{name}.jpg", quality=90)
        _crop(photo, (0.0, 0.0, 0.7, 0.7)).save(owner_a / f"{name}_crop1.jpg", quality=90)
        _crop(photo, (0.3, 0.3, 1.0, 1.0)).save(owner_a / f"{name}_crop2.jpg", quality=90)
    for name, photo in photos[::3]:
        photo.save(owner_b / f"{name}.jpg", quality=90)
    cat = dict(photos)["chelsea"]
    _crop(cat, (0.15, 0.1, 0.85, 0.9)).save(out / "query.jpg", quality=90)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    write_samples(Path(args[0]))
    print(f"wrote sample frames to {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
