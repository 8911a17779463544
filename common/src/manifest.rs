//! A file version's manifest: everything needed to restore it. Sealed with the manifest key
//! before it leaves the agent, so the receiver sees only its length. A folder's version is a
//! manifest too ([`EntryKind::Dir`]): its mode, owner and mtime, no content.
//!
//! Encoding: `0x00`, the format byte ([`FORMAT`]), then the `postcard` encoding of
//! [`Manifest`]. Manifests of the first format (before sparse files, hard links, extended
//! attributes and special files) are the bare `postcard` encoding of the fields up to
//! `chunks`; their first byte is the path's length, never 0 for a path that restores, so
//! the two are told apart by the first byte and both decode.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;

/// The manifest format written by this build.
pub const FORMAT: u8 = 2;

/// Data extents a manifest holds at most: a file more fragmented than this is read and
/// stored whole (holes as zeros), so a manifest stays within `wire::MAX_MANIFEST`.
pub const MAX_EXTENTS: usize = 32 * 1024;
/// Bytes of extended attributes (names and values) a manifest holds at most; attributes
/// past it are left out with a warning.
pub const MAX_XATTR_BYTES: usize = 512 * 1024;

/// What a version is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file whose bytes are the concatenated chunks (placed at the data extents
    /// of a sparse file, see [`Manifest::sparse`]).
    File,
    /// A symbolic link, kept as its target's raw bytes (never followed).
    Symlink {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// The file was deleted at this version.
    Deleted,
    /// A folder: `mode`, `uid`, `gid` and `mtime_ns` are its own; `size` is 0, no chunks,
    /// `content_hash` zero. After the first three, so the variant indexes of older manifests
    /// (postcard encodes a variant by its index) keep their meaning.
    Dir,
    /// A FIFO, socket or device node (format 2): no content; `rdev` is a device's number.
    Special { kind: SpecialKind, rdev: u64 },
}

/// The kind of a [`EntryKind::Special`] file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpecialKind {
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl SpecialKind {
    /// As `ls` and `versions` show it.
    pub fn name(self) -> &'static str {
        match self {
            SpecialKind::Fifo => "fifo",
            SpecialKind::Socket => "socket",
            SpecialKind::CharDevice => "char-device",
            SpecialKind::BlockDevice => "block-device",
        }
    }
}

/// One chunk of a file: its id and plaintext length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// A region of a sparse file that holds data: `len` bytes at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// One extended attribute (an ACL is the attribute `system.posix_acl_access` or
/// `system.posix_acl_default`, kept in the kernel's binary form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// A file with more than one name: the inode it was read from. Versions of two paths with
/// the same `dev`, `ino` and content are hard links to one another, restored as such when
/// both are restored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardLink {
    pub dev: u64,
    pub ino: u64,
    /// Another path of the inode whose read this version shares (its content was not read
    /// again), empty when this version's content was read.
    #[serde(with = "serde_bytes")]
    pub to: Vec<u8>,
}

/// One version of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// `watch-name/relative/path` as raw bytes (names need not be UTF-8).
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// BLAKE3 of the file's bytes as read (a sparse file's holes as zeros).
    pub content_hash: [u8; 32],
    pub chunks: Vec<ChunkRef>,
    /// A sparse file: the regions holding data, in order; every other byte up to `size` is
    /// a hole (zeros), and the chunks are the extents' bytes concatenated. `None`: the
    /// chunks are every byte.
    pub sparse: Option<Vec<Extent>>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<Xattr>,
    pub hardlink: Option<HardLink>,
}

/// The fields of a manifest of format 1, as they were encoded.
#[derive(Deserialize, Serialize)]
struct V1 {
    #[serde(with = "serde_bytes")]
    path: Vec<u8>,
    kind: EntryKind,
    size: u64,
    mtime_ns: i64,
    mode: u32,
    uid: u32,
    gid: u32,
    content_hash: [u8; 32],
    chunks: Vec<ChunkRef>,
}

/// Errors decoding a manifest or validating its path.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest does not decode: {0}")]
    Decode(String),
    #[error("manifest format {0} is newer than this build reads ({FORMAT}); upgrade coffer")]
    Newer(u8),
    #[error("unsafe path in manifest ({0}): {1:?}")]
    UnsafePath(&'static str, String),
    #[error("the manifest's data extents do not fit its size and chunks: {0}")]
    Extents(&'static str),
}

impl Manifest {
    /// Serializes the manifest (before sealing), in format [`FORMAT`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0, FORMAT];
        // Serializing plain owned data into a Vec cannot fail.
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Deserializes a manifest (after opening), of format 1 or 2.
    pub fn decode(b: &[u8]) -> Result<Self, ManifestError> {
        let err = |e: postcard::Error| ManifestError::Decode(e.to_string());
        match b {
            [0, FORMAT, rest @ ..] => postcard::from_bytes(rest).map_err(err),
            [0, v, ..] => Err(ManifestError::Newer(*v)),
            _ => {
                let v: V1 = postcard::from_bytes(b).map_err(err)?;
                Ok(Manifest {
                    path: v.path,
                    kind: v.kind,
                    size: v.size,
                    mtime_ns: v.mtime_ns,
                    mode: v.mode,
                    uid: v.uid,
                    gid: v.gid,
                    content_hash: v.content_hash,
                    chunks: v.chunks,
                    sparse: None,
                    xattrs: vec![],
                    hardlink: None,
                })
            }
        }
    }

    /// The path split into components, refused if it could escape a restore target:
    /// absolute, empty, `.`/`..` components, empty components or NUL bytes.
    pub fn safe_components(&self) -> Result<Vec<&[u8]>, ManifestError> {
        safe_components(&self.path)
    }

    /// Bytes the chunks hold.
    pub fn data_len(&self) -> u64 {
        self.chunks.iter().map(|c| c.len as u64).sum()
    }

    /// Checks a sparse file's extents: in order, not overlapping, not empty, within
    /// `size`, and holding exactly the chunks' bytes (a damaged or hostile manifest cannot
    /// make a restore write outside the file or leave data unplaced).
    pub fn check_extents(&self) -> Result<(), ManifestError> {
        let Some(ext) = &self.sparse else {
            return Ok(());
        };
        let mut end = 0u64;
        let mut total = 0u64;
        for e in ext {
            if e.len == 0 {
                return Err(ManifestError::Extents("an empty extent"));
            }
            if e.offset < end {
                return Err(ManifestError::Extents(
                    "extents out of order or overlapping",
                ));
            }
            end = e
                .offset
                .checked_add(e.len)
                .ok_or(ManifestError::Extents("an extent past the largest offset"))?;
            if end > self.size {
                return Err(ManifestError::Extents("an extent past the file's size"));
            }
            total += e.len;
        }
        if total != self.data_len() {
            return Err(ManifestError::Extents(
                "extents and chunks differ in length",
            ));
        }
        Ok(())
    }
}

/// Where `len` bytes of a sparse file's data, starting `data_off` bytes into the
/// concatenated extents, go in the file: `(file offset, start, end)` of the bytes given,
/// in order. Dense files (`extents` `None`) map one to one. Bytes past the last extent are
/// left out (a manifest that passed [`Manifest::check_extents`] has none).
pub fn place(extents: Option<&[Extent]>, data_off: u64, len: usize) -> Vec<(u64, usize, usize)> {
    let Some(ext) = extents else {
        return vec![(data_off, 0, len)];
    };
    let mut out = Vec::new();
    let (mut skip, mut done) = (data_off, 0usize);
    for e in ext {
        if done == len {
            break;
        }
        if skip >= e.len {
            skip -= e.len;
            continue;
        }
        let n = ((e.len - skip).min((len - done) as u64)) as usize;
        out.push((e.offset + skip, done, done + n));
        done += n;
        skip = 0;
    }
    out
}

/// See [`Manifest::safe_components`].
pub fn safe_components(path: &[u8]) -> Result<Vec<&[u8]>, ManifestError> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    if path.is_empty() {
        return Err(ManifestError::UnsafePath("empty", shown()));
    }
    if path[0] == b'/' {
        return Err(ManifestError::UnsafePath("absolute", shown()));
    }
    if path.contains(&0) {
        return Err(ManifestError::UnsafePath("NUL byte", shown()));
    }
    let parts: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    for p in &parts {
        match *p {
            b"" => return Err(ManifestError::UnsafePath("empty component", shown())),
            b"." | b".." => return Err(ManifestError::UnsafePath("dot component", shown())),
            _ => {}
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Manifest {
            path: b"docs/\xffodd\nname".to_vec(),
            kind: EntryKind::Symlink {
                target: b"../x".to_vec(),
            },
            size: 3,
            mtime_ns: -5,
            mode: 0o644,
            uid: 1,
            gid: 2,
            content_hash: [9; 32],
            chunks: vec![ChunkRef {
                id: ChunkId([1; 32]),
                len: 3,
            }],
            sparse: Some(vec![Extent { offset: 8, len: 3 }]),
            xattrs: vec![Xattr {
                name: b"user.tag".to_vec(),
                value: b"\0red".to_vec(),
            }],
            hardlink: Some(HardLink {
                dev: 3,
                ino: 4,
                to: b"docs/a".to_vec(),
            }),
        };
        let enc = m.encode();
        assert_eq!(enc[..2], [0, FORMAT]);
        assert_eq!(Manifest::decode(&enc).expect("decode"), m);
        let special = Manifest {
            kind: EntryKind::Special {
                kind: SpecialKind::BlockDevice,
                rdev: 0x0801,
            },
            sparse: None,
            hardlink: None,
            ..m
        };
        assert_eq!(
            Manifest::decode(&special.encode()).expect("decode"),
            special
        );
        // A format this build does not know is named, not misread.
        let mut newer = special.encode();
        newer[1] = 9;
        let e = Manifest::decode(&newer).expect_err("newer");
        assert!(e.to_string().contains("format 9"), "{e}");
    }

    #[test]
    fn sparse_data_is_placed_at_its_extents() {
        let ext = [
            Extent { offset: 10, len: 4 },
            Extent {
                offset: 100,
                len: 2,
            },
            Extent {
                offset: 200,
                len: 5,
            },
        ];
        assert_eq!(place(None, 7, 3), vec![(7, 0, 3)]);
        assert_eq!(place(Some(&ext), 0, 4), vec![(10, 0, 4)]);
        assert_eq!(
            place(Some(&ext), 2, 6),
            vec![(12, 0, 2), (100, 2, 4), (200, 4, 6)]
        );
        assert_eq!(place(Some(&ext), 6, 5), vec![(200, 0, 5)]);
        let mut m = Manifest {
            path: b"w/s".to_vec(),
            kind: EntryKind::File,
            size: 205,
            mtime_ns: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            content_hash: [0; 32],
            chunks: vec![ChunkRef {
                id: ChunkId([1; 32]),
                len: 11,
            }],
            sparse: Some(ext.to_vec()),
            xattrs: vec![],
            hardlink: None,
        };
        m.check_extents().expect("fits");
        m.size = 204;
        assert!(m.check_extents().is_err(), "past the size");
        m.size = 205;
        m.chunks[0].len = 12;
        assert!(m.check_extents().is_err(), "more data than extents");
        m.chunks[0].len = 11;
        m.sparse = Some(vec![ext[1], ext[0], ext[2]]);
        assert!(m.check_extents().is_err(), "out of order");
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"../x",
            b"a/../../x",
            b"a//b",
            b"a/./b",
            b"a/b/",
            b"a\0b",
            b"..",
        ] {
            assert!(safe_components(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            safe_components(b"w/a b/c..d").expect("ok"),
            vec![&b"w"[..], b"a b", b"c..d"]
        );
    }

    /// Manifests encoded by the release before folder versions (`Dir`) existed, as bytes:
    /// they decode the same, and the same values encode to the same bytes.
    #[test]
    fn manifests_of_the_release_before_dir_still_decode() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
                .collect()
        };
        let fixtures = [
            (
                "03772f610005aab4aed8c7bfce972fa403e80764070707070707070707070707070707070707\
                 070707070707070707070707070701030303030303030303030303030303030303030303030303\
                 030303030303030305",
                Manifest {
                    path: b"w/a".to_vec(),
                    kind: EntryKind::File,
                    size: 5,
                    mtime_ns: 1_700_000_000_123_456_789,
                    mode: 0o644,
                    uid: 1000,
                    gid: 100,
                    content_hash: [7; 32],
                    chunks: vec![ChunkRef {
                        id: ChunkId([3; 32]),
                        len: 5,
                    }],
                    sparse: None,
                    xattrs: vec![],
                    hardlink: None,
                },
            ),
            (
                "03772f6c0101610102ff03000001010101010101010101010101010101010101010101010101\
                 0101010101010100",
                Manifest {
                    path: b"w/l".to_vec(),
                    kind: EntryKind::Symlink {
                        target: b"a".to_vec(),
                    },
                    size: 1,
                    mtime_ns: 1,
                    mode: 0o777,
                    uid: 0,
                    gid: 0,
                    content_hash: [1; 32],
                    chunks: vec![],
                    sparse: None,
                    xattrs: vec![],
                    hardlink: None,
                },
            ),
            (
                "03772f6402000000000000000000000000000000000000000000000000000000000000000000\
                 0000000000",
                Manifest {
                    path: b"w/d".to_vec(),
                    kind: EntryKind::Deleted,
                    size: 0,
                    mtime_ns: 0,
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    content_hash: [0; 32],
                    chunks: vec![],
                    sparse: None,
                    xattrs: vec![],
                    hardlink: None,
                },
            ),
        ];
        for (bytes, want) in fixtures {
            let bytes = hex(&bytes.replace(' ', ""));
            assert_eq!(Manifest::decode(&bytes).expect("decodes"), want);
            // Format 1 is what the old encoding gave for these values.
            let v1 = V1 {
                path: want.path.clone(),
                kind: want.kind.clone(),
                size: want.size,
                mtime_ns: want.mtime_ns,
                mode: want.mode,
                uid: want.uid,
                gid: want.gid,
                content_hash: want.content_hash,
                chunks: want.chunks.clone(),
            };
            assert_eq!(postcard::to_stdvec(&v1).expect("encode"), bytes);
            assert_eq!(Manifest::decode(&want.encode()).expect("decodes"), want);
        }
        // A folder's version: the new last variant, index 3.
        let dir = Manifest {
            path: b"w/sub".to_vec(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: 5,
            mode: 0o750,
            uid: 1,
            gid: 2,
            content_hash: [0; 32],
            chunks: vec![],
            sparse: None,
            xattrs: vec![],
            hardlink: None,
        };
        let enc = dir.encode();
        assert_eq!(enc[..9], [0, FORMAT, 5, b'w', b'/', b's', b'u', b'b', 3]);
        assert_eq!(Manifest::decode(&enc).expect("decode"), dir);
    }
}
