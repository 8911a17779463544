//! The journal: the agent's SQLite database and the only owner of its connection. No SQL
//! leaves this module; callers get typed methods.
//!
//! One row per path, and one per folder, keyed by its path with a trailing `/`
//! ([`folder_key`]): a folder's row moves through the same states (its versions carry its
//! mode, owner and mtime) but is never counted in `status`'s counts, which are about files.
//! The hashes recorded (`hash`, `backed_hash`) are keyed (`Crypto::journal_hash`), never
//! a file's plain content hash. A file's state ([`FileState`]) moves `dirty` (seen, not yet read) ->
//! `uploading` (hash and commit id recorded, commit sent) -> `backed_up` (receiver version
//! recorded), or `failed` (reason, retried with back-off). `gen` is bumped on every change
//! seen, so an acknowledgement for bytes read before a newer change leaves the file dirty.
//! Writes come in batches, one transaction each.
//!
//! This file opens the journal (through `host::sqlite`'s `Schema`) and keeps `meta` and
//! `counters`. The rest, one job a file:
//! - `schema`: the migrations, the states and the `meta`/`counters` keys, each spelled once;
//! - `record`: what the daemon records (changes seen, reads, outcomes, the restart requeue);
//! - `claims`: which due files the uploader holds, and the claim queries;
//! - `counts`: `file_stats`, kept exact by every write, and `status`'s [`Summary`];
//! - `rows`: single rows for scans and `status PATH`;
//! - `held`: deletions held for confirmation (`held_deletions`);
//! - `checkpoint`: the WAL checkpointer's own connection.

mod checkpoint;
mod claims;
mod counts;
mod held;
mod record;
mod rows;
mod schema;

pub use checkpoint::Checkpointer;
pub use claims::Job;
pub use counts::Summary;
pub use held::Held;
pub use record::{Ack, FileRead};
pub use rows::{Known, Row, Standing};
pub use schema::{Class, CounterKey, FileState, MetaKey};

use claims::Claims;
use counts::Tally;
use schema::{sql, BACKED_UP, DIRTY, DUE, FAILED, SCHEMA, TIER, TIER_NEW, UPLOADING};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use coffer_common::host::sqlite::DbError;
use coffer_common::host::time::now_ms;
use coffer_common::wire::CommitId;
use rusqlite::types::{FromSql, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

/// Errors of the journal: a SQLite error, named with the journal's path ("journal PATH:
/// ..."), or a schema newer than this build knows.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct JournalError(#[from] pub DbError);

/// A function that wraps a SQLite error with the journal's `path` (copied only on error).
fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> JournalError + Copy + '_ {
    move |source| {
        JournalError(DbError::Sql {
            what: SCHEMA.what,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Whether a journal key names a folder's row (`watch/rel/`, `watch/` for the watch's own
/// folder) rather than a file's.
pub fn is_folder_key(key: &[u8]) -> bool {
    key.last() == Some(&b'/')
}

/// The journal key of the folder whose key without the trailing `/` is `path`.
pub fn folder_key(path: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(path.len() + 1);
    k.extend_from_slice(path);
    k.push(b'/');
    k
}

/// The schema whose migration (0008) drops the plain content hashes of older journals.
const KEYED_HASHES: usize = 8;

/// Stat fields compared to decide whether a file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatKey {
    pub size: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: i64,
}

/// Mode of the journal's files: they hold every path backed up and a hash of every file's
/// content, so they are readable by the agent's user alone, whatever the umask.
const FILE_MODE: u32 = 0o600;

/// Makes the journal's files [`FILE_MODE`]: a new journal is created with that mode before
/// SQLite opens it (SQLite gives the `-wal` and `-shm` files it creates the database's own
/// mode), and an existing database, `-wal` or `-shm` open to group or others is tightened,
/// with a warning. What cannot be done is warned about; the open that follows reports a
/// journal it cannot use.
fn make_private(path: &Path) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path);
    if let Ok(f) = created {
        // Exactly FILE_MODE, whatever bits the umask took off.
        let _ = f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE));
        return;
    }
    let side = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    for p in [path.to_path_buf(), side("-wal"), side("-shm")] {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if !meta.is_file() || mode & 0o077 == 0 {
            continue;
        }
        let tight = mode & !0o077;
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(tight)) {
            Ok(()) => tracing::warn!(
                "journal file {} was open to group or others (mode {mode:04o}); made it {tight:04o}",
                p.display()
            ),
            Err(e) => tracing::warn!(
                "journal file {} is open to group or others (mode {mode:04o}) and cannot be \
                 made {tight:04o}: {}",
                p.display(),
                coffer_common::host::fs::describe(&e)
            ),
        }
    }
}

/// The journal.
pub struct Journal {
    conn: Connection,
    path: PathBuf,
    claims: Claims,
}

/// A 32-byte hash column (`None`: null, or not 32 bytes).
fn h32(v: ValueRef<'_>) -> Option<[u8; 32]> {
    v.as_blob().ok().and_then(|b| b.try_into().ok())
}

impl Journal {
    /// Opens (creating if needed) the journal and applies pending migrations. Its files are
    /// this user's alone ([`make_private`]).
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        make_private(path);
        let mut conn = SCHEMA.connect(path, rusqlite::OpenFlags::default())?;
        let sql = sql_err(path);
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        // Paths are looked up at random: a page cache that holds the journal's indexes
        // (it fills as needed) keeps a large tree's updates off the disk.
        conn.pragma_update(None, "cache_size", -16384)
            .map_err(sql)?;
        // A statement that may need undoing on error (an upsert) keeps a statement journal;
        // in memory it is a copy, on disk a write per page changed.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(sql)?;
        // A checkpoint copies every page changed since the last one into the database;
        // files are updated three times on their way to backed up, so a long interval lets a
        // page changed by several batches be copied once. The daemon checkpoints from a
        // thread of its own ([`Checkpointer`], every 64 MiB of WAL), so no writer does it
        // while holding the journal; this connection checkpoints only as a backstop, at
        // 256 MiB (a process without that thread, or one it cannot keep up with).
        conn.pragma_update(None, "wal_autocheckpoint", 65536)
            .map_err(sql)?;
        // After a checkpoint the WAL file is cut back to 8 MiB.
        conn.pragma_update(None, "journal_size_limit", 8 << 20)
            .map_err(sql)?;
        // Migration 0008 drops the plain content hashes: with `secure_delete` the space they
        // held is overwritten with zeros, and the checkpoint after it leaves no copy in the
        // WAL. Both cost little once, and nothing after.
        let before = SCHEMA.check(&conn, path)?;
        let drops_plain_hashes = before > 0 && before < KEYED_HASHES;
        if drops_plain_hashes {
            conn.pragma_update(None, "secure_delete", "ON")
                .map_err(sql)?;
        }
        SCHEMA.migrate(&mut conn, path)?;
        if drops_plain_hashes {
            conn.pragma_update(None, "secure_delete", "OFF")
                .map_err(sql)?;
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(sql)?;
        }
        Ok(Journal {
            conn,
            path: path.to_path_buf(),
            claims: Claims::default(),
        })
    }

    /// Opens the journal for reading only (status while the daemon runs). It is not
    /// migrated; a schema newer than this build knows is refused.
    pub fn open_read_only(path: &Path) -> Result<Self, JournalError> {
        let conn = SCHEMA.connect(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        SCHEMA.check(&conn, path)?;
        Ok(Journal {
            conn,
            path: path.to_path_buf(),
            claims: Claims::default(),
        })
    }

    /// The applied schema version (0: a journal still being created); a newer schema than
    /// this build knows is refused.
    pub fn schema_version(&self) -> Result<usize, JournalError> {
        Ok(SCHEMA.check(&self.conn, &self.path)?)
    }

    fn err(&self, source: rusqlite::Error) -> JournalError {
        sql_err(&self.path)(source)
    }

    /// Adds to a counter.
    pub fn bump(&mut self, key: CounterKey<'_>, by: i64) -> Result<(), JournalError> {
        let name = key.name();
        self.conn
            .execute(
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value = value + ?2",
                params![&*name, by],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Sets a counter.
    pub fn set_counter(&mut self, key: CounterKey<'_>, v: i64) -> Result<(), JournalError> {
        let name = key.name();
        self.conn
            .execute(
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value = ?2",
                params![&*name, v],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// All counters, by name.
    pub fn counters(&self) -> Result<Vec<(String, i64)>, JournalError> {
        let mut st = self
            .conn
            .prepare("SELECT name, value FROM counters ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Sets a meta value.
    pub fn set_meta(&mut self, key: MetaKey<'_>, value: &str) -> Result<(), JournalError> {
        let key = key.name();
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = ?2",
                params![&*key, value],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Reads a meta value.
    pub fn meta(&self, key: MetaKey<'_>) -> Result<Option<String>, JournalError> {
        let key = key.name();
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [&*key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn j() -> (tempfile::TempDir, Journal) {
        let d = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(&d.path().join("j.sqlite")).expect("open");
        (d, j)
    }

    pub(super) fn read(path: &[u8], gen: i64) -> FileRead {
        FileRead {
            path: path.to_vec(),
            gen,
            kind: "file",
            stat: StatKey {
                size: 3,
                mtime_ns: 1,
                ctime_ns: 1,
                inode: 1,
            },
            mode: 0o644,
            hash: [1; 32],
            commit_id: CommitId([2; 16]),
        }
    }

    #[test]
    fn a_newer_journal_is_refused_also_when_read_only() {
        let (d, j) = j();
        let p = d.path().join("j.sqlite");
        let newer = SCHEMA.latest() + 1;
        j.conn
            .pragma_update(None, "user_version", newer as i64)
            .expect("bump");
        drop(j);
        let want = format!(
            "journal {} has schema version {newer}, newer than this build knows ({}); \
             upgrade coffer-agent",
            p.display(),
            SCHEMA.latest()
        );
        let e = Journal::open(&p).err().expect("refused");
        assert_eq!(e.to_string(), want);
        let e = Journal::open_read_only(&p)
            .err()
            .expect("refused read-only");
        assert_eq!(e.to_string(), want);
    }

    #[test]
    fn sql_errors_name_the_journal_and_its_path() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("missing").join("j.sqlite");
        let e = Journal::open_read_only(&p).err().expect("no such journal");
        let s = e.to_string();
        assert!(s.starts_with(&format!("journal {}: ", p.display())), "{s}");
    }

    /// A journal as a build of schema 6 could leave it, at `p`: two `pending` rows (one
    /// read before, with its hash and commit id), rows left `claimed` (dirty, failed,
    /// uploading) and a backed-up one, counted in `file_stats` as that build kept them.
    fn schema_6_journal(p: &Path) {
        let v6 = coffer_common::host::sqlite::Schema {
            migrations: &SCHEMA.migrations[..6],
            ..SCHEMA
        };
        let mut c = v6.connect(p, rusqlite::OpenFlags::default()).expect("open");
        v6.migrate(&mut c, p).expect("schema 6");
        c.execute_batch(
            "INSERT INTO files (path, watch, state, gen, due_at, dirty_since, size, hash,
                                commit_id, claimed, backed_hash, backed_kind, backed_at)
             VALUES
                (x'772f70656e64696e672d61', 'w', 'pending', 1, 9000000, 100, 10,
                 zeroblob(32), zeroblob(16), 0, NULL, NULL, NULL),
                (x'772f70656e64696e672d62', 'w', 'pending', 1, 9000000, 100, 20,
                 NULL, NULL, 1, NULL, NULL, NULL),
                (x'772f636c61696d65642d6469727479', 'w', 'dirty', 2, 50, 100, NULL,
                 NULL, NULL, 1, NULL, NULL, NULL),
                (x'772f636c61696d65642d6661696c6564', 'w', 'failed', 1, 60, 100, 4,
                 NULL, NULL, 1, NULL, NULL, NULL),
                (x'772f75706c6f6164696e67', 'w', 'uploading', 1, 9000000, 100, 8,
                 zeroblob(32), zeroblob(16), 1, NULL, NULL, NULL),
                (x'772f646f6e65', 'w', 'backed_up', 1, 0, NULL, 5,
                 NULL, NULL, 0, zeroblob(32), 'file', 77);
             -- Counted as the code of schema 6 kept them (migration 0004's recount).
             UPDATE file_stats SET
                n = (SELECT COUNT(*) FROM files WHERE CASE WHEN state = 'backed_up'
                     AND backed_kind IS 'deleted' THEN 'deleted' ELSE state END = key),
                bytes = (SELECT COALESCE(SUM(COALESCE(size, 0)), 0) FROM files
                         WHERE state = key AND state != 'backed_up');
             INSERT INTO meta (key, value) VALUES ('last_backed_at', '77');",
        )
        .expect("rows of a schema 6 journal");
    }

    /// A journal written by a build of schema 6 can hold `pending` rows and rows left
    /// `claimed`: migration 0007 makes them due as the restart requeue did, keeps the counts
    /// exact, and they are claimed and backed up as before.
    #[test]
    fn migration_0007_queues_pending_and_claimed_rows_as_before() {
        use crate::journal::counts::tests::{kept, recount};
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("j.sqlite");
        schema_6_journal(&p);
        let mut j = Journal::open(&p).expect("migrate");
        assert_eq!(j.schema_version().expect("version"), SCHEMA.latest());
        let columns: i64 = j
            .conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('files') WHERE name = 'claimed'",
                [],
                |r| r.get(0),
            )
            .expect("columns");
        assert_eq!(columns, 0, "`claimed` is gone");
        let s = j.summary().expect("summary");
        assert_eq!((s.dirty, s.uploading, s.failed, s.backed_up), (3, 1, 1, 1));
        assert_eq!(s.pending_bytes, 10 + 20 + 4 + 8);
        assert_eq!(kept(&j), recount(&j, Some(77)));
        for p in [&b"w/pending-a"[..], b"w/pending-b"] {
            let r = j.row(p).expect("row").expect("exists");
            assert_eq!((r.state, r.due_at), (FileState::Dirty, 0));
        }
        assert_eq!(j.requeue_in_flight().expect("requeue"), 1);
        let mut jobs = j.claim_due(1_000, 100).expect("claim");
        jobs.sort_by(|a, b| a.path.cmp(&b.path));
        let paths: Vec<&[u8]> = jobs.iter().map(|j| &j.path[..]).collect();
        assert_eq!(
            paths,
            [
                &b"w/claimed-dirty"[..],
                b"w/claimed-failed",
                b"w/pending-a",
                b"w/pending-b",
                b"w/uploading"
            ]
        );
        // A pending file read before keeps its commit id: a repeated commit is recognised.
        assert_eq!(jobs[2].commit_id, Some(CommitId([0; 16])));
        let reads: Vec<FileRead> = jobs.iter().map(|job| read(&job.path, job.gen)).collect();
        j.record_reads(&reads).expect("reads");
        let acks: Vec<Ack> = jobs
            .iter()
            .map(|job| Ack {
                path: job.path.clone(),
                gen: job.gen,
                version: 2,
                commit_time: 90,
                hash: [1; 32],
                kind: "file",
                size: 3,
            })
            .collect();
        j.record_acks(&acks).expect("acks");
        let s = j.summary().expect("summary");
        assert_eq!((s.backed_up, s.dirty, s.pending_bytes), (6, 0, 0));
        assert_eq!(kept(&j), recount(&j, Some(90)));
        assert!(j.claim_due(i64::MAX, 100).expect("claim").is_empty());
    }

    /// `status` reads a journal of schema 6 that a running older daemon has not migrated:
    /// its `pending` rows count, and read, as `dirty`, which 0007 makes them.
    #[test]
    fn an_unmigrated_journal_reads_pending_as_dirty() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("j.sqlite");
        schema_6_journal(&p);
        let j = Journal::open_read_only(&p).expect("read-only");
        assert_eq!(j.schema_version().expect("version"), 6);
        let s = j.summary().expect("summary");
        assert_eq!(
            (s.dirty, s.uploading, s.failed, s.backed_up, s.pending()),
            (3, 1, 1, 1, 5)
        );
        assert_eq!(s.pending_bytes, 10 + 20 + 4 + 8);
        let r = j.row(b"w/pending-a").expect("row").expect("exists");
        assert_eq!(r.state, FileState::Dirty);
        assert_eq!(j.failed_rows(10).expect("failed").len(), 1);
    }

    /// The bytes of the journal's files (database, WAL, shared memory).
    fn journal_bytes(p: &Path) -> Vec<u8> {
        let mut bytes = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let mut f = p.as_os_str().to_owned();
            f.push(suffix);
            if let Ok(b) = std::fs::read(&f) {
                bytes.extend(b);
            }
        }
        bytes
    }

    fn holds(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// A journal of schema 7 (the release before keyed hashes) holds plain content hashes:
    /// migration 0008 leaves none, in its rows or in its files' bytes; the counts are kept;
    /// and a file whose backed-up hash was dropped is claimed with none, so its next read
    /// is committed, not skipped as unchanged.
    #[test]
    fn migration_0008_drops_the_plain_content_hashes() {
        use crate::journal::counts::tests::{kept, recount};
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("j.sqlite");
        let a = *blake3::hash(b"the content of w/a").as_bytes();
        let b = *blake3::hash(b"the content of w/b").as_bytes();
        {
            let v7 = coffer_common::host::sqlite::Schema {
                migrations: &SCHEMA.migrations[..7],
                ..SCHEMA
            };
            let mut c = v7
                .connect(&p, rusqlite::OpenFlags::default())
                .expect("open");
            c.pragma_update(None, "journal_mode", "WAL").expect("wal");
            v7.migrate(&mut c, &p).expect("schema 7");
            c.execute(
                "INSERT INTO files (path, watch, state, gen, kind, size, mtime_ns, ctime_ns,
                                    inode, mode, hash, commit_id, backed_version, backed_at,
                                    backed_hash, backed_kind, backed_size)
                 VALUES (CAST('w/a' AS BLOB), 'w', 'backed_up', 1, 'file', 18, 1, 1, 1, 420,
                         ?1, zeroblob(16), 3, 77, ?1, 'file', 18)",
                [&a[..]],
            )
            .expect("w/a");
            c.execute(
                "INSERT INTO files (path, watch, state, gen, dirty_since, kind, size, hash,
                                    commit_id, backed_hash)
                 VALUES (CAST('w/b' AS BLOB), 'w', 'uploading', 1, 100, 'file', 18, ?1,
                         zeroblob(16), NULL)",
                [&b[..]],
            )
            .expect("w/b");
            c.execute_batch(
                "UPDATE file_stats SET
                    n = (SELECT COUNT(*) FROM files WHERE CASE WHEN state = 'backed_up'
                         AND backed_kind IS 'deleted' THEN 'deleted' ELSE state END = key),
                    bytes = (SELECT COALESCE(SUM(COALESCE(size, 0)), 0) FROM files
                             WHERE state = key AND state != 'backed_up');
                 INSERT INTO meta (key, value) VALUES ('last_backed_at', '77');",
            )
            .expect("counts");
            // As a running agent leaves it: pages in the WAL and in the database.
            c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                .expect("checkpoint");
        }
        let before = journal_bytes(&p);
        assert!(
            holds(&before, &a) && holds(&before, &b),
            "the fixture holds them"
        );

        let mut j = Journal::open(&p).expect("migrate");
        assert_eq!(j.schema_version().expect("version"), SCHEMA.latest());
        let left: i64 = j
            .conn
            .query_row(
                "SELECT COUNT(*) FROM files WHERE hash IS NOT NULL OR backed_hash IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(left, 0);
        let after = journal_bytes(&p);
        assert!(!holds(&after, &a), "w/a's plain hash survived");
        assert!(!holds(&after, &b), "w/b's plain hash survived");
        assert_eq!(kept(&j), recount(&j, Some(77)));
        let s = j.summary().expect("summary");
        assert_eq!((s.backed_up, s.uploading), (1, 1));

        // w/a changes: it is claimed with no backed-up hash, so it is read and committed.
        j.mark_dirty(&[(b"w/a".to_vec(), "w".into())], 1_000, 0)
            .expect("dirty");
        let jobs = j.claim_due(i64::MAX, 10).expect("claim");
        let job = jobs.iter().find(|job| job.path == b"w/a").expect("w/a due");
        assert_eq!((job.hash, job.backed_hash), (None, None));
        assert_eq!(job.backed_kind.as_deref(), Some("file"));
    }

    /// A folder's row goes through the same states as a file's but is never counted:
    /// `status`'s counts, pending bytes and oldest pending change are about files.
    #[test]
    fn folder_rows_are_not_counted() {
        use crate::journal::counts::tests::{kept, recount};
        let (_d, mut j) = j();
        let dir = folder_key(b"w/sub");
        assert!(is_folder_key(&dir) && !is_folder_key(b"w/sub"));
        j.mark_dirty_sized(
            &[
                (dir.clone(), "w".into(), Some(4096)),
                (b"w/sub/f".to_vec(), "w".into(), Some(3)),
            ],
            1_000,
            0,
        )
        .expect("dirty");
        let s = j.summary().expect("summary");
        assert_eq!((s.dirty, s.pending_bytes), (1, 3));
        assert_eq!(kept(&j), recount(&j, None));
        let jobs = j.claim_due(i64::MAX, 10).expect("claim");
        assert_eq!(jobs.len(), 2);
        let reads: Vec<FileRead> = jobs
            .iter()
            .map(|job| FileRead {
                kind: if job.path == dir { "dir" } else { "file" },
                ..read(&job.path, job.gen)
            })
            .collect();
        j.record_reads(&reads).expect("reads");
        assert_eq!(j.summary().expect("summary").uploading, 1);
        let acks: Vec<Ack> = reads
            .iter()
            .map(|r| Ack {
                path: r.path.clone(),
                gen: r.gen,
                version: 1,
                commit_time: 5,
                hash: r.hash,
                kind: r.kind,
                size: 3,
            })
            .collect();
        j.record_acks(&acks).expect("acks");
        let s = j.summary().expect("summary");
        assert_eq!((s.backed_up, s.pending(), s.pending_bytes), (1, 0, 0));
        assert_eq!(s.oldest_pending_ms, None);
        assert_eq!(kept(&j), recount(&j, Some(5)));
        // `status PATH` of the folder lists its files, not its own row.
        let under = j.rows_under(b"w/sub/", 10).expect("rows");
        assert_eq!(under.len(), 1);
        assert_eq!(under[0].path, b"w/sub/f");
        assert_eq!(j.keys_under(b"w/sub/").expect("keys").len(), 2);
    }
}
