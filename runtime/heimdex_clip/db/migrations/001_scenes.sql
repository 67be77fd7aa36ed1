-- 001: the base scenes table, for standalone use.
-- A deployment that already has a scenes table keeps it: nothing here replaces or alters
-- an existing table (CREATE ... IF NOT EXISTS throughout).
CREATE TABLE IF NOT EXISTS scenes (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_id     uuid NOT NULL,
    video_id     uuid,
    scene_index  int,
    start_s      double precision,
    end_s        double precision,
    frame_path   text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- One scene per (owner, frame): `heimdex-clip index` can run again without duplicates.
CREATE UNIQUE INDEX IF NOT EXISTS scenes_owner_frame_path_key
    ON scenes (owner_id, frame_path) WHERE frame_path IS NOT NULL;
