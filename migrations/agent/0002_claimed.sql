-- A row handed to the uploader is marked claimed until its outcome is recorded, so the
-- scheduler never hands it out twice; a partial index keeps claiming cheap with many rows.
ALTER TABLE files ADD COLUMN claimed INTEGER NOT NULL DEFAULT 0;
CREATE INDEX files_due ON files(due_at) WHERE state IN ('dirty', 'uploading', 'failed') AND claimed = 0;
