//! Commit records: each acknowledged version, written into a pack beside the chunks it
//! references, so that the packs alone hold the repository and `index.sqlite` is a cache
//! that `repair` can rebuild.
//!
//! ```text
//! commit record (72 + n bytes), appended like a chunk record
//!   header   "CCMT" | file id (32) | n = body length u32 LE | BLAKE3(body) (32)
//!   body     commit id (16) | version u64 LE | commit time i64 LE (receiver's clock, Unix s)
//!            | flags u8 | reserved (3, zero) | m u32 LE | sealed manifest (m)
//!            | k u32 LE | chunk ids (32 each, k of them)
//! ```
//!
//! The header has a chunk record's shape (magic, a 32-byte key, a length, the BLAKE3 of what
//! follows), so one scan reads both kinds and checks either without a key. Chunk records are
//! decoded by [`crate::store::RecordHeader`]; this module owns the commit kind and
//! [`Header`], which tells the two apart.
//!
//! Ordering: a commit record is written in the same flush as, and after, the chunk records
//! it references that the flush wrote (earlier chunks are already durable), and is fsynced
//! before the index transaction that records its version commits, which is before the ack.
//!
//! **Removal records** say which versions `prune` removed, so that nothing that reads the
//! packs (recovery, `repair`) brings them back while their commit records are still there:
//!
//! ```text
//! removal record (72 + n bytes)
//!   header   "CDEL" | reserved (32, zero) | n = body length u32 LE | BLAKE3(body) (32)
//!   body     time i64 LE (receiver's clock, Unix s) | k u32 LE (1 ..= MAX_REMOVED)
//!            | reserved (4, zero) | k entries: version u64 LE | file id (32) | commit id (16)
//! ```
//!
//! An entry removes every commit record of its (file id, commit id) whose version is at most
//! its version (a lower one was never acknowledged: see "Pack files" in `docs/design.md`).
//! A removal record is written and fsynced before the index transaction that forgets its
//! versions.

use coffer_common::chunk::{ChunkId, FileId};
use coffer_common::wire::{CommitId, MAX_IDS, MAX_MANIFEST};

use crate::store::{RecordHeader, RECORD_HEADER_LEN, RECORD_MAGIC};

/// Magic of a commit record's header.
pub const COMMIT_MAGIC: &[u8; 4] = b"CCMT";
/// Fixed part of a commit record's body: everything but the manifest and the chunk ids.
pub const COMMIT_FIXED: usize = 16 + 8 + 8 + 1 + 3 + 4 + 4;
/// Largest commit record body an honest receiver writes.
pub const MAX_COMMIT_BODY: usize = COMMIT_FIXED + MAX_MANIFEST + 32 * MAX_IDS;

/// Flag bit: the version records the file's deletion.
const FLAG_DELETED: u8 = 1;
/// Flag bit: whether the version is a deletion is not known (written when a repository
/// whose index predates the deletion flag was upgraded; the flag is inside the sealed
/// manifest, which the receiver cannot read).
const FLAG_DELETION_UNKNOWN: u8 = 2;
const KNOWN_FLAGS: u8 = FLAG_DELETED | FLAG_DELETION_UNKNOWN;

/// Whether a version records a deletion, as far as the receiver knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Deletion {
    /// The file exists at this version.
    No,
    /// The file was deleted at this version (the agent said so).
    Yes,
    /// Not known: the version predates the flag.
    Unknown,
}

impl Deletion {
    /// The flag bits stored for this value.
    fn flags(self) -> u8 {
        match self {
            Deletion::No => 0,
            Deletion::Yes => FLAG_DELETED,
            Deletion::Unknown => FLAG_DELETION_UNKNOWN,
        }
    }

    /// The value stored in the index's `versions.deleted` column (0, 1, or NULL).
    pub fn to_column(self) -> Option<bool> {
        match self {
            Deletion::No => Some(false),
            Deletion::Yes => Some(true),
            Deletion::Unknown => None,
        }
    }

    /// The inverse of [`Deletion::to_column`].
    pub fn from_column(v: Option<bool>) -> Self {
        match v {
            Some(false) => Deletion::No,
            Some(true) => Deletion::Yes,
            None => Deletion::Unknown,
        }
    }
}

/// Magic of a removal record's header.
pub const REMOVAL_MAGIC: &[u8; 4] = b"CDEL";
/// Fixed part of a removal record's body.
pub const REMOVAL_FIXED: usize = 8 + 4 + 4;
/// Bytes of one entry of a removal record.
pub const REMOVAL_ENTRY: usize = 8 + 32 + 16;
/// Most entries in one removal record.
pub const MAX_REMOVED: usize = 4096;

/// Header of a commit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitHeader {
    pub file_id: FileId,
    /// Length of the body.
    pub len: u32,
    /// BLAKE3 of the body.
    pub hash: [u8; 32],
}

impl CommitHeader {
    /// The 72 header bytes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN as usize] {
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        h[..4].copy_from_slice(COMMIT_MAGIC);
        h[4..36].copy_from_slice(&self.file_id.0);
        h[36..40].copy_from_slice(&self.len.to_le_bytes());
        h[40..72].copy_from_slice(&self.hash);
        h
    }

    /// Decodes a header; `None` if the magic is wrong or the length impossible.
    pub fn decode(h: &[u8]) -> Option<Self> {
        if h.len() < RECORD_HEADER_LEN as usize || &h[..4] != COMMIT_MAGIC {
            return None;
        }
        let len = u32::from_le_bytes([h[36], h[37], h[38], h[39]]);
        if (len as usize) < COMMIT_FIXED || len as usize > MAX_COMMIT_BODY {
            return None;
        }
        Some(Self {
            file_id: FileId(arr(&h[4..36])),
            len,
            hash: arr(&h[40..72]),
        })
    }

    /// Bytes the whole record takes.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN + self.len as u64
    }
}

/// Header of a removal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemovalHeader {
    /// Length of the body.
    pub len: u32,
    /// BLAKE3 of the body.
    pub hash: [u8; 32],
}

impl RemovalHeader {
    /// The 72 header bytes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN as usize] {
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        h[..4].copy_from_slice(REMOVAL_MAGIC);
        h[36..40].copy_from_slice(&self.len.to_le_bytes());
        h[40..72].copy_from_slice(&self.hash);
        h
    }

    /// Decodes a header; `None` if the magic is wrong, the reserved bytes are not zero or
    /// the length is impossible.
    pub fn decode(h: &[u8]) -> Option<Self> {
        if h.len() < RECORD_HEADER_LEN as usize || &h[..4] != REMOVAL_MAGIC {
            return None;
        }
        if h[4..36].iter().any(|b| *b != 0) {
            return None;
        }
        let len = u32::from_le_bytes([h[36], h[37], h[38], h[39]]) as usize;
        let entries = len.checked_sub(REMOVAL_FIXED)?;
        if entries == 0
            || !entries.is_multiple_of(REMOVAL_ENTRY)
            || entries / REMOVAL_ENTRY > MAX_REMOVED
        {
            return None;
        }
        Some(Self {
            len: len as u32,
            hash: arr(&h[40..72]),
        })
    }
}

/// A record header of any kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    Chunk(RecordHeader),
    Commit(CommitHeader),
    Removal(RemovalHeader),
}

impl Header {
    /// Decodes the 72 bytes at the start of a record; `None` when they are neither kind.
    pub fn decode(h: &[u8]) -> Option<Self> {
        match h.get(..4) {
            Some(m) if m == RECORD_MAGIC => RecordHeader::decode(h).map(Header::Chunk),
            Some(m) if m == COMMIT_MAGIC => CommitHeader::decode(h).map(Header::Commit),
            Some(m) if m == REMOVAL_MAGIC => RemovalHeader::decode(h).map(Header::Removal),
            _ => None,
        }
    }

    /// Length of what follows the header.
    pub fn body_len(&self) -> u32 {
        match self {
            Header::Chunk(h) => h.len,
            Header::Commit(h) => h.len,
            Header::Removal(h) => h.len,
        }
    }

    /// BLAKE3 the body must have.
    pub fn hash(&self) -> &[u8; 32] {
        match self {
            Header::Chunk(h) => &h.hash,
            Header::Commit(h) => &h.hash,
            Header::Removal(h) => &h.hash,
        }
    }

    /// Bytes the whole record takes.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN + self.body_len() as u64
    }
}

/// One version, as its commit record holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitRecord {
    pub commit_id: CommitId,
    pub file_id: FileId,
    /// The number the receiver assigned.
    pub version: u64,
    /// The receiver's commit time, Unix seconds.
    pub commit_time: i64,
    pub deletion: Deletion,
    /// The sealed manifest, as the agent sent it.
    pub manifest: Vec<u8>,
    /// The chunks the version references, each once, in the order first referenced.
    pub chunks: Vec<ChunkId>,
}

/// Why a commit record's body does not decode (its hash matched: a bug or a forgery, not
/// bit rot).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("commit record body of {0} bytes is shorter than its fixed part")]
    Short(usize),
    #[error("commit record has unknown flags {0:#04x}")]
    Flags(u8),
    #[error("commit record's reserved bytes are not zero")]
    Reserved,
    #[error("commit record's manifest of {0} bytes exceeds the limit or the body")]
    Manifest(u64),
    #[error("commit record's {0} chunk ids exceed the limit or the body")]
    Chunks(u64),
    #[error("commit record body has {0} bytes past its chunk ids")]
    Trailing(usize),
}

impl CommitRecord {
    /// Length of the body.
    pub fn body_len(&self) -> usize {
        COMMIT_FIXED + self.manifest.len() + 32 * self.chunks.len()
    }

    /// The body bytes.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.body_len());
        b.extend_from_slice(&self.commit_id.0);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.commit_time.to_le_bytes());
        b.push(self.deletion.flags());
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(&(self.manifest.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.manifest);
        b.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            b.extend_from_slice(&c.0);
        }
        b
    }

    /// The record's header and body bytes.
    pub fn encode(&self) -> ([u8; RECORD_HEADER_LEN as usize], Vec<u8>) {
        let body = self.encode_body();
        let header = CommitHeader {
            file_id: self.file_id,
            len: body.len() as u32,
            hash: *blake3::hash(&body).as_bytes(),
        };
        (header.encode(), body)
    }

    /// The whole record, header and body, appended to `out`. Its length is
    /// `RECORD_HEADER_LEN + body_len()`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (header, body) = self.encode();
        out.extend_from_slice(&header);
        out.extend_from_slice(&body);
    }

    /// Decodes a body whose hash the caller has checked against `header`.
    pub fn decode(header: &CommitHeader, body: &[u8]) -> Result<Self, BodyError> {
        if body.len() < COMMIT_FIXED {
            return Err(BodyError::Short(body.len()));
        }
        let flags = body[32];
        if flags & !KNOWN_FLAGS != 0 || flags == KNOWN_FLAGS {
            return Err(BodyError::Flags(flags));
        }
        if body[33..36] != [0, 0, 0] {
            return Err(BodyError::Reserved);
        }
        let deletion = match flags {
            FLAG_DELETED => Deletion::Yes,
            FLAG_DELETION_UNKNOWN => Deletion::Unknown,
            _ => Deletion::No,
        };
        let m = u32_at(body, 36) as u64;
        let after_fixed = (body.len() - COMMIT_FIXED) as u64;
        if m > MAX_MANIFEST as u64 || m > after_fixed {
            return Err(BodyError::Manifest(m));
        }
        let m = m as usize;
        let manifest = body[40..40 + m].to_vec();
        let k = u32_at(body, 40 + m) as u64;
        let ids_at = 44 + m;
        let room = (body.len() - ids_at) as u64;
        if k > MAX_IDS as u64 || 32 * k > room {
            return Err(BodyError::Chunks(k));
        }
        let end = ids_at + 32 * k as usize;
        if end != body.len() {
            return Err(BodyError::Trailing(body.len() - end));
        }
        let chunks = body[ids_at..end]
            .chunks_exact(32)
            .map(|c| ChunkId(arr(c)))
            .collect();
        Ok(Self {
            commit_id: CommitId(arr(&body[..16])),
            file_id: header.file_id,
            version: u64::from_le_bytes(arr(&body[16..24])),
            commit_time: i64::from_le_bytes(arr(&body[24..32])),
            deletion,
            manifest,
            chunks,
        })
    }
}

/// One version a removal record removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Removed {
    pub version: u64,
    pub file_id: FileId,
    pub commit_id: CommitId,
}

/// Versions `prune` removed, as a removal record holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovalRecord {
    /// The receiver's time when it was written, Unix seconds.
    pub time: i64,
    /// 1 ..= [`MAX_REMOVED`] entries.
    pub removed: Vec<Removed>,
}

/// Why a removal record's body does not decode (its hash matched).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RemovalError {
    #[error("removal record body of {0} bytes does not hold whole entries")]
    Length(usize),
    #[error("removal record says {said} entries but holds {held}")]
    Count { said: u64, held: usize },
    #[error("removal record's reserved bytes are not zero")]
    Reserved,
}

impl RemovalRecord {
    /// Length of the body.
    pub fn body_len(&self) -> usize {
        REMOVAL_FIXED + REMOVAL_ENTRY * self.removed.len()
    }

    /// The record's header and body bytes. The caller keeps `removed` within
    /// 1 ..= [`MAX_REMOVED`].
    pub fn encode(&self) -> ([u8; RECORD_HEADER_LEN as usize], Vec<u8>) {
        let mut b = Vec::with_capacity(self.body_len());
        b.extend_from_slice(&self.time.to_le_bytes());
        b.extend_from_slice(&(self.removed.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        for r in &self.removed {
            b.extend_from_slice(&r.version.to_le_bytes());
            b.extend_from_slice(&r.file_id.0);
            b.extend_from_slice(&r.commit_id.0);
        }
        let header = RemovalHeader {
            len: b.len() as u32,
            hash: *blake3::hash(&b).as_bytes(),
        };
        (header.encode(), b)
    }

    /// Decodes a body whose hash the caller has checked against its header.
    pub fn decode(body: &[u8]) -> Result<Self, RemovalError> {
        let n = body.len();
        if n < REMOVAL_FIXED || !(n - REMOVAL_FIXED).is_multiple_of(REMOVAL_ENTRY) {
            return Err(RemovalError::Length(n));
        }
        if body[12..16] != [0; 4] {
            return Err(RemovalError::Reserved);
        }
        let held = (n - REMOVAL_FIXED) / REMOVAL_ENTRY;
        let said = u32_at(body, 8) as u64;
        if said != held as u64 || held == 0 || held > MAX_REMOVED {
            return Err(RemovalError::Count { said, held });
        }
        let removed = body[REMOVAL_FIXED..]
            .chunks_exact(REMOVAL_ENTRY)
            .map(|e| Removed {
                version: u64::from_le_bytes(arr(&e[..8])),
                file_id: FileId(arr(&e[8..40])),
                commit_id: CommitId(arr(&e[40..56])),
            })
            .collect();
        Ok(Self {
            time: i64::from_le_bytes(arr(&body[..8])),
            removed,
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(arr(&b[at..at + 4]))
}

/// The first `N` bytes of `b`, which the caller has checked holds at least that many.
fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(deletion: Deletion, manifest: usize, chunks: usize) -> CommitRecord {
        CommitRecord {
            commit_id: CommitId([7; 16]),
            file_id: FileId([9; 32]),
            version: 0x0102_0304_0506_0708,
            commit_time: 1_764_000_000,
            deletion,
            manifest: (0..manifest).map(|i| i as u8).collect(),
            chunks: (0..chunks).map(|i| ChunkId([i as u8; 32])).collect(),
        }
    }

    fn split(bytes: &[u8]) -> (CommitHeader, &[u8]) {
        let Some(Header::Commit(h)) = Header::decode(&bytes[..72]) else {
            panic!("not a commit header");
        };
        (h, &bytes[72..])
    }

    #[test]
    fn records_round_trip_and_hash_their_body() {
        for (d, m, k) in [
            (Deletion::No, 100, 3),
            (Deletion::Yes, 0, 0),
            (Deletion::Unknown, 5, 1),
        ] {
            let r = record(d, m, k);
            let mut bytes = Vec::new();
            r.encode_into(&mut bytes);
            assert_eq!(bytes.len(), 72 + r.body_len());
            let (h, body) = split(&bytes);
            assert_eq!(h.record_len(), bytes.len() as u64);
            assert_eq!(&h.hash, blake3::hash(body).as_bytes());
            assert_eq!(CommitRecord::decode(&h, body), Ok(r));
        }
    }

    /// The byte layout is a format: pin it.
    #[test]
    fn the_layout_is_as_documented() {
        let mut bytes = Vec::new();
        record(Deletion::Yes, 2, 1).encode_into(&mut bytes);
        assert_eq!(&bytes[..4], b"CCMT");
        assert_eq!(&bytes[4..36], &[9; 32]);
        assert_eq!(&bytes[36..40], &(44u32 + 2 + 32).to_le_bytes());
        let body = &bytes[72..];
        assert_eq!(&body[..16], &[7; 16]);
        assert_eq!(&body[16..24], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&body[24..32], &1_764_000_000i64.to_le_bytes());
        assert_eq!(&body[32..36], &[1, 0, 0, 0]);
        assert_eq!(&body[36..40], &2u32.to_le_bytes());
        assert_eq!(&body[40..42], &[0, 1]);
        assert_eq!(&body[42..46], &1u32.to_le_bytes());
        assert_eq!(&body[46..78], &[0; 32]);
    }

    #[test]
    fn malformed_bodies_are_named() {
        let r = record(Deletion::No, 4, 2);
        let mut bytes = Vec::new();
        r.encode_into(&mut bytes);
        let (h, body) = split(&bytes);
        let mut b = body.to_vec();
        b[32] = 0x80;
        assert_eq!(CommitRecord::decode(&h, &b), Err(BodyError::Flags(0x80)));
        let mut b = body.to_vec();
        b[32] = 3;
        assert_eq!(CommitRecord::decode(&h, &b), Err(BodyError::Flags(3)));
        let mut b = body.to_vec();
        b[34] = 1;
        assert_eq!(CommitRecord::decode(&h, &b), Err(BodyError::Reserved));
        let mut b = body.to_vec();
        b[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            CommitRecord::decode(&h, &b),
            Err(BodyError::Manifest(_))
        ));
        let mut b = body.to_vec();
        b[44..48].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(CommitRecord::decode(&h, &b), Err(BodyError::Chunks(3)));
        let mut b = body.to_vec();
        b.push(0);
        assert_eq!(CommitRecord::decode(&h, &b), Err(BodyError::Trailing(1)));
        assert_eq!(
            CommitRecord::decode(&h, &body[..10]),
            Err(BodyError::Short(10))
        );
    }

    fn removal() -> RemovalRecord {
        RemovalRecord {
            time: 1_764_000_123,
            removed: vec![
                Removed {
                    version: 5,
                    file_id: FileId([1; 32]),
                    commit_id: CommitId([2; 16]),
                },
                Removed {
                    version: 0x0102_0304_0506_0708,
                    file_id: FileId([3; 32]),
                    commit_id: CommitId([4; 16]),
                },
            ],
        }
    }

    /// The removal record's byte layout is a format: pin it.
    #[test]
    fn the_removal_layout_is_as_documented() {
        let (h, body) = removal().encode();
        assert_eq!(&h[..4], b"CDEL");
        assert_eq!(&h[4..36], &[0; 32]);
        assert_eq!(&h[36..40], &(16u32 + 2 * 56).to_le_bytes());
        assert_eq!(&h[40..72], blake3::hash(&body).as_bytes());
        assert_eq!(body.len(), 16 + 2 * 56);
        assert_eq!(&body[..8], &1_764_000_123i64.to_le_bytes());
        assert_eq!(&body[8..12], &2u32.to_le_bytes());
        assert_eq!(&body[12..16], &[0; 4]);
        assert_eq!(&body[16..24], &5u64.to_le_bytes());
        assert_eq!(&body[24..56], &[1; 32]);
        assert_eq!(&body[56..72], &[2; 16]);
        assert_eq!(&body[72..80], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&body[80..112], &[3; 32]);
        assert_eq!(&body[112..128], &[4; 16]);
        let Some(Header::Removal(d)) = Header::decode(&h) else {
            panic!("not a removal header");
        };
        assert_eq!(d.len as usize, body.len());
        assert_eq!(RemovalRecord::decode(&body), Ok(removal()));
    }

    #[test]
    fn malformed_removal_records_are_named() {
        let (h, body) = removal().encode();
        let mut b = body.clone();
        b[8] = 3;
        assert_eq!(
            RemovalRecord::decode(&b),
            Err(RemovalError::Count { said: 3, held: 2 })
        );
        let mut b = body.clone();
        b[13] = 1;
        assert_eq!(RemovalRecord::decode(&b), Err(RemovalError::Reserved));
        assert_eq!(
            RemovalRecord::decode(&body[..20]),
            Err(RemovalError::Length(20))
        );
        // A header with a non-zero reserved key, or room for no entry, is no header.
        let mut bad = h;
        bad[10] = 1;
        assert_eq!(Header::decode(&bad), None);
        let mut empty = h;
        empty[36..40].copy_from_slice(&16u32.to_le_bytes());
        assert_eq!(Header::decode(&empty), None);
    }

    #[test]
    fn headers_of_both_kinds_are_told_apart() {
        let chunk = RecordHeader {
            id: ChunkId([1; 32]),
            len: 100,
            hash: [2; 32],
        };
        assert_eq!(Header::decode(&chunk.encode()), Some(Header::Chunk(chunk)));
        let commit = CommitHeader {
            file_id: FileId([3; 32]),
            len: 200,
            hash: [4; 32],
        };
        assert_eq!(
            Header::decode(&commit.encode()),
            Some(Header::Commit(commit))
        );
        let mut short = commit.encode();
        short[36..40].copy_from_slice(&10u32.to_le_bytes());
        assert_eq!(Header::decode(&short), None, "shorter than the fixed part");
        let mut junk = commit.encode();
        junk[..4].copy_from_slice(b"CRAP");
        assert_eq!(Header::decode(&junk), None);
    }
}
