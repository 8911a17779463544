//! What `prune` ([`crate::prune`]) does to an open repository while sessions keep
//! writing it, each step under the repository's locks for as short a time as it can:
//!
//! - [`Repo::remove_versions`]: a removal record is appended like a commit record (under
//!   the state lock), fsynced (under the writer lock only), and ONE index transaction
//!   indexes whatever was pending before it (group commit, as a flush does) and forgets
//!   the removed versions. A file that gained a version since the policy looked at it is
//!   left for the next prune.
//! - [`Repo::drop_chunks`]: chunk rows no version references are deleted under the writer
//!   AND state locks, so that no flush settles a commit against a row being deleted: a
//!   flush whose step 0 ran before asks the index again (`chunks_dropped` moved) and gets
//!   `MissingChunks` for a chunk that is gone; chunks referenced by versions indexed since
//!   prune built its set of live chunks, or by pending commit records, are kept.
//! - [`Repo::seal_open_pack`], [`Repo::start_pack`], [`Repo::relocate`]: compaction's
//!   copies go to packs of their own (never the open pack), written and fsynced under no
//!   lock; one index transaction (writer lock) points the rows at the copies and forgets
//!   the rewritten packs, which are deleted only after it commits.

use super::*;
use crate::index::Moved;
use crate::records::Removed;

impl Repo {
    /// Where the repository's packs are.
    pub(crate) fn pack_store(&self) -> &Arc<dyn PackStore> {
        &self.packs
    }

    /// The repository's folder.
    pub(crate) fn repo_dir(&self) -> &RepoDir {
        &self.dir
    }

    /// The pack size cap.
    pub(crate) fn pack_max_bytes(&self) -> u64 {
        self.pack_max
    }

    /// Writes a removal record of `removed` (at most [`crate::records::MAX_REMOVED`]) and
    /// forgets those versions. `latest` holds, for every file of `removed`, the newest
    /// version the policy saw: a file with a newer one (indexed or pending) keeps its
    /// versions this time. Returns the versions removed and how many rows were forgotten.
    pub(crate) fn remove_versions(
        &self,
        mut removed: Vec<Removed>,
        latest: &HashMap<FileId, u64>,
        now: i64,
    ) -> Result<(Vec<Removed>, u64), RepoError> {
        let mut w = lock(&self.writer);
        let mut stale = HashSet::new();
        for (f, seen) in latest {
            if w.latest_version(f)?.is_some_and(|v| v > *seen) {
                stale.insert(*f);
            }
        }
        let (snapshot, seq_hi, epoch, rr) = {
            let mut st = lock(&self.state);
            for (f, _) in st.pending_commits.keys() {
                if latest.contains_key(f) {
                    stale.insert(*f);
                }
            }
            removed.retain(|r| !stale.contains(&r.file_id));
            if removed.is_empty() {
                return Ok((removed, 0));
            }
            let record = RemovalRecord { time: now, removed };
            let (header, body) = record.encode();
            let hash = *blake3::hash(&body).as_bytes();
            let r = self
                .append_record(&mut st, &header, &body)
                .and_then(|at| st.write_out(&*self.packs).map(|()| at));
            let at = match r {
                Ok(at) => at,
                Err(e) => {
                    drop(st);
                    self.rollback_locked(&mut w, &e.to_string());
                    return Err(e.into());
                }
            };
            (
                st.dirty.clone(),
                st.seq,
                st.epoch,
                RecordedRemoval { record, hash, at },
            )
        };
        for p in snapshot.keys() {
            if let Err(e) = self.packs.sync(*p) {
                self.rollback_locked(&mut w, &e.to_string());
                return Err(e.into());
            }
        }
        let n = self.index_pending(&mut w, snapshot, seq_hi, epoch, std::slice::from_ref(&rr))?;
        Ok((rr.record.removed, n))
    }

    /// Deletes the chunk rows of `candidates` (chunks no version referenced when prune
    /// built its live set, whose highest version was `hi`), except those referenced by a
    /// version indexed since (numbered above `hi`) or by a pending commit record. Returns
    /// how many rows and record bytes were deleted.
    pub(crate) fn drop_chunks(
        &self,
        candidates: &[ChunkId],
        hi: u64,
    ) -> Result<(u64, u64), RepoError> {
        let mut w = lock(&self.writer);
        let mut keep: HashSet<ChunkId> = w.chunks_referenced_above(hi)?.into_iter().collect();
        let mut st = lock(&self.state);
        for (_, _, v) in &st.commit_order {
            if let Some(v) = v {
                keep.extend(v.record.chunks.iter().copied());
            }
        }
        let ids: Vec<ChunkId> = candidates
            .iter()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        // Under both locks: a flush settles its commits either before (its records are
        // pending: kept above) or after (it sees `chunks_dropped` moved and asks again).
        let r = w.delete_chunks(&ids);
        st.chunks_dropped += 1;
        Ok(r?)
    }

    /// Makes sure nothing will be appended to the packs compaction is about to rewrite
    /// (`pack`, when it is the open one, is closed: new records go to a new pack), then
    /// indexes everything pending, so every record in them is indexed or gone.
    pub(crate) fn seal_open_pack(&self, packs: &[PackNo]) -> Result<(), RepoError> {
        {
            let mut st = lock(&self.state);
            if st.cur.is_some_and(|p| packs.contains(&p)) {
                if let Err(e) = st.write_out(&*self.packs) {
                    drop(st);
                    self.rollback(&e.to_string());
                    return Err(e.into());
                }
                st.cur = None;
            }
        }
        self.flush(&[])?;
        Ok(())
    }

    /// Creates a pack for compaction's copies (numbered as any new pack), counted in the
    /// repository's use.
    pub(crate) fn start_pack(&self) -> Result<PackNo, RepoError> {
        let mut st = lock(&self.state);
        let p = PackNo(st.next_pack);
        self.packs.create(p)?;
        st.next_pack += 1;
        st.committed.insert(p, PACK_HEADER_LEN);
        st.held += PACK_HEADER_LEN;
        Ok(p)
    }

    /// Counts `bytes` written to a compaction pack in the repository's use.
    pub(crate) fn add_held(&self, bytes: u64) {
        lock(&self.state).held += bytes;
    }

    /// Points the index at the copies in `moved` (their packs, synced, reaching the
    /// lengths in `packs`) and, in the same transaction, forgets the packs of `done`, then
    /// deletes those files. A pack still open or holding unindexed records is never
    /// forgotten (it cannot be: compaction seals them first). Returns the packs deleted.
    pub(crate) fn relocate(
        &self,
        moved: &[Moved],
        packs: &[(PackNo, u64)],
        done: &[PackNo],
    ) -> Result<Vec<PackNo>, RepoError> {
        let mut w = lock(&self.writer);
        let done: Vec<PackNo> = {
            let st = lock(&self.state);
            done.iter()
                .filter(|p| st.cur != Some(**p) && !st.dirty.contains_key(p))
                .copied()
                .collect()
        };
        let kept = w.relocate(moved, packs, &done)?;
        let gone: Vec<PackNo> = done.into_iter().filter(|p| !kept.contains(p)).collect();
        {
            let mut st = lock(&self.state);
            for (p, l) in packs {
                let c = st.committed.entry(*p).or_insert(*l);
                *c = (*c).max(*l);
            }
            for p in &gone {
                if let Some(l) = st.committed.remove(p) {
                    st.held = st.held.saturating_sub(l);
                }
            }
        }
        drop(w);
        for p in &kept {
            tracing::error!(
                repo = %self.name,
                "{} still holds indexed chunks after compaction copied them; kept",
                self.packs.describe(*p)
            );
        }
        for p in &gone {
            self.packs.remove(*p)?;
        }
        Ok(gone)
    }

    /// After compaction failed: its pack `p`, of which `written` bytes were written, is cut
    /// back to `indexed` (or was deleted, `None`: the index never learned of it); the use
    /// no longer counts the difference.
    pub(crate) fn forget_copies(&self, p: PackNo, indexed: Option<u64>, written: u64) {
        let mut st = lock(&self.state);
        st.held = st
            .held
            .saturating_sub(written.saturating_sub(indexed.unwrap_or(0)));
        match indexed {
            Some(l) => {
                st.committed.insert(p, l);
            }
            None => {
                st.committed.remove(&p);
            }
        }
    }

    /// Sets a row of the index's `meta` table.
    pub(crate) fn set_meta(&self, key: &str, value: &str) -> Result<(), RepoError> {
        Ok(lock(&self.writer).set_meta(key, value)?)
    }
}
