-- Deletions held for confirmation: a scan that would record more than `max_delete_share`
-- of a watch's files as deleted records none of them; it lists them here instead, and
-- their rows stay as they were (backed up). `coffer-agent confirm-deletions WATCH` marks
-- them dirty (the uploader then records each deletion) and removes them from here; a
-- later scan that finds a held file back, or few enough gone, removes it too.
CREATE TABLE held_deletions (
    path     BLOB PRIMARY KEY,            -- watch-name/relative/path, as in files.path
    watch    TEXT NOT NULL,               -- the watch's name
    held_at  INTEGER NOT NULL             -- unix ms: when a scan first held it
) WITHOUT ROWID;

CREATE INDEX held_deletions_by_watch ON held_deletions(watch, path);
