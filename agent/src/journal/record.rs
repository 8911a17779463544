//! What the daemon records in the journal: changes seen (`mark_dirty`), reads, outcomes
//! (acknowledged, unchanged, failed, retried, forgotten), and the requeue after a restart.
//! Each batch is one transaction, counted by a [`Tally`].

use super::*;

/// What was read of a file, recorded before its commit is sent.
#[derive(Debug, Clone)]
pub struct FileRead {
    pub path: Vec<u8>,
    pub gen: i64,
    pub kind: &'static str,
    pub stat: StatKey,
    pub mode: i64,
    /// Keyed hash of the bytes read (`Crypto::journal_hash` of their BLAKE3), or of a
    /// folder's metadata: never the plain content hash.
    pub hash: [u8; 32],
    pub commit_id: CommitId,
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

impl Journal {
    /// After a restart: work that was in the hands of the uploader becomes due again
    /// (its hash and commit id stay, so a repeated commit is recognised by the receiver).
    /// It changes only `due_at`, nothing `file_stats` counts, so it needs no [`Tally`].
    pub fn requeue_in_flight(&mut self) -> Result<usize, JournalError> {
        self.claims = Claims::default();
        self.conn
            .execute(
                sql!("UPDATE files SET due_at = 0 WHERE state = {UPLOADING}"),
                [],
            )
            .map_err(|e| self.err(e))
    }

    /// Records that paths changed (or may have), as a scan finds them: they become dirty,
    /// backlog ([`Class::Backlog`]), and due after `delay_ms`.
    pub fn mark_dirty(
        &mut self,
        items: &[(Vec<u8>, String)],
        now: i64,
        delay_ms: i64,
    ) -> Result<(), JournalError> {
        self.mark_dirty_iter(
            items.iter().map(|(p, w)| (&p[..], &w[..], None)),
            now,
            delay_ms,
            Class::Backlog,
        )
    }

    /// [`Journal::mark_dirty`] with each file's size as seen (`None`: gone, or not known).
    /// A row keeps its size until the file is read, so `status` counts a file still
    /// settling in the pending bytes: at the size it was seen with, else its last read one.
    pub fn mark_dirty_sized(
        &mut self,
        items: &[(Vec<u8>, String, Option<i64>)],
        now: i64,
        delay_ms: i64,
    ) -> Result<(), JournalError> {
        self.mark_dirty_iter(
            items.iter().map(|(p, w, size)| (&p[..], &w[..], *size)),
            now,
            delay_ms,
            Class::Backlog,
        )
    }

    /// [`Journal::mark_dirty_sized`] for changes the watcher saw while the agent runs:
    /// they are fresh ([`Class::Fresh`]), and a queued file seen changing is made fresh.
    pub fn mark_seen_sized(
        &mut self,
        items: &[(Vec<u8>, String, Option<i64>)],
        now: i64,
        delay_ms: i64,
    ) -> Result<(), JournalError> {
        self.mark_dirty_iter(
            items.iter().map(|(p, w, size)| (&p[..], &w[..], *size)),
            now,
            delay_ms,
            Class::Fresh,
        )
    }

    /// Marks paths dirty in `class`: a file not queued takes it; a queued one keeps the
    /// first of its class and this (a scan never demotes a fresh change) and its first-seen
    /// time (`first_seen`, as `dirty_since`), and takes the size tier of the size seen.
    fn mark_dirty_iter<'a>(
        &mut self,
        items: impl ExactSizeIterator<Item = (&'a [u8], &'a str, Option<i64>)>,
        now: i64,
        delay_ms: i64,
        class: Class,
    ) -> Result<(), JournalError> {
        if items.len() == 0 {
            return Ok(());
        }
        self.claims.due_at(class, now + delay_ms);
        let mut released: Vec<&[u8]> = Vec::new();
        let tx = self.conn.transaction().map_err(sql_err(&self.path))?;
        {
            let mut st = tx
                .prepare_cached(sql!(
                    "INSERT INTO files (path, watch, state, gen, due_at, dirty_since, size, class, tier, first_seen)
                     VALUES (?1, ?2, {DIRTY}, 1, ?3, ?4, ?5, ?6, {TIER_NEW}, ?7)
                     ON CONFLICT(path) DO UPDATE SET
                        state = {DIRTY}, gen = gen + 1, due_at = ?3,
                        dirty_since = COALESCE(dirty_since, ?4), reason = NULL,
                        attempts = CASE WHEN state = {FAILED} THEN 0 ELSE attempts END,
                        size = COALESCE(?5, size),
                        class = CASE WHEN state = {BACKED_UP} THEN ?6 ELSE MIN(class, ?6) END,
                        tier = {TIER},
                        first_seen = CASE WHEN state = {BACKED_UP} OR dirty_since IS NULL
                            THEN ?7 ELSE first_seen END"
                ))
                .map_err(sql_err(&self.path))?;
            let mut tally = Tally::default();
            for (p, w, size) in items {
                released.push(p);
                // A folder's row is never pending in `status`: no `dirty_since`.
                let since = (!is_folder_key(p)).then_some(now);
                tally
                    .row(&tx, p, || {
                        st.execute(params![
                            p,
                            w,
                            now + delay_ms,
                            since,
                            size,
                            class as i64,
                            now
                        ])
                    })
                    .map_err(sql_err(&self.path))?;
            }
            tally.write(&tx).map_err(sql_err(&self.path))?;
        }
        // A path seen changed (back, or being recorded) is no longer a held deletion.
        super::held::release_held(&tx, &released).map_err(sql_err(&self.path))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Records what was read and the commit id, before the commits are sent.
    pub fn record_reads(&mut self, reads: &[FileRead]) -> Result<(), JournalError> {
        if reads.is_empty() {
            return Ok(());
        }
        let e = sql_err(&self.path);
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut st = tx
                .prepare_cached(sql!(
                    "UPDATE files SET kind = ?2, size = ?3, mtime_ns = ?4, ctime_ns = ?5, inode = ?6,
                        mode = ?7, hash = ?8, commit_id = ?9,
                        state = CASE WHEN gen = ?10 THEN {UPLOADING} ELSE state END
                     WHERE path = ?1"
                ))
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
                            r.commit_id,
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
    pub fn record_unchanged(&mut self, reads: &[FileRead]) -> Result<(), JournalError> {
        let e = sql_err(&self.path);
        let mut released = Vec::with_capacity(reads.len());
        let r = (|| {
            let tx = self.conn.transaction().map_err(e)?;
            {
                let mut st = tx
                    .prepare_cached(sql!(
                        "UPDATE files SET kind = ?2, size = ?3, mtime_ns = ?4, ctime_ns = ?5, inode = ?6,
                            mode = ?7, hash = ?8, reason = NULL, attempts = 0,
                            state = CASE WHEN gen = ?9 THEN {BACKED_UP} ELSE state END,
                            dirty_since = CASE WHEN gen = ?9 THEN NULL ELSE dirty_since END
                         WHERE path = ?1"
                    ))
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
                    let backed_up = now.is_some_and(|c| c.state == FileState::BackedUp);
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
        let e = sql_err(&self.path);
        let mut latest = None;
        let mut released = Vec::with_capacity(acks.len());
        let r = (|| {
            let tx = self.conn.transaction().map_err(e)?;
            {
                // The usual case first: the file did not change since it was read.
                let mut done = tx
                    .prepare_cached(sql!(
                        "UPDATE files SET backed_version = ?2, backed_at = ?3, backed_hash = ?4,
                            backed_kind = ?5, backed_size = ?6, reason = NULL, attempts = 0,
                            state = {BACKED_UP}, dirty_since = NULL
                         WHERE path = ?1 AND gen = ?7"
                    ))
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
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT(key) DO UPDATE SET value = ?2",
                    params![&*MetaKey::LastAckMs.name(), now_ms().to_string()],
                )
                .map_err(e)?;
                if let Some(latest) = latest {
                    tx.execute(
                        "INSERT INTO meta (key, value) VALUES (?1, ?2)
                         ON CONFLICT(key) DO UPDATE SET
                            value = CAST(MAX(CAST(value AS INTEGER), ?3) AS TEXT)",
                        params![&*MetaKey::LastBackedAt.name(), latest.to_string(), latest],
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
                    sql!(
                        "UPDATE files SET state = CASE WHEN gen = ?2 THEN {FAILED} ELSE state END,
                            attempts = attempts + 1, reason = ?3,
                            due_at = CASE WHEN gen = ?2 THEN ?4 ELSE due_at END
                         WHERE path = ?1"
                    ),
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
        let e = sql_err(&self.path);
        let r = (|| {
            let tx = self.conn.transaction().map_err(e)?;
            {
                let mut st = tx
                    .prepare_cached(sql!(
                        "UPDATE files SET
                            reason = CASE WHEN state = {BACKED_UP} THEN reason ELSE ?2 END,
                            due_at = CASE WHEN state = {BACKED_UP} THEN due_at ELSE MAX(due_at, ?3) END
                         WHERE path = ?1"
                    ))
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::tests::{j, read};

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
    fn files_still_settling_count_in_the_pending_bytes() {
        let (_d, mut j) = j();
        // New, never read: the size it was seen with.
        j.mark_dirty_sized(&[(b"w/new".to_vec(), "w".into(), Some(1000))], 0, 60_000)
            .expect("dirty");
        assert_eq!(j.summary().expect("s").pending_bytes, 1000);
        // Seen again without a size (e.g. gone): the last known one stays.
        j.mark_dirty_sized(&[(b"w/new".to_vec(), "w".into(), None)], 1, 60_000)
            .expect("dirty");
        assert_eq!(j.summary().expect("s").pending_bytes, 1000);
        // Seen again larger: the new size.
        j.mark_dirty_sized(&[(b"w/new".to_vec(), "w".into(), Some(4000))], 2, 60_000)
            .expect("dirty");
        let s = j.summary().expect("s");
        assert_eq!((s.dirty, s.pending_bytes), (1, 4000));
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
        assert_eq!(r.state, FileState::Dirty);
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
        assert_eq!(again.commit_id, Some(CommitId([2; 16])));
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
}
