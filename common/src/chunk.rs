//! Content-defined chunking, chunk ids, and sealing of chunks and other blobs.
//!
//! A chunk's id is the keyed BLAKE3 of its plaintext (key: `context::CHUNK_ID`), so equal
//! content dedups while the receiver cannot test for known plaintext. A sealed blob is:
//!
//! ```text
//! 0        format version (1)
//! 1..25    XChaCha20-Poly1305 nonce (24 random bytes)
//! 25..     ciphertext of (flag || body) followed by a 16-byte tag
//!          flag 0: body is the plaintext; flag 1: body is zstd-compressed plaintext
//! AAD      version byte || domain byte || 32-byte id
//! ```
//!
//! Opening checks the tag, decompresses with a hard size cap, and for chunks recomputes
//! the id from the plaintext: a swapped, truncated or bit-flipped chunk is an error.

use std::fmt;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::aead::{XChaCha, TAG_LEN};
use crate::keys::{fill_random, KeyError, SubKeys};

/// Smallest chunk the chunker cuts (except a file's last chunk).
pub const MIN_CHUNK: u32 = 128 * 1024;
/// Average chunk size the chunker aims for.
pub const AVG_CHUNK: u32 = 512 * 1024;
/// Largest chunk the chunker cuts.
pub const MAX_CHUNK: u32 = 2 * 1024 * 1024;
/// Largest plaintext that `seal` accepts and `open` will ever produce.
pub const MAX_PLAIN: usize = 8 * 1024 * 1024;
/// Bytes a sealed blob adds to at most `MAX_PLAIN`: version, nonce, flag and tag.
pub const SEAL_OVERHEAD: usize = 1 + 24 + 1 + 16;
/// Largest sealed blob there can be.
pub const MAX_SEALED: usize = MAX_PLAIN + SEAL_OVERHEAD;

const VERSION: u8 = 1;
const DOMAIN_CHUNK: u8 = b'c';
const DOMAIN_MANIFEST: u8 = b'm';
const FLAG_RAW: u8 = 0;
const FLAG_ZSTD: u8 = 1;
const ZSTD_LEVEL: i32 = 1;
/// Size of the sample compressed to decide whether a chunk is worth compressing.
const PROBE: usize = 16 * 1024;

/// Errors from sealing and opening.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("sealed blob is too short ({0} bytes)")]
    TooShort(usize),
    #[error("sealed blob has unknown format version {0}")]
    Version(u8),
    #[error(
        "authentication failed: the blob was damaged, tampered with, or belongs to another id"
    )]
    Auth,
    #[error("chunk content does not match its id (expected {expected}, got {actual})")]
    IdMismatch { expected: ChunkId, actual: ChunkId },
    #[error("blob flag {0} is unknown")]
    Flag(u8),
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("plaintext of {0} bytes exceeds the {MAX_PLAIN}-byte limit")]
    TooLarge(usize),
    #[error(transparent)]
    Rng(#[from] KeyError),
}

/// A chunk's name: keyed BLAKE3 of its plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id as lowercase hex.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &to_hex(&self.0)[..16])
    }
}

/// An opaque file id: keyed BLAKE3 of the file's path.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileId(pub [u8; 32]);

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileId({})", &to_hex(&self.0)[..16])
    }
}

/// Lowercase hex of some bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

/// Parses lowercase or uppercase hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

/// Everything needed to name, seal and open chunks and manifests. Holds keys; never printed.
pub struct Crypto {
    id_key: [u8; 32],
    file_id_key: [u8; 32],
    journal_key: [u8; 32],
    chunk: XChaCha,
    manifest: XChaCha,
}

impl fmt::Debug for Crypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Crypto(<redacted>)")
    }
}

impl Drop for Crypto {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.id_key.zeroize();
        self.file_id_key.zeroize();
        self.journal_key.zeroize();
        // The sealing keys zero themselves on drop (`XChaCha` holds them in `Zeroizing`).
    }
}

impl Crypto {
    /// Builds the sealing context from the derived keys.
    pub fn new(keys: &SubKeys) -> Self {
        Self {
            id_key: *keys.chunk_id.as_bytes(),
            file_id_key: *keys.file_id.as_bytes(),
            journal_key: *keys.journal_hash.as_bytes(),
            chunk: XChaCha::new(keys.chunk_seal.as_bytes()),
            manifest: XChaCha::new(keys.manifest_seal.as_bytes()),
        }
    }

    /// The id of a chunk's plaintext.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, plain).as_bytes())
    }

    /// The opaque id of a path (raw bytes, as the agent names it).
    pub fn file_id(&self, path: &[u8]) -> FileId {
        FileId(*blake3::keyed_hash(&self.file_id_key, path).as_bytes())
    }

    /// What the agent's journal records of a file's content: a keyed BLAKE3 of its plain
    /// content hash (or of another short summary, such as a folder's metadata), which tells
    /// a change apart without confirming a guess of the content to whoever reads the journal.
    pub fn journal_hash(&self, summary: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.journal_key, summary).as_bytes()
    }

    /// Seals a chunk under its id, compressing it when that pays.
    pub fn seal_chunk(&self, id: &ChunkId, plain: &[u8]) -> Result<Vec<u8>, ChunkError> {
        seal(&self.chunk, DOMAIN_CHUNK, &id.0, plain, true)
    }

    /// [`Crypto::seal_chunk`] on a chunk the caller gives up: an incompressible chunk is
    /// encrypted in its own buffer, which becomes the sealed blob.
    pub fn seal_chunk_owned(&self, id: &ChunkId, plain: PlainChunk) -> Result<Vec<u8>, ChunkError> {
        seal_buf(&self.chunk, DOMAIN_CHUNK, &id.0, plain.buf, true)
    }

    /// Opens a sealed chunk and checks that its content matches `id`.
    pub fn open_chunk(&self, id: &ChunkId, sealed: &[u8]) -> Result<Vec<u8>, ChunkError> {
        Ok(self.open_chunk_owned(id, sealed.to_vec())?.into_vec())
    }

    /// [`Crypto::open_chunk`] on a buffer the caller gives up: decrypted in place, and an
    /// uncompressed chunk's plaintext is left where it lies in that buffer.
    pub fn open_chunk_owned(&self, id: &ChunkId, sealed: Vec<u8>) -> Result<Opened, ChunkError> {
        let plain = open_owned(&self.chunk, DOMAIN_CHUNK, &id.0, sealed)?;
        let actual = self.chunk_id(&plain);
        if actual != *id {
            return Err(ChunkError::IdMismatch {
                expected: *id,
                actual,
            });
        }
        Ok(plain)
    }

    /// Seals a manifest, bound to its file id.
    pub fn seal_manifest(&self, file: &FileId, plain: &[u8]) -> Result<Vec<u8>, ChunkError> {
        // Manifests are small and mostly ids: not worth a compression attempt.
        seal(&self.manifest, DOMAIN_MANIFEST, &file.0, plain, false)
    }

    /// Opens a sealed manifest, checking that it belongs to `file`.
    pub fn open_manifest(&self, file: &FileId, sealed: &[u8]) -> Result<Vec<u8>, ChunkError> {
        Ok(open(&self.manifest, DOMAIN_MANIFEST, &file.0, sealed)?.into_vec())
    }
}

fn aad(domain: u8, id: &[u8; 32]) -> [u8; 34] {
    let mut a = [0u8; 34];
    a[0] = VERSION;
    a[1] = domain;
    a[2..].copy_from_slice(id);
    a
}

thread_local! {
    /// One zstd compression context per thread, reused: creating a context costs more than
    /// compressing a small file.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses with the thread's reused context.
fn compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut()?.compress(data).ok()
    })
}

/// The compressed form of `plain` when it is smaller. Large inputs are probed with a sample
/// first, so incompressible data costs little; small ones are simply compressed once.
fn compressed(plain: &[u8]) -> Option<Vec<u8>> {
    if plain.len() < 64 {
        return None;
    }
    if plain.len() > PROBE {
        let sample = &plain[..PROBE];
        let c = compress(sample)?;
        if c.len() >= sample.len() * 15 / 16 {
            return None;
        }
    }
    compress(plain).filter(|c| c.len() < plain.len())
}

/// Bytes of a sealed blob before its body: version, nonce, flag.
const HEAD: usize = 1 + 24 + 1;

fn seal(
    cipher: &XChaCha,
    domain: u8,
    id: &[u8; 32],
    plain: &[u8],
    compress: bool,
) -> Result<Vec<u8>, ChunkError> {
    if plain.len() > MAX_PLAIN {
        return Err(ChunkError::TooLarge(plain.len()));
    }
    seal_buf(cipher, domain, id, with_head(plain), compress)
}

/// Seals `buf` (`HEAD` bytes to fill in, then the plaintext): its compressed form when
/// that pays, else the buffer itself, encrypted where it lies.
fn seal_buf(
    cipher: &XChaCha,
    domain: u8,
    id: &[u8; 32],
    buf: Vec<u8>,
    compress: bool,
) -> Result<Vec<u8>, ChunkError> {
    let plain = &buf[HEAD..];
    if plain.len() > MAX_PLAIN {
        return Err(ChunkError::TooLarge(plain.len()));
    }
    match compress.then(|| compressed(plain)).flatten() {
        Some(c) => envelope(cipher, domain, id, FLAG_ZSTD, with_head(&c)),
        None => envelope(cipher, domain, id, FLAG_RAW, buf),
    }
}

/// `HEAD` bytes to be filled in, then `body`, with room for the tag.
fn with_head(body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(SEAL_OVERHEAD + body.len());
    buf.resize(HEAD, 0);
    buf.extend_from_slice(body);
    buf
}

/// Seals `buf` (`HEAD` bytes to fill in, then the body) where it lies: writes version,
/// fresh nonce and flag, encrypts flag and body in place, appends the tag.
fn envelope(
    cipher: &XChaCha,
    domain: u8,
    id: &[u8; 32],
    flag: u8,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, ChunkError> {
    let mut nonce = [0u8; 24];
    fill_random(&mut nonce)?;
    buf[0] = VERSION;
    buf[1..25].copy_from_slice(&nonce);
    buf[25] = flag;
    let tag = cipher
        .seal_in_place(&nonce, &aad(domain, id), &mut buf[25..])
        .map_err(|_| ChunkError::Auth)?;
    buf.extend_from_slice(&tag);
    Ok(buf)
}

/// A chunk's plaintext held with room for the sealed envelope around it, so that sealing
/// it without compression encrypts it where it lies instead of copying it first. Derefs to
/// the plaintext.
pub struct PlainChunk {
    buf: Vec<u8>,
}

impl PlainChunk {
    /// A copy of `plain` with the room around it.
    pub fn copy_of(plain: &[u8]) -> Self {
        Self {
            buf: with_head(plain),
        }
    }
}

impl std::ops::Deref for PlainChunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[HEAD..]
    }
}

impl fmt::Debug for PlainChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlainChunk({} bytes)", self.len())
    }
}

/// An opened blob's plaintext, in the buffer it was opened in. Derefs to the plaintext.
pub struct Opened {
    buf: Vec<u8>,
    start: usize,
}

impl Opened {
    /// The plaintext in a buffer of its own (moved to the buffer's start if need be).
    pub fn into_vec(mut self) -> Vec<u8> {
        self.buf.drain(..self.start);
        self.buf
    }
}

impl std::ops::Deref for Opened {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Opened({} bytes)", self.len())
    }
}

fn open(cipher: &XChaCha, domain: u8, id: &[u8; 32], sealed: &[u8]) -> Result<Opened, ChunkError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(ChunkError::TooShort(sealed.len()));
    }
    open_owned(cipher, domain, id, sealed.to_vec())
}

/// Opens a sealed blob in its own buffer: decrypted in place, so a raw chunk costs no copy
/// of its body and a compressed one only its decompression.
fn open_owned(
    cipher: &XChaCha,
    domain: u8,
    id: &[u8; 32],
    mut sealed: Vec<u8>,
) -> Result<Opened, ChunkError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(ChunkError::TooShort(sealed.len()));
    }
    if sealed[0] != VERSION {
        return Err(ChunkError::Version(sealed[0]));
    }
    let a = aad(domain, id);
    let tag_at = sealed.len() - TAG_LEN;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&sealed[tag_at..]);
    let mut nonce = [0u8; 24];
    nonce.copy_from_slice(&sealed[1..25]);
    cipher
        .open_in_place(&nonce, &a, &mut sealed[25..tag_at], &tag)
        .map_err(|_| ChunkError::Auth)?;
    match sealed[25] {
        FLAG_RAW => {
            sealed.truncate(tag_at);
            Ok(Opened {
                buf: sealed,
                start: 26,
            })
        }
        FLAG_ZSTD => Ok(Opened {
            buf: decompress(&sealed[26..tag_at])?,
            start: 0,
        }),
        f => Err(ChunkError::Flag(f)),
    }
}

thread_local! {
    /// One zstd decompression context per thread, reused (restore opens many small chunks).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses at most `MAX_PLAIN` bytes with the thread's reused context, allocating
/// only what the frame declares (within the cap).
fn decompress(data: &[u8]) -> Result<Vec<u8>, ChunkError> {
    let err = |e: std::io::Error| ChunkError::Decompress(e.to_string());
    let cap = match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(n)) if n <= MAX_PLAIN as u64 => n as usize,
        _ => MAX_PLAIN,
    };
    DECOMPRESSOR.with(|d| match d.try_borrow_mut() {
        Ok(mut d) => {
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new().map_err(err)?);
            }
            match d.as_mut() {
                Some(d) => d.decompress(data, cap).map_err(err),
                None => zstd::bulk::decompress(data, cap).map_err(err),
            }
        }
        Err(_) => zstd::bulk::decompress(data, cap).map_err(err),
    })
}

/// A reader adapter that hashes everything read through it with BLAKE3.
pub struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps a reader.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        }
    }

    /// The hash and length of everything read so far.
    pub fn finish(&self) -> ([u8; 32], u64) {
        (*self.hasher.finalize().as_bytes(), self.bytes)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Splits a stream into content-defined chunks with bounded memory: one buffer of
/// `2 * MAX_CHUNK`, whatever the stream's length.
pub fn chunk_stream<R: Read>(reader: R) -> Chunker<R> {
    Chunker::new(reader, u64::MAX)
}

/// [`chunk_stream`] of a stream expected to be about `len` bytes long (a file's size): the
/// buffer starts no larger than that and grows only if the stream turns out longer, so a
/// file of 1 MiB does not cost a zeroed buffer of `2 * MAX_CHUNK`. The cut points do not
/// depend on the hint.
pub fn chunk_stream_sized<R: Read>(reader: R, len: u64) -> Chunker<R> {
    Chunker::new(reader, len)
}

/// The chunker behind [`chunk_stream`]: FastCDC 2020 (normalization level 1, the crate's
/// standard gear table) over a window the reader fills, so each chunk costs one copy out
/// of the window. Cut points are those of `fastcdc::v2020::StreamCDC` with the same sizes:
/// the cut search always sees at least `MAX_CHUNK` bytes unless the stream ends first.
pub struct Chunker<R> {
    reader: R,
    /// Size of the buffer when it is first needed.
    first_len: usize,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    masks: [u64; 4],
}

impl<R: Read> Chunker<R> {
    fn new(reader: R, len_hint: u64) -> Self {
        use fastcdc::v2020::{logarithm2, MASKS};
        let bits = logarithm2(AVG_CHUNK) as usize;
        let (s, l) = (MASKS[bits + 1], MASKS[bits - 1]);
        // One byte more than expected, so that the end of the stream is seen without a
        // move; at least a page of reads, at most the full window.
        let first_len = len_hint
            .saturating_add(1)
            .clamp(64 * 1024, 2 * MAX_CHUNK as u64) as usize;
        Self {
            reader,
            first_len,
            buf: Vec::new(),
            start: 0,
            end: 0,
            eof: false,
            masks: [s, l, s << 1, l << 1],
        }
    }

    /// Tops the window up to at least `MAX_CHUNK` bytes, or to the end of the stream.
    /// Unread bytes move to the front only when the buffer's end is reached; the buffer
    /// grows (up to `2 * MAX_CHUNK`) only when it is too small to hold `MAX_CHUNK`.
    fn fill(&mut self) -> std::io::Result<()> {
        let want = MAX_CHUNK as usize;
        if self.eof || self.end - self.start >= want {
            return Ok(());
        }
        if self.buf.is_empty() {
            self.buf = vec![0; self.first_len];
        }
        while !self.eof && self.end - self.start < want {
            if self.end == self.buf.len() {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                } else {
                    let grown = (self.buf.len() * 2).min(2 * want);
                    self.buf.resize(grown, 0);
                }
            }
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = Result<PlainChunk, std::io::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Err(e) = self.fill() {
            return Some(Err(e));
        }
        if self.start == self.end {
            return None;
        }
        let [s, l, s_ls, l_ls] = self.masks;
        let (_, n) = fastcdc::v2020::cut(
            &self.buf[self.start..self.end],
            MIN_CHUNK as usize,
            AVG_CHUNK as usize,
            MAX_CHUNK as usize,
            s,
            l,
            s_ls,
            l_ls,
        );
        let chunk = PlainChunk::copy_of(&self.buf[self.start..self.start + n]);
        self.start += n;
        Some(Ok(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterSecret;
    use proptest::prelude::*;

    fn crypto() -> Crypto {
        Crypto::new(&MasterSecret::generate().expect("rng").sub_keys())
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut x = blake3::Hasher::new();
        x.update(&seed.to_le_bytes());
        x.finalize_xof().fill(&mut out);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn seal_open_round_trip(len in 0usize..=MAX_PLAIN, seed in any::<u64>(), text in any::<bool>()) {
            let c = crypto();
            let data = if text { vec![b'a' + (seed % 26) as u8; len] } else { pseudo_random(len, seed) };
            let id = c.chunk_id(&data);
            let sealed = c.seal_chunk(&id, &data).expect("seal");
            prop_assert_eq!(c.open_chunk(&id, &sealed).expect("open"), data.clone());
            // Sealed in its own buffer: the same format, opened the same way.
            let owned = c.seal_chunk_owned(&id, PlainChunk::copy_of(&data)).expect("seal");
            prop_assert_eq!(owned.len(), sealed.len());
            let opened = c.open_chunk_owned(&id, owned).expect("open");
            prop_assert_eq!(&*opened, &data[..]);
            prop_assert_eq!(opened.into_vec(), data);
        }

        #[test]
        fn chunker_reassembles_input(len in 0usize..(12 << 20), seed in any::<u64>()) {
            let data = pseudo_random(len, seed);
            let mut joined = Vec::with_capacity(len);
            for c in chunk_stream(&data[..]) {
                let c = c.expect("chunk");
                prop_assert!(c.len() <= MAX_CHUNK as usize);
                joined.extend_from_slice(&c);
            }
            prop_assert_eq!(joined, data);
        }

        /// Same cut points as the crate's own streaming chunker, even when the reader
        /// hands out bytes in small, uneven pieces, and whatever length it was expected
        /// to have (a file that grew or shrank since it was measured).
        #[test]
        fn chunker_cuts_where_streamcdc_cuts(len in 0usize..(9 << 20), seed in any::<u64>(), piece in 1usize..100_000, hint in prop_oneof![Just(u64::MAX), 0u64..(10 << 20)]) {
            struct Trickle<'a>(&'a [u8], usize);
            impl Read for Trickle<'_> {
                fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                    let n = buf.len().min(self.1).min(self.0.len());
                    buf[..n].copy_from_slice(&self.0[..n]);
                    self.0 = &self.0[n..];
                    Ok(n)
                }
            }
            let data = pseudo_random(len, seed);
            let ours: Vec<usize> = chunk_stream_sized(Trickle(&data, piece), hint)
                .map(|c| c.expect("chunk").len())
                .collect();
            let theirs: Vec<usize> =
                fastcdc::v2020::StreamCDC::new(&data[..], MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
                    .map(|c| c.expect("chunk").length)
                    .collect();
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn compressible_data_shrinks_and_random_data_does_not_grow() {
        let c = crypto();
        let text = b"the quick brown fox ".repeat(10_000);
        let id = c.chunk_id(&text);
        assert!(c.seal_chunk(&id, &text).expect("seal").len() < text.len() / 4);
        let rnd = pseudo_random(100_000, 1);
        let id = c.chunk_id(&rnd);
        assert_eq!(
            c.seal_chunk(&id, &rnd).expect("seal").len(),
            rnd.len() + SEAL_OVERHEAD
        );
    }

    #[test]
    fn every_bit_class_flip_is_detected() {
        let c = crypto();
        for data in [pseudo_random(5000, 7), b"abc".repeat(3000)] {
            let id = c.chunk_id(&data);
            let sealed = c.seal_chunk(&id, &data).expect("seal");
            // version, nonce, first ciphertext byte (flag), middle, last tag byte
            for at in [0, 1, 24, 25, sealed.len() / 2, sealed.len() - 1] {
                for bit in [0x01u8, 0x80] {
                    let mut bad = sealed.clone();
                    bad[at] ^= bit;
                    assert!(c.open_chunk(&id, &bad).is_err(), "flip at {at}");
                }
            }
            assert!(c.open_chunk(&id, &sealed[..sealed.len() - 1]).is_err());
            assert!(c.open_chunk(&id, &sealed[..10]).is_err());
            let mut extended = sealed.clone();
            extended.push(0);
            assert!(c.open_chunk(&id, &extended).is_err());
        }
    }

    #[test]
    fn a_chunk_cannot_pose_as_another() {
        let c = crypto();
        let (a, b) = (pseudo_random(1000, 1), pseudo_random(1000, 2));
        let (ida, idb) = (c.chunk_id(&a), c.chunk_id(&b));
        let sealed_a = c.seal_chunk(&ida, &a).expect("seal");
        assert!(matches!(
            c.open_chunk(&idb, &sealed_a),
            Err(ChunkError::Auth)
        ));
        // And a manifest sealed for one file does not open as a chunk or another file.
        let f1 = c.file_id(b"w/a");
        let m = c.seal_manifest(&f1, b"manifest").expect("seal");
        assert!(c.open_manifest(&c.file_id(b"w/b"), &m).is_err());
        assert!(c.open_chunk(&ChunkId(f1.0), &m).is_err());
        assert_eq!(c.open_manifest(&f1, &m).expect("open"), b"manifest");
    }

    #[test]
    fn other_keys_cannot_open() {
        let (c1, c2) = (crypto(), crypto());
        let d = pseudo_random(100, 3);
        let id = c1.chunk_id(&d);
        assert_ne!(id, c2.chunk_id(&d));
        let s = c1.seal_chunk(&id, &d).expect("seal");
        assert!(c2.open_chunk(&id, &s).is_err());
    }

    #[test]
    fn chunking_is_content_defined() {
        // Inserting bytes near the start leaves most later chunks unchanged.
        let data = pseudo_random(16 << 20, 9);
        let a: Vec<_> = chunk_stream(&data[..])
            .map(|c| blake3::hash(&c.expect("c")))
            .collect();
        let mut edited = data[..1000].to_vec();
        edited.extend_from_slice(b"inserted");
        edited.extend_from_slice(&data[1000..]);
        let b: Vec<_> = chunk_stream(&edited[..])
            .map(|c| blake3::hash(&c.expect("c")))
            .collect();
        let shared = a.iter().filter(|h| b.contains(h)).count();
        assert!(
            shared + 2 >= a.len(),
            "{shared} of {} chunks shared",
            a.len()
        );
    }

    #[test]
    fn hex_round_trip() {
        let b = pseudo_random(33, 4);
        assert_eq!(from_hex(&to_hex(&b)).expect("hex"), b);
        assert!(from_hex("zz").is_none());
        assert!(from_hex("abc").is_none());
    }
}
