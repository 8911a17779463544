-- The order of work: a change the watcher saw while the agent ran (`class` 0, fresh) goes
-- ahead of what a scan found (`class` 1, backlog); within a class small files go first
-- (`tier`, from the size as seen: 0 under 1 MiB, 1 under 64 MiB, 2 under 1 GiB, 3 larger),
-- then the change waiting longest (`first_seen`, Unix ms of the first change not yet backed
-- up: `dirty_since`, but never NULL, since the claim compares it in a row value where a
-- NULL would hide the row). Kept in the journal so a restart keeps the order. Rows already
-- queued count as backlog.
ALTER TABLE files ADD COLUMN class INTEGER NOT NULL DEFAULT 1;
ALTER TABLE files ADD COLUMN tier INTEGER NOT NULL DEFAULT 0;
ALTER TABLE files ADD COLUMN first_seen INTEGER NOT NULL DEFAULT 0;
UPDATE files SET
    tier = CASE
        WHEN COALESCE(size, 0) < 1048576 THEN 0
        WHEN size < 67108864 THEN 1
        WHEN size < 1073741824 THEN 2
        ELSE 3 END,
    first_seen = COALESCE(dirty_since, due_at, 0);
-- The claim order. Its condition repeats `files_due`'s word for word (the claim's queries
-- repeat it too: the planner matches it term by term).
CREATE INDEX files_queue ON files(class, tier, first_seen, path)
    WHERE (state = 'dirty' OR state = 'uploading' OR state = 'failed');
