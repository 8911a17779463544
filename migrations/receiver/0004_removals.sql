-- coffer-receiver index, schema 4: versions `prune` removed, and the removal records
-- that say so in the packs.
--
-- `removed`: one row per removed version. A commit record of (file_id, commit_id) whose
-- version is at most `version` is never indexed again (recovery, `repair`), and `scrub`
-- does not count it as missing from the index. Keyed by file and commit (random keys), but
-- written only by `prune`, never by a backup.
-- `removals`: each removal record the packs hold, by the BLAKE3 of its body, where its
-- counted copy is (`pack`, `offset`) and how long it is (header included). Compaction
-- carries these forward; a second copy (a compaction cut off) is garbage.
CREATE TABLE removed (
    file_id   BLOB NOT NULL,
    commit_id BLOB NOT NULL,
    version   INTEGER NOT NULL,
    PRIMARY KEY (file_id, commit_id, version)
) WITHOUT ROWID;

CREATE TABLE removals (
    hash   BLOB PRIMARY KEY,
    pack   INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    len    INTEGER NOT NULL
) WITHOUT ROWID;
