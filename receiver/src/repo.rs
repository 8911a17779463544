//! One repository: its write path (appending chunks to packs, group commit into the
//! index, rollback after a storage failure), its reads (chunks, versions), the escrowed key
//! files (a history an agent can add to but never replace or shorten), and recovery when it
//! is opened. Its packs are in the [`PackStore`] it is given.
//!
//! Write order (the durability contract):
//! 1. `put` appends a record to the open pack (through a small buffer) and remembers the
//!    chunk as *pending*: visible to presence queries and commits, not yet indexed.
//! 2. `flush`, under the state lock, settles each commit of its batch: one already pending
//!    or indexed keeps its version; one with a chunk neither pending nor indexed is
//!    `MissingChunks`; any other gets the next version number and a *commit record*,
//!    appended after the chunks it references and remembered as pending. Then it writes
//!    the buffer out and fsyncs every pack written since the last flush (a new pack's file
//!    and directory entry were made durable when it was created),
//! 3. then, in ONE index transaction, inserts the pending chunk rows and versions (this
//!    session's and others' written before), and raises the recorded pack lengths;
//! 4. only after that transaction commits does the caller acknowledge the commits.
//!
//! Version numbers are assigned here, in the order commit records are written: they
//! increase, and may skip (a number given to a record that a rollback discarded is not
//! given again).
//!
//! Locks: `writer` (index transactions) is taken before `state`; `reader` (index queries)
//! is only ever taken last. The fsync of step 2 runs under no lock, so other sessions keep
//! appending while one waits for the disk.
//!
//! Reads (restore, `verify --read-data`) look a chunk up and read its record under no
//! lock, so compaction may move the record in between (it points the index at a copy,
//! then deletes the old pack): a read that fails looks the chunk up again and follows it
//! ([`Repo::get_many`]), and a restore never fails because a pack moved.
//!
//! A write or fsync failure (e.g. a full disk) rolls back: every pack is cut to its
//! recorded length, every pending chunk and commit is forgotten and the *epoch* moves on,
//! so any flush that was in progress fails instead of indexing bytes that are gone.
//! Nothing from the failed batch is acknowledged; the agent sends it again.
//!
//! Opening a repository whose versions predate commit records writes their records out
//! (the upgrade, [`Repo::open`]), in batches, each fsynced before the index learns where
//! its records are.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use coffer_common::chunk::{ChunkId, FileId};
use coffer_common::host::fs::{create_dir_all, write_atomic, IoError};
use coffer_common::host::time::now_secs;
use coffer_common::wire::{sealed_hash, CommitId, EscrowedKeyFile, VersionEntry, MAX_KEYFILES};

use crate::auth::RepoName;
use crate::index::{
    first_of_each, CommitOutcome, Index, IndexError, Mode, NewCommit, RecordedRemoval,
    RecordedVersion,
};
use crate::layout::RepoDir;
use crate::records::{CommitRecord, Deletion, RemovalRecord};
use crate::store::{
    header_ok, pack_header, pack_version, read_record_into, scan, Check, Found, Location, PackNo,
    PackStore, RecordError, RecordHeader, PACK_HEADER_LEN, PACK_VERSION, RECORD_HEADER_LEN,
};

/// Records at most this large are gathered in memory and written together.
const SMALL_RECORD: usize = 64 * 1024;
/// Size of that buffer.
const BUFFER: usize = 1 << 20;
/// Largest escrowed key file.
pub const MAX_KEYFILE: usize = 4096;
/// Most manifest bytes in one `Versions` reply (well below the frame limit).
pub const MAX_LIST_BYTES: usize = 4 << 20;
/// Most entries in one `Versions` reply.
pub const MAX_LIST_ENTRIES: usize = 10_000;
/// Most versions the upgrade writes out as commit records per fsync and index transaction.
const UPGRADE_VERSIONS: usize = 4096;
/// Most bytes of commit records the upgrade writes per fsync and index transaction.
const UPGRADE_BYTES: usize = 32 << 20;
/// How many times a chunk read follows the chunk to a new location (compaction moved it
/// while it was being read) before the read fails.
const MOVED_RETRIES: u32 = 8;

/// Errors of the repository write and read paths.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Record(#[from] RecordError),
    /// Its index is missing without commit records to rebuild it, or damaged.
    #[error(transparent)]
    NeedsRepair(#[from] crate::repair::NeedsRepair),
    #[error(
        "a storage error while this batch was being made durable discarded it; nothing of it \
         was acknowledged, send it again"
    )]
    RolledBack,
    #[error("key file of {0} bytes exceeds the {MAX_KEYFILE}-byte limit")]
    KeyFileTooLarge(usize),
    #[error("not a key file ({0}); nothing was stored")]
    KeyFileMalformed(String),
    #[error(
        "the repository already holds {MAX_KEYFILES} escrowed key files, the most it keeps; \
         this one was not stored (none is ever removed by an agent: the receiver's operator \
         decides)"
    )]
    KeyFilesFull,
    /// Over the repository's quota or the receiver's disk floor: nothing was written.
    #[error(transparent)]
    Refused(#[from] crate::quota::Refusal),
}

/// What [`Repo::put_keyfile`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyFileStored {
    /// Added to the history as this entry.
    Added(u32),
    /// Equal to this entry, already there: nothing written.
    Present(u32),
}

impl RepoError {
    /// True when the error is about storing data (reported to agents as `Storage`).
    pub fn is_storage(&self) -> bool {
        matches!(
            self,
            RepoError::Io(_)
                | RepoError::Index(_)
                | RepoError::RolledBack
                | RepoError::NeedsRepair(_)
        )
    }
}

#[derive(Default)]
struct WriteState {
    /// The pack being appended to, and its logical length (buffer included).
    cur: Option<PackNo>,
    cur_len: u64,
    /// Records not yet written to `cur`, which start at `buf_at`.
    buf: Vec<u8>,
    buf_at: u64,
    next_pack: u32,
    /// Recorded (durable, indexed) length of each pack.
    committed: HashMap<PackNo, u64>,
    /// Length written to the OS of each pack that has unindexed records.
    dirty: BTreeMap<PackNo, u64>,
    /// Chunks stored but not yet indexed, with their sequence numbers, in order.
    pending: HashMap<ChunkId, (u64, Location)>,
    order: VecDeque<(u64, ChunkId)>,
    /// Commit records written but not yet indexed (by any session's flush), by file and
    /// commit id: their sequence numbers (from the same counter as chunks), versions and
    /// commit times; and in order, with the versions to index (taken, not copied, by the
    /// index transaction that records them, which holds the writer lock until they leave).
    pending_commits: HashMap<(FileId, CommitId), (u64, u64, i64)>,
    commit_order: VecDeque<(u64, (FileId, CommitId), Option<RecordedVersion>)>,
    seq: u64,
    epoch: u64,
    /// Bytes the packs hold (headers, records and the buffer): the quota's count.
    held: u64,
    /// Moves on whenever pending chunks or commits become indexed (and leave `pending`).
    indexed_gen: u64,
    /// The number the next commit record gets.
    next_version: u64,
    /// Moves on whenever `prune` deletes chunk rows: a flush whose step 0 found a chunk
    /// indexed asks the index again under the lock (it may be gone).
    chunks_dropped: u64,
}

impl WriteState {
    fn write_out(&mut self, packs: &dyn PackStore) -> Result<(), IoError> {
        let Some(p) = self.cur else {
            return Ok(());
        };
        if self.buf.is_empty() {
            return Ok(());
        }
        packs.write_at(p, self.buf_at, &self.buf)?;
        self.buf_at += self.buf.len() as u64;
        self.buf.clear();
        self.dirty.insert(p, self.buf_at);
        Ok(())
    }
}

/// A repository: its packs, its index and the state of its open pack.
pub struct Repo {
    name: RepoName,
    dir: RepoDir,
    packs: Arc<dyn PackStore>,
    writer: Mutex<Index>,
    reader: Mutex<Index>,
    state: Mutex<WriteState>,
    pack_max: u64,
    /// Held while the escrowed key files are read to choose the next entry and written.
    escrow: Mutex<()>,
    /// Its quota and the receiver's disk floor (none until `serve` sets them).
    pub limits: crate::quota::Limits,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// What `open` found and repaired.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Intact chunk records past the indexed length that were added to the index.
    pub reindexed: usize,
    /// Intact commit records past the indexed length whose versions were added to the
    /// index (or, written by the upgrade, whose record locations were filled in).
    pub reindexed_commits: usize,
    /// Intact commit records past the indexed length left out of the index: a chunk they
    /// reference is missing, or their commit is indexed under another version (never
    /// acknowledged either way).
    pub skipped_commits: usize,
    /// Bytes of torn tails cut off.
    pub cut_bytes: u64,
    /// Versions written out as commit records by the upgrade.
    pub upgraded: u64,
}

mod maintenance;

/// The commit records found past one pack's indexed end, checked before they are indexed.
struct TailCommits {
    /// By file and commit id: the record with the highest version.
    found: HashMap<(FileId, CommitId), RecordedVersion>,
    /// The highest version number any of them carries.
    max_version: u64,
}

impl Repo {
    /// Opens (creating if needed) the repository in `dir`, whose packs are in `packs`, and
    /// repairs what a crash left: intact records past a pack's recorded length are fsynced
    /// and indexed (a commit record only when every chunk it references is present), a
    /// torn tail is cut. Packs shorter than recorded are reported and never appended to.
    /// Then versions without a commit record (committed by a release before them) get one:
    /// the upgrade, resumed where it stopped if it was interrupted.
    pub fn open(
        dir: &RepoDir,
        name: RepoName,
        packs: Arc<dyn PackStore>,
        pack_max: u64,
    ) -> Result<(Self, Recovery), RepoError> {
        let (repo, mut rec) = Self::open_recovered(dir, name, packs, pack_max)?;
        rec.upgraded = repo.upgrade()?;
        Ok((repo, rec))
    }

    /// [`Repo::open`] up to the upgrade.
    fn open_recovered(
        dir: &RepoDir,
        name: RepoName,
        packs: Arc<dyn PackStore>,
        pack_max: u64,
    ) -> Result<(Self, Recovery), RepoError> {
        dir.create()?;
        let index_path = dir.index();
        // A missing index is rebuilt from the packs, a damaged one refused (`repair.rs`).
        let mut writer = crate::repair::open_index(dir, &*packs)?;
        let recorded: HashMap<PackNo, u64> = writer.pack_lengths()?.into_iter().collect();
        let on_disk = packs.list()?;
        for p in recorded.keys() {
            if !on_disk.contains(p) {
                tracing::error!(
                    repo = %name,
                    "pack {} is recorded in the index but missing; its chunks cannot be served",
                    packs.describe(*p)
                );
            }
        }
        let mut st = WriteState::default();
        let mut rec = Recovery::default();
        let mut appendable = None;
        let mut max_version = 0;
        for &p in &on_disk {
            let mut file_len = packs.len(p)?;
            let known = recorded.get(&p).copied();
            if known.is_none() && (file_len < PACK_HEADER_LEN || !header_ok(&*packs, p)?) {
                // Created but never indexed, header incomplete: make it a fresh pack.
                packs.truncate(p, 0)?;
                packs.write_at(p, 0, &pack_header())?;
                packs.sync(p)?;
                file_len = PACK_HEADER_LEN;
            }
            let indexed = known.unwrap_or(PACK_HEADER_LEN);
            if file_len < indexed {
                tracing::error!(
                    repo = %name,
                    "pack {} is {file_len} bytes but the index recorded {indexed}: data was lost \
                     after it was acknowledged; run `coffer-receiver scrub`",
                    packs.describe(p)
                );
                st.committed.insert(p, indexed);
                appendable = None;
                continue;
            }
            let mut end = indexed;
            if file_len > indexed || known.is_none() {
                let (e, tail_max) = Self::recover_tail(
                    &name,
                    &*packs,
                    &mut writer,
                    p,
                    indexed,
                    file_len,
                    &mut rec,
                )?;
                max_version = max_version.max(tail_max);
                end = e;
            }
            st.committed.insert(p, end);
            appendable = Some((p, end));
        }
        let max = on_disk
            .iter()
            .chain(recorded.keys())
            .map(|p| p.0)
            .max()
            .unwrap_or(0);
        st.next_pack = max + 1;
        st.next_version = writer.next_version()?.max(max_version.saturating_add(1));
        if let Some((p, end)) = appendable {
            // A version 1 pack (from a release before commit records) is never appended to.
            if p.0 == max && end < pack_max && pack_version(&*packs, p)? == Some(PACK_VERSION) {
                st.cur = Some(p);
                st.cur_len = end;
                st.buf_at = end;
            }
        }
        st.held = st.committed.values().sum();
        let reader = Index::open(&index_path, Mode::Read)?;
        let repo = Self {
            name,
            dir: dir.clone(),
            packs,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            state: Mutex::new(st),
            pack_max,
            escrow: Mutex::new(()),
            limits: Default::default(),
        };
        Ok((repo, rec))
    }

    /// Scans `p` from its indexed end `indexed` to `file_len`: cuts a torn tail, and indexes
    /// (in one transaction, after an fsync) the intact chunk records and those intact commit
    /// records whose chunks are all present, raising the pack's length to the end of the
    /// last intact record. Returns that end and the highest version number a commit record
    /// there carries (indexed or not: numbers are never given twice).
    fn recover_tail(
        name: &RepoName,
        packs: &dyn PackStore,
        writer: &mut Index,
        p: PackNo,
        indexed: u64,
        file_len: u64,
        rec: &mut Recovery,
    ) -> Result<(u64, u64), RepoError> {
        let mut rows = Vec::new();
        let mut removals = Vec::new();
        let mut tail = TailCommits {
            found: HashMap::new(),
            max_version: 0,
        };
        let sc_end = scan::<IoError>(packs, p, indexed, file_len, |f| {
            match f {
                Found::Chunk { id, loc } => rows.push((id, loc)),
                Found::Commit {
                    header,
                    offset,
                    body,
                } => match CommitRecord::decode(&header, body) {
                    Ok(record) => {
                        tail.max_version = tail.max_version.max(record.version);
                        let key = (record.file_id, record.commit_id);
                        let v = RecordedVersion {
                            record,
                            at: (p, offset),
                        };
                        match tail.found.get(&key) {
                            Some(have) if have.record.version >= v.record.version => {}
                            _ => {
                                tail.found.insert(key, v);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(
                            repo = %name,
                            "commit record at offset {offset} of {} is malformed ({e}); left \
                             out of the index",
                            packs.describe(p)
                        );
                        rec.skipped_commits += 1;
                    }
                },
                Found::Removal {
                    header,
                    offset,
                    body,
                } => match RemovalRecord::decode(body) {
                    Ok(record) => removals.push(RecordedRemoval {
                        record,
                        hash: header.hash,
                        at: (p, offset),
                    }),
                    Err(e) => tracing::error!(
                        repo = %name,
                        "removal record at offset {offset} of {} is malformed ({e}); ignored",
                        packs.describe(p)
                    ),
                },
            }
            Ok(())
        })?;
        if sc_end < file_len {
            tracing::warn!(
                repo = %name,
                "cutting a torn tail of {} bytes at offset {} of {}",
                file_len - sc_end,
                sc_end,
                packs.describe(p)
            );
            rec.cut_bytes += file_len - sc_end;
            packs.truncate(p, sc_end)?;
        }
        // A commit record is indexed only when every chunk it references is present (the
        // chunks it was written after are in this tail or an earlier pack's) and its commit
        // is not indexed under another number; else it was never acknowledged.
        let here: HashSet<ChunkId> = rows.iter().map(|(id, _)| *id).collect();
        let mut versions: Vec<RecordedVersion> = Vec::with_capacity(tail.found.len());
        for v in tail.found.into_values() {
            let r = &v.record;
            let mut missing = 0usize;
            for id in &r.chunks {
                if !here.contains(id) && !writer.has_chunk(id)? {
                    missing += 1;
                }
            }
            let other = writer
                .find_version(&r.file_id, &r.commit_id)?
                .filter(|(n, _)| *n != r.version);
            // A version `prune` removed (its record not yet compacted away) stays removed.
            if other.is_none() && writer.is_removed(&r.file_id, &r.commit_id, r.version)? {
                continue;
            }
            if missing > 0 || other.is_some() {
                let why = match other {
                    Some((n, _)) => format!("its commit is indexed as version {n}"),
                    None => format!("{missing} of the chunks it references are missing"),
                };
                tracing::warn!(
                    repo = %name,
                    "commit record of version {} at offset {} of {} was never acknowledged \
                     ({why}); left out of the index",
                    r.version,
                    v.at.1,
                    packs.describe(p)
                );
                rec.skipped_commits += 1;
                continue;
            }
            versions.push(v);
        }
        versions.sort_by_key(|v| v.record.version);
        if !rows.is_empty() || !versions.is_empty() || !removals.is_empty() {
            packs.sync(p)?;
            tracing::info!(
                repo = %name,
                "re-indexed {} intact chunks and {} commit records found past the indexed end \
                 of {}",
                rows.len(),
                versions.len(),
                packs.describe(p)
            );
        }
        rec.reindexed += rows.len();
        rec.reindexed_commits += versions.len();
        // A removal record there (fsynced before a crash) removes its versions, as `prune`
        // would have in its next index transaction.
        writer.add_recorded_removing(&rows, &[(p, sc_end)], &versions, &removals)?;
        Ok((sc_end, tail.max_version))
    }

    /// Writes the versions that have no commit record (committed by a release before
    /// commit records) out as commit records, oldest first, in batches: each batch is
    /// appended (never to a version 1 pack), fsynced, then its record locations are set in
    /// one index transaction. A crash after an fsync leaves records past the indexed end,
    /// which the next open re-indexes (filling their locations in); what is left is done
    /// then. Returns how many versions it wrote out. Called by `open`, before the
    /// repository is shared.
    fn upgrade(&self) -> Result<u64, RepoError> {
        let left = lock(&self.writer).unrecorded_count()?;
        if left == 0 {
            return Ok(0);
        }
        tracing::info!(
            repo = %self.name,
            "upgrading: writing {left} versions out as commit records (they were committed \
             before the packs held them)"
        );
        let (mut after, mut done) = (0, 0u64);
        while let Some((versions, packs)) = self.upgrade_write(after)? {
            after = versions.last().map_or(after, |v| v.record.version);
            done += versions.len() as u64;
            self.upgrade_index(&versions, &packs)?;
        }
        tracing::info!(
            repo = %self.name,
            "upgraded: {done} versions written out as commit records"
        );
        Ok(done)
    }

    /// One batch of the upgrade: the next versions above `after` without a commit record,
    /// appended as records and fsynced; `None` when none is left.
    #[allow(clippy::type_complexity)]
    fn upgrade_write(
        &self,
        after: u64,
    ) -> Result<Option<(Vec<RecordedVersion>, Vec<(PackNo, u64)>)>, RepoError> {
        let batch = lock(&self.writer).unrecorded(after, UPGRADE_VERSIONS, UPGRADE_BYTES)?;
        if batch.is_empty() {
            return Ok(None);
        }
        let mut versions = Vec::with_capacity(batch.len());
        let dirty = {
            let mut st = lock(&self.state);
            for record in batch {
                let (header, body) = record.encode();
                let at = self.append_record(&mut st, &header, &body)?;
                versions.push(RecordedVersion { record, at });
            }
            st.write_out(&*self.packs)?;
            std::mem::take(&mut st.dirty)
        };
        for p in dirty.keys() {
            self.packs.sync(*p)?;
        }
        Ok(Some((versions, dirty.into_iter().collect())))
    }

    /// Sets the record locations of a batch [`Repo::upgrade_write`] made durable.
    fn upgrade_index(
        &self,
        versions: &[RecordedVersion],
        packs: &[(PackNo, u64)],
    ) -> Result<(), RepoError> {
        lock(&self.writer).add_recorded(&[], packs, versions)?;
        let mut st = lock(&self.state);
        for (p, l) in packs {
            let c = st.committed.entry(*p).or_insert(*l);
            *c = (*c).max(*l);
        }
        Ok(())
    }

    /// The repository's name.
    pub fn name(&self) -> &RepoName {
        &self.name
    }

    /// Which of `ids` the repository lacks (neither indexed nor pending), each once, in the
    /// order first asked.
    pub fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, RepoError> {
        let mut candidates = Vec::new();
        first_of_each(ids, &mut HashSet::new(), &mut candidates);
        {
            let st = lock(&self.state);
            candidates.retain(|id| !st.pending.contains_key(id));
        }
        let r = lock(&self.reader);
        let mut out = Vec::new();
        for id in candidates {
            if !r.has_chunk(&id)? {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Appends a sealed chunk unless it is already present. Returns whether it was written.
    pub fn put(&self, id: &ChunkId, sealed: &[u8]) -> Result<bool, RepoError> {
        self.put_hashed(id, sealed, sealed_hash(sealed))
    }

    /// [`Repo::put`] of sealed bytes whose BLAKE3 the caller has already checked to be
    /// `hash` (the channel checks every `PutChunk` against the hash it carries).
    pub fn put_hashed(
        &self,
        id: &ChunkId,
        sealed: &[u8],
        hash: [u8; 32],
    ) -> Result<bool, RepoError> {
        debug_assert_eq!(
            hash,
            sealed_hash(sealed),
            "put_hashed with an unchecked hash"
        );
        let r = {
            let mut st = lock(&self.state);
            if st.pending.contains_key(id) || lock(&self.reader).has_chunk(id)? {
                return Ok(false);
            }
            let more = self.growth(&st, sealed.len());
            self.limits.admit(&self.name, st.held, more)?;
            self.append(&mut st, id, sealed, hash)
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) => {
                self.rollback(&e.to_string());
                Err(e.into())
            }
        }
    }

    /// Bytes appending a sealed chunk of `len` bytes adds to the packs (with a new pack's
    /// header when it starts one).
    fn growth(&self, st: &WriteState, len: usize) -> u64 {
        let rec_len = RECORD_HEADER_LEN + len as u64;
        let full = st.cur_len + rec_len > self.pack_max && st.cur_len > PACK_HEADER_LEN;
        rec_len
            + if st.cur.is_none() || full {
                PACK_HEADER_LEN
            } else {
                0
            }
    }

    fn append(
        &self,
        st: &mut WriteState,
        id: &ChunkId,
        sealed: &[u8],
        hash: [u8; 32],
    ) -> Result<(), IoError> {
        let header = RecordHeader {
            id: *id,
            len: sealed.len() as u32,
            hash,
        }
        .encode();
        let (pack, offset) = self.append_record(st, &header, sealed)?;
        let seq = st.seq;
        st.seq += 1;
        let loc = Location {
            pack,
            offset,
            len: sealed.len() as u32,
            hash,
        };
        st.pending.insert(*id, (seq, loc));
        st.order.push_back((seq, *id));
        Ok(())
    }

    /// Appends a commit record for `record` and remembers it as pending.
    fn append_commit(&self, st: &mut WriteState, record: CommitRecord) -> Result<(), IoError> {
        let (header, body) = record.encode();
        let at = self.append_record(st, &header, &body)?;
        let seq = st.seq;
        st.seq += 1;
        let key = (record.file_id, record.commit_id);
        st.pending_commits
            .insert(key, (seq, record.version, record.commit_time));
        st.commit_order
            .push_back((seq, key, Some(RecordedVersion { record, at })));
        Ok(())
    }

    /// Appends one record (its 72-byte header, then `body`) to the open pack, starting a new
    /// pack first when there is none or the record would take it past the cap; records up
    /// to [`SMALL_RECORD`] go through the buffer. Returns where the record starts.
    fn append_record(
        &self,
        st: &mut WriteState,
        header: &[u8; RECORD_HEADER_LEN as usize],
        body: &[u8],
    ) -> Result<(PackNo, u64), IoError> {
        let rec_len = RECORD_HEADER_LEN + body.len() as u64;
        let full = st.cur_len + rec_len > self.pack_max && st.cur_len > PACK_HEADER_LEN;
        let pack = match st.cur {
            Some(p) if !full => p,
            _ => {
                st.write_out(&*self.packs)?;
                let p = PackNo(st.next_pack);
                self.packs.create(p)?;
                st.next_pack += 1;
                st.committed.insert(p, PACK_HEADER_LEN);
                st.held += PACK_HEADER_LEN;
                st.cur = Some(p);
                st.cur_len = PACK_HEADER_LEN;
                st.buf_at = PACK_HEADER_LEN;
                tracing::debug!(repo = %self.name, "started {}", self.packs.describe(p));
                p
            }
        };
        let offset = st.cur_len;
        if body.len() <= SMALL_RECORD {
            if st.buf.len() + rec_len as usize > BUFFER {
                st.write_out(&*self.packs)?;
            }
            if st.buf.is_empty() {
                st.buf_at = offset;
            }
            st.buf.extend_from_slice(header);
            st.buf.extend_from_slice(body);
        } else {
            st.write_out(&*self.packs)?;
            self.packs.write_at(pack, offset, header)?;
            self.packs
                .write_at(pack, offset + RECORD_HEADER_LEN, body)?;
            st.buf_at = offset + rec_len;
            st.dirty.insert(pack, offset + rec_len);
        }
        st.cur_len = offset + rec_len;
        st.held += rec_len;
        Ok((pack, offset))
    }

    /// Makes everything stored so far durable and indexed, and records `commits` (each
    /// with a commit record in a pack), in one index transaction. On success every outcome
    /// is final and may be acknowledged.
    pub fn flush(&self, commits: &[NewCommit]) -> Result<Vec<CommitOutcome>, RepoError> {
        // 0. Under no lock: which commits and chunks the index already holds (a version or
        // a chunk, once indexed, stays). What was pending then and has been indexed since
        // is asked again under the lock (`indexed_gen` moved).
        let gen = {
            let st = lock(&self.state);
            (st.indexed_gen, st.chunks_dropped)
        };
        let (known, indexed) = self.lookup(commits)?;
        // 1. Settle each commit, append the new ones' commit records, write the buffer
        // out; note what must be synced.
        let (out, snapshot, seq_hi, epoch) = {
            let mut st = lock(&self.state);
            let mut out = Vec::with_capacity(commits.len());
            let r = self.settle(&mut st, commits, &known, &indexed, gen, &mut out);
            let r = r.and_then(|()| st.write_out(&*self.packs).map_err(RepoError::from));
            let snap = (st.dirty.clone(), st.seq, st.epoch);
            drop(st);
            match r {
                Ok(()) => {}
                Err(e @ RepoError::Io(_)) => {
                    self.rollback(&e.to_string());
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
            (out, snap.0, snap.1, snap.2)
        };
        if snapshot.is_empty() {
            // Nothing unindexed anywhere: every commit was indexed already or is missing
            // chunks (a pending one lies in a pack written since its flush began).
            return Ok(out);
        }
        // 2. fsync, under no lock.
        for p in snapshot.keys() {
            if let Err(e) = self.packs.sync(*p) {
                self.rollback(&e.to_string());
                return Err(e.into());
            }
        }
        // 3. One transaction: the pending chunks and versions written before the snapshot,
        // this session's and other sessions' alike (their bytes were synced above).
        let mut w = lock(&self.writer);
        self.index_pending(&mut w, snapshot, seq_hi, epoch, &[])?;
        Ok(out)
    }

    /// `flush`'s step 3 (and a removal's): with the writer lock held, in ONE transaction,
    /// indexes the pending chunks and commit records written before `seq_hi` (synced, with
    /// the packs' lengths in `snapshot`), then applies `removals`. Fails with `RolledBack`
    /// when a rollback came first (the epoch moved). Returns how many versions the
    /// removals forgot.
    fn index_pending(
        &self,
        w: &mut Index,
        snapshot: BTreeMap<PackNo, u64>,
        seq_hi: u64,
        epoch: u64,
        removals: &[RecordedRemoval],
    ) -> Result<u64, RepoError> {
        let (rows, versions) = {
            let mut st = lock(&self.state);
            if st.epoch != epoch {
                return Err(RepoError::RolledBack);
            }
            let rows: Vec<(ChunkId, Location)> = st
                .order
                .iter()
                .take_while(|(s, _)| *s < seq_hi)
                .filter_map(|(s, id)| match st.pending.get(id) {
                    Some((ps, loc)) if ps == s => Some((*id, *loc)),
                    _ => None,
                })
                .collect();
            let versions: Vec<RecordedVersion> = st
                .commit_order
                .iter_mut()
                .take_while(|(s, _, _)| *s < seq_hi)
                .filter_map(|(_, _, v)| v.take())
                .collect();
            (rows, versions)
        };
        let packs: Vec<(PackNo, u64)> = snapshot.iter().map(|(p, l)| (*p, *l)).collect();
        let removed = match w.add_recorded_removing(&rows, &packs, &versions, removals) {
            Ok(n) => n,
            Err(e) => {
                self.rollback_locked(w, &e.to_string());
                return Err(e.into());
            }
        };
        let mut st = lock(&self.state);
        while let Some(&(s, id)) = st.order.front() {
            if s >= seq_hi {
                break;
            }
            st.order.pop_front();
            if matches!(st.pending.get(&id), Some((ps, _)) if *ps == s) {
                st.pending.remove(&id);
            }
        }
        while let Some(&(s, key, _)) = st.commit_order.front() {
            if s >= seq_hi {
                break;
            }
            st.commit_order.pop_front();
            if matches!(st.pending_commits.get(&key), Some((ps, _, _)) if *ps == s) {
                st.pending_commits.remove(&key);
            }
        }
        st.indexed_gen += 1;
        for (p, l) in snapshot {
            let c = st.committed.entry(p).or_insert(l);
            *c = (*c).max(l);
            if st.dirty.get(&p).is_some_and(|d| *d <= l) {
                st.dirty.remove(&p);
            }
        }
        Ok(removed)
    }

    /// For `flush`'s step 0, in one read transaction: the version of each commit already
    /// indexed, and which chunks referenced by the others are indexed.
    #[allow(clippy::type_complexity)]
    fn lookup(
        &self,
        commits: &[NewCommit],
    ) -> Result<(Vec<Option<(u64, i64)>>, HashSet<ChunkId>), RepoError> {
        let r = lock(&self.reader);
        Ok(r.in_read_tx(|ix| {
            let mut known = Vec::with_capacity(commits.len());
            let mut indexed = HashSet::new();
            for c in commits {
                let v = ix.find_version(&c.file_id, &c.commit_id)?;
                if v.is_none() {
                    for id in &c.chunks {
                        if !indexed.contains(id) && ix.has_chunk(id)? {
                            indexed.insert(*id);
                        }
                    }
                }
                known.push(v);
            }
            Ok((known, indexed))
        })?)
    }

    /// `flush`'s step 1 for each commit, in order, under the state lock: a commit pending
    /// (its record written by this or another flush) or indexed keeps its version; one
    /// referencing a chunk neither pending nor indexed is `MissingChunks`; any other gets
    /// the next version number, the receiver's time and a commit record. `known` and
    /// `indexed` are step 0's answers, taken when `indexed_gen` and `chunks_dropped` were
    /// `gen`.
    fn settle(
        &self,
        st: &mut WriteState,
        commits: &[NewCommit],
        known: &[Option<(u64, i64)>],
        indexed: &HashSet<ChunkId>,
        gen: (u64, u64),
        out: &mut Vec<CommitOutcome>,
    ) -> Result<(), RepoError> {
        // Pending work indexed since step 0 has left `pending`: ask the index again. Chunk
        // rows `prune` deleted since then are no longer indexed: ask about those too.
        let moved = st.indexed_gen != gen.0;
        let dropped = st.chunks_dropped != gen.1;
        let now = now_secs();
        let (mut seen, mut ids) = (HashSet::new(), Vec::new());
        for (c, known) in commits.iter().zip(known) {
            let key = (c.file_id, c.commit_id);
            let existing = match (st.pending_commits.get(&key), known) {
                (Some((_, version, time)), _) => Some((*version, *time)),
                (None, Some(k)) => Some(*k),
                (None, None) if moved => {
                    lock(&self.reader).find_version(&c.file_id, &c.commit_id)?
                }
                (None, None) => None,
            };
            if let Some((version, commit_time)) = existing {
                out.push(CommitOutcome::Acked {
                    version,
                    commit_time,
                });
                continue;
            }
            first_of_each(&c.chunks, &mut seen, &mut ids);
            let mut missing = Vec::new();
            for id in &ids {
                if (indexed.contains(id) && !dropped) || st.pending.contains_key(id) {
                    continue;
                }
                if (moved || dropped) && lock(&self.reader).has_chunk(id)? {
                    continue;
                }
                missing.push(*id);
            }
            if !missing.is_empty() {
                out.push(CommitOutcome::MissingChunks(missing));
                continue;
            }
            let version = st.next_version;
            st.next_version += 1;
            let record = CommitRecord {
                commit_id: c.commit_id,
                file_id: c.file_id,
                version,
                commit_time: now,
                deletion: if c.deleted {
                    Deletion::Yes
                } else {
                    Deletion::No
                },
                manifest: c.manifest.clone(),
                chunks: std::mem::take(&mut ids),
            };
            self.append_commit(st, record)?;
            out.push(CommitOutcome::Acked {
                version,
                commit_time: now,
            });
        }
        Ok(())
    }

    fn rollback(&self, why: &str) {
        let mut w = lock(&self.writer);
        self.rollback_locked(&mut w, why);
    }

    /// Cuts every pack back to its recorded length and forgets pending chunks and commits.
    /// The caller holds the writer lock, so no index transaction can be using them.
    fn rollback_locked(&self, _writer: &mut Index, why: &str) {
        let mut st = lock(&self.state);
        tracing::warn!(
            repo = %self.name,
            "storage error ({why}); discarding {} unindexed chunks and {} unindexed commit \
             records and cutting packs back to their recorded length",
            st.pending.len(),
            st.pending_commits.len()
        );
        let dirty: Vec<PackNo> = st.dirty.keys().copied().chain(st.cur).collect();
        for p in dirty {
            let len = st.committed.get(&p).copied().unwrap_or(PACK_HEADER_LEN);
            if let Err(e) = self.packs.truncate(p, len) {
                tracing::error!(repo = %self.name, "{e}");
                if st.cur == Some(p) {
                    st.cur = None;
                }
            }
        }
        st.buf.clear();
        if let Some(p) = st.cur {
            let len = st.committed.get(&p).copied().unwrap_or(PACK_HEADER_LEN);
            st.cur_len = len;
            st.buf_at = len;
        }
        st.pending.clear();
        st.order.clear();
        st.pending_commits.clear();
        st.commit_order.clear();
        st.dirty.clear();
        st.held = st.committed.values().sum();
        st.epoch += 1;
    }

    /// One chunk's sealed bytes (tests).
    #[cfg(test)]
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, RepoError> {
        self.get_many(std::slice::from_ref(id), Vec::new())
            .pop()
            .unwrap_or(Ok(None))
    }

    /// Reads chunks' sealed bytes, in order: from the pack buffer for those not yet written
    /// out, else from their packs, with one index transaction for the lookups. A record's
    /// header is checked, not its bytes' hash (see [`Check::Header`]). Each result is that
    /// chunk's alone: a damaged record fails its own read, not the others'.
    /// Buffers from `bufs` are reused for the reads (a buffer per chunk read from a pack).
    pub fn get_many(
        &self,
        ids: &[ChunkId],
        mut bufs: Vec<Vec<u8>>,
    ) -> Vec<Result<Option<Vec<u8>>, RepoError>> {
        /// What each requested chunk needs.
        enum Step {
            /// Answered from the pack buffer.
            Done(Option<Vec<u8>>),
            /// In a pack, not yet in the index.
            At(Location),
            /// To be looked up in the index.
            Lookup,
        }
        let mut lookup = Vec::new();
        let steps: Vec<Step> = {
            let st = lock(&self.state);
            ids.iter()
                .map(|id| match st.pending.get(id) {
                    Some((_, loc)) if st.cur == Some(loc.pack) && loc.offset >= st.buf_at => {
                        let start = (loc.offset - st.buf_at + RECORD_HEADER_LEN) as usize;
                        let bytes = st.buf.get(start..start + loc.len as usize);
                        Step::Done(bytes.map(|b| {
                            let mut v = bufs.pop().unwrap_or_default();
                            v.clear();
                            v.extend_from_slice(b);
                            v
                        }))
                    }
                    Some((_, loc)) => Step::At(*loc),
                    None => {
                        lookup.push(*id);
                        Step::Lookup
                    }
                })
                .collect()
        };
        let mut looked = {
            let r = lock(&self.reader);
            match r.chunks(&lookup) {
                Ok(l) => l.into_iter().map(Ok).collect::<Vec<_>>(),
                // Failed as a whole: each chunk gets its own lookup and its own error.
                Err(_) => lookup.iter().map(|id| r.chunk(id)).collect(),
            }
        }
        .into_iter();
        ids.iter()
            .zip(steps)
            .map(|(id, step)| {
                let loc = match step {
                    Step::Done(r) => return Ok(r),
                    Step::At(l) => l,
                    Step::Lookup => match looked.next() {
                        Some(Ok(Some(l))) => l,
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(None)) | None => return Ok(None),
                    },
                };
                let buf = bufs
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(loc.len as usize));
                self.read_located(id, loc, buf)
            })
            .collect()
    }

    /// Reads chunk `id`'s record at `loc`. When that fails, the chunk is looked up again:
    /// compaction may have copied it elsewhere, pointed the index at the copy and deleted
    /// the pack it was read from since `loc` was looked up. A new location is read (up to
    /// [`MOVED_RETRIES`] times); a chunk no longer stored at all (removed by prune) is
    /// `None`; the same location failing again is that read's error.
    fn read_located(
        &self,
        id: &ChunkId,
        mut loc: Location,
        buf: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        let mut buf = Some(buf);
        let mut moves = 0;
        loop {
            let b = buf
                .take()
                .unwrap_or_else(|| Vec::with_capacity(loc.len as usize));
            let e = match read_record_into(&*self.packs, id, &loc, Check::Header, b) {
                Ok(v) => return Ok(Some(v)),
                Err(e) => e,
            };
            let pending = lock(&self.state).pending.get(id).map(|(_, l)| *l);
            let now = match pending {
                Some(l) => Some(l),
                None => lock(&self.reader).chunk(id)?,
            };
            match now {
                Some(l) if l != loc && moves < MOVED_RETRIES => {
                    tracing::debug!(
                        repo = %self.name,
                        chunk = %id,
                        "chunk moved while it was read ({e}); reading it where it is now"
                    );
                    moves += 1;
                    loc = l;
                }
                None => return Ok(None),
                Some(_) => return Err(e.into()),
            }
        }
    }

    /// Versions after `after`, oldest first, paged.
    pub fn list_versions(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<VersionEntry>, bool), RepoError> {
        let limit = match limit as usize {
            0 => MAX_LIST_ENTRIES,
            n => n.min(MAX_LIST_ENTRIES),
        };
        Ok(lock(&self.reader).list_versions(after, limit, MAX_LIST_BYTES)?)
    }

    /// Adds a key file to the escrow's history. It must be a well-formed key file (its
    /// structure, checksum and Argon2id parameters within their bounds); one equal to an
    /// entry already there is not added again. Entries are never replaced or removed; past
    /// [`MAX_KEYFILES`] a new one is refused. A new entry is written atomically.
    pub fn put_keyfile(&self, data: &[u8]) -> Result<KeyFileStored, RepoError> {
        if data.len() > MAX_KEYFILE {
            return Err(RepoError::KeyFileTooLarge(data.len()));
        }
        coffer_common::keys::key_file_params(data)
            .map_err(|e| RepoError::KeyFileMalformed(e.to_string()))?;
        let _g = lock(&self.escrow);
        let entries = self.read_keyfiles()?;
        if let Some(e) = entries.iter().find(|e| e.data == data) {
            return Ok(KeyFileStored::Present(e.number));
        }
        if entries.len() >= MAX_KEYFILES {
            return Err(RepoError::KeyFilesFull);
        }
        let number = entries
            .first()
            .map_or(1, |e| e.number.saturating_add(1).max(1));
        create_dir_all(&self.dir.keyfiles(), 0o700)?;
        write_atomic(&self.dir.keyfile_entry(number), data, 0o600)?;
        Ok(KeyFileStored::Added(number))
    }

    /// The newest escrowed key file, if any.
    pub fn get_keyfile(&self) -> Result<Option<Vec<u8>>, RepoError> {
        let _g = lock(&self.escrow);
        Ok(self.read_keyfiles()?.into_iter().next().map(|e| e.data))
    }

    /// Every escrowed key file, newest first.
    pub fn get_keyfiles(&self) -> Result<Vec<EscrowedKeyFile>, RepoError> {
        let _g = lock(&self.escrow);
        self.read_keyfiles()
    }

    /// The history, newest first: the entries of `keyfiles/`, then an older receiver's
    /// single `keyfile` as entry 0. Other names in the folder (a temporary file) are not
    /// entries. At most [`MAX_KEYFILES`] are read (the newest).
    fn read_keyfiles(&self) -> Result<Vec<EscrowedKeyFile>, RepoError> {
        let read = |p: &std::path::Path| match std::fs::read(p) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::Io(IoError::new("reading", p, e))),
        };
        let dir = self.dir.keyfiles();
        let mut numbers = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(it) => {
                for e in it {
                    let e = e.map_err(|e| IoError::new("listing", &dir, e))?;
                    if let Some(n) = e.file_name().to_str().and_then(RepoDir::keyfile_named) {
                        numbers.push(n);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(IoError::new("listing", &dir, e).into()),
        }
        numbers.sort_unstable_by(|a, b| b.cmp(a));
        let mut out = Vec::new();
        for number in numbers {
            if let Some(data) = read(&self.dir.keyfile_entry(number))? {
                out.push(EscrowedKeyFile { number, data });
            }
        }
        if let Some(data) = read(&self.dir.keyfile())? {
            out.push(EscrowedKeyFile { number: 0, data });
        }
        out.truncate(MAX_KEYFILES);
        Ok(out)
    }

    /// Durable, indexed bytes of all packs (headers included): the recorded pack lengths,
    /// kept in memory, so this is cheap (for metrics).
    pub fn stored_bytes(&self) -> u64 {
        lock(&self.state).committed.values().sum()
    }

    /// Bytes the packs hold, flushed or not: what the quota counts.
    pub fn used_bytes(&self) -> u64 {
        lock(&self.state).held
    }

    /// Bytes of chunks written but not yet flushed (for tests and logs).
    pub fn pending_chunks(&self) -> usize {
        lock(&self.state).pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;
    use crate::store::LocalPacks;
    use coffer_common::chunk::FileId;
    use coffer_common::wire::{CommitId, Message};
    use std::path::Path;

    fn dir(root: &Path) -> RepoDir {
        Layout::new(root).repo(&RepoName::new("r").expect("name"))
    }

    fn packs(root: &Path) -> LocalPacks {
        LocalPacks::new(dir(root).packs())
    }

    fn open(root: &Path, pack_max: u64) -> (Repo, Recovery) {
        let name = RepoName::new("r").expect("name");
        Repo::open(&dir(root), name, Arc::new(packs(root)), pack_max).expect("open")
    }

    fn repo(root: &Path, pack_max: u64) -> Repo {
        open(root, pack_max).0
    }

    /// A well-formed key file (structure, parameters and checksum; what it seals is
    /// noise: the receiver cannot tell), different for each `seed`.
    fn key_file(seed: u32) -> Vec<u8> {
        let mut v = b"COFFERKF\x01\0\0\0".to_vec();
        for x in [19 * 1024u32, 2, 1] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        let mut rest = [0u8; 112 - 24];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut rest);
        v.extend_from_slice(&rest);
        let sum = *blake3::hash(&v).as_bytes();
        v.extend_from_slice(&sum);
        assert!(coffer_common::keys::key_file_params(&v).is_ok());
        v
    }

    fn numbers(r: &Repo) -> Vec<u32> {
        r.get_keyfiles()
            .expect("list")
            .iter()
            .map(|e| e.number)
            .collect()
    }

    #[test]
    fn escrowed_key_files_are_kept_and_only_well_formed_ones_accepted() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 1 << 20);
        assert_eq!(r.get_keyfile().expect("none"), None);
        // An older receiver's single key file is entry 0.
        std::fs::write(dir(d.path()).keyfile(), key_file(0)).expect("legacy");
        assert_eq!(
            r.put_keyfile(&key_file(1)).expect("put"),
            KeyFileStored::Added(1)
        );
        assert_eq!(
            r.put_keyfile(&key_file(0)).expect("put"),
            KeyFileStored::Present(0)
        );
        assert_eq!(
            r.put_keyfile(&key_file(1)).expect("put"),
            KeyFileStored::Present(1)
        );
        let mut junk = key_file(2);
        junk[30] ^= 1; // checksum no longer matches
        let mut greedy = key_file(3);
        greedy[12..16].copy_from_slice(&(4u32 << 20).to_le_bytes()); // 4 GiB of Argon2id
        let sum = *blake3::hash(&greedy[..112]).as_bytes();
        greedy[112..].copy_from_slice(&sum);
        for bad in [Vec::new(), b"junk".to_vec(), junk, greedy] {
            let e = r.put_keyfile(&bad).expect_err("refused");
            assert!(matches!(e, RepoError::KeyFileMalformed(_)), "{e}");
        }
        assert_eq!(
            r.put_keyfile(&key_file(4)).expect("put"),
            KeyFileStored::Added(2)
        );
        assert_eq!(numbers(&r), [2, 1, 0]);
        assert_eq!(r.get_keyfile().expect("newest"), Some(key_file(4)));
        let all = r.get_keyfiles().expect("all");
        assert_eq!(all[1].data, key_file(1));
        assert_eq!(all[2].data, key_file(0));
        // Nothing else was written: no temporary file, no replaced legacy file.
        let names: Vec<_> = std::fs::read_dir(dir(d.path()).keyfiles())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(
            std::fs::read(dir(d.path()).keyfile()).expect("legacy"),
            key_file(0)
        );
    }

    #[test]
    fn past_the_cap_a_new_key_file_is_refused_and_none_is_removed() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 1 << 20);
        for i in 0..MAX_KEYFILES as u32 {
            assert_eq!(
                r.put_keyfile(&key_file(i)).expect("put"),
                KeyFileStored::Added(i + 1)
            );
        }
        let e = r.put_keyfile(&key_file(1000)).expect_err("full");
        assert!(matches!(e, RepoError::KeyFilesFull), "{e}");
        assert!(e.to_string().contains("64 escrowed key files"), "{e}");
        // One already there is still a success, and every entry is still there.
        assert_eq!(
            r.put_keyfile(&key_file(0)).expect("present"),
            KeyFileStored::Present(1)
        );
        let all = r.get_keyfiles().expect("all");
        assert_eq!(all.len(), MAX_KEYFILES);
        assert_eq!(all[0].data, key_file(MAX_KEYFILES as u32 - 1));
        assert!(Message::KeyFiles { files: all }.encode().is_ok());
    }

    fn data(i: u32, len: usize) -> (ChunkId, Vec<u8>) {
        let mut v = vec![0u8; len];
        blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut v);
        (ChunkId(*blake3::hash(&v).as_bytes()), v)
    }

    fn commit(c: u8, chunks: Vec<ChunkId>) -> NewCommit {
        NewCommit {
            commit_id: CommitId([c; 16]),
            file_id: FileId([c; 32]),
            manifest: vec![c; 10],
            chunks,
            deleted: c.is_multiple_of(2),
        }
    }

    #[test]
    fn put_flush_get_and_rotation() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 1 << 20);
        let mut ids = Vec::new();
        for i in 0..40 {
            let (id, v) = data(i, if i % 3 == 0 { 200_000 } else { 3000 });
            assert!(r.put(&id, &v).expect("put"));
            assert!(!r.put(&id, &v).expect("dedup"));
            assert_eq!(r.get(&id).expect("get"), Some(v));
            ids.push(id);
        }
        assert!(r.missing(&ids).expect("missing").is_empty());
        let out = r.flush(&[commit(1, ids.clone())]).expect("flush");
        assert!(matches!(out[0], CommitOutcome::Acked { version: 1, .. }));
        assert_eq!(r.pending_chunks(), 0);
        drop(r);
        let (r, rec) = open(d.path(), 1 << 20);
        assert_eq!(rec, Recovery::default());
        for (i, id) in ids.iter().enumerate() {
            let (_, v) = data(i as u32, if i % 3 == 0 { 200_000 } else { 3000 });
            assert_eq!(r.get(id).expect("get"), Some(v));
        }
        assert!(packs(d.path()).list().expect("ls").len() > 2);
    }

    #[test]
    fn get_many_answers_each_chunk_in_order_wherever_it_is() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 1 << 20);
        let sizes = |i: u32| if i.is_multiple_of(4) { 300_000 } else { 5000 };
        let mut flushed = Vec::new();
        for i in 0..12 {
            let (id, v) = data(i, sizes(i));
            r.put(&id, &v).expect("put");
            flushed.push(id);
        }
        r.flush(&[commit(1, flushed.clone())]).expect("flush");
        // Two chunks put after the flush: in the pack buffer, not yet in the index.
        let (p1, vp1) = data(100, 4000);
        let (p2, vp2) = data(101, 250_000);
        r.put(&p1, &vp1).expect("put");
        r.put(&p2, &vp2).expect("put");
        // One record damaged on disk: its read fails alone.
        let broken = flushed[5];
        let loc = lock(&r.reader)
            .chunk(&broken)
            .expect("lookup")
            .expect("indexed");
        packs(d.path())
            .write_at(loc.pack, loc.offset, b"XXXX")
            .expect("damage");
        let absent = data(999, 10).0;
        let ask = vec![flushed[3], p2, absent, broken, flushed[0], p1, flushed[11]];
        let bufs = (0..3).map(|_| Vec::with_capacity(16)).collect();
        let got = r.get_many(&ask, bufs);
        assert_eq!(got.len(), ask.len());
        let want = |i: u32| Some(data(i, sizes(i)).1);
        assert_eq!(got[0].as_ref().expect("read"), &want(3));
        assert_eq!(got[1].as_ref().expect("read"), &Some(vp2));
        assert_eq!(got[2].as_ref().expect("read"), &None);
        let e = got[3].as_ref().expect_err("damaged record read");
        assert!(e.to_string().contains("damaged record"), "{e}");
        assert_eq!(got[4].as_ref().expect("read"), &want(0));
        assert_eq!(got[5].as_ref().expect("read"), &Some(vp1));
        assert_eq!(got[6].as_ref().expect("read"), &want(11));
    }

    #[test]
    fn unflushed_tail_is_reindexed_and_torn_tail_cut() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 64 << 20);
        let (a, va) = data(1, 100_000);
        let (b, vb) = data(2, 100_000);
        r.put(&a, &va).expect("put");
        r.flush(&[]).expect("flush");
        r.put(&b, &vb).expect("put");
        drop(r); // as after kill -9: b is in the pack, not in the index
        let packs = packs(d.path());
        let len = packs.len(PackNo(1)).expect("len");
        packs.write_at(PackNo(1), len, b"CREC torn").expect("tear");
        let (r, rec) = open(d.path(), 64 << 20);
        assert_eq!(rec.reindexed, 1);
        assert_eq!(rec.cut_bytes, 9);
        assert_eq!(r.get(&b).expect("get"), Some(vb));
        assert_eq!(packs.len(PackNo(1)).expect("len"), len);
    }

    #[test]
    fn rollback_discards_pending_and_cuts_packs() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 64 << 20);
        let (a, va) = data(1, 100_000);
        r.put(&a, &va).expect("put");
        r.flush(&[]).expect("flush");
        let (b, vb) = data(2, 100_000);
        r.put(&b, &vb).expect("put");
        r.rollback("test");
        assert_eq!(r.missing(&[a, b]).expect("missing"), vec![b]);
        let out = r.flush(&[commit(1, vec![a, b])]).expect("flush");
        assert_eq!(out[0], CommitOutcome::MissingChunks(vec![b]));
        let packs = packs(d.path());
        assert_eq!(
            packs.len(PackNo(1)).expect("len"),
            PACK_HEADER_LEN + RECORD_HEADER_LEN + 100_000
        );
        r.put(&b, &vb).expect("put again");
        let out = r.flush(&[commit(1, vec![a, b])]).expect("flush");
        assert!(matches!(out[0], CommitOutcome::Acked { .. }));
        assert_eq!(r.get(&b).expect("get"), Some(vb));
    }

    /// Every intact commit record in the repository's packs, in pack order.
    fn commit_records(root: &Path) -> Vec<(PackNo, u64, CommitRecord)> {
        let s = packs(root);
        let mut out = Vec::new();
        for p in s.list().expect("ls") {
            let len = s.len(p).expect("len");
            scan::<IoError>(&s, p, PACK_HEADER_LEN, len, |f| {
                if let Found::Commit {
                    header,
                    offset,
                    body,
                } = f
                {
                    let r = CommitRecord::decode(&header, body).expect("decodes");
                    out.push((p, offset, r));
                }
                Ok(())
            })
            .expect("scan");
        }
        out
    }

    fn acked(o: &CommitOutcome) -> (u64, i64) {
        match o {
            CommitOutcome::Acked {
                version,
                commit_time,
            } => (*version, *commit_time),
            other => panic!("not acknowledged: {other:?}"),
        }
    }

    /// Step 1 of a flush only (commit records appended and written out, nothing synced or
    /// indexed), as a flush of another session caught between its steps.
    fn step1(r: &Repo, commits: &[NewCommit]) -> Vec<CommitOutcome> {
        let gen = {
            let st = lock(&r.state);
            (st.indexed_gen, st.chunks_dropped)
        };
        let (known, indexed) = r.lookup(commits).expect("lookup");
        let mut st = lock(&r.state);
        let mut out = Vec::new();
        r.settle(&mut st, commits, &known, &indexed, gen, &mut out)
            .expect("settle");
        st.write_out(&*r.packs).expect("write out");
        out
    }

    #[test]
    fn every_flush_writes_commit_records_that_scan_reads_back() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 1 << 20);
        let (a, va) = data(1, 5000);
        let (b, vb) = data(2, 300_000);
        r.put(&a, &va).expect("put");
        r.put(&b, &vb).expect("put");
        let absent = data(3, 10).0;
        let out = r
            .flush(&[
                commit(1, vec![a, b, a]),
                commit(2, vec![b]),
                commit(3, vec![a, absent]),
                commit(1, vec![a, b, a]),
            ])
            .expect("flush");
        let (v1, t1) = acked(&out[0]);
        let (v2, _) = acked(&out[1]);
        assert_eq!(out[2], CommitOutcome::MissingChunks(vec![absent]));
        assert_eq!(acked(&out[3]), (v1, t1), "a repeat within the batch");
        assert_eq!((v1, v2), (1, 2));
        // A later flush: an indexed commit keeps its version and gets no second record.
        let out = r
            .flush(&[commit(1, vec![a, b]), commit(4, vec![a])])
            .expect("flush");
        assert_eq!(acked(&out[0]), (v1, t1));
        assert_eq!(acked(&out[1]).0, 3);
        let recs = commit_records(d.path());
        let got: Vec<_> = recs
            .iter()
            .map(|(_, _, c)| (c.version, c.commit_id.0[0], c.deletion, c.chunks.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 1, Deletion::No, vec![a, b]),
                (2, 2, Deletion::Yes, vec![b]),
                (3, 4, Deletion::Yes, vec![a]),
            ]
        );
        assert_eq!(recs[0].2.commit_time, t1);
        assert_eq!(recs[0].2.manifest, vec![1; 10]);
        assert_eq!(recs[0].2.file_id, FileId([1; 32]));
        // Each record lies after the chunks it references, below the indexed length, and
        // the index knows where it is.
        let w = lock(&r.writer);
        assert_eq!(w.unrecorded_count().expect("count"), 0);
        let lens: HashMap<PackNo, u64> = w.pack_lengths().expect("lengths").into_iter().collect();
        for (p, off, c) in &recs {
            assert!(*off < lens[p], "record of version {} indexed", c.version);
            for id in &c.chunks {
                let l = w.chunk(id).expect("q").expect("indexed");
                assert!((l.pack, l.offset) < (*p, *off), "chunk before its record");
            }
        }
    }

    #[test]
    fn a_commit_pending_in_another_flush_gets_that_version_and_is_indexed_with_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 1 << 20);
        let (a, va) = data(1, 5000);
        r.put(&a, &va).expect("put");
        // Another session's flush has written its records and waits for its fsync.
        let theirs = step1(&r, &[commit(1, vec![a]), commit(2, vec![a])]);
        let (v1, t1) = acked(&theirs[0]);
        let (v2, _) = acked(&theirs[1]);
        assert_eq!(lock(&r.state).pending_commits.len(), 2);
        // This session commits the same commit, and one of its own.
        let ours = r
            .flush(&[commit(1, vec![a]), commit(3, vec![a])])
            .expect("flush");
        assert_eq!(acked(&ours[0]), (v1, t1), "the pending record's version");
        assert_eq!(acked(&ours[1]).0, v2 + 1);
        // Its flush indexed the other session's records too (their bytes came before).
        assert!(lock(&r.state).pending_commits.is_empty());
        let rd = lock(&r.reader);
        assert_eq!(
            rd.find_version(&FileId([2; 32]), &CommitId([2; 16]))
                .expect("q"),
            Some((v2, t1))
        );
        drop(rd);
        assert_eq!(commit_records(d.path()).len(), 3, "one record per version");
        // The other session's flush, resumed, finds nothing left to do but succeeds.
        let out = r.flush(&[commit(1, vec![a])]).expect("flush");
        assert_eq!(acked(&out[0]), (v1, t1));
    }

    #[test]
    fn rollback_forgets_pending_commits_and_their_numbers_are_not_reused() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 64 << 20);
        let (a, va) = data(1, 5000);
        r.put(&a, &va).expect("put");
        r.flush(&[]).expect("flush");
        let lost = step1(&r, &[commit(1, vec![a])]);
        let (v, _) = acked(&lost[0]);
        r.rollback("test");
        assert!(lock(&r.state).pending_commits.is_empty());
        assert!(commit_records(d.path()).is_empty(), "the record was cut");
        let out = r.flush(&[commit(1, vec![a])]).expect("flush");
        let (again, _) = acked(&out[0]);
        assert!(again > v, "{again} after {v}");
        let recs = commit_records(d.path());
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].2.version, again);
    }

    #[test]
    fn recovery_reindexes_a_synced_commit_record_and_a_recommit_gets_its_version() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 64 << 20);
        let (a, va) = data(1, 5000);
        r.put(&a, &va).expect("put");
        r.flush(&[commit(1, vec![a])]).expect("flush");
        let (b, vb) = data(2, 5000);
        r.put(&b, &vb).expect("put");
        // Records written and synced, then a crash before the index transaction.
        let out = step1(&r, &[commit(2, vec![a, b])]);
        let (v, t) = acked(&out[0]);
        r.packs.sync(PackNo(1)).expect("sync");
        drop(r);
        // Past the end too: a commit record whose chunk never arrived (never acknowledged).
        let s = packs(d.path());
        let len = s.len(PackNo(1)).expect("len");
        let orphan = CommitRecord {
            commit_id: CommitId([9; 16]),
            file_id: FileId([9; 32]),
            version: 40,
            commit_time: 1,
            deletion: Deletion::No,
            manifest: vec![9; 5],
            chunks: vec![data(99, 10).0],
        };
        let mut bytes = Vec::new();
        orphan.encode_into(&mut bytes);
        s.write_at(PackNo(1), len, &bytes).expect("write");
        let (r, rec) = open(d.path(), 64 << 20);
        assert_eq!(
            (rec.reindexed, rec.reindexed_commits, rec.skipped_commits),
            (1, 1, 1)
        );
        let out = r.flush(&[commit(2, vec![a, b])]).expect("re-commit");
        assert_eq!(acked(&out[0]), (v, t));
        // Numbers carried by records left out are not given again.
        let out = r.flush(&[commit(3, vec![a])]).expect("commit");
        assert_eq!(acked(&out[0]).0, 41);
        drop(r);
        let (_, rec) = open(d.path(), 64 << 20);
        assert_eq!(rec, Recovery::default(), "nothing left to recover");
    }

    /// A repository as a release before commit records left it: version 1 packs of chunk
    /// records, versions only in the index. Returns the versions' (number, chunk ids).
    fn legacy_repo(root: &Path, versions: u32) -> Vec<(u64, Vec<ChunkId>)> {
        let r = repo(root, 64 << 20);
        let mut ids = Vec::new();
        for i in 0..20 {
            let (id, v) = data(i, 1000);
            r.put(&id, &v).expect("put");
            ids.push(id);
        }
        r.flush(&[]).expect("flush");
        let mut out = Vec::new();
        {
            let mut w = lock(&r.writer);
            for i in 0..versions {
                let chunks = vec![ids[i as usize % 20], ids[(i as usize + 7) % 20]];
                let mut c = [0u8; 16];
                c[..4].copy_from_slice(&i.to_le_bytes());
                let v = w
                    .add_legacy(
                        &FileId([(i % 7) as u8; 32]),
                        &CommitId(c),
                        1_600_000_000 + i as i64,
                        &[i as u8; 30],
                        &chunks,
                    )
                    .expect("legacy version");
                out.push((v, chunks));
            }
        }
        drop(r);
        packs(root)
            .write_at(PackNo(1), 8, &1u32.to_le_bytes())
            .expect("version 1 header");
        out
    }

    #[test]
    fn the_upgrade_writes_each_version_once_resumes_after_a_crash_and_ends() {
        let d = tempfile::tempdir().expect("tempdir");
        let n = UPGRADE_VERSIONS as u32 + 300;
        let legacy = legacy_repo(d.path(), n);
        // Stopped after the first batch was synced, before the index learnt of it.
        let (r, _) = Repo::open_recovered(
            &dir(d.path()),
            RepoName::new("r").expect("name"),
            Arc::new(packs(d.path())),
            64 << 20,
        )
        .expect("open");
        assert!(r.upgrade_write(0).expect("batch").is_some());
        drop(r);
        assert_eq!(commit_records(d.path()).len(), UPGRADE_VERSIONS);
        let (r, rec) = open(d.path(), 64 << 20);
        assert_eq!(
            rec.reindexed_commits, UPGRADE_VERSIONS,
            "found past the end"
        );
        assert_eq!(rec.upgraded, 300, "the rest written");
        assert_eq!(lock(&r.writer).unrecorded_count().expect("count"), 0);
        let recs = commit_records(d.path());
        assert!(
            recs.iter().all(|(p, _, _)| *p != PackNo(1)),
            "never in a v1 pack"
        );
        let got: Vec<(u64, Vec<ChunkId>)> = recs
            .iter()
            .map(|(_, _, c)| {
                assert_eq!(c.deletion, Deletion::Unknown);
                (c.version, c.chunks.clone())
            })
            .collect();
        let mut want = legacy.clone();
        for (_, c) in &mut want {
            c.sort();
        }
        assert_eq!(got, want, "each version once, oldest first");
        assert_eq!(recs[5].2.manifest, vec![5; 30]);
        assert_eq!(recs[5].2.commit_time, 1_600_000_005);
        // New commits go on after the highest, into a version 2 pack.
        let (a, va) = data(500, 100);
        r.put(&a, &va).expect("put");
        let out = r.flush(&[commit(1, vec![a])]).expect("flush");
        assert_eq!(acked(&out[0]).0, legacy.len() as u64 + 1);
        drop(r);
        let (_, rec) = open(d.path(), 64 << 20);
        assert_eq!(rec, Recovery::default(), "a second open does nothing");
        assert_eq!(commit_records(d.path()).len(), n as usize + 1);
        assert_eq!(
            pack_version(&packs(d.path()), PackNo(1)).expect("header"),
            Some(1),
            "the old pack stays as it was"
        );
    }

    /// A second connection to the index, as compaction changes it (tests only).
    fn sql(root: &Path) -> rusqlite::Connection {
        rusqlite::Connection::open(dir(root).index()).expect("open index")
    }

    #[test]
    fn a_read_follows_a_chunk_that_compaction_moved_and_a_removed_one_is_absent() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = repo(d.path(), 64 << 20);
        let (a, va) = data(1, 5000);
        let (b, vb) = data(2, 300_000);
        let (c, vc) = data(3, 7000);
        for (id, v) in [(&a, &va), (&b, &vb), (&c, &vc)] {
            r.put(id, v).expect("put");
        }
        r.flush(&[]).expect("flush");
        let stale = |id: &ChunkId| lock(&r.reader).chunk(id).expect("q").expect("indexed");
        let (la, lb, lc) = (stale(&a), stale(&b), stale(&c));
        // Compaction: `a` and `b` copied into a pack of their own and the index pointed
        // at the copies, the old records gone; `c` removed by prune.
        let store = packs(d.path());
        let p = PackNo(40);
        store.create(p).expect("create");
        let mut at = PACK_HEADER_LEN;
        for (id, v) in [(&a, &va), (&b, &vb)] {
            let h = RecordHeader {
                id: *id,
                len: v.len() as u32,
                hash: sealed_hash(v),
            };
            store.write_at(p, at, &h.encode()).expect("write");
            store.write_at(p, at + RECORD_HEADER_LEN, v).expect("write");
            sql(d.path())
                .execute(
                    "UPDATE chunks SET pack = ?1, offset = ?2 WHERE id = ?3",
                    rusqlite::params![p.0, at, id],
                )
                .expect("move");
            at += RECORD_HEADER_LEN + v.len() as u64;
        }
        sql(d.path())
            .execute("DELETE FROM chunks WHERE id = ?1", [&c])
            .expect("delete");
        for l in [la, lb, lc] {
            store
                .write_at(l.pack, l.offset, &[0u8; RECORD_HEADER_LEN as usize])
                .expect("wipe");
        }
        // Reads that looked the chunks up before all that.
        assert_eq!(
            r.read_located(&a, la, Vec::new()).expect("a"),
            Some(va.clone())
        );
        assert_eq!(r.read_located(&b, lb, Vec::new()).expect("b"), Some(vb));
        assert_eq!(r.read_located(&c, lc, Vec::new()).expect("c"), None);
        // Its old pack deleted: followed as well.
        std::fs::remove_file(dir(d.path()).packs().pack(la.pack)).expect("rm");
        let fresh = packs(d.path());
        let gone = crate::store::read_record(&fresh, &a, &la, Check::Header);
        assert!(gone.is_err(), "the old pack is gone");
        assert_eq!(r.read_located(&a, la, Vec::new()).expect("a"), Some(va));
        // A record damaged where the index still points fails its read.
        let lb2 = stale(&b);
        store
            .write_at(lb2.pack, lb2.offset, b"XXXX")
            .expect("damage");
        let e = r.read_located(&b, lb2, Vec::new()).expect_err("damaged");
        assert!(e.to_string().contains("damaged record"), "{e}");
    }
}
