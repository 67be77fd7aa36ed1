"""Video in, scenes out: ``pip install 'heimdex-clip[video]'`` (PyAV).

Imported only when a video is indexed: ``import heimdex_clip`` never imports PyAV.
:func:`analyze_video` cuts a video into scenes and embeds them (no database);
:func:`heimdex_clip.db.videos.index_video` also stores them. See docs/video.md.
"""

from .cuts import CutSettings
from .decode import VideoError, VideoInfo
from .pipeline import (
    SceneResult,
    VideoAnalysis,
    VideoSettings,
    analyze_video,
    content_hash,
    video_id_for,
)
from .segments import SegmentSettings

__all__ = [
    "CutSettings",
    "SceneResult",
    "SegmentSettings",
    "VideoAnalysis",
    "VideoError",
    "VideoInfo",
    "VideoSettings",
    "analyze_video",
    "content_hash",
    "video_id_for",
]
