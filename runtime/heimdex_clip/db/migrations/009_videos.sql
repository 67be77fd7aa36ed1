-- heimdex-clip: no-transaction
-- 009: videos as things (`heimdex-clip index-video`). A video's scenes are rows of
-- `scenes` with video_id, scene_index, start_s and end_s (columns of 001); this table says
-- which file and which settings made them, so indexing the same file again adds nothing
-- and indexing it with other settings replaces its scenes in one transaction.
-- Runs statement by statement outside a transaction block: the index on a populated
-- scenes table is built CONCURRENTLY.
CREATE TABLE IF NOT EXISTS videos (
    owner_id        uuid NOT NULL,
    video_id        uuid NOT NULL,
    content_sha256  text NOT NULL,
    source_path     text,
    settings_key    text NOT NULL,
    settings        jsonb NOT NULL,
    frames_dir      text,
    duration_s      double precision,
    scene_count     int NOT NULL,
    report          jsonb,
    indexed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, video_id)
);

-- A video's scenes in order (replace, delete, and "where in the video" for search hits).
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenes_owner_video_idx
    ON scenes (owner_id, video_id, scene_index) WHERE video_id IS NOT NULL;
