-- 007: the database refuses what search cannot compare, and never drops a served vector.
--
-- 1. Every stored vector has a norm in [1e-6, 1e6] (constraint
--    scenes_visual_clip_vectors_comparable). A zero or denormal vector has no direction: its
--    cosine distance is NaN, which PostgreSQL orders above every number, so it passed any
--    threshold; a huge one overflows pgvector's float32 sums ([1e30,0,..] <=> [1,0,..] is 1,
--    not 0). pgvector itself already refuses NaN and infinite elements.
--    Existing rows: a deployment may hold such vectors. They are removed for re-embedding
--    (the first slot's vector NULLed with the reason in its metadata and last error, its
--    attempts reset so `backfill` takes it again; the second slot emptied as `db prune`
--    does), under a lock that blocks writes (reads go on) until the constraint exists, so
--    every row satisfies it. The constraint is NOT VALID only to skip a second scan under
--    the table's exclusive lock: `ALTER TABLE scenes VALIDATE CONSTRAINT
--    scenes_visual_clip_vectors_comparable` proves it at any time without blocking writes.
-- 2. The search functions refuse a query vector outside those bounds (and a NaN threshold),
--    and never return a NaN similarity.
-- 3. A row never loses its vector of the serving artifact (trigger
--    heimdex_clip_keep_serving_vector): whatever writes to the table, a model upgrade,
--    `db prune` or a third artifact's `backfill --reembed-stale` cannot take a scene out of
--    the serving model's search. Only deleting the scene removes it.

LOCK TABLE scenes IN SHARE ROW EXCLUSIVE MODE;

UPDATE scenes SET
    embedding_visual_clip = NULL,
    visual_clip_metadata = COALESCE(visual_clip_metadata, '{}'::jsonb) || jsonb_build_object(
        'error', format('migration 007: the stored vector (norm %s) cannot be compared by '
                        'cosine; removed for re-embedding', vector_norm(embedding_visual_clip))),
    visual_clip_last_error = format('migration 007: the stored vector (norm %s) cannot be '
        'compared by cosine; removed for re-embedding', vector_norm(embedding_visual_clip)),
    visual_clip_fault = 'frame',
    visual_clip_attempts = 0,
    visual_clip_job_artifact = NULL,
    visual_clip_retry_at = NULL
WHERE embedding_visual_clip IS NOT NULL
  AND NOT vector_norm(embedding_visual_clip) BETWEEN 1e-6 AND 1e6;

UPDATE scenes SET
    visual_clip_last_error = format('migration 007: the second slot''s vector of %s (norm %s) '
        'cannot be compared by cosine; removed for re-embedding', visual_clip_alt_artifact,
        vector_norm(embedding_visual_clip_alt)),
    embedding_visual_clip_alt = NULL,
    visual_clip_alt_artifact = NULL,
    visual_clip_alt_metadata = NULL
WHERE embedding_visual_clip_alt IS NOT NULL
  AND NOT vector_norm(embedding_visual_clip_alt) BETWEEN 1e-6 AND 1e6;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'scenes_visual_clip_vectors_comparable') THEN
        ALTER TABLE scenes ADD CONSTRAINT scenes_visual_clip_vectors_comparable CHECK (
            (embedding_visual_clip IS NULL
             OR vector_norm(embedding_visual_clip) BETWEEN 1e-6 AND 1e6)
            AND (embedding_visual_clip_alt IS NULL
                 OR vector_norm(embedding_visual_clip_alt) BETWEEN 1e-6 AND 1e6)) NOT VALID;
    END IF;
END;
$$;

-- Refuses an update that leaves the row without the vector of the serving artifact it had.
-- A swap of the slots (`db promote`) or a new vector of the serving artifact itself keeps it.
CREATE OR REPLACE FUNCTION heimdex_clip_keep_serving_vector()
RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    serving text := heimdex_clip_serving_artifact();
BEGIN
    IF serving IS NULL THEN
        RETURN NEW;
    END IF;
    IF ((OLD.visual_clip_artifact = serving AND OLD.embedding_visual_clip IS NOT NULL)
        OR (OLD.visual_clip_alt_artifact = serving
            AND OLD.embedding_visual_clip_alt IS NOT NULL))
       AND NOT ((NEW.visual_clip_artifact = serving AND NEW.embedding_visual_clip IS NOT NULL)
                OR (NEW.visual_clip_alt_artifact = serving
                    AND NEW.embedding_visual_clip_alt IS NOT NULL)) THEN
        RAISE EXCEPTION 'scene % would lose its vector of the serving artifact %', OLD.id,
            serving
            USING ERRCODE = 'integrity_constraint_violation',
                  HINT = 'promote another artifact first (heimdex-clip db promote)';
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS heimdex_clip_keep_serving_vector ON scenes;
CREATE TRIGGER heimdex_clip_keep_serving_vector
    BEFORE UPDATE OF embedding_visual_clip, embedding_visual_clip_alt, visual_clip_artifact,
        visual_clip_alt_artifact ON scenes
    FOR EACH ROW EXECUTE FUNCTION heimdex_clip_keep_serving_vector();

-- A query vector search can compare with: not NULL, norm in [1e-6, 1e6].
CREATE OR REPLACE FUNCTION heimdex_clip_check_query(query_embedding vector, what text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF query_embedding IS NULL THEN
        RAISE EXCEPTION '% must not be NULL', what USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT vector_norm(query_embedding) BETWEEN 1e-6 AND 1e6 THEN
        RAISE EXCEPTION '% has norm %: a zero, denormal or huge vector has no cosine '
            'similarity', what, vector_norm(query_embedding)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END;
$$;

-- As in 004, plus: the query's norm is checked, and a NaN distance never passes
-- (n.distance <= 2: NaN sorts above every number, so it fails this test).
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
    PERFORM heimdex_clip_check_query(query_embedding, 'query_embedding');
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
      AND n.distance <= 2
    ORDER BY n.distance, n.id
    LIMIT match_count;
END;
$$;

-- The four-argument form (see 004), with the same checks on its pre-provenance path.
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
    PERFORM heimdex_clip_check_query(query_embedding, 'query_embedding');
    IF match_count IS NULL OR match_count < 1 THEN
        RAISE EXCEPTION 'match_count must be >= 1, got %', match_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF match_threshold = 'NaN'::float THEN
        RAISE EXCEPTION 'match_threshold must be a number, got NaN'
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
      AND n.distance <= 2
    ORDER BY n.distance, n.id;
END;
$$;
