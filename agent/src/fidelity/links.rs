//! The reads a file version may share with another: a hard link's other name (same inode,
//! same stat, ctime included), or the same file after a change of its attributes alone
//! (same size and mtime, a new ctime, different attributes). Their content (hash, chunks,
//! extents) is taken from the last read of the inode instead of being read again.
//!
//! Held in memory, for the last [`ENTRIES`] inodes read (and at most [`REFS`] chunk
//! references), so memory is bounded whatever the file count; after a restart the first
//! read of each inode reads it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};

use coffer_common::manifest::{ChunkRef, Extent};

/// Inodes remembered at most.
pub const ENTRIES: usize = 4096;
/// Chunk references held at most, all entries together.
pub const REFS: usize = 64 * 1024;

/// The stat a read was made at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// One inode's last read.
#[derive(Debug, Clone)]
pub struct Read {
    /// The path it was read through.
    pub path: Vec<u8>,
    pub at: At,
    /// Digest of its attributes at the read.
    pub xattrs: [u8; 32],
    pub hash: [u8; 32],
    pub chunks: Vec<ChunkRef>,
    pub sparse: Option<Vec<Extent>>,
}

#[derive(Default)]
pub struct Reads {
    map: HashMap<(u64, u64), Read>,
    order: VecDeque<(u64, u64)>,
    refs: usize,
}

impl Reads {
    /// The read of inode `(dev, ino)` this one may share: at the same stat (another name
    /// of it), or at the same size and mtime with other attributes (only they changed).
    /// A changed ctime with the same attributes (a chmod, or content written and its mtime
    /// put back) is read again.
    pub fn get(&self, dev: u64, ino: u64, at: At, xattrs: &[u8; 32]) -> Option<Read> {
        let r = self.map.get(&(dev, ino))?;
        let same = r.at == at;
        let attrs_only =
            r.at.size == at.size && r.at.mtime_ns == at.mtime_ns && r.xattrs != *xattrs;
        (same || attrs_only).then(|| r.clone())
    }

    pub fn put(&mut self, dev: u64, ino: u64, read: Read) {
        let key = (dev, ino);
        self.refs += read.chunks.len();
        if let Some(old) = self.map.insert(key, read) {
            self.refs -= old.chunks.len();
            self.order.retain(|k| *k != key);
        }
        self.order.push_back(key);
        while self.map.len() > ENTRIES || self.refs > REFS {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.map.remove(&k) {
                self.refs -= old.chunks.len();
            }
        }
    }
}

/// The agent's reads (one per process).
pub fn reads() -> &'static Mutex<Reads> {
    static READS: OnceLock<Mutex<Reads>> = OnceLock::new();
    READS.get_or_init(Mutex::default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffer_common::chunk::ChunkId;

    fn read(path: &str, at: At, x: u8, chunks: usize) -> Read {
        Read {
            path: path.as_bytes().to_vec(),
            at,
            xattrs: [x; 32],
            hash: [1; 32],
            chunks: vec![
                ChunkRef {
                    id: ChunkId([2; 32]),
                    len: 1
                };
                chunks
            ],
            sparse: None,
        }
    }

    /// Another name of the inode at the same stat shares the read; so does a new ctime with
    /// other attributes; a new ctime with the same attributes, or another size or mtime,
    /// does not. Old entries go first once the bounds are passed.
    #[test]
    fn what_shares_a_read_and_the_bounds() {
        let at = At {
            size: 10,
            mtime_ns: 5,
            ctime_ns: 6,
        };
        let mut r = Reads::default();
        r.put(1, 2, read("w/a", at, 0, 1));
        assert_eq!(
            r.get(1, 2, at, &[0; 32]).map(|r| r.path),
            Some(b"w/a".to_vec())
        );
        assert!(r.get(1, 3, at, &[0; 32]).is_none());
        let touched = At { ctime_ns: 7, ..at };
        assert!(r.get(1, 2, touched, &[0; 32]).is_none());
        assert!(r.get(1, 2, touched, &[9; 32]).is_some());
        assert!(r
            .get(
                1,
                2,
                At {
                    mtime_ns: 8,
                    ..touched
                },
                &[9; 32]
            )
            .is_none());
        assert!(r
            .get(
                1,
                2,
                At {
                    size: 11,
                    ..touched
                },
                &[9; 32]
            )
            .is_none());
        for i in 0..ENTRIES as u64 {
            r.put(2, i, read("w/x", at, 0, 1));
        }
        assert!(r.get(1, 2, at, &[0; 32]).is_none(), "the oldest went first");
        assert_eq!(r.map.len(), ENTRIES);
        r.put(3, 0, read("w/big", at, 0, REFS));
        assert!(r.refs <= REFS);
        assert!(r.get(3, 0, at, &[0; 32]).is_some());
    }
}
