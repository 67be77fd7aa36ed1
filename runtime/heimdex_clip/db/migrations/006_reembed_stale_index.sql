-- heimdex-clip: no-transaction
-- 006: `backfill --reembed-stale` looks for scenes with no vector of the new artifact in
-- either slot. While an upgrade runs, done scenes hold that vector in the second slot, so
-- "which artifact's vector the second slot holds" gets an index of its own (the expression
-- is repeated verbatim by the claim query, which is how PostgreSQL matches it): a claim
-- then reads index ranges instead of the whole table. Built CONCURRENTLY: a populated
-- table keeps taking writes.
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenes_visual_clip_alt_vector_artifact_idx
    ON scenes ((CASE WHEN embedding_visual_clip_alt IS NOT NULL
                     THEN visual_clip_alt_artifact END), owner_id);
