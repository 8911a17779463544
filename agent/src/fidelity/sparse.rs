//! Sparse files: their data extents found with `SEEK_DATA`/`SEEK_HOLE` (no read of a
//! hole), only the data read and chunked, and the holes hashed as zeros from memory, so
//! the content hash is that of the file's bytes, as for any file.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use coffer_common::chunk::HashingReader;
use coffer_common::manifest::{Extent, MAX_EXTENTS};
use rustix::fs::SeekFrom;

/// The data extents of an open regular file of `size` bytes with `blocks` 512-byte blocks
/// allocated, or `None` when it is read whole: it has no holes (a file with every block
/// allocated is not even asked, however many zeros it holds), the file system cannot say,
/// or it has more than [`MAX_EXTENTS`] extents. Leaves the file's position at 0.
pub fn data_extents(file: &File, size: u64, blocks: u64) -> Option<Vec<Extent>> {
    if size == 0 || blocks.saturating_mul(512) >= size {
        return None;
    }
    let found = extents(file, size);
    rustix::fs::seek(file, SeekFrom::Start(0)).ok()?;
    match found {
        Some(e)
            if e.as_slice()
                == [Extent {
                    offset: 0,
                    len: size,
                }] =>
        {
            None
        }
        other => other,
    }
}

fn extents(file: &File, size: u64) -> Option<Vec<Extent>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            // No data past `pos`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return None,
        };
        if start >= size {
            break;
        }
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))
            .ok()?
            .min(size);
        if end <= start {
            return None;
        }
        out.push(Extent {
            offset: start,
            len: end - start,
        });
        if out.len() > MAX_EXTENTS {
            return None;
        }
        pos = end;
    }
    Some(out)
}

/// Zeros hashed for holes, from memory.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

fn hash_zeros(h: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Reads a sparse file's extents in order (the bytes the chunker cuts), hashing the whole
/// file's bytes on the way: each hole as zeros, without reading it.
pub struct ExtentReader<'a> {
    file: &'a File,
    extents: &'a [Extent],
    /// The extent being read and how far into it.
    idx: usize,
    off: u64,
    hasher: blake3::Hasher,
    /// File offset up to which the bytes are hashed.
    hashed: u64,
    /// A read came up short (the file shrank): what is hashed is all there is.
    short: bool,
}

impl<'a> ExtentReader<'a> {
    pub fn new(file: &'a File, extents: &'a [Extent]) -> Self {
        ExtentReader {
            file,
            extents,
            idx: 0,
            off: 0,
            hasher: blake3::Hasher::new(),
            hashed: 0,
            short: false,
        }
    }

    /// The hash of the file's `size` bytes and how many it holds as read (less than
    /// `size` when it shrank while read, which the caller takes as a change).
    pub fn finish(mut self, size: u64) -> ([u8; 32], u64) {
        if !self.short && self.idx == self.extents.len() && self.hashed <= size {
            hash_zeros(&mut self.hasher, size - self.hashed);
            self.hashed = size;
        }
        (*self.hasher.finalize().as_bytes(), self.hashed)
    }
}

impl Read for ExtentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.short || buf.is_empty() {
                return Ok(0);
            }
            let Some(e) = self.extents.get(self.idx) else {
                return Ok(0);
            };
            if self.off == e.len {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            if self.off == 0 && self.hashed < e.offset {
                hash_zeros(&mut self.hasher, e.offset - self.hashed);
                self.hashed = e.offset;
            }
            let want = (e.len - self.off).min(buf.len() as u64) as usize;
            let n = self.file.read_at(&mut buf[..want], e.offset + self.off)?;
            if n == 0 {
                self.short = true;
                return Ok(0);
            }
            self.hasher.update(&buf[..n]);
            self.off += n as u64;
            self.hashed = e.offset + self.off;
            return Ok(n);
        }
    }
}

/// What a large file's read goes through: the whole file, or a sparse file's extents.
pub enum Source<'a> {
    Dense(HashingReader<&'a File>),
    Sparse(ExtentReader<'a>, u64),
}

impl<'a> Source<'a> {
    pub fn new(file: &'a File, extents: Option<&'a [Extent]>, size: u64) -> Self {
        match extents {
            Some(e) => Source::Sparse(ExtentReader::new(file, e), size),
            None => Source::Dense(HashingReader::new(file)),
        }
    }

    /// The content hash and the file's length as read.
    pub fn finish(self) -> ([u8; 32], u64) {
        match self {
            Source::Dense(r) => r.finish(),
            Source::Sparse(r, size) => r.finish(size),
        }
    }
}

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Dense(r) => r.read(buf),
            Source::Sparse(r, _) => r.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    /// A file with a hole in the middle and one at its end: two extents found, only their
    /// bytes read, and the hash that of every byte; a file of zeros written out is dense.
    #[test]
    fn holes_are_found_hashed_as_zeros_and_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        let mut f = File::create(&p).expect("create");
        f.write_all(&[1u8; 8192]).expect("write");
        f.seek(std::io::SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(&[2u8; 4096]).expect("write");
        f.set_len(4 << 20).expect("len");
        drop(f);
        let f = File::open(&p).expect("open");
        let m = f.metadata().expect("stat");
        use std::os::unix::fs::MetadataExt;
        let Some(ext) = data_extents(&f, m.len(), m.blocks()) else {
            // A file system without holes (or without SEEK_HOLE) stores it whole.
            assert!(m.blocks() * 512 >= m.len());
            return;
        };
        assert_eq!(ext.first().map(|e| e.offset), Some(0));
        assert!(ext.iter().all(|e| e.offset + e.len <= (1 << 20) + 4096));
        let mut r = ExtentReader::new(&f, &ext);
        let mut data = Vec::new();
        r.read_to_end(&mut data).expect("read");
        assert_eq!(data.len() as u64, ext.iter().map(|e| e.len).sum::<u64>());
        assert!(data.len() < 64 << 10, "read {} bytes", data.len());
        let (hash, len) = r.finish(m.len());
        assert_eq!(len, 4 << 20);
        let whole = std::fs::read(&p).expect("read whole");
        assert_eq!(hash, *blake3::hash(&whole).as_bytes());

        let z = dir.path().join("z");
        std::fs::write(&z, vec![0u8; 1 << 20]).expect("zeros");
        let f = File::open(&z).expect("open");
        f.sync_all().expect("sync");
        let m = f.metadata().expect("stat");
        assert_eq!(data_extents(&f, m.len(), m.blocks()), None);
    }
}
