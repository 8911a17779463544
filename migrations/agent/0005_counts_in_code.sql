-- `file_stats` is now kept by the journal's code, in the same transactions that change
-- `files`: each write reads the row's counted columns (state, size, backed_kind) before
-- and after, and the differences are added to `file_stats` once per transaction. The
-- triggers of 0004 cost more than the writes they counted: a statement that fires a
-- trigger runs with a statement journal, and backing up 100,000 small files spent
-- ~2.5 s of the agent's ~8 s of CPU in them (measured by dropping them).
DROP TRIGGER files_stats_insert;
DROP TRIGGER files_stats_delete;
DROP TRIGGER files_stats_update;
