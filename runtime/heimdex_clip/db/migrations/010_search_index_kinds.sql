-- 010: the search index is a setting (heimdex_clip_settings 'search_index_kind'):
--   vector  - HNSW over the float32 vectors (vector_cosine_ops), as in 002 and 005;
--   halfvec - HNSW over the vectors cast to halfvec(512) (half the size);
--   bit     - HNSW over binary_quantize(vector)::bit(512) (Hamming; a 32nd of the vectors).
-- The search function keeps one contract whichever is active: it takes candidates in the
-- active index's order, then ranks them by the exact float32 cosine distance, which is the
-- similarity it returns. `heimdex-clip db search-index KIND` switches kinds: it builds the
-- new kind's indexes CONCURRENTLY (writes and searches go on), records the kind, then drops
-- the old indexes CONCURRENTLY (heimdex_clip/db/search_index.py).
--
-- A database with no stored vector yet (a new deployment) gets the default kind, halfvec,
-- here (its indexes are built on an empty column: instant). A database holding vectors
-- keeps 'vector' until an operator switches: nothing here rebuilds a populated index.

CREATE OR REPLACE FUNCTION heimdex_clip_setting(setting text, fallback text)
RETURNS text
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    SELECT COALESCE((SELECT value FROM heimdex_clip_settings WHERE key = setting), fallback);
$$;

-- The active search index kind ('vector' where none was ever recorded).
CREATE OR REPLACE FUNCTION heimdex_clip_search_index()
RETURNS text
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    SELECT heimdex_clip_setting('search_index_kind', 'vector');
$$;

-- The ORDER BY expression of one vector column under an index kind: exactly the expression
-- that kind's index is built on, so the planner can walk the index ($1 = the query).
CREATE OR REPLACE FUNCTION heimdex_clip_search_order(kind text, slot text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF slot NOT IN ('embedding_visual_clip', 'embedding_visual_clip_alt') THEN
        RAISE EXCEPTION 'unknown vector column %', slot USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN CASE kind
        -- No index is built on this expression: the owner's rows are read (b-tree on
        -- owner_id) and sorted by exact distance.
        WHEN 'exact' THEN format('(s.%I <=> $1) + 0', slot)
        WHEN 'vector' THEN format('s.%I <=> $1', slot)
        WHEN 'halfvec' THEN format('(s.%I::halfvec(512)) <=> ($1::halfvec(512))', slot)
        WHEN 'bit' THEN format(
            '(binary_quantize(s.%I)::bit(512)) <~> (binary_quantize($1)::bit(512))', slot)
    END;
END;
$$;

-- How many candidates each slot hands to the exact re-ranking, for match_count results.
-- halfvec: its order differs from float32 only between near-ties; bit: Hamming distance on
-- the signs is coarse, so it needs many more (the factors were measured, docs/scale.md).
CREATE OR REPLACE FUNCTION heimdex_clip_search_candidates(kind text, match_count int)
RETURNS int
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE kind
        WHEN 'exact' THEN match_count
        WHEN 'vector' THEN match_count
        WHEN 'halfvec' THEN 2 * match_count
        WHEN 'bit' THEN GREATEST(40 * match_count, 400)
    END;
$$;

-- The planner's estimate of an owner's rows (from the table's statistics: no scan). VOLATILE
-- only because PostgreSQL allows EXPLAIN in no other kind of function.
CREATE OR REPLACE FUNCTION heimdex_clip_owner_rows(owner uuid)
RETURNS float
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    plan json;
BEGIN
    EXECUTE 'EXPLAIN (FORMAT JSON) SELECT 1 FROM scenes WHERE owner_id = $1' INTO plan
        USING owner;
    RETURN (plan -> 0 -> 'Plan' ->> 'Plan Rows')::float;
END;
$$;

-- As in 007 (same arguments, checks and results), with candidates taken through the active
-- index kind and ranked by exact distance. An owner the statistics put at no more than
-- 'search_exact_max_rows' rows (default 10000) is searched exactly, without the index: the
-- planner costed an owner of 1% of a million rows onto the graph, where the filtered walk
-- took ~100 ms against ~15 ms for reading and sorting its rows; at 2% (20,000 rows) the
-- walk was the faster, 19 ms against 42 ms at the median (docs/scale.md).
-- ef_search comes from the setting 'search_ef_search' (default 400, as before);
-- set_config(..., true) inside a function with its own SET clause for the parameter is
-- undone when the function returns.
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
DECLARE
    kind text := heimdex_clip_search_index();
    path text;
    candidates int;
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
    IF heimdex_clip_search_candidates(kind, match_count) IS NULL OR kind = 'exact' THEN
        RAISE EXCEPTION 'unknown search index kind % (heimdex_clip_settings)', kind
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    path := CASE WHEN heimdex_clip_owner_rows(filter_user_id)
                      <= heimdex_clip_setting('search_exact_max_rows', '10000')::float
                 THEN 'exact' ELSE kind END;
    candidates := heimdex_clip_search_candidates(path, match_count);
    PERFORM set_config('hnsw.ef_search', heimdex_clip_setting('search_ef_search', '400'), true);
    -- EXECUTE plans each call with its values (the owner's size picks the access path).
    RETURN QUERY EXECUTE format($query$
        WITH main AS MATERIALIZED (
            SELECT s.id, s.owner_id, s.video_id, s.scene_index, s.frame_path,
                   s.visual_clip_metadata AS metadata,
                   s.embedding_visual_clip <=> $1 AS distance
            FROM scenes s
            WHERE s.owner_id = $2
              AND s.visual_clip_artifact = $3
              AND s.embedding_visual_clip IS NOT NULL
            ORDER BY %s
            LIMIT $4
        ), alt AS MATERIALIZED (
            SELECT s.id, s.owner_id, s.video_id, s.scene_index, s.frame_path,
                   s.visual_clip_alt_metadata AS metadata,
                   s.embedding_visual_clip_alt <=> $1 AS distance
            FROM scenes s
            WHERE s.owner_id = $2
              AND s.visual_clip_alt_artifact = $3
              AND s.embedding_visual_clip_alt IS NOT NULL
            ORDER BY %s
            LIMIT $4
        )
        SELECT n.id, n.owner_id, n.video_id, n.scene_index, n.frame_path, n.metadata,
               (1 - n.distance)::float AS similarity
        FROM (SELECT * FROM main UNION ALL SELECT * FROM alt) n
        WHERE 1 - n.distance > $5
          AND n.distance <= 2
        ORDER BY n.distance, n.id
        LIMIT $6
        $query$,
        heimdex_clip_search_order(path, 'embedding_visual_clip'),
        heimdex_clip_search_order(path, 'embedding_visual_clip_alt'))
    USING query_embedding, filter_user_id, query_artifact, candidates,
          COALESCE(match_threshold, -1), match_count;
END;
$$;

-- A new deployment starts on the default kind: its halfvec indexes replace the vector ones
-- while the column is empty (a populated database keeps 'vector', see above).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM heimdex_clip_settings WHERE key = 'search_index_kind') THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM scenes WHERE embedding_visual_clip IS NOT NULL
                                       OR embedding_visual_clip_alt IS NOT NULL) THEN
        INSERT INTO heimdex_clip_settings (key, value) VALUES ('search_index_kind', 'vector');
        RETURN;
    END IF;
    CREATE INDEX IF NOT EXISTS scenes_embedding_visual_clip_halfvec_hnsw ON scenes
        USING hnsw ((embedding_visual_clip::halfvec(512)) halfvec_cosine_ops)
        WITH (m = 16, ef_construction = 200);
    CREATE INDEX IF NOT EXISTS scenes_embedding_visual_clip_alt_halfvec_hnsw ON scenes
        USING hnsw ((embedding_visual_clip_alt::halfvec(512)) halfvec_cosine_ops)
        WITH (m = 16, ef_construction = 200);
    DROP INDEX IF EXISTS scenes_embedding_visual_clip_hnsw;
    DROP INDEX IF EXISTS scenes_embedding_visual_clip_alt_hnsw;
    INSERT INTO heimdex_clip_settings (key, value) VALUES ('search_index_kind', 'halfvec');
END;
$$;
