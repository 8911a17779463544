-- coffer-receiver index, schema 1. Applied once, in a transaction, when user_version < 1.
-- Never edit a shipped migration: add 0002_*.sql instead.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Length of each pack's durable, indexed prefix. Records past it are an unindexed tail,
-- scanned (and re-indexed or cut) when the repository is opened.
CREATE TABLE packs (
    pack   INTEGER PRIMARY KEY,
    length INTEGER NOT NULL
);

-- Where each sealed chunk is: record at `offset` in `pack`, `len` sealed bytes,
-- `hash` = BLAKE3 of the sealed bytes (also in the record header).
CREATE TABLE chunks (
    id     BLOB PRIMARY KEY,
    pack   INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    len    INTEGER NOT NULL,
    hash   BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX chunks_by_location ON chunks (pack, offset);

-- File versions, numbered here (AUTOINCREMENT: never reused, so monotonic per repository).
CREATE TABLE versions (
    version     INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id     BLOB NOT NULL,
    commit_id   BLOB NOT NULL UNIQUE,
    commit_time INTEGER NOT NULL,
    manifest    BLOB NOT NULL
);
CREATE INDEX versions_by_file ON versions (file_id, version);

-- Chunks each version references (for retention and garbage collection).
CREATE TABLE version_chunks (
    version INTEGER NOT NULL REFERENCES versions (version),
    chunk   BLOB NOT NULL,
    PRIMARY KEY (version, chunk)
) WITHOUT ROWID;
CREATE INDEX version_chunks_by_chunk ON version_chunks (chunk);

INSERT INTO meta (key, value) VALUES ('format', 'coffer-receiver index');
