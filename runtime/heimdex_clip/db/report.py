"""A self-contained HTML page of search results: the query and the result frames as
thumbnails (inline data URIs), with their similarity. People would rather look.

Frames are opened through the runtime's safe loader (:func:`heimdex_clip.images.load_image`)
with the configured pixel limit, so a result frame replaced by a FIFO, a device or a
decompression bomb is shown as missing instead of hanging or crashing the command."""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..config import ClipConfig
from ..errors import ClipError
from ..images import load_image
from .errors import OutputError
from .store import SearchHit

THUMBNAIL = 224


def thumbnail_data_uri(path: str | Path | None, *, max_pixels: int | None = None) -> str | None:
    """A JPEG thumbnail of the frame as a data URI, or None if it cannot be shown.

    ``max_pixels`` defaults to the configured CLIP_MAX_IMAGE_PIXELS.
    """
    if path is None:
        return None
    limit = max_pixels if max_pixels is not None else ClipConfig.from_env().max_image_pixels
    try:
        image = load_image(path, max_pixels=limit, min_side_for_draft=THUMBNAIL)
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=80)
    except (ClipError, OSError, ValueError, MemoryError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(uri: str | None, caption: str) -> str:
    img = f'<img src="{uri}" alt="">' if uri else '<div class="missing">frame unreadable</div>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def _query(label: str, frame: str | Path | None, max_pixels: int | None) -> str:
    """The query's thumbnail, or for a text query (no frame) the text itself."""
    if frame is None:
        return f'<p class="query-text">{html.escape(label)}</p>'
    return _figure(thumbnail_data_uri(frame, max_pixels=max_pixels), html.escape(label))


def _where(hit: SearchHit) -> str:
    """A video scene's video and time range (m:ss.s), or nothing."""
    if hit.video_id is None or hit.start_s is None or hit.end_s is None:
        return ""
    span = f"{_clock(hit.start_s)}–{_clock(hit.end_s)}"
    return f'<br><span class="where">video {str(hit.video_id)[:8]} {span}</span>'


def _clock(seconds: float) -> str:
    minutes, rest = divmod(max(0.0, seconds), 60)
    return f"{int(minutes)}:{rest:04.1f}"


def render_results(
    query_label: str,
    query_frame: str | Path | None,
    hits: Sequence[SearchHit],
    *,
    title: str = "heimdex-clip search",
    warning: str | None = None,
    max_pixels: int | None = None,
) -> str:
    """The page as a string (write it anywhere; it references no other file)."""
    cards = [
        _figure(
            thumbnail_data_uri(h.frame_path, max_pixels=max_pixels),
            f"<b>{h.similarity:.3f}</b><br>{html.escape(Path(h.frame_path or '?').name)}"
            f"{_where(h)}<br><small>{h.id}</small>",
        )
        for h in hits
    ]
    body = "".join(cards) or "<p>No scene above the threshold.</p>"
    banner = f'<p class="warn">{html.escape(warning)}</p>' if warning else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; width: {THUMBNAIL}px; text-align: center; }}
img {{ max-width: {THUMBNAIL}px; max-height: {THUMBNAIL}px; border-radius: 4px; }}
.query img {{ outline: 3px solid #2a7; }}
.query-text {{ font-size: 1.4em; border-left: 4px solid #2a7; padding: .3em .8em; }}
.warn {{ background: #fee; border: 1px solid #c33; padding: .5em; }}
.missing {{ width: {THUMBNAIL}px; height: 120px; background: #eee; line-height: 120px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>{banner}
<h2>Query</h2><div class="grid query">{_query(query_label, query_frame, max_pixels)}</div>
<h2>{len(hits)} result{"s" if len(hits) != 1 else ""}</h2><div class="grid">{body}</div>
</body></html>
"""


def check_page_target(path: str | Path) -> Path:
    """``path`` as a Path if :func:`write_page` may write there, else OutputError (checked
    before a search runs, so a bad target fails fast)."""
    target = Path(path)
    if target.exists() and not target.is_file():
        raise OutputError(f"cannot write the HTML page to {target}: not a regular file")
    if not target.parent.is_dir():
        raise OutputError(
            f"cannot write the HTML page to {target}: folder {target.parent} does not exist"
        )
    return target


def write_page(path: str | Path, page: str) -> None:
    """Write ``page`` to ``path`` whole or not at all: a temporary file beside it, renamed
    over it once fully written, so a full disk or a bad target never leaves a 0-byte or
    half page. The target must be a regular file or not exist yet (a directory, a device
    such as /dev/full, or a FIFO is refused: renaming over it would replace it)."""
    target = check_page_target(path)
    # A query text from a non-UTF-8 terminal carries lone surrogates: shown escaped.
    data = page.encode("utf-8", errors="backslashreplace")
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
        ) as out:
            tmp = out.name
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(
            f"cannot write the HTML page to {target}: {exc.strerror or exc}"
        ) from None
