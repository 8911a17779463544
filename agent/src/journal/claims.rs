//! Claims: which due files the uploader holds. Held in memory (a claim does not outlive the
//! process) with a cursor over the due index; the claim queries and their index are here.
//! Only this file touches `Journal::claims`; writes elsewhere release files through
//! [`Journal::release`] and report changes through [`Claims::due_at`].

use super::*;

/// Due files in claim order, read through the partial index `files_due` (migration 0007):
/// the condition repeats the index's word for word, or the planner scans every row.
fn claim_sql() -> &'static str {
    sql!(
        "SELECT path, watch, gen, state, attempts, hash, commit_id, backed_hash, backed_kind, mode, due_at
         FROM files WHERE {DUE}
           AND due_at <= ?1 AND (due_at, path) > (?2, ?3)
         ORDER BY due_at, path LIMIT ?4"
    )
}

/// The next due time after the claim cursor, through the same index.
fn next_due_sql() -> &'static str {
    sql!(
        "SELECT due_at FROM files
         WHERE {DUE}
           AND (due_at, path) > (?1, ?2)
         ORDER BY due_at, path LIMIT 1"
    )
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
}

/// Files handed to the uploader and not yet released (by an outcome or `unclaim`). Kept in
/// memory: a claim never outlives the process (every restart starts with none), so the
/// journal need not record it.
#[derive(Default)]
pub(super) struct Claims {
    held: std::collections::HashSet<Vec<u8>>,
    /// `(due_at, path)` of the last file taken: the next claim reads on from there, in the
    /// due index's order, instead of reading again past every file still held.
    cursor: Option<(i64, Vec<u8>)>,
    /// A released file may be due again at or before the cursor (a retry, a change seen
    /// while it was held, a clock set back): the next claim reads from the start.
    behind: bool,
}

impl Claims {
    /// A file becomes due at `due`: if that is at or before the cursor (the clock was set
    /// back), the next claim reads from the start.
    pub(super) fn due_at(&mut self, due: i64) {
        if matches!(&self.cursor, Some((d, _)) if due <= *d) {
            self.behind = true;
        }
    }

    /// See `Journal::release`.
    fn release(&mut self, path: &[u8], may_be_due: bool) {
        if self.held.remove(path) && may_be_due {
            self.behind = true;
        }
    }
}

impl Journal {
    /// Takes up to `limit` files that are due and holds them (until their outcome is
    /// recorded or they are `unclaim`ed), in due order.
    pub fn claim_due(&mut self, now: i64, limit: usize) -> Result<Vec<Job>, JournalError> {
        let e = sql_err(&self.path);
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
        let mut st = self.conn.prepare_cached(claim_sql()).map_err(e)?;
        let rows = st
            .query_map(params![now, cd, cp, fetch as i64], |r| {
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

    /// When the next file not yet taken becomes due, if any waits.
    pub fn next_due(&self) -> Result<Option<i64>, JournalError> {
        let (cd, cp) = match (&self.claims.cursor, self.claims.behind) {
            (Some((d, p)), false) => (*d, p.clone()),
            _ => (i64::MIN, Vec::new()),
        };
        let mut st = self
            .conn
            .prepare_cached(next_due_sql())
            .map_err(|e| self.err(e))?;
        st.query_row(params![cd, cp], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
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
        assert!(claim.ends_with(sql!("WHERE {DUE}")), "{claim}");
        for (name, sql, n) in [
            ("claim_due", claim_sql(), 4),
            ("next_due", next_due_sql(), 2),
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
                plan.iter().any(|p| p.contains("USING INDEX files_due")),
                "{name}: {plan:?}"
            );
        }
    }
}
