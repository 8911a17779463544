//! A repository's index (`index.sqlite`): chunk locations, pack lengths, file versions and
//! their chunk references. [`Index`] is the only owner of its connection and exposes typed
//! methods; no SQL leaves this module.
//!
//! The schema comes from `migrations/receiver/*.sql`, applied in order by
//! `PRAGMA user_version` through [`coffer_common::host::sqlite::Schema`] (each in its own
//! transaction; a newer schema refused, on read-only opens too). Ids are stored through
//! their `ToSql`/`FromSql`. WAL mode with `synchronous=FULL`: a committed transaction is
//! durable before an acknowledgement is sent.

use std::collections::HashSet;
use std::hash::Hash;
use std::path::{Path, PathBuf};

use coffer_common::chunk::{ChunkId, FileId};
use coffer_common::host::sqlite::{DbError, Schema};
use coffer_common::wire::{CommitId, VersionEntry};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::records::{CommitRecord, Deletion, RemovalRecord};
use crate::store::{Location, PackNo};

mod audit;
mod prune;
mod rebuild;
mod usage;
pub use audit::IndexedVersion;
pub use prune::{FileVersion, Held, Moved, PackUse};
pub use rebuild::Added;
pub use usage::Usage;

/// The index's schema: migration `i` brings it to version `i + 1`.
static SCHEMA: Schema = Schema {
    what: "index",
    program: "coffer-receiver",
    migrations: &[
        include_str!("../../migrations/receiver/0001_init.sql"),
        include_str!("../../migrations/receiver/0002_fewer_random_indexes.sql"),
        include_str!("../../migrations/receiver/0003_commit_records.sql"),
        include_str!("../../migrations/receiver/0004_removals.sql"),
    ],
};

/// Errors from the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A SQLite error, or a schema newer than this build knows.
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("index {}: {what} is not 32 bytes", path.display())]
    BadBlob { path: PathBuf, what: &'static str },
}

impl IndexError {
    /// True when SQLite reported a full disk.
    pub fn is_no_space(&self) -> bool {
        matches!(self, IndexError::Db(e) if e.is_no_space())
    }
}

/// `ids` without repeats, each where it first appears, into `out` (cleared first). `seen`
/// is scratch space the caller keeps across calls. A set, so that a request of many ids
/// costs linear time under the write lock, not quadratic; std's hasher is keyed per
/// process, so ids a peer chooses cannot be made to collide.
pub(crate) fn first_of_each<T: Copy + Eq + Hash>(
    ids: &[T],
    seen: &mut HashSet<T>,
    out: &mut Vec<T>,
) {
    seen.clear();
    out.clear();
    out.extend(ids.iter().filter(|id| seen.insert(**id)));
}

/// How to open an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Create if missing, migrate, write.
    Write,
    /// Existing index only, queries only (status, scrub, the serving read path).
    Read,
}

/// A commit to record.
#[derive(Clone, Debug)]
pub struct NewCommit {
    pub commit_id: CommitId,
    pub file_id: FileId,
    pub manifest: Vec<u8>,
    pub chunks: Vec<ChunkId>,
    /// The agent says the version records the file's deletion.
    pub deleted: bool,
}

/// What became of a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Recorded now, or earlier under the same commit id.
    Acked { version: u64, commit_time: i64 },
    /// Some referenced chunks are not in the repository.
    MissingChunks(Vec<ChunkId>),
}

/// A version as its commit record holds it, with where that record is: what recovery,
/// `repair` and the write path insert with [`Index::add_recorded`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedVersion {
    pub record: CommitRecord,
    /// The pack and offset of the commit record.
    pub at: (PackNo, u64),
}

/// A removal record with where it is: indexed with the removal of its versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRemoval {
    pub record: RemovalRecord,
    /// BLAKE3 of its body (its identity: a copy of it is the same removal).
    pub hash: [u8; 32],
    /// The pack and offset of the record.
    pub at: (PackNo, u64),
}

impl RecordedRemoval {
    /// Bytes the whole record takes.
    pub fn record_len(&self) -> u64 {
        crate::store::RECORD_HEADER_LEN + self.record.body_len() as u64
    }
}

/// Counts for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub versions: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub last_commit: Option<i64>,
}

/// One chunk row, for `scrub`.
#[derive(Clone, Copy, Debug)]
pub struct ChunkRow {
    pub id: ChunkId,
    pub loc: Location,
}

/// Page cache of the writing connection, KiB. It is most of the receiver's memory once an
/// index outgrows it (a million small files: an index of ~450 MB, the cache full), so it
/// is what bounds the receiver's peak; pages it does not hold are read from the OS's page
/// cache (see docs/experiments.md, "Receiver index page cache").
const INDEX_CACHE_KIB: i64 = 8 << 10;
/// WAL size (pages of 4 KiB) that triggers a checkpoint: 64 MiB.
const WAL_CHECKPOINT_PAGES: i64 = 16 << 10;

/// A repository's index database.
pub struct Index {
    conn: Connection,
    path: PathBuf,
}

/// Wraps a SQLite error with the index's path (which is cloned only on error).
fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> IndexError + Copy + '_ {
    move |source| {
        IndexError::Db(DbError::Sql {
            what: SCHEMA.what,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Like [`sql_err`], for reading a 32-byte column (an id or a hash): a blob of another
/// size is [`IndexError::BadBlob`] naming `what`.
fn blob_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl Fn(rusqlite::Error) -> IndexError + Copy + 'a {
    move |e| match e {
        rusqlite::Error::FromSqlConversionFailure(_, rusqlite::types::Type::Blob, _) => {
            IndexError::BadBlob {
                path: path.to_path_buf(),
                what,
            }
        }
        e => sql_err(path)(e),
    }
}

impl Index {
    fn err(&self) -> impl Fn(rusqlite::Error) -> IndexError + '_ {
        sql_err(&self.path)
    }

    /// Opens the index at `path`: for writing, created if missing and migrated; for
    /// reading, an existing one whose schema this build knows.
    pub fn open(path: &Path, mode: Mode) -> Result<Self, IndexError> {
        let e = sql_err(path);
        let flags = match mode {
            Mode::Write => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            Mode::Read => OpenFlags::SQLITE_OPEN_READ_WRITE,
        } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = SCHEMA.connect(path, flags)?;
        match mode {
            Mode::Write => {
                conn.pragma_update(None, "journal_mode", "WAL")
                    .map_err(&e)?;
                conn.pragma_update(None, "synchronous", "FULL")
                    .map_err(&e)?;
                // Chunk ids, commit ids and file ids are random keys: every insert touches a
                // random page of each index. A page cache that holds them (allocated as it
                // fills) keeps inserts off the disk and out of the kernel.
                conn.pragma_update(None, "cache_size", -INDEX_CACHE_KIB)
                    .map_err(&e)?;
                // A checkpoint copies every page changed since the last one into the
                // database file. Random keys change pages all over the indexes; every
                // 64 MiB, a page changed by many batches is copied once.
                conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)
                    .map_err(&e)?;
                // ...and after a checkpoint the WAL file is cut back to 8 MiB, so it does not
                // keep 64 MiB of disk once the burst is over.
                conn.pragma_update(None, "journal_size_limit", 8 << 20)
                    .map_err(&e)?;
                SCHEMA.migrate(&mut conn, path)?;
            }
            Mode::Read => {
                conn.pragma_update(None, "query_only", true).map_err(&e)?;
                SCHEMA.check(&conn, path)?;
            }
        }
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Where each of `ids` is, if indexed, looked up in one read transaction: a lookup on
    /// its own takes and releases the database's locks (two `fcntl` calls) every time,
    /// which cost more than the lookup when a restore asks for thousands of chunks.
    pub fn chunks(&self, ids: &[ChunkId]) -> Result<Vec<Option<Location>>, IndexError> {
        if ids.len() < 2 {
            return ids.iter().map(|id| self.chunk(id)).collect();
        }
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        let found = ids.iter().map(|id| self.chunk(id)).collect();
        // Only read: ending it cannot lose anything, and an error ending it changes nothing
        // about what was read.
        drop(tx);
        found
    }

    /// Runs `f` inside one read transaction: its lookups see one state of the index and
    /// take the database's locks once.
    pub fn in_read_tx<T>(
        &self,
        f: impl FnOnce(&Self) -> Result<T, IndexError>,
    ) -> Result<T, IndexError> {
        let tx = self.conn.unchecked_transaction().map_err(self.err())?;
        let r = f(self);
        // Only read: ending it cannot lose anything.
        drop(tx);
        r
    }

    /// Where chunk `id` is, if indexed.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<Location>, IndexError> {
        self.conn
            .prepare_cached("SELECT pack, offset, len, hash FROM chunks WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row([id], |r| {
                    Ok(Location {
                        pack: PackNo(r.get(0)?),
                        offset: r.get(1)?,
                        len: r.get(2)?,
                        hash: r.get(3)?,
                    })
                })
                .optional()
            })
            .map_err(blob_err(&self.path, "a chunk hash"))
    }

    /// True when chunk `id` is indexed.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, IndexError> {
        self.conn
            .prepare_cached("SELECT 1 FROM chunks WHERE id = ?1")
            .and_then(|mut s| s.exists([id]))
            .map_err(self.err())
    }

    /// The recorded (durable, indexed) length of every pack.
    pub fn pack_lengths(&self) -> Result<Vec<(PackNo, u64)>, IndexError> {
        let mut s = self
            .conn
            .prepare_cached("SELECT pack, length FROM packs ORDER BY pack")
            .map_err(self.err())?;
        let rows = s
            .query_map([], |r| Ok((PackNo(r.get(0)?), r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// In one transaction: adds chunk rows (`INSERT OR IGNORE`), raises pack lengths (never
    /// lowers them), and adds versions whose numbers their commit records already carry,
    /// with their references and their records' locations. A version
    /// already indexed keeps its row; only a missing record location is filled in (the
    /// upgrade wrote its record). Chunks are not checked: a version whose chunk was lost is
    /// still history, and `scrub` names what it lacks.
    pub fn add_recorded(
        &mut self,
        chunks: &[(ChunkId, Location)],
        packs: &[(PackNo, u64)],
        versions: &[RecordedVersion],
    ) -> Result<(), IndexError> {
        self.add_recorded_removing(chunks, packs, versions, &[])
            .map(|_| ())
    }

    /// [`Index::add_recorded`], and then, in the same transaction, the removals: each
    /// removal record is registered (once, by its hash) and the versions it names are
    /// forgotten with their references (see [`crate::records`] for which). Returns how
    /// many versions were forgotten.
    pub fn add_recorded_removing(
        &mut self,
        chunks: &[(ChunkId, Location)],
        packs: &[(PackNo, u64)],
        versions: &[RecordedVersion],
        removals: &[RecordedRemoval],
    ) -> Result<u64, IndexError> {
        let e = sql_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(e)?;
        {
            let mut ins_chunk = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO chunks (id, pack, offset, len, hash) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(e)?;
            for (id, l) in chunks {
                ins_chunk
                    .execute(params![id, l.pack.0, l.offset, l.len, &l.hash[..]])
                    .map_err(e)?;
            }
            let mut ins_pack = tx
                .prepare_cached(
                    "INSERT INTO packs (pack, length) VALUES (?1, ?2) \
                     ON CONFLICT (pack) DO UPDATE SET length = MAX(length, excluded.length)",
                )
                .map_err(e)?;
            for (p, len) in packs {
                ins_pack.execute(params![p.0, len]).map_err(e)?;
            }
            let mut ins_version = tx
                .prepare_cached(
                    "INSERT INTO versions (version, file_id, commit_id, commit_time, manifest, \
                     deleted, record_pack, record_offset) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT (version) DO UPDATE SET \
                     record_pack = COALESCE(record_pack, excluded.record_pack), \
                     record_offset = COALESCE(record_offset, excluded.record_offset)",
                )
                .map_err(e)?;
            let mut ins_ref = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO version_chunks (version, chunk) VALUES (?1, ?2)",
                )
                .map_err(e)?;
            for v in versions {
                let r = &v.record;
                ins_version
                    .execute(params![
                        r.version,
                        r.file_id,
                        r.commit_id,
                        r.commit_time,
                        &r.manifest[..],
                        r.deletion.to_column(),
                        v.at.0 .0,
                        v.at.1
                    ])
                    .map_err(e)?;
                for id in &r.chunks {
                    ins_ref.execute(params![r.version, id]).map_err(e)?;
                }
            }
        }
        let mut gone = 0;
        for r in removals {
            gone += prune::apply_removal(&tx, r).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(gone)
    }

    /// The next version number to assign: above every number ever assigned (AUTOINCREMENT's
    /// record of the highest, which survives the removal of versions, and the rows).
    pub fn next_version(&self) -> Result<u64, IndexError> {
        let hi: Option<i64> = self
            .conn
            .query_row(
                "SELECT MAX(n) FROM (SELECT MAX(version) AS n FROM versions UNION ALL \
                 SELECT seq AS n FROM sqlite_sequence WHERE name = 'versions')",
                [],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        Ok(hi.map_or(1, |n| n.max(0) as u64 + 1))
    }

    /// The version and commit time under which `(file_id, commit_id)` is indexed, if it is
    /// (through `versions_by_file`: a file has few versions).
    pub fn find_version(
        &self,
        file_id: &FileId,
        commit_id: &CommitId,
    ) -> Result<Option<(u64, i64)>, IndexError> {
        self.conn
            .prepare_cached(
                "SELECT version, commit_time FROM versions WHERE file_id = ?1 AND commit_id = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![file_id, commit_id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(self.err())
    }

    /// How many versions have no commit record yet (written by a release before commit
    /// records: the upgrade's work left), through the partial index `versions_unrecorded`.
    /// An index of schema 2 (opened read-only, not yet migrated) counts every version.
    pub fn unrecorded_count(&self) -> Result<u64, IndexError> {
        let schema = SCHEMA.check(&self.conn, &self.path)?;
        let sql = if schema < 3 {
            "SELECT COUNT(*) FROM versions"
        } else {
            "SELECT COUNT(*) FROM versions WHERE record_pack IS NULL"
        };
        self.conn
            .query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(self.err())
    }

    /// Versions above `after` that have no commit record yet, oldest first, as the records
    /// to write: at most `limit` of them, stopping once their manifests and chunk ids add up
    /// to `max_bytes` (at least one is returned when any is left). Their chunk ids are in id
    /// order (the order first referenced was not kept), their deletion is the column's.
    pub fn unrecorded(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<CommitRecord>, IndexError> {
        let e = self.err();
        let tx = self.conn.unchecked_transaction().map_err(&e)?;
        let mut out = Vec::new();
        {
            let mut s = self
                .conn
                .prepare_cached(
                    "SELECT version, file_id, commit_id, commit_time, manifest, deleted                      FROM versions WHERE record_pack IS NULL AND version > ?1                      ORDER BY version LIMIT ?2",
                )
                .map_err(&e)?;
            let mut refs = self
                .conn
                .prepare_cached("SELECT chunk FROM version_chunks WHERE version = ?1")
                .map_err(&e)?;
            let mut rows = s.query(params![after, limit as i64]).map_err(&e)?;
            let mut bytes = 0usize;
            while let Some(r) = rows.next().map_err(&e)? {
                let version: u64 = r.get(0).map_err(&e)?;
                let chunks = refs
                    .query_map([version], |r| r.get::<_, ChunkId>(0))
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .map_err(blob_err(&self.path, "a chunk id"))?;
                let record = CommitRecord {
                    commit_id: r.get(2).map_err(blob_err(&self.path, "a commit id"))?,
                    file_id: r.get(1).map_err(blob_err(&self.path, "a file id"))?,
                    version,
                    commit_time: r.get(3).map_err(&e)?,
                    deletion: Deletion::from_column(r.get(5).map_err(&e)?),
                    manifest: r.get(4).map_err(&e)?,
                    chunks,
                };
                bytes += record.body_len();
                out.push(record);
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        // Only read.
        drop(tx);
        Ok(out)
    }

    /// Adds a version as a release before commit records did (numbered by AUTOINCREMENT,
    /// deletion and record location unknown); returns its number. For tests of the upgrade.
    #[cfg(test)]
    pub(crate) fn add_legacy(
        &mut self,
        file_id: &FileId,
        commit_id: &CommitId,
        commit_time: i64,
        manifest: &[u8],
        chunks: &[ChunkId],
    ) -> Result<u64, IndexError> {
        let e = sql_err(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        tx.execute(
            "INSERT INTO versions (file_id, commit_id, commit_time, manifest) \
             VALUES (?1, ?2, ?3, ?4)",
            params![file_id, commit_id, commit_time, manifest],
        )
        .map_err(e)?;
        let version = tx.last_insert_rowid() as u64;
        for id in chunks {
            tx.execute(
                "INSERT OR IGNORE INTO version_chunks (version, chunk) VALUES (?1, ?2)",
                params![version, id],
            )
            .map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(version)
    }

    /// Versions with `version > after`, oldest first, at most `limit` of them and stopping
    /// once their manifests add up to `max_bytes`; also whether more follow.
    pub fn list_versions(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<VersionEntry>, bool), IndexError> {
        let mut s = self
            .conn
            .prepare_cached(
                "SELECT version, file_id, commit_time, manifest FROM versions \
                 WHERE version > ?1 ORDER BY version LIMIT ?2",
            )
            .map_err(self.err())?;
        let mut rows = s
            .query(params![after, (limit as i64).saturating_add(1)])
            .map_err(self.err())?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(r) = rows.next().map_err(self.err())? {
            let manifest: Vec<u8> = r.get(3).map_err(self.err())?;
            if out.len() >= limit || (!out.is_empty() && bytes + manifest.len() > max_bytes) {
                return Ok((out, true));
            }
            bytes += manifest.len() + 64;
            out.push(VersionEntry {
                version: r.get(0).map_err(self.err())?,
                file_id: r.get(1).map_err(blob_err(&self.path, "a file id"))?,
                commit_time: r.get(2).map_err(self.err())?,
                manifest,
            });
        }
        Ok((out, false))
    }

    /// Counts for `status`.
    pub fn stats(&self) -> Result<Stats, IndexError> {
        let q = |sql: &str| -> Result<i64, IndexError> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
                .map(|v| v.unwrap_or(0))
                .map_err(self.err())
        };
        let last: Option<i64> = self
            .conn
            .query_row("SELECT MAX(commit_time) FROM versions", [], |r| r.get(0))
            .map_err(self.err())?;
        Ok(Stats {
            files: q("SELECT COUNT(DISTINCT file_id) FROM versions")? as u64,
            versions: q("SELECT COUNT(*) FROM versions")? as u64,
            chunks: q("SELECT COUNT(*) FROM chunks")? as u64,
            chunk_bytes: q("SELECT SUM(len) FROM chunks")? as u64,
            last_commit: last,
        })
    }

    /// Calls `f` for every chunk row in pack order (for `scrub`). `f` returning `false`
    /// stops the walk.
    pub fn for_each_chunk(&self, mut f: impl FnMut(ChunkRow) -> bool) -> Result<(), IndexError> {
        let mut s = self
            .conn
            .prepare("SELECT id, pack, offset, len, hash FROM chunks ORDER BY pack, offset")
            .map_err(self.err())?;
        let mut rows = s.query([]).map_err(self.err())?;
        while let Some(r) = rows.next().map_err(self.err())? {
            let row = ChunkRow {
                id: r.get(0).map_err(blob_err(&self.path, "a chunk id"))?,
                loc: Location {
                    pack: PackNo(r.get(1).map_err(self.err())?),
                    offset: r.get(2).map_err(self.err())?,
                    len: r.get(3).map_err(self.err())?,
                    hash: r.get(4).map_err(blob_err(&self.path, "a chunk hash"))?,
                },
            };
            if !f(row) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(offset: u64) -> Location {
        Location {
            pack: PackNo(1),
            offset,
            len: 10,
            hash: [offset as u8; 32],
        }
    }

    /// An id that counts how often it is compared.
    #[derive(Clone, Copy, Debug)]
    struct Counted(u32);

    impl std::hash::Hash for Counted {
        fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
            self.0.hash(h)
        }
    }

    static COMPARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    impl PartialEq for Counted {
        fn eq(&self, o: &Self) -> bool {
            COMPARED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0 == o.0
        }
    }
    impl Eq for Counted {}

    #[test]
    fn repeated_ids_are_dropped_in_linear_time_keeping_first_order() {
        // The most ids a request may carry: half of them distinct, each twice.
        let n = coffer_common::wire::MAX_IDS as u32;
        let ids: Vec<Counted> = (0..n).map(|i| Counted((i * 7919) % (n / 2))).collect();
        let (mut seen, mut out) = (HashSet::new(), Vec::new());
        first_of_each(&ids, &mut seen, &mut out);
        let compared = COMPARED.load(std::sync::atomic::Ordering::Relaxed);
        let want: Vec<u32> = ids[..n as usize / 2].iter().map(|c| c.0).collect();
        assert_eq!(out.iter().map(|c| c.0).collect::<Vec<_>>(), want);
        // A set compares an id with the few that share its hash bucket; a list scan would
        // compare it with every id kept so far (about n^2 / 4 in all).
        assert!(
            compared <= 4 * n as u64,
            "{compared} comparisons for {n} ids"
        );
        // Nothing, one, and all alike.
        first_of_each(&[], &mut seen, &mut out);
        assert!(out.is_empty());
        first_of_each(&[Counted(3)], &mut seen, &mut out);
        assert_eq!(out.len(), 1);
        first_of_each(&[Counted(5); 100], &mut seen, &mut out);
        assert_eq!(out.iter().map(|c| c.0).collect::<Vec<_>>(), [5]);
    }

    fn recorded(version: u64, file: u8, chunks: &[u8]) -> RecordedVersion {
        RecordedVersion {
            record: CommitRecord {
                commit_id: CommitId([version as u8; 16]),
                file_id: FileId([file; 32]),
                version,
                commit_time: 1000 * version as i64,
                deletion: crate::records::Deletion::No,
                manifest: vec![version as u8; 40],
                chunks: chunks.iter().map(|&b| ChunkId([b; 32])).collect(),
            },
            at: (PackNo(1), 1000 + version),
        }
    }

    #[test]
    fn versions_are_found_by_commit_and_pack_lengths_only_grow() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("index.sqlite");
        let mut ix = Index::open(&p, Mode::Write).expect("open");
        let chunks = [(ChunkId([1; 32]), loc(16)), (ChunkId([2; 32]), loc(100))];
        ix.add_recorded(&chunks, &[(PackNo(1), 200)], &[recorded(1, 1, &[1, 2])])
            .expect("add");
        ix.add_recorded(&[], &[(PackNo(1), 150)], &[recorded(2, 3, &[2])])
            .expect("add");
        assert_eq!(
            ix.find_version(&FileId([1; 32]), &CommitId([1; 16]))
                .expect("q"),
            Some((1, 1000))
        );
        // Another file's commit id is another commit.
        assert_eq!(
            ix.find_version(&FileId([3; 32]), &CommitId([1; 16]))
                .expect("q"),
            None
        );
        assert_eq!(ix.pack_lengths().expect("packs"), vec![(PackNo(1), 200)]);
        assert_eq!(ix.chunk(&ChunkId([2; 32])).expect("q"), Some(loc(100)));
        assert_eq!(ix.unrecorded_count().expect("count"), 0);
        drop(ix);
        // Reopening migrates nothing and keeps everything; a reader sees it.
        let ix = Index::open(&p, Mode::Write).expect("reopen");
        let r = Index::open(&p, Mode::Read).expect("reader");
        let (v, more) = r.list_versions(0, 1, 1 << 20).expect("list");
        assert_eq!((v.len(), more), (1, true));
        let (v, more) = r.list_versions(1, 10, 1 << 20).expect("list");
        assert_eq!((v.len(), more, v[0].version), (1, false, 2));
        let s = ix.stats().expect("stats");
        assert_eq!(
            (s.files, s.versions, s.chunks, s.chunk_bytes, s.last_commit),
            (2, 2, 2, 20, Some(2000))
        );
        assert_eq!(ix.next_version().expect("next"), 3);
    }

    #[test]
    fn recorded_versions_keep_their_numbers_and_fill_in_record_locations() {
        use crate::records::Deletion;
        let d = tempfile::tempdir().expect("tempdir");
        let mut ix = Index::open(&d.path().join("index.sqlite"), Mode::Write).expect("open");
        assert_eq!(ix.next_version().expect("next"), 1);
        let rec = |version: u64, deletion| RecordedVersion {
            record: CommitRecord {
                commit_id: CommitId([version as u8; 16]),
                file_id: FileId([1; 32]),
                version,
                commit_time: 1_700_000_000 + version as i64,
                deletion,
                manifest: vec![version as u8; 3],
                chunks: vec![ChunkId([2; 32])],
            },
            at: (PackNo(2), 100 * version),
        };
        ix.add_recorded(
            &[(ChunkId([2; 32]), loc(16))],
            &[(PackNo(1), 100)],
            &[rec(5, Deletion::No), rec(9, Deletion::Yes)],
        )
        .expect("add");
        assert_eq!(ix.next_version().expect("next"), 10);
        // Again (a re-scan): nothing changes, nothing fails.
        ix.add_recorded(&[], &[], &[rec(9, Deletion::Yes)])
            .expect("again");
        let (listed, more) = ix.list_versions(0, 10, 1 << 20).expect("list");
        assert!(!more);
        assert_eq!(
            listed
                .iter()
                .map(|v| (v.version, v.commit_time))
                .collect::<Vec<_>>(),
            [(5, 1_700_000_005), (9, 1_700_000_009)]
        );
        let deleted: Vec<Option<bool>> = ix
            .conn
            .prepare("SELECT deleted FROM versions ORDER BY version")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("deleted");
        assert_eq!(deleted, [Some(false), Some(true)]);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("index.sqlite");
        let ix = Index::open(&p, Mode::Write).expect("open");
        ix.conn
            .pragma_update(None, "user_version", 99)
            .expect("bump");
        drop(ix);
        let e = Index::open(&p, Mode::Write).err().expect("too new");
        assert!(e.to_string().contains("newer"), "{e}");
        // Read-only opens, which do not migrate, refuse it too.
        let e = Index::open(&p, Mode::Read).err().expect("too new");
        assert_eq!(
            e.to_string(),
            format!(
                "index {} has schema version 99, newer than this build knows ({}); upgrade \
                 coffer-receiver",
                p.display(),
                SCHEMA.migrations.len()
            )
        );
    }

    #[test]
    fn a_wrong_sized_id_or_hash_is_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("index.sqlite");
        let ix = Index::open(&p, Mode::Write).expect("open");
        ix.conn
            .execute(
                "INSERT INTO chunks (id, pack, offset, len, hash) VALUES (?1, 1, 16, 10, ?2)",
                params![ChunkId([1; 32]), &[16u8; 31][..]],
            )
            .expect("chunk");
        let e = ix.chunk(&ChunkId([1; 32])).expect_err("short hash");
        assert_eq!(
            e.to_string(),
            format!("index {}: a chunk hash is not 32 bytes", p.display())
        );
        assert!(ix.has_chunk(&ChunkId([1; 32])).expect("present"));
        ix.conn
            .execute(
                "INSERT INTO versions (file_id, commit_id, commit_time, manifest) \
                 VALUES (?1, ?2, 1, x'00')",
                params![&[2u8; 5][..], CommitId([2; 16])],
            )
            .expect("version");
        let e = ix.list_versions(0, 10, 1 << 20).expect_err("short file id");
        assert!(e.to_string().ends_with("a file id is not 32 bytes"), "{e}");
    }

    #[test]
    fn migration_0002_keeps_versions_and_their_numbering() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("index.sqlite");
        {
            // An index as the previous release left it: schema 1 only.
            let mut conn = Connection::open(&p).expect("open");
            let tx = conn.transaction().expect("tx");
            tx.execute_batch(SCHEMA.migrations[0]).expect("schema 1");
            tx.pragma_update(None, "user_version", 1).expect("version");
            tx.commit().expect("commit");
        }
        {
            let mut conn = Connection::open(&p).expect("open");
            let tx = conn.transaction().expect("tx");
            tx.execute(
                "INSERT INTO chunks (id, pack, offset, len, hash) VALUES (?1, 1, 16, 10, ?2)",
                params![&[1u8; 32][..], &[16u8; 32][..]],
            )
            .expect("chunk");
            for (c, v) in [(1u8, 1i64), (2, 5)] {
                tx.execute(
                    "INSERT INTO versions (version, file_id, commit_id, commit_time, manifest)
                     VALUES (?1, ?2, ?3, 100, ?4)",
                    params![v, &[c; 32][..], &[c; 16][..], &[c; 40][..]],
                )
                .expect("version");
            }
            // A reference to a version: migration 0002 rebuilds `versions`, which SQLite's
            // enforced foreign keys would refuse while a reference exists.
            tx.execute(
                "INSERT INTO version_chunks (version, chunk) VALUES (5, ?1)",
                params![&[1u8; 32][..]],
            )
            .expect("reference");
            tx.commit().expect("commit");
        }
        let mut ix = Index::open(&p, Mode::Write).expect("migrates");
        let v: i64 = ix
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(v as usize, SCHEMA.migrations.len());
        let fk: bool = ix
            .conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .expect("pragma");
        assert!(fk, "enforcement is back after migrating");
        // A repeated commit is still recognised; a new one continues after the highest.
        assert_eq!(
            ix.find_version(&FileId([2; 32]), &CommitId([2; 16]))
                .expect("q"),
            Some((5, 100))
        );
        assert_eq!(ix.next_version().expect("next"), 6);
        // Both versions are left for the upgrade to write out, oldest first, in batches.
        assert_eq!(ix.unrecorded_count().expect("count"), 2);
        let first = ix.unrecorded(0, 1, 1 << 20).expect("batch");
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].version, first[0].deletion),
            (1, crate::records::Deletion::Unknown)
        );
        let rest = ix.unrecorded(1, 10, 1 << 20).expect("batch");
        assert_eq!(rest.iter().map(|r| r.version).collect::<Vec<_>>(), [5]);
        assert_eq!(rest[0].manifest, vec![2; 40]);
        assert_eq!(rest[0].chunks, [ChunkId([1; 32])]);
        // A version's record location, once written, leaves it out.
        let mut v = RecordedVersion {
            record: rest[0].clone(),
            at: (PackNo(3), 16),
        };
        v.record.deletion = crate::records::Deletion::Yes;
        ix.add_recorded(&[], &[], &[v]).expect("located");
        assert_eq!(ix.unrecorded_count().expect("count"), 1);
        assert_eq!(ix.unrecorded(0, 10, 1 << 20).expect("batch")[0].version, 1);
        let (v, more) = ix.list_versions(0, 10, 1 << 20).expect("list");
        let got: Vec<u64> = v.iter().map(|e| e.version).collect();
        assert_eq!((got, more), (vec![1, 5], false));
        let idx: i64 = ix
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'version_chunks_by_chunk'",
                [],
                |r| r.get(0),
            )
            .expect("q");
        assert_eq!(idx, 0);
    }
}
