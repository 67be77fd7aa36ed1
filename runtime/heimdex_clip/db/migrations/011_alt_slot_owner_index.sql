-- heimdex-clip: no-transaction
-- 011: the second vector slot's owner filter gets a small partial b-tree. Outside a model
-- upgrade that slot is empty, and the planner, estimating one row for an owner there, chose
-- a sequential scan of the whole table for the search function's second half on every call
-- (measured: 27 ms at 20,000 rows, ~600 ms at 1,000,000; docs/scale.md). With this index an
-- empty slot costs an index probe; a filled one is searched as before. Built CONCURRENTLY:
-- a populated table keeps taking writes.
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenes_visual_clip_alt_owner_idx
    ON scenes (owner_id, visual_clip_alt_artifact) WHERE embedding_visual_clip_alt IS NOT NULL;
