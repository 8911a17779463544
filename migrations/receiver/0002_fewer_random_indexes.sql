-- coffer-receiver index, schema 2: two fewer indexes keyed by random bytes.
--
-- Chunk ids, commit ids and file ids are random, so every insert into an index keyed by
-- one of them changes a random page, and every such page is written to the WAL at commit
-- and again at the next checkpoint: with four of them, backing up 100,000 small files wrote
-- 1.7 GB for 60 MB of data. Two of the four served nothing that needs them:
--
-- * `version_chunks_by_chunk` was kept for a garbage collector that does not exist; the
--   migration that adds one will build the index it needs.
-- * `versions.commit_id UNIQUE` answered "was this commit already made?". A repeated commit
--   always names the same file, so the question is now asked through `versions_by_file`
--   (a file has few versions), which the listing of a file's history needs anyway.
DROP INDEX version_chunks_by_chunk;

CREATE TABLE versions_new (
    version     INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id     BLOB NOT NULL,
    commit_id   BLOB NOT NULL,
    commit_time INTEGER NOT NULL,
    manifest    BLOB NOT NULL
);
INSERT INTO versions_new (version, file_id, commit_id, commit_time, manifest)
    SELECT version, file_id, commit_id, commit_time, manifest FROM versions ORDER BY version;
DROP TABLE versions;
ALTER TABLE versions_new RENAME TO versions;
CREATE INDEX versions_by_file ON versions (file_id, version);
