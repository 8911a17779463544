-- Leftovers of earlier schemas go. No build wrote the `pending` state, and none has set
-- `claimed` since claims are held in memory; the restart requeue turned both back into
-- work due now. A journal that still has them is brought to where that requeue left it:
-- `pending` rows become `dirty`, due now (their count and pending bytes move with them in
-- `file_stats`), and dropping `claimed` releases every row it held.
UPDATE file_stats SET
    n = n + COALESCE((SELECT n FROM file_stats WHERE key = 'pending'), 0),
    bytes = bytes + COALESCE((SELECT bytes FROM file_stats WHERE key = 'pending'), 0)
    WHERE key = 'dirty';
DELETE FROM file_stats WHERE key = 'pending';
UPDATE files SET state = 'dirty', due_at = 0 WHERE state = 'pending';

-- The claim's partial index named `claimed`: it is rebuilt without it. The claim's queries
-- repeat this condition word for word (the planner matches it term by term).
DROP INDEX files_due;
ALTER TABLE files DROP COLUMN claimed;
CREATE INDEX files_due ON files(due_at) WHERE (state = 'dirty' OR state = 'uploading' OR state = 'failed');
