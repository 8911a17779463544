//! Pack files: the append-only homes of sealed chunks, behind the [`PackStore`] trait.
//!
//! ```text
//! pack header (16 bytes)  "COFRPACK" | format version u32 LE (1 or 2) | reserved u32 (0)
//! record (72 + n bytes)   "CREC" | chunk id (32) | n = sealed length u32 LE
//!                         | BLAKE3(sealed) (32) | sealed (n)
//! ```
//!
//! Version 2 packs may also hold commit records ([`crate::records`]); packs are created as
//! version 2, version 1 packs (chunk records only) stay readable and are never appended to.
//!
//! Records are self-describing, so `scrub` checks them without a key and the index can be
//! rebuilt from the packs. The store only moves bytes; when they are durable and which
//! records count is decided by [`crate::repo`].
//!
//! Which store holds a repository's packs is chosen once, by the command line, as a
//! [`PackStores`] given to `serve`, `status` and `scrub`: [`LocalDisk`] keeps them as
//! files ([`LocalPacks`]) where [`crate::layout`] puts them.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use coffer_common::chunk::{ChunkId, MAX_SEALED};
use coffer_common::host::fs::{sync_dir, Context, IoError};

use crate::layout::{PacksDir, RepoDir};
use crate::records::{CommitHeader, Header, RemovalHeader};

/// Magic at the start of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"COFRPACK";
/// Format version of the packs this build creates (2: may hold commit records).
pub const PACK_VERSION: u32 = 2;
/// Oldest pack format version this build reads (1: chunk records only).
pub const PACK_VERSION_MIN: u32 = 1;
/// Length of the pack header.
pub const PACK_HEADER_LEN: u64 = 16;
/// Magic at the start of every record.
pub const RECORD_MAGIC: &[u8; 4] = b"CREC";
/// Length of a record header.
pub const RECORD_HEADER_LEN: u64 = 72;

/// A pack's number (its file name is [`PacksDir::pack`]'s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackNo(pub u32);

/// The pack header bytes.
pub fn pack_header() -> [u8; PACK_HEADER_LEN as usize] {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h
}

/// A record header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub id: ChunkId,
    pub len: u32,
    pub hash: [u8; 32],
}

impl RecordHeader {
    /// The header for `sealed` stored under `id`, whose BLAKE3 is `hash`.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN as usize] {
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        h[..4].copy_from_slice(RECORD_MAGIC);
        h[4..36].copy_from_slice(&self.id.0);
        h[36..40].copy_from_slice(&self.len.to_le_bytes());
        h[40..72].copy_from_slice(&self.hash);
        h
    }

    /// Decodes a header; `None` if the magic is wrong or the length is impossible.
    pub fn decode(h: &[u8]) -> Option<Self> {
        if h.len() < RECORD_HEADER_LEN as usize || &h[..4] != RECORD_MAGIC {
            return None;
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&h[4..36]);
        let len = u32::from_le_bytes([h[36], h[37], h[38], h[39]]);
        if len as usize > MAX_SEALED {
            return None;
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&h[40..72]);
        Some(Self {
            id: ChunkId(id),
            len,
            hash,
        })
    }

    /// Bytes the whole record takes.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN + self.len as u64
    }
}

/// Where a stored record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: PackNo,
    /// Offset of the record (its header) in the pack.
    pub offset: u64,
    /// Length of the sealed bytes.
    pub len: u32,
    /// BLAKE3 of the sealed bytes.
    pub hash: [u8; 32],
}

impl Location {
    /// Offset just past the record.
    pub fn end(&self) -> u64 {
        self.offset + RECORD_HEADER_LEN + self.len as u64
    }
}

/// Where packs live. The local-disk implementation is [`LocalPacks`]; an object store
/// would keep the open pack locally and upload it whole when it is closed.
pub trait PackStore: Send + Sync {
    /// A human-readable name of a pack (its path), for messages.
    fn describe(&self, pack: PackNo) -> String;
    /// Every pack present, ascending.
    fn list(&self) -> Result<Vec<PackNo>, IoError>;
    /// A pack's current length.
    fn len(&self, pack: PackNo) -> Result<u64, IoError>;
    /// Creates a new pack holding only its header, durably (file and directory entry).
    fn create(&self, pack: PackNo) -> Result<(), IoError>;
    /// Writes `data` at `offset` (not yet durable).
    fn write_at(&self, pack: PackNo, offset: u64, data: &[u8]) -> Result<(), IoError>;
    /// Makes everything written to `pack` durable.
    fn sync(&self, pack: PackNo) -> Result<(), IoError>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, pack: PackNo, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Cuts `pack` to `len` bytes, durably.
    fn truncate(&self, pack: PackNo, len: u64) -> Result<(), IoError>;
    /// Deletes `pack`, durably (compaction, once nothing the index holds is in it). A pack
    /// already gone is not an error.
    fn remove(&self, pack: PackNo) -> Result<(), IoError>;
}

/// Chooses where repositories keep their packs: the one place a [`PackStore`] is built.
pub trait PackStores: Send + Sync + std::fmt::Debug {
    /// The pack store of the repository in `repo` (nothing is created or read yet).
    fn open(&self, repo: &RepoDir) -> Arc<dyn PackStore>;
}

/// Packs as files on the local disk, in each repository's `packs/` directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalDisk;

impl PackStores for LocalDisk {
    fn open(&self, repo: &RepoDir) -> Arc<dyn PackStore> {
        Arc::new(LocalPacks::new(repo.packs()))
    }
}

/// How many pack files [`LocalPacks`] keeps open.
const OPEN_FILES: usize = 8;

/// Packs as files in a local directory.
pub struct LocalPacks {
    dir: PacksDir,
    open: Mutex<VecDeque<(PackNo, Arc<File>)>>,
}

impl LocalPacks {
    /// Packs in `dir` (created by [`RepoDir::create`] before any is written).
    pub fn new(dir: PacksDir) -> Self {
        Self {
            dir,
            open: Mutex::new(VecDeque::new()),
        }
    }

    fn path(&self, pack: PackNo) -> PathBuf {
        self.dir.pack(pack)
    }

    /// An error of `what` on `pack`'s file (its path built only on error).
    fn err(&self, what: &'static str, pack: PackNo) -> impl FnOnce(io::Error) -> IoError + '_ {
        move |e| IoError::new(what, self.path(pack), e)
    }

    fn file(&self, pack: PackNo) -> Result<Arc<File>, IoError> {
        let mut open = match self.open.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(i) = open.iter().position(|(p, _)| *p == pack) {
            if let Some(e) = open.remove(i) {
                let f = e.1.clone();
                open.push_front(e);
                return Ok(f);
            }
        }
        let path = self.path(pack);
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .ctx("opening", &path)?,
        );
        open.push_front((pack, f.clone()));
        open.truncate(OPEN_FILES);
        Ok(f)
    }
}

impl PackStore for LocalPacks {
    fn describe(&self, pack: PackNo) -> String {
        self.path(pack).display().to_string()
    }

    /// A missing directory holds no packs.
    fn list(&self) -> Result<Vec<PackNo>, IoError> {
        let dir = self.dir.path();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(IoError::new("listing", dir, e)),
        };
        let mut v = Vec::new();
        for e in entries {
            let e = e.ctx("listing", dir)?;
            if let Some(p) = e.file_name().to_str().and_then(PacksDir::pack_named) {
                v.push(p);
            }
        }
        v.sort();
        Ok(v)
    }

    fn len(&self, pack: PackNo) -> Result<u64, IoError> {
        Ok(self
            .file(pack)?
            .metadata()
            .map_err(self.err("reading size of", pack))?
            .len())
    }

    fn create(&self, pack: PackNo) -> Result<(), IoError> {
        let path = self.path(pack);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx("creating", &path)?;
        let r = f
            .write_all_at(&pack_header(), 0)
            .and_then(|_| f.sync_all())
            .ctx("writing", &path)
            .and_then(|_| sync_dir(self.dir.path()));
        if r.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        r
    }

    fn write_at(&self, pack: PackNo, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.file(pack)?
            .write_all_at(data, offset)
            .map_err(self.err("writing", pack))
    }

    fn sync(&self, pack: PackNo) -> Result<(), IoError> {
        self.file(pack)?
            .sync_data()
            .map_err(self.err("syncing", pack))
    }

    fn read_at(&self, pack: PackNo, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.file(pack)?
            .read_exact_at(buf, offset)
            .map_err(self.err("reading", pack))
    }

    fn truncate(&self, pack: PackNo, len: u64) -> Result<(), IoError> {
        let f = self.file(pack)?;
        let path = self.path(pack);
        f.set_len(len).ctx("truncating", &path)?;
        f.sync_all().ctx("syncing", &path)
    }

    fn remove(&self, pack: PackNo) -> Result<(), IoError> {
        // The cached descriptor goes first, so the file's space is freed when it is
        // unlinked (a reader holding a clone finishes its read first).
        {
            let mut open = match self.open.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            open.retain(|(p, _)| *p != pack);
        }
        let path = self.path(pack);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(IoError::new("removing", &path, e)),
        }
        sync_dir(self.dir.path())
    }
}

/// Why a record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("damaged record in {pack} at offset {offset} (chunk {id}): {why}")]
    Damaged {
        pack: String,
        offset: u64,
        id: ChunkId,
        why: String,
    },
}

/// How much [`read_record`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The header (magic, id, length) and the BLAKE3 of the sealed bytes against the
    /// record's and the index's hash: `scrub`, which has no other way to find damage.
    Full,
    /// The header only: serving a chunk to the agent, which opens it (tag, then id)
    /// before using a byte, so damage reaches it as a failed open naming the file.
    Header,
}

/// Reads the record at `loc`, checking that it is the one expected for `id` (and, with
/// [`Check::Full`], that its bytes hash to what was stored); returns the sealed bytes.
pub fn read_record(
    store: &dyn PackStore,
    id: &ChunkId,
    loc: &Location,
    check: Check,
) -> Result<Vec<u8>, RecordError> {
    read_record_into(store, id, loc, check, Vec::new())
}

/// [`read_record`] into `buf`, a buffer to reuse (its contents are replaced).
pub fn read_record_into(
    store: &dyn PackStore,
    id: &ChunkId,
    loc: &Location,
    check: Check,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, RecordError> {
    let damaged = |why: String| RecordError::Damaged {
        pack: store.describe(loc.pack),
        offset: loc.offset,
        id: *id,
        why,
    };
    // Header and sealed bytes are read into separate buffers, so the sealed bytes need no
    // shift afterwards: their buffer is what goes out.
    let read = |offset: u64, buf: &mut [u8]| match store.read_at(loc.pack, offset, buf) {
        Err(e) if e.source.kind() == io::ErrorKind::UnexpectedEof => {
            Err(damaged("the pack ends before the record does".into()))
        }
        r => r.map_err(RecordError::from),
    };
    let mut head = [0u8; RECORD_HEADER_LEN as usize];
    read(loc.offset, &mut head)?;
    let h = RecordHeader::decode(&head).ok_or_else(|| damaged("bad record header".into()))?;
    if h.id != *id {
        return Err(damaged(format!("the record holds chunk {}", h.id)));
    }
    if h.len != loc.len {
        return Err(damaged(format!(
            "the record is {} bytes, the index says {}",
            h.len, loc.len
        )));
    }
    // Only bytes past the buffer's current length are zeroed first.
    buf.resize(loc.len as usize, 0);
    let mut sealed = buf;
    read(loc.offset + RECORD_HEADER_LEN, &mut sealed)?;
    if check == Check::Full {
        let actual = blake3::hash(&sealed);
        if actual.as_bytes() != &h.hash || h.hash != loc.hash {
            return Err(damaged("the sealed bytes do not match their hash".into()));
        }
    }
    Ok(sealed)
}

/// A whole, intact record found by [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found<'a> {
    /// A chunk record.
    Chunk { id: ChunkId, loc: Location },
    /// A commit record at `offset`, whose body (checked against its hash, not yet decoded:
    /// [`crate::records::CommitRecord::decode`]) is `body`.
    Commit {
        header: CommitHeader,
        offset: u64,
        body: &'a [u8],
    },
    /// A removal record at `offset`, whose body (checked against its hash, not yet
    /// decoded: [`crate::records::RemovalRecord::decode`]) is `body`.
    Removal {
        header: RemovalHeader,
        offset: u64,
        body: &'a [u8],
    },
}

/// Reads the records of `pack` from `from` to `len`, handing each whole, intact one (of
/// any kind) to `f` in order, and stops at the first one that is incomplete, has a bad
/// header or does not match its hash. Returns the offset just past the last intact record:
/// everything after it is a torn tail. One record's body is in memory at a time.
pub fn scan<E: From<IoError>>(
    store: &dyn PackStore,
    pack: PackNo,
    from: u64,
    len: u64,
    mut f: impl FnMut(Found<'_>) -> Result<(), E>,
) -> Result<u64, E> {
    let mut at = from;
    let mut header = [0u8; RECORD_HEADER_LEN as usize];
    let mut data = Vec::new();
    while at + RECORD_HEADER_LEN <= len {
        store.read_at(pack, at, &mut header)?;
        let Some(h) = Header::decode(&header) else {
            break;
        };
        if at + h.record_len() > len {
            break;
        }
        data.resize(h.body_len() as usize, 0);
        store.read_at(pack, at + RECORD_HEADER_LEN, &mut data)?;
        if blake3::hash(&data).as_bytes() != h.hash() {
            break;
        }
        match h {
            Header::Chunk(c) => f(Found::Chunk {
                id: c.id,
                loc: Location {
                    pack,
                    offset: at,
                    len: c.len,
                    hash: c.hash,
                },
            })?,
            Header::Commit(c) => f(Found::Commit {
                header: c,
                offset: at,
                body: &data,
            })?,
            Header::Removal(r) => f(Found::Removal {
                header: r,
                offset: at,
                body: &data,
            })?,
        }
        at += h.record_len();
    }
    Ok(at)
}

/// Checks a pack's header: true when it is one this build reads (version 1 or 2).
pub fn header_ok(store: &dyn PackStore, pack: PackNo) -> Result<bool, IoError> {
    Ok(pack_version(store, pack)?.is_some())
}

/// The format version of a pack whose header is well-formed and of a version this build
/// reads; `None` for a header that is short, damaged or of an unknown version.
pub fn pack_version(store: &dyn PackStore, pack: PackNo) -> Result<Option<u32>, IoError> {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    match store.read_at(pack, 0, &mut h) {
        Ok(()) => {}
        Err(e) if e.source.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let v = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let known = (PACK_VERSION_MIN..=PACK_VERSION).contains(&v);
    Ok((&h[..8] == PACK_MAGIC && known && h[12..] == [0; 4]).then_some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u8, sealed: &[u8]) -> Vec<u8> {
        let h = RecordHeader {
            id: ChunkId([id; 32]),
            len: sealed.len() as u32,
            hash: *blake3::hash(sealed).as_bytes(),
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(sealed);
        v
    }

    /// The chunk records `scan` finds, and where it stopped.
    fn chunks_in(s: &dyn PackStore, p: PackNo, from: u64, len: u64) -> (Vec<Location>, u64) {
        let mut locs = Vec::new();
        let end = scan::<IoError>(s, p, from, len, |f| {
            if let Found::Chunk { loc, .. } = f {
                locs.push(loc);
            }
            Ok(())
        })
        .expect("scan");
        (locs, end)
    }

    #[test]
    fn scan_hands_over_commit_records_between_chunk_records() {
        use crate::records::{CommitRecord, Deletion};
        use coffer_common::chunk::FileId;
        use coffer_common::wire::CommitId;
        let d = tempfile::tempdir().expect("tempdir");
        let repo = crate::Layout::new(d.path()).repo(&"r".parse().expect("name"));
        repo.create().expect("create");
        let s = LocalPacks::new(repo.packs());
        let p = PackNo(1);
        s.create(p).expect("create");
        let commit = CommitRecord {
            commit_id: CommitId([5; 16]),
            file_id: FileId([6; 32]),
            version: 3,
            commit_time: 1_700_000_000,
            deletion: Deletion::No,
            manifest: b"sealed manifest".to_vec(),
            chunks: vec![ChunkId([1; 32])],
        };
        let mut bytes = record(1, b"first sealed");
        commit.encode_into(&mut bytes);
        bytes.extend_from_slice(&record(2, b"second"));
        s.write_at(p, PACK_HEADER_LEN, &bytes).expect("write");
        let full = s.len(p).expect("len");
        let mut seen = Vec::new();
        let end = scan::<IoError>(&s, p, PACK_HEADER_LEN, full, |f| {
            seen.push(match f {
                Found::Chunk { id, .. } => format!("chunk {}", id.0[0]),
                Found::Commit { header, body, .. } => {
                    let c = CommitRecord::decode(&header, body).expect("decode");
                    assert_eq!(c, commit);
                    format!("commit {}", c.version)
                }
                Found::Removal { .. } => "removal".to_string(),
            });
            Ok(())
        })
        .expect("scan");
        assert_eq!(end, full);
        assert_eq!(seen, ["chunk 1", "commit 3", "chunk 2"]);
    }

    #[test]
    fn scan_stops_at_a_torn_or_damaged_tail_and_reads_verify() {
        let d = tempfile::tempdir().expect("tempdir");
        let repo = crate::Layout::new(d.path()).repo(&"r".parse().expect("name"));
        repo.create().expect("create");
        let s = LocalPacks::new(repo.packs());
        let p = PackNo(1);
        s.create(p).expect("create");
        assert!(header_ok(&s, p).expect("header"));
        assert_eq!(pack_version(&s, p).expect("header"), Some(PACK_VERSION));
        // A version 1 pack (the previous release's) is read; an unknown version is not.
        s.write_at(p, 8, &1u32.to_le_bytes()).expect("v1");
        assert_eq!(pack_version(&s, p).expect("header"), Some(1));
        s.write_at(p, 8, &3u32.to_le_bytes()).expect("v3");
        assert!(!header_ok(&s, p).expect("header"));
        s.write_at(p, 0, &pack_header()).expect("v2");
        let (a, b) = (record(1, b"first sealed"), record(2, &[9u8; 5000]));
        s.write_at(p, PACK_HEADER_LEN, &a).expect("write");
        s.write_at(p, PACK_HEADER_LEN + a.len() as u64, &b)
            .expect("write");
        let full = s.len(p).expect("len");
        let (locs, end) = chunks_in(&s, p, PACK_HEADER_LEN, full);
        assert_eq!(locs.len(), 2);
        assert_eq!(end, full);
        let got = read_record(&s, &ChunkId([2; 32]), &locs[1], Check::Full).expect("read");
        assert_eq!(got, vec![9u8; 5000]);
        // Torn: the second record is cut short.
        s.truncate(p, full - 10).expect("truncate");
        let (locs, end) = chunks_in(&s, p, PACK_HEADER_LEN, full - 10);
        assert_eq!(locs.len(), 1);
        assert_eq!(end, PACK_HEADER_LEN + a.len() as u64);
        // Reading a record past the end is "damaged", never wrong bytes.
        let e = read_record(
            &s,
            &ChunkId([2; 32]),
            &Location { ..locs[0] },
            Check::Header,
        );
        assert!(e.is_err());
        // A flipped byte is caught by the hash.
        s.write_at(p, PACK_HEADER_LEN + 80, b"X").expect("write");
        let (locs, _) = chunks_in(&s, p, PACK_HEADER_LEN, s.len(p).expect("len"));
        assert_eq!(locs.len(), 0);
        let loc = Location {
            pack: p,
            offset: PACK_HEADER_LEN,
            len: 12,
            hash: *blake3::hash(b"first sealed").as_bytes(),
        };
        let e = read_record(&s, &ChunkId([1; 32]), &loc, Check::Full).expect_err("damaged");
        assert!(e.to_string().contains("do not match"), "{e}");
    }
}
