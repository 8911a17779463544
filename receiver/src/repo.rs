//! One repository: its write path (appending chunks to packs, group commit into the
//! index, rollback after a storage failure), its reads (chunks, versions), the escrowed key
//! files (a history an agent can add to but never replace or shorten), and recovery when it
//! is opened. Its packs are in the [`PackStore`] it is given.
//!
//! Write order (the durability contract):
//! 1. `put` appends a record to the open pack (through a small buffer) and remembers the
//!    chunk as *pending*: visible to presence queries and commits, not yet indexed.
//! 2. `flush` writes the buffer out and fsyncs every pack written since the last flush
//!    (a new pack's file and directory entry were made durable when it was created),
//! 3. then, in ONE index transaction, inserts the pending chunk rows, raises the recorded
//!    pack lengths, and records the batch's commits (each re-checked against the index);
//! 4. only after that transaction commits does the caller acknowledge the commits.
//!
//! Locks: `writer` (index transactions) is taken before `state`; `reader` (index queries)
//! is only ever taken last. The fsync of step 2 runs under no lock, so other sessions keep
//! appending while one waits for the disk.
//!
//! A write or fsync failure (e.g. a full disk) rolls back: every pack is cut to its
//! recorded length, every pending chunk is forgotten and the *epoch* moves on, so any
//! flush that was in progress fails instead of indexing bytes that are gone. Nothing from
//! the failed batch is acknowledged; the agent sends it again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use coffer_common::chunk::ChunkId;
use coffer_common::host::fs::{create_dir_all, write_atomic, IoError};
use coffer_common::host::time::now_secs;
use coffer_common::wire::{sealed_hash, EscrowedKeyFile, VersionEntry, MAX_KEYFILES};

use crate::auth::RepoName;
use crate::index::{first_of_each, CommitOutcome, Index, IndexError, Mode, NewCommit};
use crate::layout::RepoDir;
use crate::store::{
    header_ok, pack_header, read_record_into, scan, Check, Found, Location, PackNo, PackStore,
    RecordError, RecordHeader, PACK_HEADER_LEN, RECORD_HEADER_LEN,
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
    seq: u64,
    epoch: u64,
    /// Bytes the packs hold (headers, records and the buffer): the quota's count.
    held: u64,
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
    /// Intact records past the indexed length that were added to the index.
    pub reindexed: usize,
    /// Bytes of torn tails cut off.
    pub cut_bytes: u64,
}

impl Repo {
    /// Opens (creating if needed) the repository in `dir`, whose packs are in `packs`, and
    /// repairs what a crash left: intact records past a pack's recorded length are fsynced
    /// and indexed, a torn tail is cut. Packs shorter than recorded are reported and never
    /// appended to.
    pub fn open(
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
                // Commit records past the indexed end are not yet re-indexed here.
                let mut rows = Vec::new();
                let sc_end = scan::<IoError>(&*packs, p, indexed, file_len, |f| {
                    if let Found::Chunk { id, loc } = f {
                        rows.push((id, loc));
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
                if !rows.is_empty() {
                    packs.sync(p)?;
                    tracing::info!(
                        repo = %name,
                        "re-indexed {} intact chunks found past the indexed end of {}",
                        rows.len(),
                        packs.describe(p)
                    );
                }
                rec.reindexed += rows.len();
                writer.commit_batch(&rows, &[(p, sc_end)], &[], 0)?;
                end = sc_end;
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
        if let Some((p, end)) = appendable {
            if p.0 == max && end < pack_max {
                st.cur = Some(p);
                st.cur_len = end;
                st.buf_at = end;
            }
        }
        st.held = st.committed.values().sum();
        let reader = Index::open(&index_path, Mode::Read)?;
        Ok((
            Self {
                name,
                dir: dir.clone(),
                packs,
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                state: Mutex::new(st),
                pack_max,
                escrow: Mutex::new(()),
                limits: Default::default(),
            },
            rec,
        ))
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
        let rec_len = RECORD_HEADER_LEN + sealed.len() as u64;
        let full = st.cur_len + rec_len > self.pack_max && st.cur_len > PACK_HEADER_LEN;
        if st.cur.is_none() || full {
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
        }
        let Some(pack) = st.cur else {
            return Ok(());
        };
        let header = RecordHeader {
            id: *id,
            len: sealed.len() as u32,
            hash,
        }
        .encode();
        let offset = st.cur_len;
        if sealed.len() <= SMALL_RECORD {
            if st.buf.len() + rec_len as usize > BUFFER {
                st.write_out(&*self.packs)?;
            }
            if st.buf.is_empty() {
                st.buf_at = offset;
            }
            st.buf.extend_from_slice(&header);
            st.buf.extend_from_slice(sealed);
        } else {
            st.write_out(&*self.packs)?;
            self.packs.write_at(pack, offset, &header)?;
            self.packs
                .write_at(pack, offset + RECORD_HEADER_LEN, sealed)?;
            st.buf_at = offset + rec_len;
            st.dirty.insert(pack, offset + rec_len);
        }
        st.cur_len = offset + rec_len;
        st.held += rec_len;
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

    /// Makes everything stored so far durable and indexed, and records `commits`, in one
    /// index transaction. On success every outcome is final and may be acknowledged.
    pub fn flush(&self, commits: &[NewCommit]) -> Result<Vec<CommitOutcome>, RepoError> {
        // 1. Write the buffer out; note what must be synced.
        let (snapshot, seq_hi, epoch) = {
            let mut st = lock(&self.state);
            let r = st.write_out(&*self.packs);
            let snap = (st.dirty.clone(), st.seq, st.epoch);
            drop(st);
            if let Err(e) = r {
                self.rollback(&e.to_string());
                return Err(e.into());
            }
            snap
        };
        if snapshot.is_empty() && commits.is_empty() {
            return Ok(Vec::new());
        }
        // 2. fsync, under no lock.
        for p in snapshot.keys() {
            if let Err(e) = self.packs.sync(*p) {
                self.rollback(&e.to_string());
                return Err(e.into());
            }
        }
        // 3. One transaction.
        let mut w = lock(&self.writer);
        let rows: Vec<(ChunkId, Location)> = {
            let st = lock(&self.state);
            if st.epoch != epoch {
                return Err(RepoError::RolledBack);
            }
            st.order
                .iter()
                .take_while(|(s, _)| *s < seq_hi)
                .filter_map(|(s, id)| match st.pending.get(id) {
                    Some((ps, loc)) if ps == s => Some((*id, *loc)),
                    _ => None,
                })
                .collect()
        };
        let packs: Vec<(PackNo, u64)> = snapshot.iter().map(|(p, l)| (*p, *l)).collect();
        let out = match w.commit_batch(&rows, &packs, commits, now_secs()) {
            Ok(out) => out,
            Err(e) => {
                self.rollback_locked(&mut w, &e.to_string());
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
        for (p, l) in snapshot {
            let c = st.committed.entry(p).or_insert(l);
            *c = (*c).max(l);
            if st.dirty.get(&p).is_some_and(|d| *d <= l) {
                st.dirty.remove(&p);
            }
        }
        Ok(out)
    }

    fn rollback(&self, why: &str) {
        let mut w = lock(&self.writer);
        self.rollback_locked(&mut w, why);
    }

    /// Cuts every pack back to its recorded length and forgets pending chunks. The caller
    /// holds the writer lock, so no index transaction can be using them.
    fn rollback_locked(&self, _writer: &mut Index, why: &str) {
        let mut st = lock(&self.state);
        tracing::warn!(
            repo = %self.name,
            "storage error ({why}); discarding {} unindexed chunks and cutting packs back to \
             their recorded length",
            st.pending.len()
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
                Ok(Some(read_record_into(
                    &*self.packs,
                    id,
                    &loc,
                    Check::Header,
                    buf,
                )?))
            })
            .collect()
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
}
