-- 012: the serving-vector trigger takes the serving lock (shared) before it reads the
-- serving artifact. `db promote` changes that artifact only while holding the lock
-- exclusively, after a final check that every scene holds a vector of the new one; a
-- writer that read the old artifact and committed between that check and promote's commit
-- could otherwise replace the new artifact's vector and leave a scene unfindable (found by
-- a randomized upgrade sequence). The package's writers take the lock themselves, before
-- their row locks; a raw-SQL writer gets it here. 1212371798 = 0x48435356 ("HCSV"),
-- heimdex_clip.db.slots.SERVING_LOCK.
CREATE OR REPLACE FUNCTION heimdex_clip_keep_serving_vector()
RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    serving text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1212371798);
    serving := heimdex_clip_serving_artifact();
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
