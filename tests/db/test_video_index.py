"""index-video on the embedded PostgreSQL: rows, ids, re-indexing, deleting, search with
the video's time range, and bad files that write nothing."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")  # the video extra

from heimdex_clip.cli import main as cli_main  # noqa: E402
from heimdex_clip.db.store import SceneStore  # noqa: E402
from heimdex_clip.db.videos import delete_video, index_video, video_row  # noqa: E402
from heimdex_clip.video import SegmentSettings, VideoSettings  # noqa: E402
from heimdex_clip.video.pipeline import VIDEO_NAMESPACE  # noqa: E402
from heimdex_clip_export.video_samples import Shot, _view, write_video  # noqa: E402

pytestmark = pytest.mark.db

OWNER = uuid.UUID("00000000-0000-4000-a000-0000000000a7")
OTHER = uuid.UUID("00000000-0000-4000-a000-0000000000b7")
SHOTS = [
    Shot("astronaut", 1.5, "pan"),
    Shot("coffee", 1.5, "zoom"),
    Shot("rocket", 1.5, "noise"),
    Shot("chelsea", 1.5, "still", "dissolve"),
    Shot("camera", 1.5, "pan"),
    Shot("brick", 1.5, "still", "fade"),
    Shot("clock", 1.5, "zoom"),
    Shot("moon", 1.5, "pan"),
]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "photos.mp4"
    return path, write_video(path, SHOTS, size=(320, 180), black_intro_s=0.5)


@pytest.fixture(scope="module")
def indexed(module_pool, embedder, video, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    done = index_video(module_pool, embedder, video[0], OWNER, media_dir=media)
    return done, media


def _rows(pool, owner, video_id):
    with pool.connection() as conn:
        return conn.execute(
            "SELECT id, scene_index, start_s, end_s, frame_path, embedding_visual_clip, "
            "visual_clip_artifact, visual_clip_metadata FROM scenes "
            "WHERE owner_id = %s AND video_id = %s ORDER BY scene_index",
            (owner, video_id),
        ).fetchall()


def test_one_row_per_scene_with_times_frames_vectors_and_provenance(
    module_pool, embedder, video, indexed
):
    (path, truth), (done, _) = video, indexed
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert done.status == "indexed"
    assert done.video_id == uuid.uuid5(VIDEO_NAMESPACE, f"sha256:{sha}")
    rows = _rows(module_pool, OWNER, done.video_id)
    assert len(rows) == done.scenes == len(SHOTS)
    assert [r[1] for r in rows] == list(range(len(SHOTS)))
    for row, (start, limit) in zip(rows, _shot_bounds(truth), strict=True):
        _, _, start_s, end_s, frame_path, vector, artifact, meta = row
        # Each scene starts at its shot's first frame (after a dissolve: mid-dissolve) and
        # ends before the next shot starts.
        assert start - 0.3 <= start_s <= start + 2 / 30
        assert start_s < end_s <= limit + 1e-6
        assert Path(frame_path).is_file() and frame_path == meta["frame_path"]
        assert vector is not None and artifact == embedder.artifact_id
        assert meta["artifact_id"] == embedder.artifact_id and meta["error"] is None
        assert meta["video"]["start_s"] == pytest.approx(start_s, abs=1e-3)
    record = video_row(module_pool, OWNER, done.video_id)
    assert record["content_sha256"] == sha and record["scene_count"] == len(SHOTS)
    assert record["source_path"] == str(path.resolve())


def _shot_bounds(truth) -> list[tuple[float, float]]:
    """Each shot's first frame, and the next shot's (the end of the video for the last),
    plus the frame a boundary may land late by: 15 analysed frames a second (the default)
    see every other frame of this 30 fps video, and a cut on a skipped frame is found on
    the next one."""
    starts = [start for _, start, _ in truth.shots]
    ends = [end + 1 / 30 for end in starts[1:]] + [truth.frame_times[-1] + 1 / 30]
    return list(zip(starts, ends, strict=True))


def test_indexing_the_same_file_again_adds_nothing(module_pool, embedder, video, indexed):
    done, media = indexed
    before = _rows(module_pool, OWNER, done.video_id)
    again = index_video(module_pool, embedder, video[0], OWNER, media_dir=media)
    assert again.status == "unchanged" and again.video_id == done.video_id
    assert [r[0] for r in _rows(module_pool, OWNER, done.video_id)] == [r[0] for r in before]


def test_every_photo_is_found_first_by_its_own_scene(
    module_pool, embedder, video, indexed, photos, tmp_path
):
    (_, truth), (done, _) = video, indexed
    store, by_name = SceneStore(module_pool), dict(photos)
    for (name, _, _), (start, limit), shot in zip(
        truth.shots, _shot_bounds(truth), SHOTS, strict=True
    ):
        query = tmp_path / f"{name}.png"  # the shot's view a third of the way in
        view = _view(
            np.asarray(by_name[name]), (320, 180), 0.33, shot.motion, np.random.default_rng(5)
        )
        Image.fromarray(view).save(query)
        hit = store.search_by_image(OWNER, embedder, query, count=3)[0]
        assert hit.video_id == done.video_id, name
        assert hit.start_s is not None and hit.end_s is not None
        assert hit.start_s - 0.3 <= start < hit.end_s <= limit + 1e-6, name


def test_search_json_and_html_show_the_video_and_time_range(
    module_pool, video, indexed, artifact_dir, tmp_path, capsys, monkeypatch, photos
):
    done, _ = indexed
    url = module_pool.conninfo
    monkeypatch.setenv("CLIP_PRETRAINED", "none")
    query = tmp_path / "q.png"
    Image.fromarray(
        _view(np.asarray(dict(photos)["moon"]), (320, 180), 0.5, "pan", np.random.default_rng(0))
    ).save(query)
    code = cli_main(
        [
            "--model-dir",
            str(artifact_dir),
            "search",
            "--image",
            str(query),
            "--owner",
            str(OWNER),
            "--database-url",
            url,
            "-q",
            "--json",
            "--html",
            str(tmp_path / "r.html"),
            "--count",
            "3",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    hits = json.loads(out[: out.rindex("]") + 1])
    assert hits[0]["video_id"] == str(done.video_id)
    assert hits[0]["start_s"] < hits[0]["end_s"] and hits[0]["scene_index"] == len(SHOTS) - 1
    page = (tmp_path / "r.html").read_text()
    assert f"video {str(done.video_id)[:8]}" in page


def test_other_settings_replace_the_scenes_in_one_transaction(
    module_pool, embedder, video, tmp_path
):
    path = tmp_path / "copy.mp4"
    path.write_bytes(video[0].read_bytes())
    media = tmp_path / "media"
    first = index_video(module_pool, embedder, path, OTHER, media_dir=media)
    old = _rows(module_pool, OTHER, first.video_id)
    old_dir = Path(old[0][4]).parent
    settings = VideoSettings(segments=SegmentSettings(window_s=0.75))
    second = index_video(module_pool, embedder, path, OTHER, media_dir=media, settings=settings)
    assert second.status == "replaced" and second.video_id == first.video_id
    new = _rows(module_pool, OTHER, first.video_id)
    assert len(new) > len(old)  # 1.5 s shots now split into windows of 0.75 s
    assert not {r[0] for r in old} & {r[0] for r in new}
    assert not old_dir.exists() and all(Path(r[4]).is_file() for r in new)
    assert video_row(module_pool, OTHER, first.video_id)["settings_key"] == settings.key


def test_delete_video_removes_rows_and_frames(module_pool, embedder, video, tmp_path):
    owner = uuid.uuid4()
    done = index_video(module_pool, embedder, video[0], owner, media_dir=tmp_path)
    frames = [Path(r[4]) for r in _rows(module_pool, owner, done.video_id)]
    assert frames and all(f.is_file() for f in frames)
    assert delete_video(module_pool, owner, done.video_id) == len(frames)
    assert _rows(module_pool, owner, done.video_id) == []
    assert video_row(module_pool, owner, done.video_id) is None
    assert not any(f.exists() for f in frames)
    with pytest.raises(LookupError):
        delete_video(module_pool, owner, done.video_id)


def test_cli_index_video_and_delete_video(
    module_pool, video, artifact_dir, tmp_path, capsys, monkeypatch
):
    url = module_pool.conninfo
    owner = str(uuid.uuid4())
    monkeypatch.setenv("CLIP_PRETRAINED", "none")
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    base = ["--model-dir", str(artifact_dir)]
    code = cli_main(
        [
            *base,
            "index-video",
            str(video[0]),
            str(bad),
            "--owner",
            owner,
            "--database-url",
            url,
            "-q",
            "--json",
            "--media-dir",
            str(tmp_path / "m"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # one file failed, the other was indexed
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert line["status"] == "indexed" and line["scenes"] == len(SHOTS)
    errors = [e for e in captured.err.splitlines() if e.startswith("error:")]
    assert len(errors) == 1 and "bad.mp4" in errors[0] and "not a readable video" in errors[0]
    with module_pool.connection() as conn:
        videos = conn.execute(
            "SELECT count(*) FROM videos WHERE owner_id = %s", (uuid.UUID(owner),)
        ).fetchone()[0]
    assert videos == 1  # nothing of the bad file
    code = cli_main(
        [
            *base,
            "db",
            "delete-video",
            "--owner",
            owner,
            "--video-id",
            line["video_id"],
            "--database-url",
            url,
            "-q",
        ]
    )
    assert code == 0 and f"{len(SHOTS)} scenes" in capsys.readouterr().out
    code = cli_main(
        [
            *base,
            "db",
            "delete-video",
            "--owner",
            owner,
            "--video-id",
            line["video_id"],
            "--database-url",
            url,
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "has no video" in err and len(err.strip().splitlines()) == 1
