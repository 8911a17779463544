//! A file version's manifest: everything needed to restore it. Sealed with the manifest key
//! before it leaves the agent, so the receiver sees only its length. A folder's version is a
//! manifest too ([`EntryKind::Dir`]): its mode, owner and mtime, no content.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;

/// What a version is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file whose bytes are the concatenated chunks.
    File,
    /// A symbolic link, kept as its target's raw bytes (never followed).
    Symlink {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// The file was deleted at this version.
    Deleted,
    /// A folder: `mode`, `uid`, `gid` and `mtime_ns` are its own; `size` is 0, no chunks,
    /// `content_hash` zero. Last, so the variant indexes of older manifests (postcard
    /// encodes a variant by its index) keep their meaning.
    Dir,
}

/// One chunk of a file: its id and plaintext length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
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
    /// BLAKE3 of exactly the bytes that were chunked and sent.
    pub content_hash: [u8; 32],
    pub chunks: Vec<ChunkRef>,
}

/// Errors decoding a manifest or validating its path.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest does not decode: {0}")]
    Decode(String),
    #[error("unsafe path in manifest ({0}): {1:?}")]
    UnsafePath(&'static str, String),
}

impl Manifest {
    /// Serializes the manifest (before sealing).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain owned data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Deserializes a manifest (after opening).
    pub fn decode(b: &[u8]) -> Result<Self, ManifestError> {
        postcard::from_bytes(b).map_err(|e| ManifestError::Decode(e.to_string()))
    }

    /// The path split into components, refused if it could escape a restore target:
    /// absolute, empty, `.`/`..` components, empty components or NUL bytes.
    pub fn safe_components(&self) -> Result<Vec<&[u8]>, ManifestError> {
        safe_components(&self.path)
    }
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
        };
        assert_eq!(Manifest::decode(&m.encode()).expect("decode"), m);
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
                },
            ),
        ];
        for (bytes, want) in fixtures {
            let bytes = hex(&bytes.replace(' ', ""));
            assert_eq!(Manifest::decode(&bytes).expect("decodes"), want);
            assert_eq!(want.encode(), bytes);
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
        };
        let enc = dir.encode();
        assert_eq!(enc[..7], [5, b'w', b'/', b's', b'u', b'b', 3]);
        assert_eq!(Manifest::decode(&enc).expect("decode"), dir);
    }
}
