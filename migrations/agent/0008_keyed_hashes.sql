-- The journal records a keyed hash of each file's content (keyed BLAKE3 of its plain
-- BLAKE3, under a key derived from the master secret), no longer the plain hash, which
-- confirmed a guess of a file's content to anyone who could read the journal. The plain
-- hashes written before are dropped: a NULL `hash` or `backed_hash` means "not known", so
-- the next read of that file is committed (never skipped as unchanged) and records the
-- keyed hash. The pages that held them are overwritten with zeros (`secure_delete`, set by
-- the journal before it migrates), not merely freed.
UPDATE files SET hash = NULL WHERE hash IS NOT NULL;
UPDATE files SET backed_hash = NULL WHERE backed_hash IS NOT NULL;
