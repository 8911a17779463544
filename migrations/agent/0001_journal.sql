-- The agent's journal: one row per path ever seen under a watched folder.
CREATE TABLE files (
    path           BLOB PRIMARY KEY,          -- watch-name/relative/path, raw bytes
    watch          TEXT NOT NULL,             -- the watch's name
    state          TEXT NOT NULL,             -- dirty | pending | uploading | backed_up | failed
    gen            INTEGER NOT NULL DEFAULT 0, -- bumped on every change seen
    due_at         INTEGER NOT NULL DEFAULT 0, -- unix ms: earliest the uploader takes it
    dirty_since    INTEGER,                   -- unix ms: first change not yet backed up
    kind           TEXT,                      -- file | symlink | deleted, as last read
    size           INTEGER,                   -- stat at the last read
    mtime_ns       INTEGER,
    ctime_ns       INTEGER,
    inode          INTEGER,
    mode           INTEGER,
    hash           BLOB,                      -- BLAKE3 of the bytes last read and sent
    commit_id      BLOB,                      -- recorded before CommitFile is sent
    attempts       INTEGER NOT NULL DEFAULT 0,
    reason         TEXT,                      -- why it failed or waits
    backed_version INTEGER,                   -- receiver version of the last ack
    backed_at      INTEGER,                   -- unix s of the last ack (receiver time)
    backed_hash    BLOB,
    backed_kind    TEXT,
    backed_size    INTEGER
) WITHOUT ROWID;

CREATE INDEX files_by_state ON files(state, due_at);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
