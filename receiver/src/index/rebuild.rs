//! Building an index from the packs alone, for `repair`: a fresh file filled record by
//! record in large transactions, made durable once at the end. The file is thrown away if
//! the build does not finish, so it is written without a journal and without fsyncs until
//! [`Index::finish_rebuild`].

use std::path::Path;

use coffer_common::chunk::{ChunkId, FileId};
use rusqlite::{params, OpenFlags, OptionalExtension};

use super::{blob_err, sql_err, Index, IndexError, RecordedRemoval, SCHEMA};
use crate::records::CommitRecord;
use crate::store::{Location, PackNo};

/// Page cache of the building connection, KiB: the working set of a rebuild lives in the
/// file, not in memory.
const REBUILD_CACHE_KIB: i64 = 16 << 10;

/// What became of a commit record added by [`Index::rebuild_version`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// Indexed.
    New,
    /// The same commit (file id, commit id) is already indexed as this higher version:
    /// this record was not added.
    Duplicate { kept: u64 },
    /// The same commit was indexed under this lower version, which was dropped for this
    /// record's.
    Replaced { dropped: u64 },
    /// Another commit already holds this version number: this record was not added.
    Conflict,
}

impl Index {
    /// A new, empty index at `path` for a rebuild, with a transaction open. Nothing may
    /// be at `path` (nor its `-journal`): the caller removes what a cut-off rebuild left.
    pub fn create_rebuild(path: &Path) -> Result<Self, IndexError> {
        let e = sql_err(path);
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = SCHEMA.connect(path, flags)?;
        conn.pragma_update(None, "journal_mode", "OFF").map_err(e)?;
        conn.pragma_update(None, "synchronous", "OFF").map_err(e)?;
        conn.pragma_update(None, "cache_size", -REBUILD_CACHE_KIB)
            .map_err(e)?;
        SCHEMA.migrate(&mut conn, path)?;
        conn.execute_batch("BEGIN").map_err(e)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Commits what the rebuild added so far and opens the next transaction.
    pub fn rebuild_checkpoint(&mut self) -> Result<(), IndexError> {
        self.conn
            .execute_batch("COMMIT; BEGIN")
            .map_err(sql_err(&self.path))
    }

    /// Adds a chunk found in a pack (the first location found is kept).
    pub fn rebuild_chunk(&mut self, id: &ChunkId, l: &Location) -> Result<(), IndexError> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO chunks (id, pack, offset, len, hash) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![id, l.pack.0, l.offset, l.len, &l.hash[..]]))
            .map(|_| ())
            .map_err(sql_err(&self.path))
    }

    /// Records a pack's valid length.
    pub fn rebuild_pack(&mut self, pack: PackNo, len: u64) -> Result<(), IndexError> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO packs (pack, length) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![pack.0, len]))
            .map(|_| ())
            .map_err(sql_err(&self.path))
    }

    /// Adds the version a commit record holds, at its own number, with its references and
    /// the record's location. A commit recorded twice keeps its highest version: the write
    /// path writes a second record only when the first was never acknowledged (its chunks
    /// were missing when recovery found it), so the higher one is what the agent was told.
    pub fn rebuild_version(
        &mut self,
        r: &CommitRecord,
        at: (PackNo, u64),
    ) -> Result<Added, IndexError> {
        let e = sql_err(&self.path);
        let same: Option<u64> = self
            .conn
            .prepare_cached("SELECT version FROM versions WHERE file_id = ?1 AND commit_id = ?2")
            .and_then(|mut s| {
                s.query_row(params![r.file_id, r.commit_id], |row| row.get(0))
                    .optional()
            })
            .map_err(e)?;
        let mut added = Added::New;
        match same {
            Some(v) if v >= r.version => return Ok(Added::Duplicate { kept: v }),
            Some(v) => {
                self.conn
                    .execute("DELETE FROM version_chunks WHERE version = ?1", [v])
                    .and_then(|_| {
                        self.conn
                            .execute("DELETE FROM versions WHERE version = ?1", [v])
                    })
                    .map_err(e)?;
                added = Added::Replaced { dropped: v };
            }
            None => {}
        }
        let taken = self
            .conn
            .prepare_cached("SELECT 1 FROM versions WHERE version = ?1")
            .and_then(|mut s| s.exists([r.version]))
            .map_err(e)?;
        if taken {
            return Ok(Added::Conflict);
        }
        self.conn
            .prepare_cached(
                "INSERT INTO versions (version, file_id, commit_id, commit_time, manifest, \
                 deleted, record_pack, record_offset) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    r.version,
                    r.file_id,
                    r.commit_id,
                    r.commit_time,
                    &r.manifest[..],
                    r.deletion.to_column(),
                    at.0 .0,
                    at.1
                ])
            })
            .map_err(e)?;
        let mut ins = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO version_chunks (version, chunk) VALUES (?1, ?2)")
            .map_err(e)?;
        for id in &r.chunks {
            ins.execute(params![r.version, id]).map_err(e)?;
        }
        Ok(added)
    }

    /// Adds a removal record found in a pack: registered (the first copy of it found counts)
    /// with the versions it names. They are forgotten by [`Index::rebuild_apply_removals`]
    /// once every pack has been read (a removed version's record may come later).
    pub fn rebuild_removal(&mut self, r: &RecordedRemoval) -> Result<(), IndexError> {
        let e = sql_err(&self.path);
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO removals (hash, pack, offset, len) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![&r.hash[..], r.at.0 .0, r.at.1, r.record_len()]))
            .map_err(e)?;
        let mut note = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO removed (file_id, commit_id, version) VALUES (?1, ?2, ?3)",
            )
            .map_err(e)?;
        for x in &r.record.removed {
            note.execute(params![x.file_id, x.commit_id, x.version])
                .map_err(e)?;
        }
        Ok(())
    }

    /// Forgets every version a removal names (its commit at that version or below), with
    /// its references; returns how many.
    pub fn rebuild_apply_removals(&mut self) -> Result<u64, IndexError> {
        let e = sql_err(&self.path);
        let named = "EXISTS (SELECT 1 FROM removed r WHERE r.file_id = v.file_id                      AND r.commit_id = v.commit_id AND r.version >= v.version)";
        self.conn
            .execute(
                &format!(
                    "DELETE FROM version_chunks WHERE version IN                      (SELECT v.version FROM versions v WHERE {named})"
                ),
                [],
            )
            .map_err(e)?;
        let n = self
            .conn
            .execute(
                &format!(
                    "DELETE FROM versions WHERE version IN                      (SELECT v.version FROM versions v WHERE {named})"
                ),
                [],
            )
            .map_err(e)?;
        let hi: Option<u64> = self
            .conn
            .query_row("SELECT MAX(version) FROM removed", [], |r| r.get(0))
            .map_err(e)?;
        if let Some(hi) = hi {
            self.rebuild_reserve(hi)?;
        }
        Ok(n as u64)
    }

    /// Makes the next version number assigned at least `version + 1`: a damaged commit
    /// record's number is not reused for another commit.
    pub fn rebuild_reserve(&mut self, version: u64) -> Result<(), IndexError> {
        let e = sql_err(&self.path);
        let v = i64::try_from(version).unwrap_or(i64::MAX);
        let updated = self
            .conn
            .execute(
                "UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'versions'",
                [v],
            )
            .map_err(e)?;
        if updated == 0 {
            self.conn
                .execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('versions', ?1)",
                    [v],
                )
                .map_err(e)?;
        }
        Ok(())
    }

    /// Commits the rebuild and closes it in rollback-journal mode (no `-wal` beside it).
    /// The caller makes the file durable.
    pub fn finish_rebuild(self) -> Result<(), IndexError> {
        let e = sql_err(&self.path);
        self.conn.execute_batch("COMMIT").map_err(e)?;
        self.conn
            .pragma_update(None, "journal_mode", "DELETE")
            .map_err(e)?;
        self.conn.close().map_err(|(_, err)| e(err))
    }

    /// Calls `f(version, file id, chunk)` for every reference to a chunk that is not
    /// indexed, in version order (`repair`'s lost chunks, `scrub`'s unresolved references).
    pub fn unresolved_references(
        &self,
        mut f: impl FnMut(u64, FileId, ChunkId),
    ) -> Result<u64, IndexError> {
        let mut s = self
            .conn
            .prepare(
                // The file id is looked up only for the (few) references that do not
                // resolve: a join would seek every version row once per reference.
                "SELECT vc.version, \
                 (SELECT v.file_id FROM versions v WHERE v.version = vc.version), vc.chunk \
                 FROM version_chunks vc \
                 WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = vc.chunk) \
                 ORDER BY vc.version",
            )
            .map_err(sql_err(&self.path))?;
        let mut rows = s.query([]).map_err(sql_err(&self.path))?;
        let mut n = 0;
        while let Some(r) = rows.next().map_err(sql_err(&self.path))? {
            let version: u64 = r.get(0).map_err(sql_err(&self.path))?;
            let file = r.get(1).map_err(blob_err(&self.path, "a file id"))?;
            let chunk = r.get(2).map_err(blob_err(&self.path, "a chunk id"))?;
            f(version, file, chunk);
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Mode;
    use crate::records::Deletion;
    use coffer_common::wire::CommitId;

    fn rec(version: u64, commit: u8, chunks: &[u8]) -> CommitRecord {
        CommitRecord {
            commit_id: CommitId([commit; 16]),
            file_id: FileId([commit; 32]),
            version,
            commit_time: 1_700_000_000 + version as i64,
            deletion: Deletion::No,
            manifest: vec![commit; 20],
            chunks: chunks.iter().map(|&c| ChunkId([c; 32])).collect(),
        }
    }

    #[test]
    fn a_rebuild_keeps_numbers_and_the_highest_of_a_repeated_commit() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("index.sqlite.repair");
        let mut ix = Index::create_rebuild(&p).expect("create");
        let loc = Location {
            pack: PackNo(1),
            offset: 16,
            len: 5,
            hash: [1; 32],
        };
        ix.rebuild_chunk(&ChunkId([1; 32]), &loc).expect("chunk");
        ix.rebuild_pack(PackNo(1), 500).expect("pack");
        assert_eq!(
            ix.rebuild_version(&rec(7, 1, &[1]), (PackNo(1), 93))
                .expect("v"),
            Added::New
        );
        ix.rebuild_checkpoint().expect("checkpoint");
        assert_eq!(
            ix.rebuild_version(&rec(3, 1, &[1]), (PackNo(1), 200))
                .expect("v"),
            Added::Duplicate { kept: 7 }
        );
        assert_eq!(
            ix.rebuild_version(&rec(9, 1, &[1, 2]), (PackNo(2), 16))
                .expect("v"),
            Added::Replaced { dropped: 7 }
        );
        assert_eq!(
            ix.rebuild_version(&rec(9, 2, &[1]), (PackNo(2), 300))
                .expect("v"),
            Added::Conflict
        );
        ix.rebuild_version(&rec(4, 3, &[1, 3]), (PackNo(2), 400))
            .expect("v");
        let mut lost = Vec::new();
        ix.unresolved_references(|v, _, c| lost.push((v, c.0[0])))
            .expect("lost");
        lost.sort();
        assert_eq!(lost, [(4, 3), (9, 2)]);
        ix.finish_rebuild().expect("finish");
        assert!(!d.path().join("index.sqlite.repair-wal").exists());
        let ix = Index::open(&p, Mode::Write).expect("opens as an index");
        // Above every number a record held: never reused.
        assert_eq!(ix.next_version().expect("next"), 10);
        let (v, _) = ix.list_versions(0, 10, 1 << 20).expect("list");
        assert_eq!(v.iter().map(|v| v.version).collect::<Vec<_>>(), [4, 9]);
        assert_eq!(ix.pack_lengths().expect("packs"), [(PackNo(1), 500)]);
        // A damaged record's number is reserved too.
        let mut other = Index::create_rebuild(&d.path().join("other")).expect("create");
        other.rebuild_reserve(12).expect("reserve");
        other.rebuild_reserve(5).expect("lower: no change");
        assert_eq!(other.next_version().expect("next"), 13);
    }
}
