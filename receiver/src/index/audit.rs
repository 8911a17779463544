//! Reads that check the index against the packs: `scrub` walks every version with its
//! references, and opening a repository samples a few rows whose records it reads back.

use coffer_common::chunk::{ChunkId, FileId};
use coffer_common::wire::CommitId;
use rusqlite::{params, OptionalExtension};

use super::{blob_err, sql_err, ChunkRow, Index, IndexError};
use crate::records::Deletion;
use crate::store::{Location, PackNo};

/// First schema whose versions carry their commit record's location.
const RECORDS_SCHEMA: i64 = 3;

/// A version as the index holds it, with its references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedVersion {
    pub version: u64,
    pub file_id: FileId,
    pub commit_id: CommitId,
    pub commit_time: i64,
    pub manifest: Vec<u8>,
    pub deletion: Deletion,
    /// Where its commit record is; `None` until the upgrade writes it.
    pub record: Option<(PackNo, u64)>,
    /// The chunks it references, in id order.
    pub chunks: Vec<ChunkId>,
}

impl Index {
    /// True when the schema has the versions' record columns (a read-only open of an
    /// index no receiver with commit records has migrated yet does not).
    fn has_record_columns(&self) -> Result<bool, IndexError> {
        let v: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql_err(&self.path))?;
        Ok(v >= RECORDS_SCHEMA)
    }

    fn version_query(&self, tail: &str) -> Result<String, IndexError> {
        let cols = if self.has_record_columns()? {
            "deleted, record_pack, record_offset"
        } else {
            "NULL, NULL, NULL"
        };
        Ok(format!(
            "SELECT version, file_id, commit_id, commit_time, manifest, {cols} FROM versions {tail}"
        ))
    }

    fn version_row(&self, r: &rusqlite::Row<'_>) -> Result<IndexedVersion, IndexError> {
        let e = sql_err(&self.path);
        let pack: Option<u32> = r.get(6).map_err(e)?;
        let offset: Option<u64> = r.get(7).map_err(e)?;
        Ok(IndexedVersion {
            version: r.get(0).map_err(e)?,
            file_id: r.get(1).map_err(blob_err(&self.path, "a file id"))?,
            commit_id: r.get(2).map_err(blob_err(&self.path, "a commit id"))?,
            commit_time: r.get(3).map_err(e)?,
            manifest: r.get(4).map_err(e)?,
            deletion: Deletion::from_column(r.get(5).map_err(e)?),
            record: pack.zip(offset).map(|(p, o)| (PackNo(p), o)),
            chunks: Vec::new(),
        })
    }

    /// Calls `f` for every version with its references, in version order. `f` returning
    /// `false` stops the walk. One version is in memory at a time.
    pub fn for_each_version(
        &self,
        mut f: impl FnMut(&IndexedVersion) -> bool,
    ) -> Result<(), IndexError> {
        let e = sql_err(&self.path);
        let mut s = self
            .conn
            .prepare(&self.version_query("ORDER BY version")?)
            .map_err(e)?;
        let mut refs = self
            .conn
            .prepare("SELECT chunk FROM version_chunks WHERE version = ?1 ORDER BY chunk")
            .map_err(e)?;
        let mut rows = s.query([]).map_err(e)?;
        while let Some(r) = rows.next().map_err(e)? {
            let mut v = self.version_row(r)?;
            let mut c = refs.query([v.version]).map_err(e)?;
            while let Some(row) = c.next().map_err(e)? {
                v.chunks
                    .push(row.get(0).map_err(blob_err(&self.path, "a chunk id"))?);
            }
            if !f(&v) {
                break;
            }
        }
        Ok(())
    }

    /// Version `version`'s commit id, file id and record location, if it is indexed.
    pub fn version_at(&self, version: u64) -> Result<Option<IndexedVersion>, IndexError> {
        let e = sql_err(&self.path);
        let mut s = self
            .conn
            .prepare_cached(&self.version_query("WHERE version = ?1")?)
            .map_err(e)?;
        let mut rows = s.query([version]).map_err(e)?;
        match rows.next().map_err(e)? {
            Some(r) => Ok(Some(self.version_row(r)?)),
            None => Ok(None),
        }
    }

    /// The version that records commit `commit_id` of file `file_id`, if indexed.
    pub fn version_of_commit(
        &self,
        file_id: &FileId,
        commit_id: &CommitId,
    ) -> Result<Option<u64>, IndexError> {
        self.conn
            .prepare_cached("SELECT version FROM versions WHERE file_id = ?1 AND commit_id = ?2")
            .and_then(|mut s| {
                s.query_row(params![file_id, commit_id], |r| r.get(0))
                    .optional()
            })
            .map_err(sql_err(&self.path))
    }

    /// The `n` first and `n` last chunk rows in pack order: a sample, cheap to read,
    /// whose records opening a repository checks.
    pub fn edge_chunks(&self, n: usize) -> Result<Vec<ChunkRow>, IndexError> {
        let mut out = Vec::new();
        for order in ["pack, offset", "pack DESC, offset DESC"] {
            let mut s = self
                .conn
                .prepare(&format!(
                    "SELECT id, pack, offset, len, hash FROM chunks ORDER BY {order} LIMIT ?1"
                ))
                .map_err(sql_err(&self.path))?;
            let mut rows = s.query([n as i64]).map_err(sql_err(&self.path))?;
            while let Some(r) = rows.next().map_err(sql_err(&self.path))? {
                let e = sql_err(&self.path);
                let row = ChunkRow {
                    id: r.get(0).map_err(blob_err(&self.path, "a chunk id"))?,
                    loc: Location {
                        pack: PackNo(r.get(1).map_err(e)?),
                        offset: r.get(2).map_err(e)?,
                        len: r.get(3).map_err(e)?,
                        hash: r.get(4).map_err(blob_err(&self.path, "a chunk hash"))?,
                    },
                };
                out.push(row);
            }
        }
        Ok(out)
    }

    /// The `n` newest versions (with their references): a sample whose commit records
    /// opening a repository checks.
    pub fn newest_versions(&self, n: usize) -> Result<Vec<IndexedVersion>, IndexError> {
        let e = sql_err(&self.path);
        let mut s = self
            .conn
            .prepare(&self.version_query("ORDER BY version DESC LIMIT ?1")?)
            .map_err(e)?;
        let mut rows = s.query([n as i64]).map_err(e)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(e)? {
            out.push(self.version_row(r)?);
        }
        for v in &mut out {
            let mut refs = self
                .conn
                .prepare_cached(
                    "SELECT chunk FROM version_chunks WHERE version = ?1 ORDER BY chunk",
                )
                .map_err(e)?;
            let mut c = refs.query([v.version]).map_err(e)?;
            while let Some(row) = c.next().map_err(e)? {
                v.chunks
                    .push(row.get(0).map_err(blob_err(&self.path, "a chunk id"))?);
            }
        }
        Ok(out)
    }

    /// How many versions have no commit record yet (all of them in a schema older than
    /// commit records).
    pub fn unrecorded_versions(&self) -> Result<u64, IndexError> {
        let sql = if self.has_record_columns()? {
            "SELECT COUNT(*) FROM versions WHERE record_pack IS NULL"
        } else {
            "SELECT COUNT(*) FROM versions"
        };
        self.conn
            .query_row(sql, [], |r| r.get(0))
            .map_err(sql_err(&self.path))
    }

    /// SQLite's own check of every page (`PRAGMA quick_check`): `None` when it finds
    /// nothing, else its first complaint. It reads the whole file.
    pub fn quick_check(&self) -> Result<Option<String>, IndexError> {
        let first: String = self
            .conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(sql_err(&self.path))?;
        Ok((first != "ok").then_some(first))
    }
}
