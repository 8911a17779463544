//! The counts `status` reads: `file_stats`, kept by the journal's writes through [`Tally`]
//! in the same transaction, and the [`Summary`] built from it. Every write to `files`
//! that can change a counted column goes through a `Tally`.

use super::*;

/// Counts for `status`.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub dirty: i64,
    pub uploading: i64,
    pub backed_up: i64,
    pub deleted: i64,
    pub failed: i64,
    pub pending_bytes: i64,
    pub last_backup_at: Option<i64>,
    pub oldest_pending_ms: Option<i64>,
}

impl Summary {
    /// Files not backed up (dirty, uploading or failed): what `status` calls pending.
    pub fn pending(&self) -> i64 {
        self.dirty + self.uploading + self.failed
    }

    /// Adds `n` rows counted in `b` holding `bytes` pending.
    fn add(&mut self, b: Bucket, n: i64, bytes: i64) {
        *match b {
            Bucket::Dirty => &mut self.dirty,
            Bucket::Uploading => &mut self.uploading,
            Bucket::BackedUp => &mut self.backed_up,
            Bucket::Deleted => &mut self.deleted,
            Bucket::Failed => &mut self.failed,
        } += n;
        if b.state().is_pending() {
            self.pending_bytes += bytes;
        }
    }
}

/// A row of `file_stats` (its `key`): the files in one state, with backed-up deletions
/// counted apart from the other backed-up files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bucket {
    Dirty,
    Uploading,
    BackedUp,
    /// Backed up as a deletion.
    Deleted,
    Failed,
}

impl Bucket {
    const ALL: [Bucket; 5] = [
        Bucket::Dirty,
        Bucket::Uploading,
        Bucket::BackedUp,
        Bucket::Deleted,
        Bucket::Failed,
    ];

    /// The bucket of a row in `state`; `deletion`: backed up as a deletion.
    fn of(state: FileState, deletion: bool) -> Bucket {
        match state {
            FileState::Dirty => Bucket::Dirty,
            FileState::Uploading => Bucket::Uploading,
            FileState::BackedUp if deletion => Bucket::Deleted,
            FileState::BackedUp => Bucket::BackedUp,
            FileState::Failed => Bucket::Failed,
        }
    }

    /// The state of the rows it counts.
    fn state(self) -> FileState {
        match self {
            Bucket::Dirty => FileState::Dirty,
            Bucket::Uploading => FileState::Uploading,
            Bucket::BackedUp | Bucket::Deleted => FileState::BackedUp,
            Bucket::Failed => FileState::Failed,
        }
    }

    /// Its `file_stats.key`: its state's name, or `deleted`.
    fn key(self) -> &'static str {
        match self {
            Bucket::Deleted => "deleted",
            b => b.state().as_str(),
        }
    }

    /// The bucket a `file_stats.key` names, if any.
    fn from_key(key: &str) -> Option<Bucket> {
        Bucket::ALL
            .into_iter()
            .find(|b| b.key() == key)
            .or_else(|| FileState::from_name(key).map(|s| Bucket::of(s, false)))
    }
}

/// What `file_stats` counts of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Counted {
    pub(super) state: FileState,
    size: Option<i64>,
    /// Backed up as a deletion (`backed_kind` is `deleted`).
    deletion: bool,
}

impl Counted {
    /// The `file_stats` row it counts in.
    fn bucket(&self) -> Bucket {
        Bucket::of(self.state, self.deletion)
    }

    /// The bytes it adds to its state's pending bytes.
    fn bytes(&self) -> i64 {
        if self.state.is_pending() {
            self.size.unwrap_or(0)
        } else {
            0
        }
    }

    /// The counted columns of `path`'s row, if there is one.
    fn of(tx: &Connection, path: &[u8]) -> rusqlite::Result<Option<Counted>> {
        tx.prepare_cached("SELECT state, size, backed_kind FROM files WHERE path = ?1")?
            .query_row([path], |r| {
                Ok(Counted {
                    state: r.get(0)?,
                    size: r.get(1)?,
                    deletion: r.get_ref(2)? == ValueRef::Text(b"deleted"),
                })
            })
            .optional()
    }
}

/// The changes one transaction makes to `file_stats` (rows and pending bytes, by
/// [`Bucket`]), written by [`Tally::write`] before it commits. Every write to `files` goes
/// through [`Tally::row`], which reads the row's counted columns before and after it, so
/// the counts stay exact whatever the statement did (checked against a full recount by
/// `kept_counts_equal_a_recount`).
#[derive(Default)]
pub(super) struct Tally([(i64, i64); Bucket::ALL.len()]);

impl Tally {
    /// Runs `write` on `path`'s row and counts its effect.
    pub(super) fn row<T>(
        &mut self,
        tx: &Connection,
        path: &[u8],
        write: impl FnOnce() -> rusqlite::Result<T>,
    ) -> rusqlite::Result<(T, Option<Counted>)> {
        if is_folder_key(path) {
            // A folder's row: not counted (the counts are about files).
            let out = write()?;
            return Ok((out, Counted::of(tx, path)?));
        }
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
            let e = &mut self.0[o.bucket() as usize];
            e.0 -= 1;
            e.1 -= o.bytes();
        }
        if let Some(n) = new {
            let e = &mut self.0[n.bucket() as usize];
            e.0 += 1;
            e.1 += n.bytes();
        }
    }

    /// Adds the counted changes to `file_stats`.
    pub(super) fn write(self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let mut st = tx.prepare_cached(
            "UPDATE file_stats SET n = n + ?2, bytes = bytes + ?3 WHERE key = ?1",
        )?;
        for b in Bucket::ALL {
            let (n, bytes) = self.0[b as usize];
            if n != 0 || bytes != 0 {
                st.execute(params![b.key(), n, bytes])?;
            }
        }
        Ok(())
    }
}

impl Journal {
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
                    Bucket::from_key(r.get_ref(0)?.as_str()?),
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            // A key this build does not count in (none in a journal of schema 7) is left out.
            if let (Some(b), n, bytes) = row.map_err(|e| self.err(e))? {
                s.add(b, n, bytes);
            }
        }
        s.oldest_pending_ms = self
            .conn
            .prepare_cached(sql!(
                "SELECT MIN(dirty_since) FROM files
                 WHERE dirty_since IS NOT NULL AND state != {BACKED_UP}"
            ))
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))?;
        s.last_backup_at = self
            .meta(MetaKey::LastBackedAt)?
            .and_then(|v| v.parse::<i64>().ok());
        Ok(s)
    }

    /// Counts by scanning every row, for a journal without `file_stats` (schema < 4).
    fn summary_by_scan(&self) -> Result<Summary, JournalError> {
        let mut s = Summary::default();
        let mut st = self
            .conn
            .prepare(sql!(
                "SELECT state, state = {BACKED_UP} AND backed_kind IS 'deleted', COUNT(*),
                        COALESCE(SUM(CASE WHEN state != {BACKED_UP} THEN COALESCE(size, 0) ELSE 0 END), 0),
                        MIN(CASE WHEN state != {BACKED_UP} THEN dirty_since END),
                        MAX(backed_at)
                 FROM files GROUP BY 1, 2"
            ))
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, FileState>(0)?,
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
            s.add(Bucket::of(state, deleted), n, bytes);
            s.oldest_pending_ms = match (s.oldest_pending_ms, since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            s.last_backup_at = s.last_backup_at.max(last);
        }
        Ok(s)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::journal::record::{Ack, FileRead};
    use crate::journal::tests::{j, read};

    /// The counts `status` reads, computed the slow way: by scanning every row.
    pub(in crate::journal) type Counts = (Vec<(String, bool, i64)>, i64, Option<i64>, Option<i64>);

    /// `last` is the latest receiver time of an acknowledgement that was recorded.
    pub(in crate::journal) fn recount(j: &Journal, last: Option<i64>) -> Counts {
        let mut st = j
            .conn
            .prepare(sql!(
                "SELECT state, state = {BACKED_UP} AND backed_kind IS 'deleted', COUNT(*),
                        SUM(CASE WHEN state != {BACKED_UP} THEN COALESCE(size, 0) ELSE 0 END)
                 FROM files WHERE substr(path, -1) != x'2f' GROUP BY 1, 2 ORDER BY 1, 2"
            ))
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
                sql!("SELECT MIN(dirty_since) FROM files WHERE state != {BACKED_UP}"),
                [],
                |r| r.get(0),
            )
            .expect("since");
        (groups, bytes, since, last)
    }

    pub(in crate::journal) fn kept(j: &Journal) -> Counts {
        let s = j.summary().expect("summary");
        let mut groups = Vec::new();
        // In the recount's order: by state name, deletions after.
        for (state, deleted, n) in [
            (FileState::BackedUp, false, s.backed_up),
            (FileState::BackedUp, true, s.deleted),
            (FileState::Dirty, false, s.dirty),
            (FileState::Failed, false, s.failed),
            (FileState::Uploading, false, s.uploading),
        ] {
            if n > 0 {
                groups.push((state.as_str().to_string(), deleted, n));
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
                    0 => j.mark_dirty(&[(path(i), "w".into())], now, 5).expect("dirty"),
                    1 => j.mark_dirty_sized(&[(path(i), "w".into(), (x > 0).then_some(x * 50))], now, 5).expect("dirty"),
                    2 => { j.claim_due(now, 3).expect("claim"); }
                    3 => j.record_reads(&[FileRead { stat: StatKey { size: x * 100, ..read(b"", 0).stat }, ..read(&path(i), gen) }]).expect("reads"),
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
                    (a.dirty, a.uploading, a.backed_up, a.deleted, a.failed),
                    (b.dirty, b.uploading, b.backed_up, b.deleted, b.failed)
                );
                proptest::prop_assert_eq!((a.pending_bytes, a.oldest_pending_ms), (b.pending_bytes, b.oldest_pending_ms));
            }
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
                    "DROP TABLE file_stats; DROP TABLE held_deletions;
                     DROP INDEX files_pending_since; DROP INDEX files_failed;
                     DROP INDEX files_queue; ALTER TABLE files DROP COLUMN class;
                     ALTER TABLE files DROP COLUMN tier; ALTER TABLE files DROP COLUMN first_seen;
                     ALTER TABLE files ADD COLUMN claimed INTEGER NOT NULL DEFAULT 0;
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
