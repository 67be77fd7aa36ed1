-- 004: which artifact made each vector, a second vector slot for model upgrades, and the
-- backfill's lease columns. Additive: new nullable columns (or constant defaults, which
-- PostgreSQL adds without rewriting the table) and functions; no existing row is changed.
--
-- Provenance: visual_clip_artifact is the artifact id ("<model>:<pretrained>:<sha256[:16]
-- of the INT8 graph>") of embedding_visual_clip. Rows embedded before this migration keep
-- a NULL artifact: "unknown", matched by no search, until re-embedded or attributed.
--
-- Upgrades: the *_alt columns hold a vector of a second artifact beside the first: the new
-- model's while it is backfilled, the old model's after `heimdex-clip db promote` swapped
-- the slots. Search takes the querying model's artifact and reads whichever slot holds it,
-- so every model in service sees all of its own vectors and never another model's.
DO $$
DECLARE
    version text := (SELECT extversion FROM pg_extension WHERE extname = 'vector');
BEGIN
    IF version IS NULL OR string_to_array(split_part(version, '-', 1), '.')::int[]
            < ARRAY[0, 8] THEN
        RAISE EXCEPTION 'pgvector % is installed; heimdex-clip needs >= 0.8 (iterative '
            'index scans): run ALTER EXTENSION vector UPDATE', COALESCE(version, 'not')
            USING ERRCODE = 'feature_not_supported';
    END IF;
END;
$$;

ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_artifact text;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS embedding_visual_clip_alt vector(512);
ALTER TABLE scenes ALTER COLUMN embedding_visual_clip_alt SET STORAGE MAIN;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_alt_artifact text;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_alt_metadata jsonb;

-- Backfill leases: a claim sets the token and expiry in one committed statement; the
-- result is written only while the token is still the claimer's. Counters are per
-- artifact (visual_clip_job_artifact): a frame given up by one model is tried by the next.
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_job_artifact text;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_attempts int NOT NULL DEFAULT 0;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_lease_token uuid;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_lease_until timestamptz;
-- Who holds the lease ("host:pid"), for operators looking at a stuck scene.
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_leased_by text;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_retry_at timestamptz;
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_last_error text;
-- 'frame' (the image itself is bad) or 'worker' (crash, lease expiry, timeout under load).
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_fault text;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'scenes_visual_clip_slots_distinct') THEN
        -- NOT VALID: the new columns are NULL in every existing row; skip the table scan.
        ALTER TABLE scenes ADD CONSTRAINT scenes_visual_clip_slots_distinct
            CHECK (visual_clip_alt_artifact IS DISTINCT FROM visual_clip_artifact
                   OR visual_clip_alt_artifact IS NULL) NOT VALID;
    END IF;
END;
$$;

-- Deployment-wide settings; 'serving_visual_clip_artifact' is the artifact the
-- four-argument search functions (which cannot say which model made their query) use.
CREATE TABLE IF NOT EXISTS heimdex_clip_settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Top scenes of ONE owner by cosine similarity to a query made by artifact query_artifact.
-- Each slot is searched through its own HNSW index (pgvector 0.8 iterative scan, so the
-- owner filter cannot starve the result); a row holds at most one vector per artifact.
-- plan_cache_mode: a cached generic plan would freeze one index choice for owners of
-- every size; search_path is pinned so a caller's search_path cannot redirect the names.
CREATE OR REPLACE FUNCTION search_scenes_by_visual_clip_embedding(
    query_embedding vector(512),
    match_threshold float,
    match_count int,
    filter_user_id uuid,
    query_artifact text
)
RETURNS TABLE (
    id uuid,
    owner_id uuid,
    video_id uuid,
    scene_index int,
    frame_path text,
    visual_clip_metadata jsonb,
    similarity float
)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = 'force_custom_plan'
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = '400'
SET hnsw.max_scan_tuples = '100000'
AS $$
BEGIN
    IF filter_user_id IS NULL THEN
        RAISE EXCEPTION 'filter_user_id must not be NULL: search is always owner-scoped'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF query_artifact IS NULL THEN
        RAISE EXCEPTION 'query_artifact must not be NULL: vectors of different artifacts '
            'are not comparable' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF query_embedding IS NULL THEN
        RAISE EXCEPTION 'query_embedding must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF match_count IS NULL OR match_count < 1 THEN
        RAISE EXCEPTION 'match_count must be >= 1, got %', match_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF match_threshold = 'NaN'::float THEN
        RAISE EXCEPTION 'match_threshold must be a number, got NaN'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH main AS MATERIALIZED (
        SELECT s.id, s.owner_id, s.video_id, s.scene_index, s.frame_path,
               s.visual_clip_metadata AS metadata,
               s.embedding_visual_clip <=> query_embedding AS distance
        FROM scenes s
        WHERE s.owner_id = filter_user_id
          AND s.visual_clip_artifact = query_artifact
          AND s.embedding_visual_clip IS NOT NULL
        ORDER BY s.embedding_visual_clip <=> query_embedding
        LIMIT match_count
    ), alt AS MATERIALIZED (
        SELECT s.id, s.owner_id, s.video_id, s.scene_index, s.frame_path,
               s.visual_clip_alt_metadata AS metadata,
               s.embedding_visual_clip_alt <=> query_embedding AS distance
        FROM scenes s
        WHERE s.owner_id = filter_user_id
          AND s.visual_clip_alt_artifact = query_artifact
          AND s.embedding_visual_clip_alt IS NOT NULL
        ORDER BY s.embedding_visual_clip_alt <=> query_embedding
        LIMIT match_count
    )
    SELECT n.id, n.owner_id, n.video_id, n.scene_index, n.frame_path, n.metadata,
           (1 - n.distance)::float AS similarity
    FROM (SELECT * FROM main UNION ALL SELECT * FROM alt) n
    WHERE 1 - n.distance > COALESCE(match_threshold, -1)
    ORDER BY n.distance, n.id
    LIMIT match_count;
END;
$$;

-- The serving artifact, for the four-argument forms (NULL until one is recorded).
CREATE OR REPLACE FUNCTION heimdex_clip_serving_artifact()
RETURNS text
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    SELECT value FROM heimdex_clip_settings WHERE key = 'serving_visual_clip_artifact';
$$;

-- The design's four-argument form: searches the serving artifact's vectors. Until a
-- serving artifact is recorded (a deployment migrated, its workers not yet upgraded), it
-- searches the rows embedded before provenance, as it did before this migration: the
-- query then comes from the same pre-provenance code, and no attributed row is mixed in.
CREATE OR REPLACE FUNCTION search_scenes_by_visual_clip_embedding(
    query_embedding vector(512),
    match_threshold float,
    match_count int,
    filter_user_id uuid
)
RETURNS TABLE (
    id uuid,
    owner_id uuid,
    video_id uuid,
    scene_index int,
    frame_path text,
    visual_clip_metadata jsonb,
    similarity float
)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
SET plan_cache_mode = 'force_custom_plan'
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = '400'
SET hnsw.max_scan_tuples = '100000'
AS $$
DECLARE
    serving text := heimdex_clip_serving_artifact();
BEGIN
    IF serving IS NOT NULL THEN
        RETURN QUERY SELECT * FROM search_scenes_by_visual_clip_embedding(
            query_embedding, match_threshold, match_count, filter_user_id, serving);
        RETURN;
    END IF;
    IF filter_user_id IS NULL THEN
        RAISE EXCEPTION 'filter_user_id must not be NULL: search is always owner-scoped'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF match_count IS NULL OR match_count < 1 THEN
        RAISE EXCEPTION 'match_count must be >= 1, got %', match_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH nearest AS MATERIALIZED (
        SELECT s.id, s.owner_id, s.video_id, s.scene_index, s.frame_path,
               s.visual_clip_metadata,
               s.embedding_visual_clip <=> query_embedding AS distance
        FROM scenes s
        WHERE s.owner_id = filter_user_id
          AND s.visual_clip_artifact IS NULL
          AND s.embedding_visual_clip IS NOT NULL
        ORDER BY s.embedding_visual_clip <=> query_embedding
        LIMIT match_count
    )
    SELECT n.id, n.owner_id, n.video_id, n.scene_index, n.frame_path,
           n.visual_clip_metadata, (1 - n.distance)::float AS similarity
    FROM nearest n
    WHERE 1 - n.distance > COALESCE(match_threshold, -1)
    ORDER BY n.distance, n.id;
END;
$$;

-- "Similar scenes": a scene's own vector of artifact query_artifact as the query.
CREATE OR REPLACE FUNCTION search_similar_scenes_by_visual_clip(
    query_scene_id uuid,
    match_threshold float,
    match_count int,
    filter_user_id uuid,
    query_artifact text
)
RETURNS TABLE (
    id uuid,
    owner_id uuid,
    video_id uuid,
    scene_index int,
    frame_path text,
    visual_clip_metadata jsonb,
    similarity float
)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    query_vector vector(512);
BEGIN
    IF filter_user_id IS NULL THEN
        RAISE EXCEPTION 'filter_user_id must not be NULL: search is always owner-scoped'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM 1 FROM scenes s WHERE s.id = query_scene_id AND s.owner_id = filter_user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'scene % not found for this owner', query_scene_id
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT CASE WHEN s.visual_clip_artifact = query_artifact THEN s.embedding_visual_clip
                WHEN s.visual_clip_alt_artifact = query_artifact
                    THEN s.embedding_visual_clip_alt END
    INTO query_vector
    FROM scenes s WHERE s.id = query_scene_id AND s.owner_id = filter_user_id;
    IF query_vector IS NULL THEN
        RAISE EXCEPTION 'scene % has no CLIP embedding of artifact % yet', query_scene_id,
            query_artifact USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY
    SELECT r.* FROM search_scenes_by_visual_clip_embedding(
        query_vector, match_threshold, match_count + 1, filter_user_id, query_artifact) r
    WHERE r.id <> query_scene_id
    ORDER BY r.similarity DESC, r.id
    LIMIT match_count;
END;
$$;

CREATE OR REPLACE FUNCTION search_similar_scenes_by_visual_clip(
    query_scene_id uuid,
    match_threshold float,
    match_count int,
    filter_user_id uuid
)
RETURNS TABLE (
    id uuid,
    owner_id uuid,
    video_id uuid,
    scene_index int,
    frame_path text,
    visual_clip_metadata jsonb,
    similarity float
)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    serving text := heimdex_clip_serving_artifact();
    query_vector vector(512);
BEGIN
    IF serving IS NOT NULL THEN
        RETURN QUERY SELECT * FROM search_similar_scenes_by_visual_clip(
            query_scene_id, match_threshold, match_count, filter_user_id, serving);
        RETURN;
    END IF;
    -- No serving artifact yet: the scene's pre-provenance vector, among such vectors.
    SELECT s.embedding_visual_clip INTO query_vector FROM scenes s
    WHERE s.id = query_scene_id AND s.owner_id = filter_user_id
      AND s.visual_clip_artifact IS NULL;
    IF query_vector IS NULL THEN
        RAISE EXCEPTION 'scene % has no CLIP embedding for this owner', query_scene_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY
    SELECT r.* FROM search_scenes_by_visual_clip_embedding(
        query_vector, match_threshold, match_count + 1, filter_user_id) r
    WHERE r.id <> query_scene_id
    ORDER BY r.similarity DESC, r.id
    LIMIT match_count;
END;
$$;
