//! Claims: which due files the uploader holds. Held in memory (a claim does not outlive the
//! process) with a cursor over the due index; the claim queries and their index are here.
//! Only this file touches `Journal::claims`; writes elsewhere release files through
//! [`Journal::release`] and report changes through [`Claims::due_at`].

use super::*;

/// Due files of one class in claim order (migration 0009's `files_queue`: small before
/// large, then the oldest change), read on from a cursor. The condition repeats the index's
/// word for word, or the planner scans every row.
fn claim_sql() -> &'static str {
    sql!(
        "SELECT path, watch, gen, state, attempts, hash, commit_id, backed_hash, backed_kind, mode,
                tier, first_seen, size
         FROM files WHERE {DUE}
           AND class = ?1 AND due_at <= ?2 AND (tier, first_seen, path) > (?3, ?4, ?5)
         ORDER BY tier, first_seen, path LIMIT ?6"
    )
}

/// The first time after `?1` that a queued file becomes due (through `files_due`).
fn next_due_sql() -> &'static str {
    sql!("SELECT MIN(due_at) FROM files WHERE {DUE} AND due_at > ?1")
}

/// The first time after `?1` that a queued file of class `?2` becomes due.
fn next_due_of_class_sql() -> &'static str {
    // `files_queue` would read every queued file of the class: the due order stops at the
    // first of the class after `?1`.
    sql!("SELECT MIN(due_at) FROM files INDEXED BY files_due WHERE {DUE} AND due_at > ?1 AND class = ?2")
}

/// A file handed to the uploader.
#[derive(Debug, Clone)]
pub struct Job {
    pub path: Vec<u8>,
    pub watch: String,
    pub gen: i64,
    pub state: FileState,
    pub attempts: i64,
    /// BLAKE3 of the bytes last read (and sent), if it was read.
    pub hash: Option<[u8; 32]>,
    /// The commit id recorded with `hash`: reused when the bytes are the same, so a commit
    /// repeated after a restart is recognised by the receiver.
    pub commit_id: Option<CommitId>,
    pub backed_hash: Option<[u8; 32]>,
    pub backed_kind: Option<String>,
    pub mode: Option<i64>,
    /// The queue it waited in.
    pub class: Class,
    /// Its size as last seen, if known.
    pub size: Option<i64>,
}

/// A row of [`claim_sql`] or [`claim_large_sql`]: the job and its `(tier, first_seen)`.
fn job_row(r: &rusqlite::Row<'_>, class: Class) -> rusqlite::Result<(Job, (i64, i64))> {
    Ok((
        Job {
            path: r.get(0)?,
            watch: r.get(1)?,
            gen: r.get(2)?,
            state: r.get(3)?,
            attempts: r.get(4)?,
            hash: h32(r.get_ref(5)?),
            commit_id: CommitId::column_result(r.get_ref(6)?).ok(),
            backed_hash: h32(r.get_ref(7)?),
            backed_kind: r.get(8)?,
            mode: r.get(9)?,
            class,
            size: r.get(12)?,
        },
        (r.get::<_, i64>(10)?, r.get::<_, i64>(11)?),
    ))
}

/// Due backlog files of the large tiers (`?3` and up) in claim order, from the start of
/// that part of `files_queue` (large files are few).
fn claim_large_sql() -> &'static str {
    sql!(
        "SELECT path, watch, gen, state, attempts, hash, commit_id, backed_hash, backed_kind, mode,
                tier, first_seen, size
         FROM files WHERE {DUE}
           AND class = ?1 AND due_at <= ?2 AND tier >= ?3
         ORDER BY tier, first_seen, path LIMIT ?4"
    )
}

/// The size tier from which a backlog file is large (64 MiB), see [`Journal::claim_large`].
pub const LARGE_TIER: i64 = 2;

/// A position in one class's claim order: `(tier, first_seen, path)`.
type Key = (i64, i64, Vec<u8>);

/// Files handed to the uploader and not yet released (by an outcome or `unclaim`). Kept in
/// memory: a claim never outlives the process (every restart starts with none), so the
/// journal need not record it.
#[derive(Default)]
pub(super) struct Claims {
    /// Each held file, with its class.
    held: HashMap<Vec<u8>, Class>,
    /// Per class: the key of the last file taken. The next claim reads on from there, in
    /// the queue index's order, instead of reading again past every file still held.
    cursor: [Option<Key>; 2],
    /// Per class: a released file may be due again before the cursor (a retry, a change
    /// seen while it was held, a hand-back): the next claim reads from the start.
    behind: [bool; 2],
    /// Per class: a file not due at the last read from the start (or changed since) becomes
    /// due at this time, possibly before the cursor: from then on the next claim reads from
    /// the start.
    recheck_at: [Option<i64>; 2],
}

impl Claims {
    /// Files marked in `class` become due at `due` (a change seen): their place in the
    /// order may be before the cursor, so that class reads from the start once they are
    /// due. A scan's marks may move fresh files too (a queued file keeps its class), so
    /// they concern both classes; the watcher's concern only the fresh class, whose reads
    /// from the start are cheap (the backlog's skip every file held).
    pub(super) fn due_at(&mut self, class: Class, due: i64) {
        for (i, r) in self.recheck_at.iter_mut().enumerate() {
            if class == Class::Backlog || i == class as usize {
                *r = Some(r.map_or(due, |t| t.min(due)));
            }
        }
    }

    /// See `Journal::release`.
    fn release(&mut self, path: &[u8], may_be_due: bool) {
        if let Some(class) = self.held.remove(path) {
            if may_be_due {
                self.behind[class as usize] = true;
            }
        }
    }

    /// Whether the next claim of `class` at `now` reads from the start of its order.
    fn reads_from_start(&self, class: Class, now: i64) -> bool {
        let c = class as usize;
        self.behind[c] || self.cursor[c].is_none() || self.recheck_at[c].is_some_and(|t| now >= t)
    }
}

impl Journal {
    /// Takes up to `limit` files that are due and holds them (until their outcome is
    /// recorded or they are `unclaim`ed): fresh ones first, then the backlog, each class in
    /// its order (see [`Journal::claim_class`]).
    pub fn claim_due(&mut self, now: i64, limit: usize) -> Result<Vec<Job>, JournalError> {
        let mut out = self.claim_class(now, Class::Fresh, limit)?;
        let more = self.claim_class(now, Class::Backlog, limit - out.len())?;
        out.extend(more);
        Ok(out)
    }

    /// Takes up to `limit` due files of `class` and holds them: small files before large
    /// ones (by size tier), then the change waiting longest first.
    pub fn claim_class(
        &mut self,
        now: i64,
        class: Class,
        limit: usize,
    ) -> Result<Vec<Job>, JournalError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let e = sql_err(&self.path);
        let c = class as usize;
        let from_start = self.claims.reads_from_start(class, now);
        let (ct, cs, cp) = match (&self.claims.cursor[c], from_start) {
            (Some((t, s, p)), false) => (*t, *s, p.clone()),
            _ => (i64::MIN, i64::MIN, Vec::new()),
        };
        // From the start, files still held are read again and skipped: read that many more.
        let fetch = if from_start {
            limit + self.claims.held.len()
        } else {
            limit
        };
        let mut st = self.conn.prepare_cached(claim_sql()).map_err(e)?;
        let rows = st
            .query_map(params![class as i64, now, ct, cs, cp, fetch as i64], |r| {
                job_row(r, class)
            })
            .map_err(e)?;
        let mut out = Vec::new();
        let mut last = None;
        for row in rows {
            let (job, (tier, since)) = row.map_err(e)?;
            if out.len() == limit {
                break;
            }
            last = Some((tier, since, job.path.clone()));
            if !self.claims.held.contains_key(&job.path) {
                self.claims.held.insert(job.path.clone(), class);
                out.push(job);
            }
        }
        drop(st);
        if from_start {
            self.claims.behind[c] = false;
            self.claims.recheck_at[c] = self.first_due_after(now, Some(class))?;
        }
        if let Some(k) = last {
            self.claims.cursor[c] = Some(k);
        }
        Ok(out)
    }

    /// Takes up to `limit` due backlog files of 64 MiB or more ([`LARGE_TIER`]), first in
    /// the claim order, ahead of their turn. The backlog's order puts them last; one worker
    /// starting them early lets their long reads overlap the many small files' instead of
    /// ending the backlog alone (see `upload::Lane::Large`). The backlog's claim skips
    /// them as held when it gets there.
    pub fn claim_large(&mut self, now: i64, limit: usize) -> Result<Vec<Job>, JournalError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let e = sql_err(&self.path);
        let class = Class::Backlog;
        let fetch = limit + self.claims.held.len();
        let mut st = self.conn.prepare_cached(claim_large_sql()).map_err(e)?;
        let rows = st
            .query_map(params![class as i64, now, LARGE_TIER, fetch as i64], |r| {
                job_row(r, class)
            })
            .map_err(e)?;
        let mut out = Vec::new();
        for row in rows {
            let (job, _) = row.map_err(e)?;
            if out.len() == limit {
                break;
            }
            if !self.claims.held.contains_key(&job.path) {
                self.claims.held.insert(job.path.clone(), class);
                out.push(job);
            }
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
    pub(super) fn release(&mut self, path: &[u8], may_be_due: bool) {
        self.claims.release(path, may_be_due);
    }

    /// Releases a batch's files, each with whether it may be due again (all may be when the
    /// batch's outcomes could not be recorded).
    pub(super) fn release_all<'a>(&mut self, released: impl IntoIterator<Item = (&'a [u8], bool)>) {
        for (path, due) in released {
            self.claims.release(path, due);
        }
    }

    /// When a claim at `now` found nothing: the time the next claim may find something. A
    /// file released since reads from the start at once (`now`); else the first due time
    /// after `now` of a queued file, if any waits.
    pub fn next_due(&self, now: i64) -> Result<Option<i64>, JournalError> {
        if self.claims.behind.iter().any(|b| *b) {
            return Ok(Some(now));
        }
        self.first_due_after(now, None)
    }

    /// The first due time after `now` of a queued file (held or not) of `class`, or of any
    /// class, if any. Through `files_due`: the rows of another class due later are read
    /// past (fresh ones are few; backlog ones due later are retries).
    fn first_due_after(&self, now: i64, class: Option<Class>) -> Result<Option<i64>, JournalError> {
        let e = |e| self.err(e);
        match class {
            None => self
                .conn
                .prepare_cached(next_due_sql())
                .and_then(|mut st| st.query_row(params![now], |r| r.get(0)))
                .map_err(e),
            Some(c) => self
                .conn
                .prepare_cached(next_due_of_class_sql())
                .and_then(|mut st| st.query_row(params![now, c as i64], |r| r.get(0)))
                .map_err(e),
        }
    }

    /// True when the journal orders its queue by class (migration 0009); a journal not yet
    /// migrated, read by `status` under an older daemon, has one queue: all backlog.
    fn has_classes(&self) -> Result<bool, JournalError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('files') WHERE name = 'class'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    /// Files and bytes waiting in each class (indexed by `Class as usize`), given the
    /// summary's pending totals: the fresh ones are counted through the queue index (fresh
    /// work is what a person saves, not a tree's worth), the backlog is the rest.
    pub fn queue_counts(&self, s: &Summary) -> Result<[(i64, i64); 2], JournalError> {
        let fresh: (i64, i64) = if self.has_classes()? {
            self.conn
                .prepare_cached(sql!(
                    "SELECT COUNT(*), COALESCE(SUM(COALESCE(size, 0)), 0) FROM files
                     WHERE {DUE} AND class = ?1"
                ))
                .and_then(|mut st| {
                    st.query_row(params![Class::Fresh as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                })
                .map_err(|e| self.err(e))?
        } else {
            (0, 0)
        };
        let backlog = (
            (s.pending() - fresh.0).max(0),
            (s.pending_bytes - fresh.1).max(0),
        );
        Ok([fresh, backlog])
    }

    /// Where a queued file stands in line: its class, and how many queued files come
    /// before it in the claim order (for the backlog, every fresh one too; files being
    /// uploaded count). `None` if it is not queued.
    pub fn place_in_line(&self, path: &[u8]) -> Result<Option<(Class, i64)>, JournalError> {
        if !self.has_classes()? {
            return Ok(None);
        }
        let e = sql_err(&self.path);
        let key: Option<(i64, i64, i64)> = self
            .conn
            .query_row(
                sql!("SELECT class, tier, first_seen FROM files WHERE path = ?1 AND {DUE}"),
                params![path],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(e)?;
        let Some((class, tier, since)) = key else {
            return Ok(None);
        };
        let ahead: i64 = self
            .conn
            .prepare_cached(sql!(
                "SELECT COUNT(*) FROM files WHERE {DUE}
                   AND class = ?1 AND (tier, first_seen, path) < (?2, ?3, ?4)"
            ))
            .and_then(|mut st| st.query_row(params![class, tier, since, path], |r| r.get(0)))
            .map_err(e)?;
        let fresh: i64 = if class == Class::Fresh as i64 {
            0
        } else {
            self.conn
                .prepare_cached(sql!(
                    "SELECT COUNT(*) FROM files WHERE {DUE} AND class = ?1"
                ))
                .and_then(|mut st| st.query_row(params![Class::Fresh as i64], |r| r.get(0)))
                .map_err(e)?
        };
        Ok(Some((Class::from_i64(class), ahead + fresh)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::Ack;
    use crate::journal::tests::j;

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
                .prepare(sql!("SELECT path FROM files WHERE state != {BACKED_UP} ORDER BY path"))
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

    /// The claim's queries must use the partial indexes: the planner only does when their
    /// condition repeats the index's term by term, and otherwise scans every row.
    #[test]
    fn claiming_uses_the_queue_and_due_indexes() {
        let (_d, j) = j();
        for index in ["files_due", "files_queue"] {
            let sql = j
                .conn
                .prepare("SELECT sql FROM sqlite_master WHERE name = ?1")
                .and_then(|mut s| s.query_row([index], |r| r.get::<_, String>(0)))
                .expect("index");
            assert!(sql.ends_with(sql!("WHERE {DUE}")), "{sql}");
        }
        for (name, sql, n, index) in [
            ("claim_class", claim_sql(), 6, "files_queue"),
            ("next_due", next_due_sql(), 1, "files_due"),
            ("next_due_of_class", next_due_of_class_sql(), 2, "files_due"),
        ] {
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
                plan.iter()
                    .any(|p| p.contains(&format!("USING INDEX {index}"))
                        || p.contains(&format!("USING COVERING INDEX {index}"))),
                "{name}: {plan:?}"
            );
        }
    }

    fn paths(jobs: &[Job]) -> Vec<String> {
        jobs.iter()
            .map(|j| String::from_utf8_lossy(&j.path).into_owned())
            .collect()
    }

    /// Backlog (a scan's) files `names` of `size` bytes, first seen at `at`.
    fn backlog(j: &mut Journal, names: &[&str], size: i64, at: i64) {
        let items: Vec<_> = names
            .iter()
            .map(|n| (format!("w/{n}").into_bytes(), "w".to_string(), Some(size)))
            .collect();
        j.mark_dirty_sized(&items, at, 0).expect("backlog");
    }

    /// Fresh (the watcher's) files, due after a debounce of 10 ms.
    fn fresh(j: &mut Journal, names: &[&str], size: i64, at: i64) {
        let items: Vec<_> = names
            .iter()
            .map(|n| (format!("w/{n}").into_bytes(), "w".to_string(), Some(size)))
            .collect();
        j.mark_seen_sized(&items, at, 10).expect("fresh");
    }

    /// Fresh before backlog; small before large within a class; the oldest change first
    /// within a size tier, whatever the paths' order.
    #[test]
    fn fresh_first_then_small_then_oldest() {
        let (_d, mut j) = j();
        backlog(&mut j, &["a-big"], 2 << 30, 100);
        backlog(&mut j, &["b-mid"], 10 << 20, 110);
        backlog(&mut j, &["z-small-old"], 10, 120);
        backlog(&mut j, &["c-small-new"], 10, 130);
        fresh(&mut j, &["y-fresh-big"], 100 << 20, 200);
        fresh(&mut j, &["x-fresh-new"], 5, 300);
        fresh(&mut j, &["w-fresh-old"], 5, 250);
        let got = paths(&j.claim_due(1_000, 100).expect("claim"));
        assert_eq!(
            got,
            [
                "w/w-fresh-old",
                "w/x-fresh-new",
                "w/y-fresh-big",
                "w/z-small-old",
                "w/c-small-new",
                "w/b-mid",
                "w/a-big"
            ]
        );
    }

    /// A fresh change is taken as soon as it is due, even when the backlog's claim has
    /// read far past where it sorts, and a file seen by the watcher while queued as
    /// backlog becomes fresh; a scan does not make a fresh file backlog again.
    #[test]
    fn fresh_work_jumps_the_backlog_and_is_never_demoted() {
        let (_d, mut j) = j();
        let names: Vec<String> = (0..50).map(|i| format!("old-{i:02}")).collect();
        let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        backlog(&mut j, &names, 10, 100);
        assert_eq!(
            j.claim_class(1_000, Class::Backlog, 10)
                .expect("claim")
                .len(),
            10
        );
        // Seen changing: old-40 is now fresh; new is fresh and due after its debounce.
        fresh(&mut j, &["old-40", "new"], 10, 1_000);
        backlog(&mut j, &["old-40"], 10, 1_001);
        // The scan's mark made old-40 due at once, and it stays fresh; new is due later.
        let got = paths(&j.claim_class(1_005, Class::Fresh, 10).expect("claim"));
        assert_eq!(got, ["w/old-40"]);
        let got = paths(&j.claim_due(1_010, 1).expect("claim"));
        assert_eq!(got, ["w/new"]);
        assert_eq!(
            j.row(b"w/old-40").expect("row").expect("exists").state,
            FileState::Dirty
        );
        // The backlog reads on where it was, and skips old-40, now held.
        let got = paths(&j.claim_class(1_010, Class::Backlog, 100).expect("claim"));
        assert_eq!(got.len(), 39);
        assert_eq!(got[0], "w/old-10");
        assert!(!got.contains(&"w/old-40".to_string()));
    }

    /// The order is in the journal: after a restart (reopen and requeue) fresh work is still
    /// first, and work in flight goes back in line where it was.
    #[test]
    fn the_order_survives_a_restart() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("j.sqlite");
        {
            let mut j = Journal::open(&p).expect("open");
            backlog(&mut j, &["a", "b"], 10, 100);
            fresh(&mut j, &["later"], 10, 500);
            fresh(&mut j, &["big"], 200 << 20, 400);
            let jobs = j.claim_due(1_000, 1).expect("claim");
            assert_eq!(paths(&jobs), ["w/later"]);
            j.record_reads(&[crate::journal::tests::read(&jobs[0].path, jobs[0].gen)])
                .expect("reads");
        }
        let mut j = Journal::open(&p).expect("reopen");
        j.requeue_in_flight().expect("requeue");
        let got = paths(&j.claim_due(1_000, 100).expect("claim"));
        assert_eq!(got, ["w/later", "w/big", "w/a", "w/b"]);
        assert!(j.claim_due(1_000, 100).expect("again").is_empty());
    }

    /// `status PATH`'s place in line: files of its class ahead of it, and every fresh one
    /// ahead of a backlog file.
    #[test]
    fn place_in_line_counts_the_files_ahead() {
        let (_d, mut j) = j();
        backlog(&mut j, &["a", "b", "c"], 10, 100);
        fresh(&mut j, &["f1", "f2"], 10, 200);
        let place =
            |j: &Journal, n: &str| j.place_in_line(format!("w/{n}").as_bytes()).expect("place");
        assert_eq!(place(&j, "f1"), Some((Class::Fresh, 0)));
        assert_eq!(place(&j, "f2"), Some((Class::Fresh, 1)));
        assert_eq!(place(&j, "a"), Some((Class::Backlog, 2)));
        assert_eq!(place(&j, "c"), Some((Class::Backlog, 4)));
        assert_eq!(place(&j, "nope"), None);
        let s = j.summary().expect("summary");
        assert_eq!(j.queue_counts(&s).expect("counts"), [(2, 20), (3, 30)]);
    }

    /// A journal of schema 7 (before classes): `status` reads it under an older daemon
    /// (everything waiting is backlog, no place in line), and migration 0009 queues its
    /// rows as backlog, tiered by size, oldest first (a row without `dirty_since` by its
    /// due time).
    #[test]
    fn migration_0009_queues_earlier_rows_as_backlog_in_order() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("j.sqlite");
        let v7 = coffer_common::host::sqlite::Schema {
            migrations: &SCHEMA.migrations[..7],
            ..SCHEMA
        };
        {
            let mut c = v7
                .connect(&p, rusqlite::OpenFlags::default())
                .expect("open");
            v7.migrate(&mut c, &p).expect("schema 7");
            c.execute_batch(
                "INSERT INTO files (path, watch, state, gen, due_at, dirty_since, size) VALUES
                    (x'772f626967', 'w', 'dirty', 1, 10, 100, 104857600),
                    (x'772f6e6577', 'w', 'dirty', 1, 10, 300, 5),
                    (x'772f6f6c64', 'w', 'uploading', 1, 10, 200, 5),
                    (x'772f6e6f2d73696e6365', 'w', 'failed', 1, 150, NULL, 5),
                    (x'772f646f6e65', 'w', 'backed_up', 1, 0, NULL, 5);
                 UPDATE file_stats SET
                    n = (SELECT COUNT(*) FROM files WHERE state = key),
                    bytes = (SELECT COALESCE(SUM(size), 0) FROM files
                             WHERE state = key AND state != 'backed_up');",
            )
            .expect("rows of a schema 7 journal");
        }
        let ro = Journal::open_read_only(&p).expect("read-only");
        let s = ro.summary().expect("summary");
        assert_eq!(
            ro.queue_counts(&s).expect("counts"),
            [(0, 0), (4, 104857600 + 15)]
        );
        assert_eq!(ro.place_in_line(b"w/new").expect("place"), None);
        drop(ro);
        let mut j = Journal::open(&p).expect("migrate");
        let got = paths(&j.claim_due(1_000, 100).expect("claim"));
        assert_eq!(got, ["w/no-since", "w/old", "w/new", "w/big"]);
        let s = j.summary().expect("summary");
        assert_eq!(j.queue_counts(&s).expect("counts")[0], (0, 0));
        assert_eq!(
            j.place_in_line(b"w/big").expect("place"),
            Some((Class::Backlog, 3))
        );
    }

    /// The backlog's large files can be taken ahead of their turn (one worker starts them
    /// while the others take the small files); the backlog's claim then skips them.
    #[test]
    fn large_backlog_files_can_start_early() {
        let (_d, mut j) = j();
        backlog(&mut j, &["s1", "s2"], 10, 100);
        backlog(&mut j, &["mid"], 10 << 20, 100);
        backlog(&mut j, &["huge"], 3 << 30, 90);
        backlog(&mut j, &["big"], 100 << 20, 80);
        fresh(&mut j, &["f"], 200 << 20, 100);
        assert_eq!(paths(&j.claim_large(1_000, 1).expect("large")), ["w/big"]);
        assert_eq!(paths(&j.claim_large(1_000, 5).expect("large")), ["w/huge"]);
        assert!(j.claim_large(1_000, 5).expect("large").is_empty());
        let got = paths(&j.claim_class(1_000, Class::Backlog, 10).expect("backlog"));
        assert_eq!(got, ["w/s1", "w/s2", "w/mid"]);
    }
}
