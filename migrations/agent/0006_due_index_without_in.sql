-- The claim's partial index, with its condition written without `IN (...)`: SQLite
-- evaluates a partial index's condition for the old and the new row of every write, and
-- an `IN` list of three values is built as a temporary table each time (two per UPDATE,
-- three per upsert of the journal). The same rows are indexed; the queries that use it
-- repeat the condition word for word (the planner matches it term by term).
DROP INDEX files_due;
CREATE INDEX files_due ON files(due_at)
    WHERE (state = 'dirty' OR state = 'uploading' OR state = 'failed') AND claimed = 0;
