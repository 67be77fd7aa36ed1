-- 002: CLIP visual embeddings (ViT-B-32: 512 dimensions), their metadata, and search.
CREATE EXTENSION IF NOT EXISTS vector;

ALTER TABLE scenes ADD COLUMN IF NOT EXISTS embedding_visual_clip vector(512);
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS visual_clip_metadata jsonb;

-- Cosine distance HNSW index (embeddings are unit norm; similarity = 1 - distance).
CREATE INDEX IF NOT EXISTS scenes_embedding_visual_clip_hnsw
    ON scenes USING hnsw (embedding_visual_clip vector_cosine_ops);
-- Tenant filter; small owners are answered exactly through this index.
CREATE INDEX IF NOT EXISTS scenes_owner_id_idx ON scenes (owner_id);
-- Backfill finds the scenes still waiting for an embedding without a scan.
CREATE INDEX IF NOT EXISTS scenes_clip_pending_idx ON scenes (owner_id)
    WHERE embedding_visual_clip IS NULL;

-- Top scenes of ONE owner by cosine similarity, highest first, above match_threshold.
-- A filtered HNSW scan returns too few rows when the owner filter prunes its candidate
-- list; pgvector 0.8's iterative scan keeps scanning until enough rows pass the filter.
-- relaxed_order may return rows slightly out of order: the outer query re-sorts them.
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
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = '400'
SET hnsw.max_scan_tuples = '100000'
AS $$
BEGIN
    IF filter_user_id IS NULL THEN
        RAISE EXCEPTION 'filter_user_id must not be NULL: search is always owner-scoped'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF query_embedding IS NULL THEN
        RAISE EXCEPTION 'query_embedding must not be NULL'
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

-- "Similar scenes": a scene of the owner as the query; the scene itself is excluded.
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
AS $$
DECLARE
    query_vector vector(512);
BEGIN
    IF filter_user_id IS NULL THEN
        RAISE EXCEPTION 'filter_user_id must not be NULL: search is always owner-scoped'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT s.embedding_visual_clip INTO query_vector
    FROM scenes s WHERE s.id = query_scene_id AND s.owner_id = filter_user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'scene % not found for this owner', query_scene_id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF query_vector IS NULL THEN
        RAISE EXCEPTION 'scene % has no CLIP embedding yet', query_scene_id
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
