//! The protocol: one message enum, each request paired with its reply, and its framing.
//!
//! A message is encoded with `postcard` and carried in one *frame* of the secure channel.
//! Frames are capped at [`MAX_FRAME`] bytes; the cap is checked on the length prefix before
//! any buffer is allocated. An unknown message kind is a typed error, not a panic.

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, FileId, MAX_CHUNK, MAX_SEALED, SEAL_OVERHEAD};

/// Protocol version spoken by this build. Exchanged in the clear before the handshake (and
/// bound into it as the Noise prologue); a mismatch is a clear error on both sides.
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest encoded message: a sealed chunk at its largest plus room for the envelope.
pub const MAX_FRAME: usize = MAX_SEALED + 64 * 1024;

/// Largest number of ids in one presence query or commit (bounded by `MAX_FRAME`).
pub const MAX_IDS: usize = 64 * 1024;

/// Largest number of files committed by one `PutFiles` (and of chunks it carries).
pub const MAX_BATCH_FILES: usize = 4096;

/// Largest sealed chunk a receiver accepts: the largest chunk the chunker cuts
/// ([`MAX_CHUNK`]) sealed without compression. ([`MAX_SEALED`] bounds any sealed blob.)
pub const MAX_SEALED_CHUNK: usize = MAX_CHUNK as usize + SEAL_OVERHEAD;

/// Largest sealed manifest a receiver accepts. A manifest holds a path, a symlink target
/// and 36 bytes at most per chunk reference; with [`MAX_IDS`] references that is 2.3 MiB
/// plus the path, so 4 MiB leaves room for any real path while keeping a `CommitFile` at
/// its largest inside a frame.
pub const MAX_MANIFEST: usize = 4 << 20;

/// Longest `agent_name`, and `software`, of a `Hello` (bytes).
pub const MAX_NAME: usize = 256;

/// A client-chosen commit id: stored in the agent's journal before the commit is sent, so a
/// repeated commit after a crash is recognised and answered with the existing version.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub struct CommitId(pub [u8; 16]);

/// One version of a file as listed for restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionEntry {
    /// Receiver-assigned, monotonic per repository.
    pub version: u64,
    pub file_id: FileId,
    /// Commit time on the receiver, Unix seconds.
    pub commit_time: i64,
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The agent's key is not authorized on this receiver.
    Unauthorized,
    /// The peers speak different protocol versions.
    ProtocolVersion,
    /// A message was malformed or out of place.
    Malformed,
    /// The receiver could not store data (e.g. the disk is full); nothing was acknowledged.
    Storage,
    /// A commit referenced chunks the receiver does not have.
    MissingChunks,
    /// The requested object does not exist.
    NotFound,
    /// The receiver is shutting down.
    ShuttingDown,
    /// Anything else.
    Internal,
    /// The repository is over its quota, or the receiver's disk is below its free-space
    /// floor: new chunks are refused (nothing of the request was stored); commits that need
    /// no new chunks still succeed. The message says which, with the numbers.
    QuotaExceeded,
}

/// A repository's quota as the receiver sees it at `Welcome` (absent when it has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaInfo {
    /// Bytes the repository's packs hold.
    pub used: u64,
    /// The quota, in bytes (never 0: no quota is no `QuotaInfo`).
    pub quota: u64,
    /// The warning threshold, in percent of the quota (1..=100).
    pub warn_at_percent: u32,
}

/// Every message of the protocol. Requests come from the agent; each gets exactly one
/// reply, in order, so requests can be pipelined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First request of a session. Reply: `Welcome`.
    Hello {
        protocol: u32,
        /// The machine's name, for logs only (identity is the key).
        agent_name: String,
        software: String,
    },
    Welcome {
        protocol: u32,
        /// Repository this agent's key writes to.
        repo: String,
        /// The repository's use and quota, when it has one (protocol 5).
        quota: Option<QuotaInfo>,
    },
    /// Which of these chunks are missing? Reply: `Missing`.
    HaveChunks {
        ids: Vec<ChunkId>,
    },
    Missing {
        ids: Vec<ChunkId>,
    },
    /// Store a sealed chunk (a chunk already present is not stored again). Reply: `Stored`.
    /// `sealed_hash` is the BLAKE3 of `sealed`: the channel carries the sealed bytes
    /// outside its own encryption and checks them against it (see [`Message::put_chunk`]).
    PutChunk {
        id: ChunkId,
        sealed_hash: [u8; 32],
        #[serde(with = "serde_bytes")]
        sealed: Vec<u8>,
    },
    Stored {
        id: ChunkId,
    },
    /// Record a new version of a file. Reply, once durable: `FileAcked`.
    CommitFile {
        commit_id: CommitId,
        file_id: FileId,
        #[serde(with = "serde_bytes")]
        manifest: Vec<u8>,
        chunks: Vec<ChunkId>,
        /// The version records the file's deletion (its manifest's kind is `Deleted`); the
        /// receiver keeps it in the version's commit record, for retention (protocol 5).
        deleted: bool,
    },
    FileAcked {
        commit_id: CommitId,
        version: u64,
        /// Commit time on the receiver, Unix seconds.
        commit_time: i64,
    },
    /// Escrow the wrapped key file, added to the repository's history of key files (one
    /// equal to an entry already there is not added again). Reply: `KeyFileStored`.
    PutKeyFile {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    KeyFileStored,
    /// Fetch the newest escrowed key file. Reply: `KeyFile`.
    GetKeyFile,
    KeyFile {
        #[serde(with = "serde_bytes")]
        data: Option<Vec<u8>>,
    },
    /// List versions with `version > after`, oldest first. Reply: `Versions`.
    ListVersions {
        after: u64,
        limit: u32,
    },
    Versions {
        entries: Vec<VersionEntry>,
        /// True when more versions follow the last one listed.
        more: bool,
    },
    /// Fetch a sealed chunk. Reply: `Chunk`.
    GetChunk {
        id: ChunkId,
    },
    /// A stored chunk. Its sealed bytes also cross the channel outside the Noise
    /// encryption, but without a hash: the agent trusts neither the receiver nor the
    /// network for them and opens each chunk (tag, then id) before using a byte.
    Chunk {
        id: ChunkId,
        #[serde(with = "serde_bytes")]
        sealed: Vec<u8>,
    },
    /// Reply to any request that failed.
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The small-file fast path: store these sealed chunks, then record these file
    /// versions (which may reference the chunks, or chunks stored earlier). One request and
    /// one reply for many files. Reply, once every commit is durable: `FilesAcked`, or
    /// `Error` when the chunks could not be stored (then nothing of it was acknowledged).
    PutFiles {
        chunks: Vec<SealedChunk>,
        commits: Vec<FileCommit>,
    },
    /// One result per commit of a `PutFiles`, in the same order.
    FilesAcked {
        results: Vec<CommitResult>,
    },
    /// Fetch every escrowed key file of the repository. Reply: `KeyFiles`.
    GetKeyFiles,
    /// The repository's escrowed key files, newest first (at most [`MAX_KEYFILES`]).
    KeyFiles {
        files: Vec<EscrowedKeyFile>,
    },
}

/// Most key files a repository's escrow holds; past it a new one is refused (none is ever
/// removed), so a stolen agent key cannot fill the receiver's disk with them.
pub const MAX_KEYFILES: usize = 64;

/// One entry of a repository's escrowed key files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowedKeyFile {
    /// Its number in the repository's history: 0 the oldest, increasing, never reused.
    pub number: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A sealed chunk inside a `PutFiles`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedChunk {
    pub id: ChunkId,
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

/// A file version inside a `PutFiles` (the fields of `CommitFile`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCommit {
    pub commit_id: CommitId,
    pub file_id: FileId,
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    pub chunks: Vec<ChunkId>,
    /// As `CommitFile`'s.
    pub deleted: bool,
}

/// The outcome of one commit of a `PutFiles`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitResult {
    /// Durable: the same as a `FileAcked`.
    Acked {
        commit_id: CommitId,
        version: u64,
        commit_time: i64,
    },
    /// Not recorded (e.g. it references chunks the receiver lacks); the others are.
    Failed { code: ErrorCode, message: String },
}

/// Number of kinds in [`Message`]; a first byte at or past this is an unknown kind.
const KINDS: u8 = 21;

/// The hash that `PutChunk` and `Chunk` carry of their sealed bytes: BLAKE3, the same as
/// the receiver's pack records hold.
pub fn sealed_hash(sealed: &[u8]) -> [u8; 32] {
    *blake3::hash(sealed).as_bytes()
}

impl Message {
    /// A `PutChunk` of `sealed`, hashing it.
    pub fn put_chunk(id: ChunkId, sealed: Vec<u8>) -> Self {
        Message::PutChunk {
            id,
            sealed_hash: sealed_hash(&sealed),
            sealed,
        }
    }

    /// Short name of the message kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::HaveChunks { .. } => "HaveChunks",
            Message::Missing { .. } => "Missing",
            Message::PutChunk { .. } => "PutChunk",
            Message::Stored { .. } => "Stored",
            Message::CommitFile { .. } => "CommitFile",
            Message::FileAcked { .. } => "FileAcked",
            Message::PutKeyFile { .. } => "PutKeyFile",
            Message::KeyFileStored => "KeyFileStored",
            Message::GetKeyFile => "GetKeyFile",
            Message::KeyFile { .. } => "KeyFile",
            Message::ListVersions { .. } => "ListVersions",
            Message::Versions { .. } => "Versions",
            Message::GetChunk { .. } => "GetChunk",
            Message::Chunk { .. } => "Chunk",
            Message::Error { .. } => "Error",
            Message::PutFiles { .. } => "PutFiles",
            Message::FilesAcked { .. } => "FilesAcked",
            Message::GetKeyFiles => "GetKeyFiles",
            Message::KeyFiles { .. } => "KeyFiles",
        }
    }

    /// Encodes the message body (without length prefix).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let v = postcard::to_stdvec(self).map_err(|e| WireError::Encode(e.to_string()))?;
        if v.len() > MAX_FRAME {
            return Err(WireError::TooLarge {
                len: v.len() as u64,
                max: MAX_FRAME,
            });
        }
        Ok(v)
    }

    /// [`Message::encode`]'s output in two pieces, head then tail: for a message carrying a
    /// sealed chunk (`PutChunk`, `Chunk`) a short head and the sealed bytes themselves,
    /// borrowed rather than copied; for any other message the whole encoding and nothing.
    pub fn encode_split(&self) -> Result<(Vec<u8>, &[u8]), WireError> {
        // Postcard writes the id's 32 bytes, for a `PutChunk` the hash's 32 bytes, then the
        // byte string's length as a varint (the same for a usize and a u64 of equal value).
        let enc = |e: postcard::Error| WireError::Encode(e.to_string());
        let (head, sealed) = match self {
            Message::PutChunk {
                id,
                sealed_hash,
                sealed,
            } => (
                postcard::to_extend(
                    &(id, sealed_hash, sealed.len() as u64),
                    vec![PUT_CHUNK_KIND],
                )
                .map_err(enc)?,
                sealed,
            ),
            Message::Chunk { id, sealed } => (
                postcard::to_extend(&(id, sealed.len() as u64), vec![CHUNK_KIND]).map_err(enc)?,
                sealed,
            ),
            _ => return Ok((self.encode()?, &[])),
        };
        let len = head.len() + sealed.len();
        if len > MAX_FRAME {
            return Err(WireError::TooLarge {
                len: len as u64,
                max: MAX_FRAME,
            });
        }
        Ok((head, sealed))
    }

    /// Decodes a message body. Unknown kinds and trailing bytes are errors.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        match body.first() {
            None => return Err(WireError::Malformed("empty frame".into())),
            Some(&k) if k >= KINDS => return Err(WireError::UnknownKind(k)),
            _ => {}
        }
        let (m, rest) =
            postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(WireError::Malformed(format!(
                "{} trailing bytes after message",
                rest.len()
            )));
        }
        Ok(m)
    }
}

/// The head of a frame carrying a sealed chunk (`PutChunk` or `Chunk`): what comes before
/// the sealed bytes, which a receiver can then decrypt straight into their own buffer.
#[derive(Debug)]
pub struct ChunkHead {
    id: ChunkId,
    /// The BLAKE3 of the sealed bytes as the sender stated it (`PutChunk` only).
    pub sealed_hash: Option<[u8; 32]>,
    /// Bytes of the encoding before the sealed bytes.
    pub head_len: usize,
    /// Length of the sealed bytes (the rest of the frame).
    pub sealed_len: usize,
}

impl ChunkHead {
    /// Whether a frame whose body starts with `first` carries a sealed chunk.
    pub fn is_chunk_kind(first: u8) -> bool {
        first == PUT_CHUNK_KIND || first == CHUNK_KIND
    }

    /// Parses the head from the start of a frame's body (`start`) whose full length is
    /// `frame_len`. `None` when the frame is not a chunk or `start` is too short to hold
    /// the whole head; an error when the head's length disagrees with the frame's.
    pub fn parse(start: &[u8], frame_len: usize) -> Result<Option<Self>, WireError> {
        let kind = match start.first() {
            Some(&k) if Self::is_chunk_kind(k) => k,
            _ => return Ok(None),
        };
        let parsed = if kind == PUT_CHUNK_KIND {
            postcard::take_from_bytes::<(ChunkId, [u8; 32], u64)>(&start[1..])
                .map(|((id, hash, len), rest)| ((id, Some(hash), len), rest))
        } else {
            postcard::take_from_bytes::<(ChunkId, u64)>(&start[1..])
                .map(|((id, len), rest)| ((id, None, len), rest))
        };
        let Ok(((id, sealed_hash, sealed_len), rest)) = parsed else {
            return Ok(None);
        };
        let head_len = start.len() - rest.len();
        if (head_len as u64).checked_add(sealed_len) != Some(frame_len as u64) {
            return Err(WireError::Malformed(format!(
                "chunk of {sealed_len} bytes does not fill its frame of {frame_len} bytes"
            )));
        }
        Ok(Some(Self {
            id,
            sealed_hash,
            head_len,
            sealed_len: sealed_len as usize,
        }))
    }

    /// The chunk's id.
    pub fn id(&self) -> ChunkId {
        self.id
    }

    /// The message, given its sealed bytes.
    pub fn into_message(self, sealed: Vec<u8>) -> Message {
        match self.sealed_hash {
            Some(sealed_hash) => Message::PutChunk {
                id: self.id,
                sealed_hash,
                sealed,
            },
            None => Message::Chunk {
                id: self.id,
                sealed,
            },
        }
    }
}

/// Variant index of `PutChunk` (postcard encodes the variant index first).
const PUT_CHUNK_KIND: u8 = 4;
/// Variant index of `Chunk`.
const CHUNK_KIND: u8 = 15;

/// Errors from framing and decoding.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("encoding a message failed: {0}")]
    Encode(String),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("connection closed by peer")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks a frame length prefix against the cap before anything is allocated for it.
pub fn check_len(len: u64) -> Result<usize, WireError> {
    if len > MAX_FRAME as u64 {
        return Err(WireError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kinds_constant_matches_the_enum() {
        // `KeyFiles` is the last variant; postcard encodes the variant index first.
        let e = Message::KeyFiles { files: vec![] };
        assert_eq!(e.encode().expect("encode")[0], KINDS - 1);
        assert_eq!(Message::GetKeyFiles.encode().expect("encode"), [19]);
    }

    #[test]
    fn chunk_kind_constants_match_the_enum() {
        let m = Message::put_chunk(ChunkId([1; 32]), vec![2; 3]);
        assert_eq!(m.encode().expect("encode")[0], PUT_CHUNK_KIND);
        let m = Message::Chunk {
            id: ChunkId([1; 32]),
            sealed: vec![2; 3],
        };
        assert_eq!(m.encode().expect("encode")[0], CHUNK_KIND);
    }

    #[test]
    fn chunk_head_disagreeing_with_its_frame_is_refused() {
        let b = Message::put_chunk(ChunkId([1; 32]), vec![2; 100])
            .encode()
            .expect("encode");
        assert!(ChunkHead::parse(&b, b.len() + 1).is_err());
        assert!(ChunkHead::parse(&b, b.len() - 1).is_err());
        assert!(ChunkHead::parse(&b, b.len()).expect("ok").is_some());
    }

    #[test]
    fn the_largest_honest_manifest_and_commit_fit_the_limits() {
        use crate::manifest::{
            ChunkRef, EntryKind, Extent, HardLink, Manifest, Xattr, MAX_EXTENTS, MAX_XATTR_BYTES,
        };
        let m = Manifest {
            path: vec![b'p'; 64 * 1024],
            kind: EntryKind::Symlink {
                target: vec![b't'; 4096],
            },
            size: u64::MAX,
            mtime_ns: i64::MIN,
            mode: u32::MAX,
            uid: u32::MAX,
            gid: u32::MAX,
            content_hash: [0xff; 32],
            chunks: vec![
                ChunkRef {
                    id: ChunkId([0xff; 32]),
                    len: MAX_CHUNK,
                };
                MAX_IDS
            ],
            sparse: Some(vec![
                Extent {
                    offset: u64::MAX,
                    len: u64::MAX,
                };
                MAX_EXTENTS
            ]),
            xattrs: vec![Xattr {
                name: vec![b'n'; 255],
                value: vec![b'v'; MAX_XATTR_BYTES - 255],
            }],
            hardlink: Some(HardLink {
                dev: u64::MAX,
                ino: u64::MAX,
                to: vec![b'p'; 64 * 1024],
            }),
        };
        let sealed = m.encode().len() + SEAL_OVERHEAD;
        assert!(sealed < MAX_MANIFEST, "{sealed}");
        let c = Message::CommitFile {
            commit_id: CommitId([0xff; 16]),
            file_id: FileId([0xff; 32]),
            manifest: vec![0; MAX_MANIFEST],
            chunks: vec![ChunkId([0xff; 32]); MAX_IDS],
            deleted: true,
        };
        assert!(
            c.encode().is_ok(),
            "a CommitFile at its largest fits a frame"
        );
        const { assert!(MAX_SEALED_CHUNK <= MAX_SEALED) };
    }

    #[test]
    fn a_full_key_file_history_fits_a_frame() {
        let files = vec![
            EscrowedKeyFile {
                number: u32::MAX,
                data: vec![0xff; 4096],
            };
            MAX_KEYFILES
        ];
        assert!(Message::KeyFiles { files }.encode().is_ok());
    }

    #[test]
    fn unknown_kind_is_typed() {
        assert!(matches!(
            Message::decode(&[200, 1, 2]),
            Err(WireError::UnknownKind(200))
        ));
        assert!(matches!(
            Message::decode(&[KINDS]),
            Err(WireError::UnknownKind(_))
        ));
        assert!(matches!(Message::decode(&[]), Err(WireError::Malformed(_))));
    }

    #[test]
    fn truncated_and_trailing_bodies_are_malformed() {
        let m = Message::put_chunk(ChunkId([7; 32]), vec![1; 100]);
        let b = m.encode().expect("encode");
        assert!(Message::decode(&b[..b.len() - 1]).is_err());
        let mut t = b.clone();
        t.push(0);
        assert!(matches!(Message::decode(&t), Err(WireError::Malformed(_))));
    }

    #[test]
    fn oversized_length_is_refused() {
        assert!(check_len(MAX_FRAME as u64).is_ok());
        assert!(matches!(
            check_len(u32::MAX as u64),
            Err(WireError::TooLarge { .. })
        ));
        let big = Message::put_chunk(ChunkId([0; 32]), vec![0; MAX_FRAME]);
        assert!(matches!(big.encode(), Err(WireError::TooLarge { .. })));
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u32>(), ".{0,20}").prop_map(|(p, n)| Message::Hello {
                protocol: p,
                agent_name: n,
                software: "x".into()
            }),
            proptest::collection::vec(any::<[u8; 32]>(), 0..50).prop_map(|ids| {
                Message::HaveChunks {
                    ids: ids.into_iter().map(ChunkId).collect(),
                }
            }),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..5000)
            )
                .prop_map(|(id, sealed)| Message::put_chunk(ChunkId(id), sealed)),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..5000)
            )
                .prop_map(|(id, sealed)| Message::Chunk {
                    id: ChunkId(id),
                    sealed
                }),
            (
                any::<[u8; 16]>(),
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(c, f, manifest)| Message::CommitFile {
                    commit_id: CommitId(c),
                    file_id: FileId(f),
                    deleted: c[0] % 2 == 0,
                    manifest,
                    chunks: vec![ChunkId(f)],
                }),
            (any::<u64>(), any::<i64>()).prop_map(|(v, t)| Message::Versions {
                entries: vec![VersionEntry {
                    version: v,
                    file_id: FileId([1; 32]),
                    commit_time: t,
                    manifest: vec![1, 2, 3]
                }],
                more: v % 2 == 0
            }),
            (".{0,20}", any::<u64>(), any::<u64>(), 1u32..=100).prop_map(
                |(repo, used, quota, w)| {
                    Message::Welcome {
                        protocol: PROTOCOL_VERSION,
                        repo,
                        quota: (quota > 0).then_some(QuotaInfo {
                            used,
                            quota,
                            warn_at_percent: w,
                        }),
                    }
                }
            ),
            Just(Message::GetKeyFile),
            Just(Message::KeyFile { data: None }),
            Just(Message::GetKeyFiles),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
                |(number, data)| Message::KeyFiles {
                    files: vec![EscrowedKeyFile { number, data }; (number % 3) as usize],
                }
            ),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..2000),
                0usize..4
            )
                .prop_map(|(id, sealed, n)| Message::PutFiles {
                    chunks: vec![
                        SealedChunk {
                            id: ChunkId(id),
                            sealed: sealed.clone()
                        };
                        n
                    ],
                    commits: vec![
                        FileCommit {
                            commit_id: CommitId([n as u8; 16]),
                            file_id: FileId(id),
                            manifest: sealed,
                            chunks: vec![ChunkId(id); n],
                            deleted: n == 2,
                        };
                        n
                    ],
                }),
            (any::<u64>(), any::<i64>(), ".{0,20}").prop_map(|(v, t, m)| Message::FilesAcked {
                results: vec![
                    CommitResult::Acked {
                        commit_id: CommitId([3; 16]),
                        version: v,
                        commit_time: t
                    },
                    CommitResult::Failed {
                        code: ErrorCode::MissingChunks,
                        message: m.clone()
                    },
                    CommitResult::Failed {
                        code: ErrorCode::QuotaExceeded,
                        message: m
                    },
                ],
            }),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(m in arb_message()) {
            let b = m.encode().expect("encode");
            prop_assert_eq!(Message::decode(&b).expect("decode"), m);
        }

        #[test]
        fn decoding_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&b);
            let _ = ChunkHead::parse(&b, b.len());
        }

        #[test]
        fn encode_split_joins_to_encode(m in arb_message()) {
            let (mut head, tail) = m.encode_split().expect("split");
            head.extend_from_slice(tail);
            prop_assert_eq!(head, m.encode().expect("encode"));
        }

        #[test]
        fn chunk_head_and_rest_equal_decode(m in arb_message(), cut in 0usize..40) {
            let b = m.encode().expect("encode");
            let start = &b[..b.len().min(cut + 66)];
            match ChunkHead::parse(start, b.len()).expect("consistent head") {
                Some(h) => {
                    let sealed = b[h.head_len..].to_vec();
                    prop_assert_eq!(h.into_message(sealed), m);
                }
                None => {
                    let is_chunk = matches!(m, Message::PutChunk { .. } | Message::Chunk { .. });
                    // A chunk's head is kind (1), id (32), for a `PutChunk` hash (32),
                    // and a length varint (1..=10).
                    prop_assert!(!is_chunk || start.len() < 1 + 32 + 32 + 10);
                }
            }
        }

    }
}
