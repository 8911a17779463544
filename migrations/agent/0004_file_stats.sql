-- `status` must answer in milliseconds however many files are watched: it is polled by
-- people and by scripts while the daemon works. Counting by scanning `files` took 150 ms
-- at 100,000 rows (a sort of every row), so the counts are kept here, exactly, by triggers
-- in the same transactions that change `files`.
--
-- One row per (state, deleted): `deleted` is 1 for a backed-up deletion. `bytes` sums the
-- last-read size of files not backed up (what `status` calls pending bytes).
CREATE TABLE file_stats (
    state   TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    bytes   INTEGER NOT NULL,
    PRIMARY KEY (state, deleted)
) WITHOUT ROWID;

-- Every state a row can be in (0001) has its rows here from the start, so the triggers
-- only update: a conflict clause inside a trigger would be overridden by the statement
-- that fired it (`mark_dirty`'s upsert).
INSERT INTO file_stats (state, deleted, n, bytes) VALUES
    ('dirty', 0, 0, 0), ('pending', 0, 0, 0), ('uploading', 0, 0, 0), ('failed', 0, 0, 0),
    ('backed_up', 0, 0, 0), ('backed_up', 1, 0, 0);

INSERT INTO file_stats (state, deleted, n, bytes)
    SELECT state,
           CASE WHEN state = 'backed_up' AND backed_kind IS 'deleted' THEN 1 ELSE 0 END,
           COUNT(*),
           COALESCE(SUM(CASE WHEN state != 'backed_up' THEN COALESCE(size, 0) ELSE 0 END), 0)
    FROM files WHERE true GROUP BY 1, 2
    ON CONFLICT (state, deleted) DO UPDATE SET n = excluded.n, bytes = excluded.bytes;

CREATE TRIGGER files_stats_insert AFTER INSERT ON files BEGIN
    UPDATE file_stats SET n = n + 1,
            bytes = bytes + CASE WHEN new.state != 'backed_up' THEN COALESCE(new.size, 0) ELSE 0 END
        WHERE state = new.state
          AND deleted = CASE WHEN new.state = 'backed_up' AND new.backed_kind IS 'deleted' THEN 1 ELSE 0 END;
END;

CREATE TRIGGER files_stats_delete AFTER DELETE ON files BEGIN
    UPDATE file_stats SET n = n - 1,
            bytes = bytes - CASE WHEN old.state != 'backed_up' THEN COALESCE(old.size, 0) ELSE 0 END
        WHERE state = old.state
          AND deleted = CASE WHEN old.state = 'backed_up' AND old.backed_kind IS 'deleted' THEN 1 ELSE 0 END;
END;

CREATE TRIGGER files_stats_update AFTER UPDATE OF state, size, backed_kind ON files
WHEN old.state IS NOT new.state OR old.size IS NOT new.size OR old.backed_kind IS NOT new.backed_kind
BEGIN
    UPDATE file_stats SET n = n - 1,
            bytes = bytes - CASE WHEN old.state != 'backed_up' THEN COALESCE(old.size, 0) ELSE 0 END
        WHERE state = old.state
          AND deleted = CASE WHEN old.state = 'backed_up' AND old.backed_kind IS 'deleted' THEN 1 ELSE 0 END;
    UPDATE file_stats SET n = n + 1,
            bytes = bytes + CASE WHEN new.state != 'backed_up' THEN COALESCE(new.size, 0) ELSE 0 END
        WHERE state = new.state
          AND deleted = CASE WHEN new.state = 'backed_up' AND new.backed_kind IS 'deleted' THEN 1 ELSE 0 END;
END;

-- The oldest change not yet backed up (`pending_since`): `dirty_since` is set by the first
-- change and cleared by the backup, so only pending rows are in this index.
CREATE INDEX files_pending_since ON files (dirty_since) WHERE dirty_since IS NOT NULL;

-- Failed files, listed by `status` (few, and written only when a file fails or recovers).
CREATE INDEX files_failed ON files (path) WHERE state = 'failed';

-- The latest acknowledgement's receiver time, kept by `record_acks` (was MAX over `files`).
INSERT INTO meta (key, value)
    SELECT 'last_backed_at', CAST(MAX(backed_at) AS TEXT) FROM files HAVING MAX(backed_at) IS NOT NULL;
