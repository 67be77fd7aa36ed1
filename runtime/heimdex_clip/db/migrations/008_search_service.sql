-- 008: the search service (`heimdex-clip serve`): per-owner API keys, scene transcripts
-- for full-text search, and hybrid search (CLIP ranking + full-text ranking, fused by
-- reciprocal rank fusion). Additive: a new table, a nullable column, an index, a function.

-- API keys: only a SHA-256 of each key is stored. The keys are 256-bit random strings, so
-- a fast hash is enough (no dictionary to guess from); the key itself is shown once.
CREATE TABLE IF NOT EXISTS heimdex_clip_api_keys (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_id    uuid NOT NULL,
    key_sha256  text NOT NULL UNIQUE,
    -- The key's first characters, so an operator can tell keys apart in `api-key list`.
    key_prefix  text NOT NULL,
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX IF NOT EXISTS heimdex_clip_api_keys_owner_idx ON heimdex_clip_api_keys (owner_id);

-- The words of a scene (speech transcript, captions, OCR...), written by whoever has them.
ALTER TABLE scenes ADD COLUMN IF NOT EXISTS transcript text;
-- The 'simple' configuration: lower-cased words, no stemming and no stop words, so any
-- language is indexed the same way. The search below uses the same expression.
CREATE INDEX IF NOT EXISTS scenes_transcript_fts_idx
    ON scenes USING gin (to_tsvector('simple', transcript)) WHERE transcript IS NOT NULL;

-- Hybrid search: the owner's scenes ranked by CLIP similarity (the usual search function)
-- and by full-text rank of their transcript against query_text, fused by reciprocal rank
-- fusion: score = sum over both rankings of 1 / (rrf_k + rank). A scene found only by its
-- words and a scene found only by its pixels both come back. match_threshold applies to
-- the CLIP ranking only. similarity is the scene's cosine similarity to the query (NULL
-- if it has no vector of query_artifact); clip_rank/text_rank are NULL where absent.
CREATE OR REPLACE FUNCTION search_scenes_hybrid(
    query_embedding vector(512),
    query_text text,
    match_threshold float,
    match_count int,
    filter_user_id uuid,
    query_artifact text,
    rrf_k int DEFAULT 60
)
RETURNS TABLE (
    id uuid,
    owner_id uuid,
    video_id uuid,
    scene_index int,
    frame_path text,
    visual_clip_metadata jsonb,
    similarity float,
    clip_rank int,
    text_rank int,
    score float
)
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    -- Each ranking contributes this many candidates before fusion.
    candidates int := GREATEST(2 * match_count, 50);
BEGIN
    IF filter_user_id IS NULL THEN
        RAISE EXCEPTION 'filter_user_id must not be NULL: search is always owner-scoped'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF match_count IS NULL OR match_count < 1 THEN
        RAISE EXCEPTION 'match_count must be >= 1, got %', match_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rrf_k IS NULL OR rrf_k < 1 THEN
        RAISE EXCEPTION 'rrf_k must be >= 1, got %', rrf_k
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH clip AS MATERIALIZED (
        SELECT c.id, row_number() OVER (ORDER BY c.similarity DESC, c.id)::int AS r
        FROM search_scenes_by_visual_clip_embedding(
            query_embedding, match_threshold, candidates, filter_user_id, query_artifact) c
    ), words AS MATERIALIZED (
        SELECT s.id, row_number() OVER (
                   ORDER BY ts_rank_cd(to_tsvector('simple', s.transcript), q) DESC, s.id
               )::int AS r
        FROM scenes s, websearch_to_tsquery('simple', COALESCE(query_text, '')) q
        WHERE s.owner_id = filter_user_id
          AND s.transcript IS NOT NULL
          AND to_tsvector('simple', s.transcript) @@ q
        ORDER BY r
        LIMIT candidates
    ), fused AS (
        SELECT COALESCE(clip.id, words.id) AS id, clip.r AS clip_rank, words.r AS text_rank,
               COALESCE(1.0 / (rrf_k + clip.r), 0) + COALESCE(1.0 / (rrf_k + words.r), 0)
                   AS score
        FROM clip FULL OUTER JOIN words ON clip.id = words.id
    )
    SELECT s.id, s.owner_id, s.video_id, s.scene_index, s.frame_path,
           CASE WHEN s.visual_clip_artifact = query_artifact THEN s.visual_clip_metadata
                WHEN s.visual_clip_alt_artifact = query_artifact
                    THEN s.visual_clip_alt_metadata END,
           (1 - CASE WHEN s.visual_clip_artifact = query_artifact
                         THEN s.embedding_visual_clip <=> query_embedding
                     WHEN s.visual_clip_alt_artifact = query_artifact
                         THEN s.embedding_visual_clip_alt <=> query_embedding END)::float,
           f.clip_rank, f.text_rank, f.score::float
    FROM fused f JOIN scenes s ON s.id = f.id AND s.owner_id = filter_user_id
    ORDER BY f.score DESC, f.id
    LIMIT match_count;
END;
$$;
