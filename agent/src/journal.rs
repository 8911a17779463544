//! The journal: the agent's SQLite database and the only owner of its connection.
//!
//! One row per path. A file's state moves `dirty` (seen, not yet read) -> `uploading` (hash
//! and commit id recorded, commit sent) -> `backed_up` (receiver version recorded), or
//! `failed` (reason, retried with back-off). `gen` is bumped on every change seen, so an
//! acknowledgement for bytes read before a newer change leaves the file dirty. Writes come
//! in batches, one transaction each.

use std::collections::HashMap;
use std::path::Path;

use coffer_common::host::time::now_ms;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/agent/0001_journal.sql"),
    include_str!("../../migrations/agent/0002_claimed.sql"),
    include_str!("../../migrations/agent/0003_drop_state_index.sql"),
    include_str!("../../migrations/agent/0004_file_stats.sql"),
    include_str!("../../migrations/agent/0005_counts_in_code.sql"),
    include_str!("../../migrations/agent/0006_due_index_without_in.sql"),
];

/// Due files in claim order, read through the partial index `files_due` (migration 0006):
/// the condition repeats the index's word for word, or the planner scans every row.
const CLAIM_SQL: &str =
    "SELECT path, watch, gen, state, attempts, hash, commit_id, backed_hash, backed_kind, mode, due_at
     FROM files WHERE (state = 'dirty' OR state = 'uploading' OR state = 'failed') AND claimed = 0
       AND due_at <= ?1 AND (due_at, path) > (?2, ?3)
     ORDER BY due_at, path LIMIT ?4";

/// The next due time after the claim cursor, through the same index.
const NEXT_DUE_SQL: &str = "SELECT due_at FROM files
     WHERE (state = 'dirty' OR state = 'uploading' OR state = 'failed') AND claimed = 0
       AND (due_at, path) > (?1, ?2)
     ORDER BY due_at, path LIMIT 1";

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Sql {
        path: String,
        source: rusqlite::Error,
    },
    #[error("journal {path} has schema version {found}, newer than this build knows ({known}); upgrade coffer-agent")]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
}

/// Stat fields compared to decide whether a file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatKey {
    pub size: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: i64,
}

/// Where a known path stands, as far as a scan cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Backed up as it was last read.
    BackedUp,
    /// Backed up as a deletion.
    Deleted,
    /// Failed; read again when its stat changes or it disappears.
    Failed,
    /// Queued (dirty, pending or uploading): the uploader reads it anyway.
    Queued,
}

/// What a scan needs to know about a known path. A scan holds one per file of the watch,
/// so it is kept small: no strings.
#[derive(Debug, Clone)]
pub struct Known {
    pub standing: Standing,
    pub stat: Option<StatKey>,
    /// Set by the scan when it finds the path; those left unset are gone.
    pub seen: bool,
}

/// A file handed to the uploader.
#[derive(Debug, Clone)]
pub struct Job {
    pub path: Vec<u8>,
    pub watch: String,
    pub gen: i64,
    pub state: String,
    pub attempts: i64,
    pub hash: Option<[u8; 32]>,
    pub commit_id: Option<[u8; 16]>,
    pub backed_hash: Option<[u8; 32]>,
    pub backed_kind: Option<String>,
    pub mode: Option<i64>,
}

/// What was read of a file, recorded before its commit is sent.
#[derive(Debug, Clone)]
pub struct Read {
    pub path: Vec<u8>,
    pub gen: i64,
    pub kind: &'static str,
    pub stat: StatKey,
    pub mode: i64,
    pub hash: [u8; 32],
    pub commit_id: [u8; 16],
}

/// An acknowledgement to record.
#[derive(Debug, Clone)]
pub struct Ack {
    pub path: Vec<u8>,
    pub gen: i64,
    pub version: i64,
    pub commit_time: i64,
    pub hash: [u8; 32],
    pub kind: &'static str,
    pub size: i64,
}

/// One row, for `status PATH`.
#[derive(Debug, Clone)]
pub struct Row {
    pub path: Vec<u8>,
    pub state: String,
    pub kind: Option<String>,
    pub size: Option<i64>,
    pub dirty_since: Option<i64>,
    pub due_at: i64,
    pub reason: Option<String>,
    pub attempts: i64,
    pub stat: Option<StatKey>,
    pub backed_version: Option<i64>,
    pub backed_at: Option<i64>,
    pub backed_kind: Option<String>,
    pub backed_size: Option<i64>,
}

/// Counts for `status`.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub dirty: i64,
    pub pending: i64,
    pub uploading: i64,
    pub backed_up: i64,
    pub deleted: i64,
    pub failed: i64,
    pub pending_bytes: i64,
    pub last_backup_at: Option<i64>,
    pub oldest_pending_ms: Option<i64>,
}

impl Summary {
    /// Adds `n` rows in `state` (`deleted`: backed-up deletions) holding `bytes` pending.
    fn add(&mut self, state: &str, deleted: bool, n: i64, bytes: i64) {
        match (state, deleted) {
            ("backed_up", true) => self.deleted += n,
            ("backed_up", false) => self.backed_up += n,
            ("dirty", _) => self.dirty += n,
            ("pending", _) => self.pending += n,
            ("uploading", _) => self.uploading += n,
            ("failed", _) => self.failed += n,
            _ => {}
        }
        if state != "backed_up" {
            self.pending_bytes += bytes;
        }
    }
}

/// Files handed to the uploader and not yet released (by an outcome or `unclaim`). Kept in
/// memory: a claim does not outlive the process (every restart starts with none), so writing
/// it to the journal cost an UPDATE per file for nothing.
#[derive(Default)]
struct Claims {
    held: std::collections::HashSet<Vec<u8>>,
    /// `(due_at, path)` of the last file taken: the next claim reads on from there, in the
    /// due index's order, instead of reading again past every file still held.
    cursor: Option<(i64, Vec<u8>)>,
    /// A released file may be due again at or before the cursor (a retry, a change seen
    /// while it was held, a clock set back): the next claim reads from the start.
    behind: bool,
}

impl Claims {
    /// See `Journal::release`.
    fn release(&mut self, path: &[u8], may_be_due: bool) {
        if self.held.remove(path) && may_be_due {
            self.behind = true;
        }
    }
}

/// What `file_stats` counts of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counted {
    state: String,
    size: Option<i64>,
    backed_kind: Option<String>,
}

impl Counted {
    /// The `file_stats` row it counts in: its state, or `deleted` for a backed-up deletion.
    fn key(&self) -> &str {
        if self.state == "backed_up" && self.backed_kind.as_deref() == Some("deleted") {
            "deleted"
        } else {
            &self.state
        }
    }

    /// The bytes it adds to its state's pending bytes.
    fn bytes(&self) -> i64 {
        if self.state == "backed_up" {
            0
        } else {
            self.size.unwrap_or(0)
        }
    }

    /// The counted columns of `path`'s row, if there is one.
    fn of(tx: &Connection, path: &[u8]) -> rusqlite::Result<Option<Counted>> {
        tx.prepare_cached("SELECT state, size, backed_kind FROM files WHERE path = ?1")?
            .query_row([path], |r| {
                Ok(Counted {
                    state: r.get(0)?,
                    size: r.get(1)?,
                    backed_kind: r.get(2)?,
                })
            })
            .optional()
    }
}

/// The changes one transaction makes to `file_stats`, written by [`Tally::write`] before it
/// commits. Every write to `files` goes through [`Tally::row`], which reads the row's
/// counted columns before and after it, so the counts stay exact whatever the statement
/// did (checked against a full recount by `kept_counts_equal_a_recount`).
#[derive(Default)]
struct Tally(HashMap<String, (i64, i64)>);

impl Tally {
    /// Runs `write` on `path`'s row and counts its effect.
    fn row<T>(
        &mut self,
        tx: &Connection,
        path: &[u8],
        write: impl FnOnce() -> rusqlite::Result<T>,
    ) -> rusqlite::Result<(T, Option<Counted>)> {
        let old = Counted::of(tx, path)?;
        let out = write()?;
        let new = Counted::of(tx, path)?;
        self.change(old.as_ref(), new.as_ref());
        Ok((out, new))
    }

    fn change(&mut self, old: Option<&Counted>, new: Option<&Counted>) {
        if old == new {
            return;
        }
        if let Some(o) = old {
            let e = self.0.entry(o.key().to_string()).or_default();
            e.0 -= 1;
            e.1 -= o.bytes();
        }
        if let Some(n) = new {
            let e = self.0.entry(n.key().to_string()).or_default();
            e.0 += 1;
            e.1 += n.bytes();
        }
    }

    /// Adds the counted changes to `file_stats`.
    fn write(self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let mut st = tx.prepare_cached(
            "UPDATE file_stats SET n = n + ?2, bytes = bytes + ?3 WHERE key = ?1",
        )?;
        for (key, (n, bytes)) in self.0 {
            if n != 0 || bytes != 0 {
                st.execute(params![key, n, bytes])?;
            }
        }
        Ok(())
    }
}

/// Checkpoints the journal's WAL from a connection of its own, so that no writer does it.
///
/// Why: a checkpoint copies the WAL's pages into the database file and syncs both. Run by
/// the connection that commits, it ran while that thread held the journal's lock, and every
/// thread that needed the journal waited: ~0.3 s with all of the agent's threads stalled,
/// sampled during a backup of 100,000 small files. A `PASSIVE` checkpoint on another
/// connection takes no lock that writers need (WAL mode: they append while it copies), and
/// the next write after a complete one starts the WAL over from its beginning.
pub struct Checkpointer {
    conn: Connection,
    wal: std::path::PathBuf,
    path: String,
}

impl Checkpointer {
    /// A connection to the journal at `path` (which `Journal::open` has created).
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let (conn, p) = connect(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let sql = |source| JournalError::Sql {
            path: p.clone(),
            source,
        };
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        // This connection writes nothing: it never checkpoints on commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sql)?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(Self {
            conn,
            wal: wal.into(),
            path: p,
        })
    }

    /// Runs a `PASSIVE` checkpoint if the WAL file holds at least `min_bytes`; returns the
    /// WAL's frames and how many of them are now in the database, if it ran.
    pub fn maybe_run(&self, min_bytes: u64) -> Result<Option<(i64, i64)>, JournalError> {
        let len = std::fs::metadata(&self.wal).map_or(0, |m| m.len());
        if len < min_bytes {
            return Ok(None);
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
            .map(Some)
            .map_err(|source| JournalError::Sql {
                path: self.path.clone(),
                source,
            })
    }
}

/// The journal.
pub struct Journal {
    conn: Connection,
    path: String,
    claims: Claims,
}

/// A connection to the journal at `path` with `flags`, waiting up to 10 s for locks; and
/// the path as errors name it.
fn connect(path: &Path, flags: rusqlite::OpenFlags) -> Result<(Connection, String), JournalError> {
    let p = path.display().to_string();
    let sql = |source| JournalError::Sql {
        path: p.clone(),
        source,
    };
    let conn = Connection::open_with_flags(path, flags).map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql)?;
    Ok((conn, p))
}

fn h32(v: Option<Vec<u8>>) -> Option<[u8; 32]> {
    v.and_then(|b| b.try_into().ok())
}

impl Journal {
    /// Opens (creating if needed) the journal and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let (conn, p) = connect(path, rusqlite::OpenFlags::default())?;
        let sql = |source| JournalError::Sql {
            path: p.clone(),
            source,
        };
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
        // files are updated three times on their way to backed up, so with SQLite's default
        // (every 4 MiB of WAL) most pages were copied several times. The daemon checkpoints
        // from a thread of its own ([`Checkpointer`], every 64 MiB of WAL), so no writer
        // does it while holding the journal; this connection checkpoints only as a
        // backstop, at 256 MiB (a process without that thread, or one it cannot keep up
        // with).
        conn.pragma_update(None, "wal_autocheckpoint", 65536)
            .map_err(sql)?;
        // After a checkpoint the WAL file is cut back to 8 MiB.
        conn.pragma_update(None, "journal_size_limit", 8 << 20)
            .map_err(sql)?;
        let mut j = Journal {
            conn,
            path: p,
            claims: Claims::default(),
        };
        j.migrate()?;
        Ok(j)
    }

    /// Opens the journal for reading only (status while the daemon runs).
    pub fn open_read_only(path: &Path) -> Result<Self, JournalError> {
        let (conn, p) = connect(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Ok(Journal {
            conn,
            path: p,
            claims: Claims::default(),
        })
    }

    /// The applied schema version (0: a journal still being created).
    pub fn schema_version(&self) -> Result<i64, JournalError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn err(&self, source: rusqlite::Error) -> JournalError {
        JournalError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), JournalError> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        let known = MIGRATIONS.len() as i64;
        if v > known {
            return Err(JournalError::TooNew {
                path: self.path.clone(),
                found: v,
                known,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(v as usize) {
            let tx = self.conn.transaction().map_err(|e| JournalError::Sql {
                path: self.path.clone(),
                source: e,
            })?;
            tx.execute_batch(m)
                .and_then(|_| tx.pragma_update(None, "user_version", (i + 1) as i64))
                .and_then(|_| tx.commit())
                .map_err(|e| JournalError::Sql {
                    path: self.path.clone(),
                    source: e,
                })?;
        }
        Ok(())
    }

    /// After a restart: work that was in the hands of the uploader becomes due again
    /// (its hash and commit id stay, so a repeated commit is recognised by the receiver).
    pub fn requeue_in_flight(&mut self) -> Result<usize, JournalError> {
        self.claims = Claims::default();
        let p = self.path.clone();
        let e = |source| JournalError::Sql {
            path: p.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(e)?;
        // Only `pending` rows change what is counted: they become `dirty`, sizes unchanged.
        let (n, bytes): (i64, i64) = tx
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(COALESCE(size, 0)), 0) FROM files WHERE state = 'pending'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(e)?;
        let changed = tx
            .execute(
                "UPDATE files SET state = CASE WHEN state = 'pending' THEN 'dirty' ELSE state END,
                    due_at = CASE WHEN state IN ('pending', 'uploading') THEN 0 ELSE due_at END,
                    claimed = 0
                 WHERE state IN ('pending', 'uploading') OR claimed != 0",
                [],
            )
            .map_err(e)?;
        let mut tally = Tally::default();
        tally.0.insert("pending".into(), (-n, -bytes));
        tally.0.insert("dirty".into(), (n, bytes));
        tally.write(&tx).map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(changed)
    }

    /// Records that paths changed (or may have): they become dirty and due after `delay_ms`.
    pub fn mark_dirty(
        &mut self,
        items: &[(Vec<u8>, String)],
        now: i64,
        delay_ms: i64,
    ) -> Result<(), JournalError> {
        if items.is_empty() {
            return Ok(());
        }
        if matches!(&self.claims.cursor, Some((d, _)) if now + delay_ms <= *d) {
            // Due before the claim cursor (the clock was set back): read from the start.
            self.claims.behind = true;
        }
        let tx = self.conn.transaction().map_err(|e| JournalError::Sql {
            path: self.path.clone(),
            source: e,
        })?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO files (path, watch, state, gen, due_at, dirty_since)
                     VALUES (?1, ?2, 'dirty', 1, ?3, ?4)
                     ON CONFLICT(path) DO UPDATE SET
                        state = 'dirty', gen = gen + 1, due_at = ?3,
                        dirty_since = COALESCE(dirty_since, ?4), reason = NULL,
                        attempts = CASE WHEN state = 'failed' THEN 0 ELSE attempts END",
                )
                .map_err(|e| JournalError::Sql {
                    path: self.path.clone(),
                    source: e,
                })?;
            let mut tally = Tally::default();
            for (p, w) in items {
                tally
                    .row(&tx, p, || st.execute(params![p, w, now + delay_ms, now]))
                    .map_err(|e| JournalError::Sql {
                        path: self.path.clone(),
                        source: e,
                    })?;
            }
            tally.write(&tx).map_err(|e| JournalError::Sql {
                path: self.path.clone(),
                source: e,
            })?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Known paths of one watch with their last-read stat, for scans.
    pub fn known(&self, watch: &str) -> Result<HashMap<Vec<u8>, Known>, JournalError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT path, CASE WHEN state = 'backed_up' AND kind = 'deleted' THEN 1 \
                 WHEN state = 'backed_up' THEN 0 WHEN state = 'failed' THEN 2 ELSE 3 END, \
                 size, mtime_ns, ctime_ns, inode FROM files WHERE watch = ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([watch], |r| {
                let size: Option<i64> = r.get(2)?;
                let stat = match size {
                    Some(size) => Some(StatKey {
                        size,
                        mtime_ns: r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                        ctime_ns: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                        inode: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                    }),
                    None => None,
                };
                let standing = match r.get::<_, i64>(1)? {
                    0 => Standing::BackedUp,
                    1 => Standing::Deleted,
                    2 => Standing::Failed,
                    _ => Standing::Queued,
                };
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    Known {
                        standing,
                        stat,
                        seen: false,
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for row in rows {
            let (p, k) = row.map_err(|e| self.err(e))?;
            out.insert(p, k);
        }
        Ok(out)
    }

    /// Takes up to `limit` files that are due and holds them (until their outcome is
    /// recorded or they are `unclaim`ed), in due order.
    pub fn claim_due(&mut self, now: i64, limit: usize) -> Result<Vec<Job>, JournalError> {
        let p = self.path.clone();
        let e = |source| JournalError::Sql {
            path: p.clone(),
            source,
        };
        let from_start = self.claims.behind || self.claims.cursor.is_none();
        let (cd, cp) = match (&self.claims.cursor, from_start) {
            (Some((d, p)), false) => (*d, p.clone()),
            _ => (i64::MIN, Vec::new()),
        };
        // From the start, files still held are read again and skipped: read that many more.
        let fetch = if from_start {
            limit + self.claims.held.len()
        } else {
            limit
        };
        let mut st = self.conn.prepare_cached(CLAIM_SQL).map_err(e)?;
        let rows = st
            .query_map(params![now, cd, cp, fetch as i64], |r| {
                Ok((
                    Job {
                        path: r.get(0)?,
                        watch: r.get(1)?,
                        gen: r.get(2)?,
                        state: r.get(3)?,
                        attempts: r.get(4)?,
                        hash: h32(r.get(5)?),
                        commit_id: r
                            .get::<_, Option<Vec<u8>>>(6)?
                            .and_then(|b| b.try_into().ok()),
                        backed_hash: h32(r.get(7)?),
                        backed_kind: r.get(8)?,
                        mode: r.get(9)?,
                    },
                    r.get::<_, i64>(10)?,
                ))
            })
            .map_err(e)?;
        let mut out = Vec::new();
        let mut last = None;
        for row in rows {
            let (job, due) = row.map_err(e)?;
            if out.len() == limit {
                break;
            }
            last = Some((due, job.path.clone()));
            if self.claims.held.insert(job.path.clone()) {
                out.push(job);
            }
        }
        if from_start {
            self.claims.behind = false;
        }
        if let Some(c) = last {
            self.claims.cursor = Some(c);
        }
        Ok(out)
    }

    /// Hands held files back without an outcome (the agent is stopping, or a batch was
    /// abandoned): they are due again as they were.
    pub fn unclaim(&mut self, paths: &[Vec<u8>]) -> Result<(), JournalError> {
        for path in paths {
            self.release(path, true);
        }
        Ok(())
    }

    /// A held file's outcome was recorded (or it was handed back); `may_be_due`: it is
    /// not backed up, so it may be due again, possibly before the claim cursor.
    fn release(&mut self, path: &[u8], may_be_due: bool) {
        self.claims.release(path, may_be_due);
    }

    /// Releases a batch's files, each with whether it may be due again (all may be when the
    /// batch's outcomes could not be recorded).
    fn release_all<'a>(&mut self, released: impl IntoIterator<Item = (&'a [u8], bool)>) {
        for (path, due) in released {
            self.claims.release(path, due);
        }
    }

    /// When the next file not yet taken becomes due, if any waits.
    pub fn next_due(&self) -> Result<Option<i64>, JournalError> {
        let (cd, cp) = match (&self.claims.cursor, self.claims.behind) {
            (Some((d, p)), false) => (*d, p.clone()),
            _ => (i64::MIN, Vec::new()),
        };
        let mut st = self
            .conn
            .prepare_cached(NEXT_DUE_SQL)
            .map_err(|e| self.err(e))?;
        st.query_row(params![cd, cp], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records what was read and the commit id, before the commits are sent.
    pub fn record_reads(&mut self, reads: &[Read]) -> Result<(), JournalError> {
        if reads.is_empty() {
            return Ok(());
        }
        let p = self.path.clone();
        let e = |source| JournalError::Sql {
            path: p.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut st = tx
                .prepare_cached(
                    "UPDATE files SET kind = ?2, size = ?3, mtime_ns = ?4, ctime_ns = ?5, inode = ?6,
                        mode = ?7, hash = ?8, commit_id = ?9,
                        state = CASE WHEN gen = ?10 THEN 'uploading' ELSE state END
                     WHERE path = ?1",
                )
                .map_err(e)?;
            let mut tally = Tally::default();
            for r in reads {
                tally
                    .row(&tx, &r.path, || {
                        st.execute(params![
                            r.path,
                            r.kind,
                            r.stat.size,
                            r.stat.mtime_ns,
                            r.stat.ctime_ns,
                            r.stat.inode,
                            r.mode,
                            &r.hash[..],
                            &r.commit_id[..],
                            r.gen
                        ])
                    })
                    .map_err(e)?;
            }
            tally.write(&tx).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Records files whose content equals their last backup: nothing to send.
    pub fn record_unchanged(&mut self, reads: &[Read]) -> Result<(), JournalError> {
        let p = self.path.clone();
        let e = |source| JournalError::Sql {
            path: p.clone(),
            source,
        };
        let mut released = Vec::with_capacity(reads.len());
        let r = (|| {
            let tx = self.conn.transaction().map_err(e)?;
            {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE files SET kind = ?2, size = ?3, mtime_ns = ?4, ctime_ns = ?5, inode = ?6,
                            mode = ?7, hash = ?8, reason = NULL, attempts = 0,
                            state = CASE WHEN gen = ?9 THEN 'backed_up' ELSE state END,
                            dirty_since = CASE WHEN gen = ?9 THEN NULL ELSE dirty_since END
                         WHERE path = ?1",
                    )
                    .map_err(e)?;
                let mut tally = Tally::default();
                for r in reads {
                    let (_, now) = tally
                        .row(&tx, &r.path, || {
                            st.execute(params![
                                r.path,
                                r.kind,
                                r.stat.size,
                                r.stat.mtime_ns,
                                r.stat.ctime_ns,
                                r.stat.inode,
                                r.mode,
                                &r.hash[..],
                                r.gen
                            ])
                        })
                        .map_err(e)?;
                    let backed_up = now.is_some_and(|c| c.state == "backed_up");
                    released.push((r.path.as_slice(), !backed_up));
                }
                tally.write(&tx).map_err(e)?;
            }
            tx.commit().map_err(e)
        })();
        match r {
            Ok(()) => self.release_all(released),
            Err(_) => self.release_all(reads.iter().map(|r| (r.path.as_slice(), true))),
        }
        r
    }

    /// Records acknowledgements in one transaction.
    pub fn record_acks(&mut self, acks: &[Ack]) -> Result<(), JournalError> {
        if acks.is_empty() {
            return Ok(());
        }
        let p = self.path.clone();
        let e = |source| JournalError::Sql {
            path: p.clone(),
            source,
        };
        let mut latest = None;
        let mut released = Vec::with_capacity(acks.len());
        let r = (|| {
            let tx = self.conn.transaction().map_err(e)?;
            {
                // The usual case first: the file did not change since it was read.
                let mut done = tx
                    .prepare_cached(
                        "UPDATE files SET backed_version = ?2, backed_at = ?3, backed_hash = ?4,
                            backed_kind = ?5, backed_size = ?6, reason = NULL, attempts = 0,
                            state = 'backed_up', dirty_since = NULL
                         WHERE path = ?1 AND gen = ?7",
                    )
                    .map_err(e)?;
                // It changed: the version is recorded, the file stays due.
                let mut changed = tx
                    .prepare_cached(
                        "UPDATE files SET backed_version = ?2, backed_at = ?3, backed_hash = ?4,
                            backed_kind = ?5, backed_size = ?6, reason = NULL, attempts = 0
                         WHERE path = ?1",
                    )
                    .map_err(e)?;
                let mut tally = Tally::default();
                for a in acks {
                    let v = params![
                        a.path,
                        a.version,
                        a.commit_time,
                        &a.hash[..],
                        a.kind,
                        a.size
                    ];
                    let ((backed_up, known), _) = tally
                        .row(&tx, &a.path, || {
                            let backed_up = done.execute(params![
                                a.path,
                                a.version,
                                a.commit_time,
                                &a.hash[..],
                                a.kind,
                                a.size,
                                a.gen
                            ])? > 0;
                            Ok((backed_up, backed_up || changed.execute(v)? > 0))
                        })
                        .map_err(e)?;
                    if known {
                        latest = latest.max(Some(a.commit_time));
                    }
                    released.push((a.path.as_slice(), !backed_up));
                }
                tally.write(&tx).map_err(e)?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('last_ack_ms', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = ?1",
                    [now_ms().to_string()],
                )
                .map_err(e)?;
                if let Some(latest) = latest {
                    tx.execute(
                        "INSERT INTO meta (key, value) VALUES ('last_backed_at', ?1)
                         ON CONFLICT(key) DO UPDATE SET
                            value = CAST(MAX(CAST(value AS INTEGER), ?2) AS TEXT)",
                        params![latest.to_string(), latest],
                    )
                    .map_err(e)?;
                }
            }
            tx.commit().map_err(e)
        })();
        match r {
            Ok(()) => self.release_all(released),
            Err(_) => self.release_all(acks.iter().map(|a| (a.path.as_slice(), true))),
        }
        r
    }

    /// Records a failure of the file itself (unreadable...): retried with back-off.
    pub fn record_failure(
        &mut self,
        path: &[u8],
        gen: i64,
        reason: &str,
        retry_at: i64,
    ) -> Result<(), JournalError> {
        let r = (|| {
            let tx = self.conn.transaction()?;
            let mut tally = Tally::default();
            tally.row(&tx, path, || {
                tx.execute(
                    "UPDATE files SET state = CASE WHEN gen = ?2 THEN 'failed' ELSE state END,
                        attempts = attempts + 1, reason = ?3,
                        due_at = CASE WHEN gen = ?2 THEN ?4 ELSE due_at END
                     WHERE path = ?1",
                    params![path, gen, reason, retry_at],
                )
            })?;
            tally.write(&tx)?;
            tx.commit()
        })()
        .map_err(|e| self.err(e));
        self.release(path, true);
        r
    }

    /// Puts a file back to wait (receiver unreachable, changed while read...). It changes
    /// only `reason` and `due_at`, nothing `file_stats` counts, so it needs no [`Tally`]; a
    /// change here that touches state, size or backed kind must go through one.
    pub fn record_retry(
        &mut self,
        items: &[(Vec<u8>, String)],
        due_at: i64,
    ) -> Result<(), JournalError> {
        let p = self.path.clone();
        let e = |source| JournalError::Sql {
            path: p.clone(),
            source,
        };
        let r = (|| {
            let tx = self.conn.transaction().map_err(e)?;
            {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE files SET
                            reason = CASE WHEN state = 'backed_up' THEN reason ELSE ?2 END,
                            due_at = CASE WHEN state = 'backed_up' THEN due_at ELSE MAX(due_at, ?3) END
                         WHERE path = ?1",
                    )
                    .map_err(e)?;
                for (path, reason) in items {
                    st.execute(params![path, reason, due_at]).map_err(e)?;
                }
            }
            tx.commit().map_err(e)
        })();
        for (path, _) in items {
            self.release(path, true);
        }
        r
    }

    /// Forgets a path that vanished before it was ever backed up.
    pub fn forget(&mut self, path: &[u8], gen: i64) -> Result<(), JournalError> {
        let r = (|| {
            let tx = self.conn.transaction()?;
            let mut tally = Tally::default();
            tally.row(&tx, path, || {
                tx.execute(
                    "DELETE FROM files WHERE path = ?1 AND gen = ?2",
                    params![path, gen],
                )
            })?;
            tally.write(&tx)?;
            tx.commit()
        })()
        .map_err(|e| self.err(e));
        self.release(path, true);
        r
    }

    /// Adds to a named counter.
    pub fn bump(&mut self, name: &str, by: i64) -> Result<(), JournalError> {
        self.conn
            .execute(
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value = value + ?2",
                params![name, by],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Sets a named counter.
    pub fn set_counter(&mut self, name: &str, v: i64) -> Result<(), JournalError> {
        self.conn
            .execute(
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value = ?2",
                params![name, v],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// All counters.
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
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), JournalError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = ?2",
                params![key, value],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Reads a meta value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, JournalError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Counts for `status`: read from `file_stats` (kept by [`Tally`]) and two index lookups,
    /// so it costs the same at 100 files and at 1,000,000.
    pub fn summary(&self) -> Result<Summary, JournalError> {
        if self.schema_version()? < 4 {
            // Read-only, under a daemon of the previous release that has not migrated yet.
            return self.summary_by_scan();
        }
        let mut s = Summary::default();
        let mut st = self
            .conn
            .prepare_cached("SELECT key, n, bytes FROM file_stats")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (key, n, bytes) = row.map_err(|e| self.err(e))?;
            match key.as_str() {
                "deleted" => s.add("backed_up", true, n, bytes),
                state => s.add(state, false, n, bytes),
            }
        }
        s.oldest_pending_ms = self
            .conn
            .prepare_cached(
                "SELECT MIN(dirty_since) FROM files
                 WHERE dirty_since IS NOT NULL AND state != 'backed_up'",
            )
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))?;
        s.last_backup_at = self
            .meta("last_backed_at")?
            .and_then(|v| v.parse::<i64>().ok());
        Ok(s)
    }

    fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
        let size: Option<i64> = r.get(3)?;
        Ok(Row {
            path: r.get(0)?,
            state: r.get(1)?,
            kind: r.get(2)?,
            size,
            dirty_since: r.get(4)?,
            due_at: r.get(5)?,
            reason: r.get(6)?,
            attempts: r.get(7)?,
            stat: size.map(|size| StatKey {
                size,
                mtime_ns: r.get::<_, Option<i64>>(8).ok().flatten().unwrap_or(0),
                ctime_ns: r.get::<_, Option<i64>>(9).ok().flatten().unwrap_or(0),
                inode: r.get::<_, Option<i64>>(10).ok().flatten().unwrap_or(0),
            }),
            backed_version: r.get(11)?,
            backed_at: r.get(12)?,
            backed_kind: r.get(13)?,
            backed_size: r.get(14)?,
        })
    }

    const ROW_COLS: &'static str = "path, state, kind, size, dirty_since, due_at, reason, attempts, mtime_ns, ctime_ns, inode, backed_version, backed_at, backed_kind, backed_size";

    /// One path's row.
    pub fn row(&self, path: &[u8]) -> Result<Option<Row>, JournalError> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM files WHERE path = ?1", Self::ROW_COLS),
                [path],
                Self::row_from,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Counts by scanning every row, for a journal without `file_stats` (schema < 4).
    fn summary_by_scan(&self) -> Result<Summary, JournalError> {
        let mut s = Summary::default();
        let mut st = self
            .conn
            .prepare(
                "SELECT state, state = 'backed_up' AND backed_kind IS 'deleted', COUNT(*),
                        COALESCE(SUM(CASE WHEN state != 'backed_up' THEN COALESCE(size, 0) ELSE 0 END), 0),
                        MIN(CASE WHEN state != 'backed_up' THEN dirty_since END),
                        MAX(backed_at)
                 FROM files GROUP BY 1, 2",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (state, deleted, n, bytes, since, last) = row.map_err(|e| self.err(e))?;
            s.add(&state, deleted, n, bytes);
            s.oldest_pending_ms = match (s.oldest_pending_ms, since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            s.last_backup_at = s.last_backup_at.max(last);
        }
        Ok(s)
    }

    /// Failed files, up to `limit` (through their partial index: no scan of every row).
    pub fn failed_rows(&self, limit: usize) -> Result<Vec<Row>, JournalError> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM files WHERE state = 'failed' ORDER BY path LIMIT ?1",
                Self::ROW_COLS
            ))
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![limit as i64], Self::row_from)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Rows whose path starts with `prefix` (a folder), up to `limit`.
    pub fn rows_under(&self, prefix: &[u8], limit: usize) -> Result<Vec<Row>, JournalError> {
        let mut hi = prefix.to_vec();
        hi.push(0xff);
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM files WHERE path >= ?1 AND path < ?2 ORDER BY path LIMIT ?3",
                Self::ROW_COLS
            ))
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![prefix, hi, limit as i64], Self::row_from)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j() -> (tempfile::TempDir, Journal) {
        let d = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(&d.path().join("j.sqlite")).expect("open");
        (d, j)
    }

    #[test]
    fn the_checkpointer_copies_the_wal_only_past_its_threshold() {
        let (d, mut j) = j();
        let items: Vec<_> = (0..2000)
            .map(|i| (format!("w/f{i:05}").into_bytes(), "w".to_string()))
            .collect();
        j.mark_dirty(&items, 0, 0).expect("mark");
        let c = Checkpointer::open(&d.path().join("j.sqlite")).expect("checkpointer");
        let wal = std::fs::metadata(d.path().join("j.sqlite-wal"))
            .expect("wal")
            .len();
        assert!(wal > 0, "the writes are in the WAL");
        let db_len = || {
            std::fs::metadata(d.path().join("j.sqlite"))
                .expect("db")
                .len()
        };
        let before = db_len();
        assert_eq!(c.maybe_run(wal + 1).expect("below"), None);
        assert_eq!(db_len(), before, "nothing copied below the threshold");
        let (frames, done) = c.maybe_run(wal).expect("run").expect("ran");
        assert!(
            frames > 0 && done == frames,
            "{done} of {frames} frames copied"
        );
        assert!(db_len() > before, "the pages are in the database file");
        // The writer goes on, and what was copied reads back from the database.
        j.mark_dirty(&items[..10], 1, 0).expect("mark again");
        drop(c);
        drop(j);
        let r = Journal::open_read_only(&d.path().join("j.sqlite")).expect("reopen");
        assert_eq!(r.summary().expect("summary").dirty, 2000);
    }

    fn read(path: &[u8], gen: i64) -> Read {
        Read {
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
            commit_id: [2; 16],
        }
    }

    #[test]
    fn lifecycle_dirty_uploading_backed_up() {
        let (_d, mut j) = j();
        j.mark_dirty(&[(b"w/a".to_vec(), "w".into())], 1000, 2000)
            .expect("dirty");
        assert!(j.claim_due(2999, 10).expect("claim").is_empty());
        let jobs = j.claim_due(3000, 10).expect("claim");
        assert_eq!(jobs.len(), 1);
        j.record_reads(&[read(b"w/a", jobs[0].gen)]).expect("reads");
        assert_eq!(j.summary().expect("s").uploading, 1);
        j.record_acks(&[Ack {
            path: b"w/a".to_vec(),
            gen: jobs[0].gen,
            version: 7,
            commit_time: 5,
            hash: [1; 32],
            kind: "file",
            size: 3,
        }])
        .expect("ack");
        let s = j.summary().expect("s");
        assert_eq!((s.backed_up, s.uploading, s.pending_bytes), (1, 0, 0));
        assert_eq!(s.last_backup_at, Some(5));
    }

    #[test]
    fn a_change_during_upload_keeps_the_file_dirty() {
        let (_d, mut j) = j();
        j.mark_dirty(&[(b"w/a".to_vec(), "w".into())], 0, 0)
            .expect("dirty");
        let job = j.claim_due(10, 1).expect("claim").remove(0);
        j.record_reads(&[read(b"w/a", job.gen)]).expect("reads");
        j.mark_dirty(&[(b"w/a".to_vec(), "w".into())], 20, 0)
            .expect("dirty again");
        j.record_acks(&[Ack {
            path: b"w/a".to_vec(),
            gen: job.gen,
            version: 1,
            commit_time: 5,
            hash: [1; 32],
            kind: "file",
            size: 3,
        }])
        .expect("ack");
        let r = j.row(b"w/a").expect("row").expect("exists");
        assert_eq!(r.state, "dirty");
        assert_eq!(r.backed_version, Some(1));
    }

    #[test]
    fn restart_requeues_in_flight_work_with_its_commit_id() {
        let (_d, mut j) = j();
        j.mark_dirty(&[(b"w/a".to_vec(), "w".into())], 0, 0)
            .expect("dirty");
        let job = j.claim_due(10, 1).expect("claim").remove(0);
        j.record_reads(&[read(b"w/a", job.gen)]).expect("reads");
        j.requeue_in_flight().expect("requeue");
        let again = j.claim_due(0, 1).expect("claim").remove(0);
        assert_eq!(again.commit_id, Some([2; 16]));
        assert_eq!(again.hash, Some([1; 32]));
    }

    #[test]
    fn failures_are_counted_and_retried_later() {
        let (_d, mut j) = j();
        j.mark_dirty(&[(b"w/a".to_vec(), "w".into())], 0, 0)
            .expect("dirty");
        j.record_failure(b"w/a", 1, "reading w/a: permission denied", 5000)
            .expect("fail");
        assert_eq!(j.summary().expect("s").failed, 1);
        assert!(j.claim_due(4999, 1).expect("c").is_empty());
        assert_eq!(j.claim_due(5000, 1).expect("c").len(), 1);
        assert_eq!(j.failed_rows(10).expect("rows")[0].attempts, 1);
    }

    /// The counts `status` reads, computed the slow way: by scanning every row.
    type Counts = (Vec<(String, bool, i64)>, i64, Option<i64>, Option<i64>);

    /// `last` is the latest receiver time of an acknowledgement that was recorded.
    fn recount(j: &Journal, last: Option<i64>) -> Counts {
        let mut st = j
            .conn
            .prepare(
                "SELECT state, state = 'backed_up' AND backed_kind IS 'deleted', COUNT(*),
                        SUM(CASE WHEN state != 'backed_up' THEN COALESCE(size, 0) ELSE 0 END)
                 FROM files GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .expect("prepare");
        let mut groups = Vec::new();
        let mut bytes = 0;
        for g in st
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)?))
            })
            .expect("query")
        {
            let (state, deleted, n, b) = g.expect("row");
            groups.push((state, deleted, n));
            bytes += b;
        }
        let since = j
            .conn
            .query_row(
                "SELECT MIN(dirty_since) FROM files WHERE state != 'backed_up'",
                [],
                |r| r.get(0),
            )
            .expect("since");
        (groups, bytes, since, last)
    }

    fn kept(j: &Journal) -> Counts {
        let s = j.summary().expect("summary");
        let mut groups = Vec::new();
        for (state, deleted, n) in [
            ("backed_up", false, s.backed_up),
            ("backed_up", true, s.deleted),
            ("dirty", false, s.dirty),
            ("failed", false, s.failed),
            ("pending", false, s.pending),
            ("uploading", false, s.uploading),
        ] {
            if n > 0 {
                groups.push((state.to_string(), deleted, n));
            }
        }
        (
            groups,
            s.pending_bytes,
            s.oldest_pending_ms,
            s.last_backup_at,
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The counts kept in `file_stats` equal a full recount after any sequence of what the
        /// daemon does to the journal (and the pending bytes their sum).
        #[test]
        fn kept_counts_equal_a_recount(ops in proptest::collection::vec((0u8..10, 0usize..6, 0i64..3), 1..60)) {
            let (_d, mut j) = j();
            let path = |i: usize| format!("w/{i}").into_bytes();
            let mut now = 1_000;
            let mut last = None;
            for (op, i, x) in ops {
                now += 10;
                // The row's current generation, or (x == 0) a stale one: a change arrived.
                let cur: Option<i64> = j
                    .conn
                    .query_row("SELECT gen FROM files WHERE path = ?1", [path(i)], |r| r.get(0))
                    .optional()
                    .expect("gen");
                let gen = cur.unwrap_or(0) - i64::from(x == 0);
                if op == 4 && cur.is_some() {
                    last = last.max(Some(now / 10 - x));
                }
                match op {
                    0 | 1 => j.mark_dirty(&[(path(i), "w".into())], now, 5).expect("dirty"),
                    2 => { j.claim_due(now, 3).expect("claim"); }
                    3 => j.record_reads(&[Read { stat: StatKey { size: x * 100, ..read(b"", 0).stat }, ..read(&path(i), gen) }]).expect("reads"),
                    4 => j.record_acks(&[Ack {
                        path: path(i), gen, version: now, commit_time: now / 10 - x,
                        hash: [1; 32], kind: if x == 2 { "deleted" } else { "file" }, size: x,
                    }]).expect("acks"),
                    5 => j.record_failure(&path(i), gen, "unreadable", now + 5).expect("fail"),
                    6 => j.record_unchanged(&[read(&path(i), gen)]).expect("unchanged"),
                    7 => j.forget(&path(i), gen).expect("forget"),
                    8 => j.record_retry(&[(path(i), "unreachable".into())], now + x).expect("retry"),
                    _ => { j.requeue_in_flight().expect("requeue"); }
                }
                proptest::prop_assert_eq!(kept(&j), recount(&j, last));
                let (a, b) = (j.summary().expect("kept"), j.summary_by_scan().expect("scan"));
                proptest::prop_assert_eq!(
                    (a.dirty, a.pending, a.uploading, a.backed_up, a.deleted, a.failed),
                    (b.dirty, b.pending, b.uploading, b.backed_up, b.deleted, b.failed)
                );
                proptest::prop_assert_eq!((a.pending_bytes, a.oldest_pending_ms), (b.pending_bytes, b.oldest_pending_ms));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Claims live in memory with a cursor: whatever happens to held files (acks of the
        /// current or an older generation, retries, failures, hand-backs, changes, a clock
        /// set back), a file is never handed out twice at once, and once everything is
        /// released every file still due is handed out again.
        #[test]
        fn claims_are_exclusive_and_nothing_due_is_lost(
            ops in proptest::collection::vec((0u8..8, 0usize..8, 0i64..3), 1..80)
        ) {
            let (_d, mut j) = j();
            let path = |i: usize| format!("w/{i}").into_bytes();
            let mut held: std::collections::HashMap<Vec<u8>, i64> = Default::default();
            let mut now = 10_000;
            for (op, i, x) in ops {
                now += 7;
                match op {
                    0 | 1 => {
                        // A change; x == 2: seen with a clock set back.
                        let t = if x == 2 { now - 5_000 } else { now };
                        j.mark_dirty(&[(path(i), "w".into())], t, 3).expect("dirty");
                    }
                    2 | 3 => {
                        for job in j.claim_due(now, 1 + i).expect("claim") {
                            proptest::prop_assert!(
                                held.insert(job.path.clone(), job.gen).is_none(),
                                "{:?} handed out twice", String::from_utf8_lossy(&job.path)
                            );
                        }
                    }
                    _ => {
                        let Some((p, gen)) = held.iter().nth(i % held.len().max(1)).map(|(p, g)| (p.clone(), *g)) else {
                            continue;
                        };
                        held.remove(&p);
                        match op {
                            4 => j.record_acks(&[Ack {
                                path: p, gen: gen - i64::from(x == 0), version: now, commit_time: 1,
                                hash: [1; 32], kind: "file", size: 1,
                            }]).expect("ack"),
                            5 => j.record_retry(&[(p, "receiver unreachable".into())], now + x).expect("retry"),
                            6 => j.record_failure(&p, gen, "unreadable", now + x).expect("fail"),
                            _ => j.unclaim(&[p]).expect("unclaim"),
                        }
                    }
                }
            }
            let paths: Vec<Vec<u8>> = held.keys().cloned().collect();
            j.unclaim(&paths).expect("unclaim all");
            let mut want: Vec<Vec<u8>> = j
                .conn
                .prepare("SELECT path FROM files WHERE state != 'backed_up' ORDER BY path")
                .expect("prepare")
                .query_map([], |r| r.get(0))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows");
            let mut got = Vec::new();
            loop {
                let jobs = j.claim_due(now + 1_000_000, 3).expect("claim");
                if jobs.is_empty() {
                    break;
                }
                got.extend(jobs.into_iter().map(|j| j.path));
            }
            got.sort();
            want.sort();
            proptest::prop_assert_eq!(got, want);
        }
    }

    /// The claim's queries must use the partial index: the planner only does when their
    /// condition repeats the index's term by term, and otherwise scans every row.
    #[test]
    fn claiming_uses_the_due_index() {
        let (_d, j) = j();
        let claim = j
            .conn
            .prepare("SELECT sql FROM sqlite_master WHERE name = 'files_due'")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, String>(0)))
            .expect("index");
        assert!(claim.contains("claimed = 0"), "{claim}");
        for (name, sql, n) in [("claim_due", CLAIM_SQL, 4), ("next_due", NEXT_DUE_SQL, 2)] {
            let mut st = j
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("explain");
            let args: Vec<i64> = vec![0; n];
            let plan: Vec<String> = st
                .query_map(rusqlite::params_from_iter(args), |r| r.get(3))
                .expect("plan")
                .map(|r| r.expect("row"))
                .collect();
            assert!(
                plan.iter().any(|p| p.contains("USING INDEX files_due")),
                "{name}: {plan:?}"
            );
        }
    }

    #[test]
    fn migration_0004_counts_an_existing_journal() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("j.sqlite");
        {
            let mut j = Journal::open(&p).expect("open");
            j.mark_dirty(
                &[(b"w/a".to_vec(), "w".into()), (b"w/b".to_vec(), "w".into())],
                0,
                0,
            )
            .expect("dirty");
            let jobs = j.claim_due(10, 1).expect("claim");
            j.record_reads(&[read(&jobs[0].path, jobs[0].gen)])
                .expect("reads");
            j.record_acks(&[Ack {
                path: jobs[0].path.clone(),
                gen: jobs[0].gen,
                version: 1,
                commit_time: 77,
                hash: [1; 32],
                kind: "file",
                size: 3,
            }])
            .expect("ack");
            // Back to schema 3, as a journal written by the previous release would be.
            j.conn
                .execute_batch(
                    "DROP TABLE file_stats;
                     DROP INDEX files_pending_since; DROP INDEX files_failed;
                     DELETE FROM meta WHERE key = 'last_backed_at'; PRAGMA user_version = 3;",
                )
                .expect("downgrade");
        }
        // 0004 counts the rows (with its triggers), 0005 hands the counting to the code.
        let mut j = Journal::open(&p).expect("reopen");
        let s = j.summary().expect("summary");
        assert_eq!((s.backed_up, s.dirty, s.last_backup_at), (1, 1, Some(77)));
        assert_eq!(kept(&j), recount(&j, Some(77)));
        let triggers: i64 = j
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'",
                [],
                |r| r.get(0),
            )
            .expect("triggers");
        assert_eq!(triggers, 0);
        j.mark_dirty(&[(b"w/c".to_vec(), "w".into())], 20, 0)
            .expect("dirty");
        assert_eq!(j.summary().expect("summary").dirty, 2);
        assert_eq!(kept(&j), recount(&j, Some(77)));
    }
}
