-- heimdex-clip: no-transaction
-- 005: indexes for the second vector slot, provenance and leases, built CONCURRENTLY so
-- a populated scenes table keeps taking writes while they build (the runner executes
-- this file statement by statement outside a transaction block; an invalid index left by
-- an interrupted build is dropped and built again on the next `db migrate`).

-- The second slot's vectors are searched like the first's.
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenes_embedding_visual_clip_alt_hnsw
    ON scenes USING hnsw (embedding_visual_clip_alt vector_cosine_ops);

-- Rows per artifact (stats), and stale rows (backfill --reembed-stale), without a scan.
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenes_visual_clip_artifact_idx
    ON scenes (visual_clip_artifact, owner_id);

-- Expired leases are found without a scan.
CREATE INDEX CONCURRENTLY IF NOT EXISTS scenes_visual_clip_lease_idx
    ON scenes (visual_clip_lease_until) WHERE visual_clip_lease_until IS NOT NULL;
