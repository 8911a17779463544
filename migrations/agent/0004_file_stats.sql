-- `status` must answer in milliseconds however many files are watched: it is polled by
-- people and by scripts while the daemon works. Counting by scanning `files` took 150 ms
-- at 100,000 rows (a sort of every row), so the counts are kept here, exactly, by triggers
-- in the same transactions that change `files`.
--
-- One row per state, and `deleted` for backed-up deletions (counted apart from `backed_up`).
-- `bytes` sums the last-read size of files not backed up (what `status` calls pending bytes).
CREATE TABLE file_stats (
    key   TEXT PRIMARY KEY,
    n     INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;

-- Every key a row can have (the states of 0001, and `deleted`) is here from the start, so
-- the triggers only update: a conflict clause inside a trigger would be overridden by the
-- statement that fired it (`mark_dirty`'s upsert). Each trigger is one statement: a
-- trigger program opens its cursors for every row it fires on.
INSERT INTO file_stats (key, n, bytes) VALUES
    ('dirty', 0, 0), ('pending', 0, 0), ('uploading', 0, 0), ('failed', 0, 0),
    ('backed_up', 0, 0), ('deleted', 0, 0);

UPDATE file_stats SET
    n = (SELECT COUNT(*) FROM files
         WHERE CASE WHEN state = 'backed_up' AND backed_kind IS 'deleted' THEN 'deleted' ELSE state END = key),
    bytes = (SELECT COALESCE(SUM(COALESCE(size, 0)), 0) FROM files
             WHERE state = key AND state != 'backed_up');

CREATE TRIGGER files_stats_insert AFTER INSERT ON files BEGIN
    UPDATE file_stats SET n = n + 1, bytes = bytes + CASE WHEN new.state != 'backed_up' THEN COALESCE(new.size, 0) ELSE 0 END
        WHERE key = CASE WHEN new.state = 'backed_up' AND new.backed_kind IS 'deleted' THEN 'deleted' ELSE new.state END;
END;

CREATE TRIGGER files_stats_delete AFTER DELETE ON files BEGIN
    UPDATE file_stats SET n = n - 1, bytes = bytes - CASE WHEN old.state != 'backed_up' THEN COALESCE(old.size, 0) ELSE 0 END
        WHERE key = CASE WHEN old.state = 'backed_up' AND old.backed_kind IS 'deleted' THEN 'deleted' ELSE old.state END;
END;

CREATE TRIGGER files_stats_update AFTER UPDATE OF state, size, backed_kind ON files
WHEN old.state IS NOT new.state OR old.size IS NOT new.size OR old.backed_kind IS NOT new.backed_kind
BEGIN
    UPDATE file_stats SET
        n = n + (key = CASE WHEN new.state = 'backed_up' AND new.backed_kind IS 'deleted' THEN 'deleted' ELSE new.state END) - (key = CASE WHEN old.state = 'backed_up' AND old.backed_kind IS 'deleted' THEN 'deleted' ELSE old.state END),
        bytes = bytes
            + CASE WHEN key = CASE WHEN new.state = 'backed_up' AND new.backed_kind IS 'deleted' THEN 'deleted' ELSE new.state END THEN CASE WHEN new.state != 'backed_up' THEN COALESCE(new.size, 0) ELSE 0 END ELSE 0 END
            - CASE WHEN key = CASE WHEN old.state = 'backed_up' AND old.backed_kind IS 'deleted' THEN 'deleted' ELSE old.state END THEN CASE WHEN old.state != 'backed_up' THEN COALESCE(old.size, 0) ELSE 0 END ELSE 0 END
        WHERE key IN (CASE WHEN new.state = 'backed_up' AND new.backed_kind IS 'deleted' THEN 'deleted' ELSE new.state END, CASE WHEN old.state = 'backed_up' AND old.backed_kind IS 'deleted' THEN 'deleted' ELSE old.state END);
END;

-- The oldest change not yet backed up (`pending_since`): `dirty_since` is set by the first
-- change and cleared by the backup, so only pending rows are in this index.
CREATE INDEX files_pending_since ON files (dirty_since) WHERE dirty_since IS NOT NULL;

-- Failed files, listed by `status` (few, and written only when a file fails or recovers).
CREATE INDEX files_failed ON files (path) WHERE state = 'failed';

-- The latest acknowledgement's receiver time, kept by `record_acks` (was MAX over `files`).
INSERT INTO meta (key, value)
    SELECT 'last_backed_at', CAST(MAX(backed_at) AS TEXT) FROM files HAVING MAX(backed_at) IS NOT NULL;
