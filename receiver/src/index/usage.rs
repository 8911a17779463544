//! What `status` and `/metrics` show of a repository's bytes, in a few aggregate queries:
//! live, the records the index still references; unused, the rest of the packs' indexed
//! parts (less their headers). Both come from one read of the index, so a batch being
//! written meanwhile (past a pack's indexed end) is in neither. Also the meta row of the
//! last prune.

use rusqlite::OptionalExtension;

use super::{sql_err, Index, IndexError};
use crate::records::COMMIT_FIXED;
use crate::store::{PACK_HEADER_LEN, RECORD_HEADER_LEN};

/// First schema whose versions carry their commit record's location.
const RECORDS_SCHEMA: i64 = 3;

/// Counts of a repository, and the bytes of the pack records its index references.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Distinct file ids with at least one version.
    pub files: u64,
    pub versions: u64,
    /// The latest commit time (the receiver's clock, unix seconds).
    pub last_commit: Option<i64>,
    /// Chunk rows, their sealed bytes, and the bytes of their records (header + sealed).
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub chunk_record_bytes: u64,
    /// Versions whose commit record is written, and the bytes of those records.
    pub commit_records: u64,
    pub commit_record_bytes: u64,
    /// Packs the index knows, and their indexed lengths (headers included).
    pub packs: u64,
    pub pack_bytes: u64,
}

impl Usage {
    /// Bytes of the pack records the index references.
    pub fn live_bytes(&self) -> u64 {
        self.chunk_record_bytes + self.commit_record_bytes
    }

    /// Bytes of the packs' indexed parts that hold no referenced record (nor a pack
    /// header): records prune dropped, repeated commit records, anything compaction frees.
    pub fn unused_bytes(&self) -> u64 {
        self.pack_bytes
            .saturating_sub(self.packs * PACK_HEADER_LEN)
            .saturating_sub(self.live_bytes())
    }
}

impl Index {
    /// Files, versions and live bytes, in one read transaction. A commit record's length is
    /// computed, not read: header + fixed body + manifest + 32 bytes per chunk it references
    /// (its `version_chunks` rows: the record lists each chunk once). Versions the upgrade
    /// has not written a record for yet count nothing.
    pub fn usage(&self) -> Result<Usage, IndexError> {
        let e = sql_err(&self.path);
        let tx = self.conn.unchecked_transaction().map_err(e)?;
        let pair = |sql: &str| -> Result<(u64, u64), IndexError> {
            self.conn
                .query_row(sql, [], |r| {
                    Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?))
                })
                .map(|(a, b)| (a.unwrap_or(0).max(0) as u64, b.unwrap_or(0).max(0) as u64))
                .map_err(e)
        };
        let (files, versions) = pair("SELECT COUNT(DISTINCT file_id), COUNT(*) FROM versions")?;
        let last_commit: Option<i64> = self
            .conn
            .query_row("SELECT MAX(commit_time) FROM versions", [], |r| r.get(0))
            .map_err(e)?;
        let (chunks, sealed) = pair("SELECT COUNT(*), SUM(len) FROM chunks")?;
        let (packs, pack_bytes) = pair("SELECT COUNT(*), SUM(length) FROM packs")?;
        let schema: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(e)?;
        let (commit_records, commit_record_bytes) = if schema >= RECORDS_SCHEMA {
            let (records, manifests) = pair(
                "SELECT COUNT(*), SUM(length(manifest)) FROM versions \
                 WHERE record_pack IS NOT NULL",
            )?;
            let (refs, unrecorded_refs) = pair(
                "SELECT (SELECT COUNT(*) FROM version_chunks), \
                 (SELECT COUNT(*) FROM version_chunks WHERE version IN \
                  (SELECT version FROM versions WHERE record_pack IS NULL))",
            )?;
            let ids = refs.saturating_sub(unrecorded_refs);
            (
                records,
                records * (RECORD_HEADER_LEN + COMMIT_FIXED as u64) + manifests + 32 * ids,
            )
        } else {
            (0, 0)
        };
        // Only read: ending it cannot lose anything.
        drop(tx);
        Ok(Usage {
            files,
            versions,
            last_commit,
            chunks,
            chunk_bytes: sealed,
            chunk_record_bytes: chunks * RECORD_HEADER_LEN + sealed,
            commit_records,
            commit_record_bytes,
            packs,
            pack_bytes,
        })
    }

    /// The meta row `last_prune` (JSON, written by prune), if there is one.
    pub fn last_prune_json(&self) -> Result<Option<String>, IndexError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'last_prune'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Mode;

    /// An index of schema `upto` with one pack, two chunks and two versions (one
    /// referencing both chunks, one referencing one; with records where the schema has them).
    fn index(dir: &std::path::Path, upto: usize) -> std::path::PathBuf {
        let path = dir.join(format!("index{upto}.sqlite"));
        let db = rusqlite::Connection::open(&path).expect("open");
        for m in &crate::index::SCHEMA.migrations[..upto] {
            db.execute_batch(m).expect("migrate");
        }
        db.pragma_update(None, "user_version", upto as i64)
            .expect("version");
        db.execute_batch(
            "INSERT INTO packs VALUES (1, 100000);
             INSERT INTO chunks VALUES (x'01', 1, 16, 1000, x'00');
             INSERT INTO chunks VALUES (x'02', 1, 1088, 500, x'00');
             INSERT INTO versions (version, file_id, commit_id, commit_time, manifest)
                 VALUES (1, x'0a', x'0b', 10, zeroblob(300));
             INSERT INTO versions (version, file_id, commit_id, commit_time, manifest)
                 VALUES (2, x'0a', x'0c', 20, zeroblob(200));
             INSERT INTO version_chunks VALUES (1, x'01'), (1, x'02'), (2, x'02');",
        )
        .expect("rows");
        if upto >= 3 {
            // Version 1 has its record; version 2 waits for the upgrade.
            db.execute_batch("UPDATE versions SET record_pack = 1 WHERE version = 1")
                .expect("record");
        }
        path
    }

    #[test]
    fn live_and_unused_bytes_of_every_schema() {
        let tmp = tempfile::tempdir().expect("tmp");
        let chunks = 2 * RECORD_HEADER_LEN + 1500;
        for (schema, commits) in [
            (1, 0),
            (2, 0),
            (3, RECORD_HEADER_LEN + COMMIT_FIXED as u64 + 300 + 2 * 32),
        ] {
            let ix = Index::open(&index(tmp.path(), schema), Mode::Read).expect("open");
            let u = ix.usage().expect("usage");
            assert_eq!((u.files, u.versions, u.last_commit), (1, 2, Some(20)));
            assert_eq!((u.chunks, u.chunk_bytes, u.packs), (2, 1500, 1));
            assert_eq!(u.live_bytes(), chunks + commits, "schema {schema}");
            assert_eq!(
                u.unused_bytes(),
                100_000 - PACK_HEADER_LEN - chunks - commits,
                "schema {schema}"
            );
            assert_eq!(ix.last_prune_json().expect("meta"), None);
        }
        let empty = Index::open(&tmp.path().join("empty.sqlite"), Mode::Write).expect("new");
        let u = empty.usage().expect("usage");
        assert_eq!(u, Usage::default());
    }
}
