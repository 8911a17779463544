//! The secure channel: Noise XX (`Noise_XX_25519_ChaChaPoly_BLAKE2s`, crate `snow`) over any
//! async byte stream, with pinned static keys, as WireGuard does.
//!
//! Connection layout:
//!
//! ```text
//! preamble   8 bytes each way, in the clear: "COFR" || protocol version (u32 LE).
//!            The initiator sends first, with its first handshake message in the same
//!            write (a round trip less per connect); the responder always answers with
//!            its own, so both sides can report a version mismatch clearly.
//! handshake  three Noise messages (-> e; <- e, ee, s, es; -> s, se), each framed by a
//!            u16 big-endian length. The prologue binds the protocol version.
//! transport  Noise transport messages (u16 BE length, at most 65535 bytes with the tag).
//!            An application frame is u32 LE length || body, split across as many
//!            transport messages as needed; the length is checked against `MAX_FRAME`
//!            before any buffer for the body is allocated.
//! chunks     A frame carrying a sealed chunk (`PutChunk`, `Chunk`) is sent as one
//!            transport message holding the length and the head (kind, chunk id, for a
//!            `PutChunk` the BLAKE3 of the sealed bytes, their length), followed by the
//!            sealed bytes as they are, outside the Noise encryption.
//! ```
//!
//! Why chunks are not encrypted a second time: a sealed chunk is already XChaCha20-Poly1305
//! ciphertext under a key that only the agent holds (the receiver stores exactly these
//! bytes), so a second encryption hides nothing more from an eavesdropper and would double
//! the cipher work on both ends. Integrity is kept: for a `PutChunk` the hash travels
//! inside the authenticated transport message, and [`RecvHalf`] checks the bytes against it
//! before returning the message, so an altered, truncated, replayed or reordered chunk is
//! refused ([`ChannelError::Altered`]) and ends the session (the receiver cannot open
//! chunks, so it needs this check to store only what the agent sent). A `Chunk` reply
//! carries no hash: the agent trusts neither the receiver nor the network for a chunk's
//! bytes and opens every chunk (tag, then id) before using any of it, which catches an
//! alteration in transit exactly as it catches a damaged or malicious store. What an
//! eavesdropper sees besides traffic volume and timing: the sealed bytes themselves (random
//! nonce, ciphertext, tag). They reveal nothing of a chunk's id or plaintext without the
//! agent's keys, but a stored chunk's bytes never change, so an eavesdropper can tell when
//! the same chunk is put and later fetched again, and which fetched files share chunks.
//! What it gives up: Noise's forward secrecy for chunk contents; whoever records the
//! traffic and later obtains the master secret (for instance the escrowed key file and the
//! passphrase) can open the recorded chunks, including ones since deleted from the
//! receiver.
//!
//! The initiator (agent) refuses a responder whose static key is not the pinned one, before
//! revealing its own static key. The responder (receiver) learns the initiator's static key
//! and returns it for authorization.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use snow::StatelessTransportState;
use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf,
    WriteHalf,
};
use zeroize::Zeroizing;

use crate::chunk::ChunkId;
use crate::wire::{check_len, sealed_hash, ChunkHead, Message, WireError, PROTOCOL_VERSION};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// How long a handshake (preamble included) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const MAGIC: &[u8; 4] = b"COFR";
const NOISE_MAX: usize = 65535;
const TAG: usize = 16;
const SEGMENT: usize = NOISE_MAX - TAG;

/// Errors of the secure channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("peer is not a Coffer endpoint (bad preamble)")]
    BadPreamble,
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}; upgrade the older side")]
    Version { ours: u32, theirs: u32 },
    #[error("receiver key mismatch: expected {expected}, the receiver presented {actual}")]
    PinMismatch {
        expected: PublicKey,
        actual: PublicKey,
    },
    #[error("noise error: {0}")]
    Noise(String),
    #[error("the sealed bytes of chunk {0} do not match the hash in their authenticated head: altered in transit")]
    Altered(ChunkId),
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl From<snow::Error> for ChannelError {
    fn from(e: snow::Error) -> Self {
        ChannelError::Noise(e.to_string())
    }
}

/// A static X25519 public key. Its one printable form is unpadded URL-safe base64 (43 chars).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Why a public key's text did not parse.
#[derive(Debug, thiserror::Error)]
#[error("not a Coffer public key (expected 43 characters of URL-safe base64): {0:?}")]
pub struct ParseKeyError(String);

impl FromStr for PublicKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let v = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t)
            .map_err(|_| ParseKeyError(t.chars().take(64).collect()))?;
        let a: [u8; 32] = v
            .try_into()
            .map_err(|_| ParseKeyError(t.chars().take(64).collect()))?;
        Ok(PublicKey(a))
    }
}

/// A static key pair. The private half zeroes on drop and is never printed.
pub struct StaticKeypair {
    private: Zeroizing<[u8; 32]>,
    public: PublicKey,
}

impl fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StaticKeypair(public: {}, private: <redacted>)",
            self.public
        )
    }
}

fn builder() -> snow::Builder<'static> {
    // The pattern string is a constant that parses; a failure here is a build bug.
    #[allow(clippy::expect_used)]
    snow::Builder::new(NOISE_PARAMS.parse().expect("valid noise pattern"))
}

impl StaticKeypair {
    /// A new random key pair.
    pub fn generate() -> Result<Self, ChannelError> {
        let kp = builder().generate_keypair()?;
        let private = Zeroizing::new(<[u8; 32]>::try_from(&kp.private[..]).map_err(|_| {
            ChannelError::Noise("generated private key has the wrong length".into())
        })?);
        let mut priv_vec = kp.private;
        zeroize::Zeroize::zeroize(&mut priv_vec);
        let public = PublicKey(kp.public.try_into().map_err(|_| {
            ChannelError::Noise("generated public key has the wrong length".into())
        })?);
        Ok(Self { private, public })
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Serialized form for a 0600 key file: private (32) || public (32).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut v = Zeroizing::new(Vec::with_capacity(64));
        v.extend_from_slice(&self.private[..]);
        v.extend_from_slice(&self.public.0);
        v
    }

    /// Parses the form written by [`StaticKeypair::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 64 {
            return None;
        }
        let mut private = Zeroizing::new([0u8; 32]);
        private.copy_from_slice(&b[..32]);
        let mut public = [0u8; 32];
        public.copy_from_slice(&b[32..]);
        Some(Self {
            private,
            public: PublicKey(public),
        })
    }
}

fn prologue() -> Vec<u8> {
    let mut p = b"coffer noise prologue v".to_vec();
    p.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p
}

fn preamble() -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(MAGIC);
    p[4..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p
}

fn check_preamble(p: &[u8; 8]) -> Result<(), ChannelError> {
    if &p[..4] != MAGIC {
        return Err(ChannelError::BadPreamble);
    }
    let theirs = u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
    if theirs != PROTOCOL_VERSION {
        return Err(ChannelError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    Ok(())
}

async fn write_noise<S: AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> Result<(), ChannelError> {
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(())
}

async fn read_noise<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Result<(), WireError> {
    let mut l = [0u8; 2];
    match s.read_exact(&mut l).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let n = u16::from_be_bytes(l) as usize;
    buf.resize(n, 0);
    match s.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Opens a channel as the initiator, refusing any responder but `pinned`.
pub async fn connect<S>(
    stream: S,
    local: &StaticKeypair,
    pinned: &PublicKey,
) -> Result<Channel<S>, ChannelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_inner(stream, local, pinned))
        .await
        .map_err(|_| ChannelError::Timeout(HANDSHAKE_TIMEOUT))?
}

async fn connect_inner<S>(
    mut stream: S,
    local: &StaticKeypair,
    pinned: &PublicKey,
) -> Result<Channel<S>, ChannelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let pro = prologue();
    let mut hs = builder()
        .local_private_key(&local.private[..])?
        .prologue(&pro)?
        .build_initiator()?;
    let mut buf = vec![0u8; NOISE_MAX];
    let mut msg = Vec::new();
    // The preamble and the first handshake message go together, in one write: the
    // responder answers the preamble before it reads on, so a peer of another version
    // still names its version, and a round trip is saved on every connect.
    let n = hs.write_message(&[], &mut buf)?;
    let mut first = preamble().to_vec();
    first.extend_from_slice(&(n as u16).to_be_bytes());
    first.extend_from_slice(&buf[..n]);
    stream.write_all(&first).await?;
    stream.flush().await?;
    let mut theirs = [0u8; 8];
    stream.read_exact(&mut theirs).await?;
    check_preamble(&theirs)?;
    read_noise(&mut stream, &mut msg).await?;
    hs.read_message(&msg, &mut buf)?;
    let actual = hs
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .map(PublicKey)
        .ok_or_else(|| ChannelError::Noise("responder sent no static key".into()))?;
    if actual != *pinned {
        return Err(ChannelError::PinMismatch {
            expected: *pinned,
            actual,
        });
    }
    let n = hs.write_message(&[], &mut buf)?;
    write_noise(&mut stream, &buf[..n]).await?;
    let t = hs.into_stateless_transport_mode()?;
    Ok(Channel::new(stream, t))
}

/// Accepts a channel as the responder; returns it with the initiator's static key, which
/// the caller must authorize before serving anything.
pub async fn accept<S>(
    stream: S,
    local: &StaticKeypair,
) -> Result<(Channel<S>, PublicKey), ChannelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    accept_within(stream, local, HANDSHAKE_TIMEOUT).await
}

/// [`accept`], with `first` (at most [`HANDSHAKE_TIMEOUT`]) for the initiator's preamble and
/// first handshake message, which an initiator sends at once: a peer that opens a connection
/// and says nothing is dropped after `first`, not after the whole handshake's time.
pub async fn accept_within<S>(
    stream: S,
    local: &StaticKeypair,
    first: Duration,
) -> Result<(Channel<S>, PublicKey), ChannelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let first = first.min(HANDSHAKE_TIMEOUT);
    let opening = tokio::time::Instant::now() + first;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_inner(stream, local, opening))
        .await
        .map_err(|_| ChannelError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// The responder's side of the handshake; the preamble and first message must have
/// arrived by `opening`.
async fn accept_inner<S>(
    mut stream: S,
    local: &StaticKeypair,
    opening: tokio::time::Instant,
) -> Result<(Channel<S>, PublicKey), ChannelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = tokio::time::Instant::now();
    let late = || ChannelError::Timeout(opening.saturating_duration_since(started));
    let mut theirs = [0u8; 8];
    tokio::time::timeout_at(opening, stream.read_exact(&mut theirs))
        .await
        .map_err(|_| late())??;
    if &theirs[..4] != MAGIC {
        return Err(ChannelError::BadPreamble);
    }
    stream.write_all(&preamble()).await?;
    stream.flush().await?;
    if let Err(e) = check_preamble(&theirs) {
        // The initiator's first handshake message may already be here (it sends it with
        // its preamble): read and drop what comes for a moment after our FIN, so that the
        // close is not a reset that could destroy our preamble before the initiator reads
        // it and names both versions.
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        return Err(e);
    }
    let pro = prologue();
    let mut hs = builder()
        .local_private_key(&local.private[..])?
        .prologue(&pro)?
        .build_responder()?;
    let mut buf = vec![0u8; NOISE_MAX];
    let mut msg = Vec::new();
    tokio::time::timeout_at(opening, read_noise(&mut stream, &mut msg))
        .await
        .map_err(|_| late())??;
    hs.read_message(&msg, &mut buf)?;
    let n = hs.write_message(&[], &mut buf)?;
    write_noise(&mut stream, &buf[..n]).await?;
    read_noise(&mut stream, &mut msg).await?;
    hs.read_message(&msg, &mut buf)?;
    let remote = hs
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .map(PublicKey)
        .ok_or_else(|| ChannelError::Noise("initiator sent no static key".into()))?;
    let t = hs.into_stateless_transport_mode()?;
    Ok((Channel::new(stream, t), remote))
}

/// An established channel carrying [`Message`]s.
pub struct Channel<S> {
    tx: SendHalf<WriteHalf<S>>,
    rx: RecvHalf<ReadHalf<S>>,
}

impl<S: AsyncRead + AsyncWrite> Channel<S> {
    fn new(stream: S, t: StatelessTransportState) -> Self {
        let t = Arc::new(t);
        let (r, w) = tokio::io::split(stream);
        Self {
            tx: SendHalf {
                w,
                t: t.clone(),
                nonce: 0,
                out: Vec::new(),
                filled: 0,
                seg: Vec::new(),
            },
            rx: RecvHalf {
                r: BufReader::with_capacity(256 * 1024, r),
                t,
                nonce: 0,
                msg: Vec::new(),
                plain: vec![0u8; NOISE_MAX],
            },
        }
    }

    /// Splits into halves that can be used from two tasks (for pipelining).
    pub fn split(self) -> (SendHalf<WriteHalf<S>>, RecvHalf<ReadHalf<S>>) {
        (self.tx, self.rx)
    }

    /// Sends one message.
    pub async fn send(&mut self, m: &Message) -> Result<(), ChannelError>
    where
        S: Unpin,
    {
        self.tx.send(m).await
    }

    /// Receives one message.
    pub async fn recv(&mut self) -> Result<Message, ChannelError>
    where
        S: Unpin,
    {
        self.rx.recv().await
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&mut self, m: &Message) -> Result<Message, ChannelError>
    where
        S: Unpin,
    {
        self.send(m).await?;
        self.recv().await
    }
}

/// The sending half of a channel.
pub struct SendHalf<W> {
    w: W,
    t: Arc<StatelessTransportState>,
    nonce: u64,
    /// Encrypted bytes waiting to be written: `out[..filled]`. The buffer keeps its length
    /// between writes, so it is not zeroed again for every frame.
    out: Vec<u8>,
    filled: usize,
    seg: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> SendHalf<W> {
    /// Sends one message.
    pub async fn send(&mut self, m: &Message) -> Result<(), ChannelError> {
        self.queue(m)?;
        self.flush_queued().await
    }

    /// Sends an already encoded body as one frame (also used by tests to send garbage).
    pub async fn send_raw(&mut self, body: &[u8]) -> Result<(), ChannelError> {
        self.encrypt_frame(&(body.len() as u32).to_le_bytes(), &[body])?;
        self.flush_queued().await
    }

    /// Sends a frame whose length prefix claims `claimed` bytes but carries `body` (tests).
    pub async fn send_with_claimed_len(
        &mut self,
        claimed: u32,
        body: &[u8],
    ) -> Result<(), ChannelError> {
        self.encrypt_frame(&claimed.to_le_bytes(), &[body])?;
        self.flush_queued().await
    }

    /// Encrypts one message and appends it to the outgoing buffer without writing it;
    /// [`SendHalf::flush_queued`] writes everything queued with one system call.
    pub fn queue(&mut self, m: &Message) -> Result<(), ChannelError> {
        let (head, tail) = m.encode_split()?;
        let len = ((head.len() + tail.len()) as u32).to_le_bytes();
        // The head (for any message but a sealed chunk, the whole encoding) in transport
        // messages; a sealed chunk's bytes after it as they are (see the module
        // documentation). Only a sealed chunk has a tail.
        self.encrypt_frame(&len, &[&head])?;
        let end = self.filled + tail.len();
        if self.out.len() < end {
            self.out.resize(end, 0);
        }
        self.out[self.filled..end].copy_from_slice(tail);
        self.filled = end;
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.filled
    }

    /// Writes everything queued.
    pub async fn flush_queued(&mut self) -> Result<(), ChannelError> {
        if self.filled > 0 {
            let r = self.w.write_all(&self.out[..self.filled]).await;
            self.filled = 0;
            r?;
        }
        self.w.flush().await?;
        Ok(())
    }

    /// Appends the encrypted frame `header || parts...` to `self.out`. A transport message
    /// that lies within one part is encrypted straight from it; one that spans parts (the
    /// first always does: it starts with the length) is assembled in `self.seg`.
    fn encrypt_frame(&mut self, header: &[u8; 4], parts: &[&[u8]]) -> Result<(), ChannelError> {
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(header);
        all.extend(parts.iter().copied().filter(|p| !p.is_empty()));
        let total: usize = all.iter().map(|p| p.len()).sum();
        let segments = total.div_ceil(SEGMENT).max(1);
        let need = self.filled + total + segments * (2 + TAG);
        if self.out.len() < need {
            self.out.resize(need, 0);
        }
        // (part index, offset in it) of the next byte to send.
        let (mut part, mut off) = (0usize, 0usize);
        let mut left = total;
        while left > 0 {
            let want = left.min(SEGMENT);
            let plain: &[u8] = if all[part].len() - off >= want {
                let p = &all[part][off..off + want];
                off += want;
                p
            } else {
                self.seg.clear();
                while self.seg.len() < want {
                    let take = (all[part].len() - off).min(want - self.seg.len());
                    self.seg.extend_from_slice(&all[part][off..off + take]);
                    off += take;
                    if off == all[part].len() && part + 1 < all.len() {
                        part += 1;
                        off = 0;
                    }
                }
                &self.seg
            };
            if off == all[part].len() && part + 1 < all.len() {
                part += 1;
                off = 0;
            }
            let at = self.filled;
            let n = plain.len() + TAG;
            self.out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            let written =
                self.t
                    .write_message(self.nonce, plain, &mut self.out[at + 2..at + 2 + n])?;
            debug_assert_eq!(written, n);
            self.filled += 2 + n;
            self.nonce += 1;
            left -= want;
        }
        Ok(())
    }

    /// Shuts down the write direction.
    pub async fn shutdown(&mut self) -> Result<(), ChannelError> {
        self.w.shutdown().await?;
        Ok(())
    }
}

/// The receiving half of a channel.
pub struct RecvHalf<R> {
    r: BufReader<R>,
    t: Arc<StatelessTransportState>,
    nonce: u64,
    msg: Vec<u8>,
    plain: Vec<u8>,
}

impl<R: AsyncRead + Unpin> RecvHalf<R> {
    /// Reads the next transport message and decrypts it into `out`, returning the
    /// plaintext's length. A message whose plaintext exceeds `limit` (<= `out.len()`) is
    /// refused before it is read. A message already whole in the read buffer is decrypted
    /// from there; one that straddles the buffer's end is first gathered in `msg`. When
    /// `out` has room for the whole message (plaintext and tag), snow decrypts in place;
    /// with less it would copy the message into a fresh buffer first, so callers leave
    /// `TAG` spare bytes after their frame. The buffers are passed as fields, not through
    /// `self`, so none is ever moved out of `self` across an await.
    async fn segment_into(
        r: &mut BufReader<R>,
        t: &StatelessTransportState,
        nonce: &mut u64,
        msg: &mut Vec<u8>,
        out: &mut [u8],
        limit: usize,
    ) -> Result<usize, ChannelError> {
        let mut l = [0u8; 2];
        match r.read_exact(&mut l).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(WireError::Closed.into())
            }
            Err(e) => return Err(e.into()),
        }
        let n = u16::from_be_bytes(l) as usize;
        if n < TAG {
            return Err(ChannelError::Noise(format!(
                "transport message of {n} bytes is shorter than its tag"
            )));
        }
        if n - TAG > limit.min(out.len()) {
            return Err(WireError::Malformed("frame longer than its length prefix".into()).into());
        }
        let room = if out.len() >= n { n } else { n - TAG };
        let out = &mut out[..room];
        let reject =
            |e: snow::Error| ChannelError::Noise(format!("transport message rejected: {e}"));
        let got = if r.buffer().len() >= n {
            let got = t
                .read_message(*nonce, &r.buffer()[..n], out)
                .map_err(reject)?;
            std::pin::Pin::new(&mut *r).consume(n);
            got
        } else {
            msg.resize(n, 0);
            match r.read_exact(msg).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(WireError::Truncated.into())
                }
                Err(e) => return Err(e.into()),
            }
            t.read_message(*nonce, msg, out).map_err(reject)?
        };
        *nonce += 1;
        Ok(got)
    }

    /// Reads a frame's first transport message into `self.plain`; returns the frame's
    /// length (checked against the cap) and the plaintext bytes in `self.plain`.
    async fn first_segment(&mut self) -> Result<(usize, usize), ChannelError> {
        let n = Self::segment_into(
            &mut self.r,
            &self.t,
            &mut self.nonce,
            &mut self.msg,
            &mut self.plain,
            NOISE_MAX - TAG,
        )
        .await?;
        if n < 4 {
            return Err(WireError::Malformed("frame header split across messages".into()).into());
        }
        let len = check_len(u32::from_le_bytes([
            self.plain[0],
            self.plain[1],
            self.plain[2],
            self.plain[3],
        ]) as u64)?;
        if n - 4 > len {
            return Err(WireError::Malformed("frame longer than its length prefix".into()).into());
        }
        Ok((len, n))
    }

    /// The rest of a frame of `len` bytes whose first `self.plain[from..to]` came with its
    /// first transport message, in a buffer of its own. The remaining transport messages
    /// are decrypted straight into it (with `TAG` spare bytes, cut off at the end).
    async fn rest(&mut self, from: usize, to: usize, len: usize) -> Result<Vec<u8>, ChannelError> {
        let mut buf = vec![0u8; len + TAG];
        let mut at = to - from;
        buf[..at].copy_from_slice(&self.plain[from..to]);
        while at < len {
            at += match Self::segment_into(
                &mut self.r,
                &self.t,
                &mut self.nonce,
                &mut self.msg,
                &mut buf[at..],
                len - at,
            )
            .await
            {
                Err(ChannelError::Wire(WireError::Closed)) => {
                    return Err(WireError::Truncated.into())
                }
                r => r?,
            };
        }
        buf.truncate(len);
        Ok(buf)
    }

    /// The head of a chunk frame whose first transport message left `self.plain[..n]`, if
    /// the frame carries a sealed chunk. Its head must fill that message exactly.
    fn chunk_head(&self, len: usize, n: usize) -> Result<Option<ChunkHead>, ChannelError> {
        if n == 4 || !ChunkHead::is_chunk_kind(self.plain[4]) {
            return Ok(None);
        }
        match ChunkHead::parse(&self.plain[4..n], len)? {
            Some(head) if 4 + head.head_len == n => Ok(Some(head)),
            _ => Err(WireError::Malformed(
                "a chunk frame's first transport message must hold exactly its head".into(),
            )
            .into()),
        }
    }

    /// A chunk's sealed bytes, read as they are after its head and checked against the
    /// hash the head carries (a `PutChunk`'s; see the module documentation).
    async fn sealed_tail(&mut self, head: &ChunkHead) -> Result<Vec<u8>, ChannelError> {
        // Read into spare capacity: a buffer about to be overwritten need not be zeroed first.
        let mut sealed = Vec::with_capacity(head.sealed_len);
        let want = head.sealed_len as u64;
        let got = (&mut self.r).take(want).read_to_end(&mut sealed).await?;
        if got as u64 != want {
            return Err(WireError::Truncated.into());
        }
        if head.sealed_hash.is_some_and(|h| h != sealed_hash(&sealed)) {
            return Err(ChannelError::Altered(head.id()));
        }
        Ok(sealed)
    }

    /// Receives one frame's body. The first transport message goes through `self.plain`
    /// (it carries the length); the rest are decrypted straight into the body.
    pub async fn recv_raw(&mut self) -> Result<Vec<u8>, ChannelError> {
        let (len, n) = self.first_segment().await?;
        if let Some(head) = self.chunk_head(len, n)? {
            let mut body = self.plain[4..n].to_vec();
            body.extend_from_slice(&self.sealed_tail(&head).await?);
            return Ok(body);
        }
        let body = self.rest(4, n, len).await?;
        Self::not_a_chunk(&body)?;
        Ok(body)
    }

    /// A frame that did not come as a chunk frame (its first transport message did not
    /// start with a chunk's head) must not be one: otherwise a peer could send a
    /// `PutChunk` whose sealed bytes no one checks against its hash.
    fn not_a_chunk(body: &[u8]) -> Result<(), ChannelError> {
        match body.first() {
            Some(&k) if ChunkHead::is_chunk_kind(k) => Err(WireError::Malformed(
                "a chunk frame must start with its whole head in one transport message".into(),
            )
            .into()),
            _ => Ok(()),
        }
    }

    /// Receives one message and the size of its frame. A sealed chunk (`PutChunk`,
    /// `Chunk`) is read straight into a buffer of its own, which the message then owns.
    pub async fn recv_sized(&mut self) -> Result<(Message, usize), ChannelError> {
        let (len, n) = self.first_segment().await?;
        if let Some(head) = self.chunk_head(len, n)? {
            let sealed = self.sealed_tail(&head).await?;
            return Ok((head.into_message(sealed), len));
        }
        let body = self.rest(4, n, len).await?;
        Self::not_a_chunk(&body)?;
        Ok((Message::decode(&body)?, len))
    }

    /// Receives one message.
    pub async fn recv(&mut self) -> Result<Message, ChannelError> {
        Ok(self.recv_sized().await?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    async fn pair() -> (
        Channel<tokio::io::DuplexStream>,
        Channel<tokio::io::DuplexStream>,
        PublicKey,
    ) {
        let (a, b) = duplex(1 << 20);
        let server = StaticKeypair::generate().expect("kp");
        let client = StaticKeypair::generate().expect("kp");
        let spub = server.public();
        let srv = tokio::spawn(async move { accept(b, &server).await });
        let c = connect(a, &client, &spub).await.expect("connect");
        let (s, seen) = srv.await.expect("join").expect("accept");
        assert_eq!(seen, client.public());
        (c, s, client.public())
    }

    #[tokio::test]
    async fn messages_of_every_size_cross() {
        let (mut c, mut s, _) = pair().await;
        // Around every place a transport message boundary can fall: in the length, in the
        // chunk's head (kind, id, length varint), and in the sealed bytes.
        let lens = [0usize, 1, SEGMENT * 3 + 7, 8 << 20]
            .into_iter()
            .chain(SEGMENT - 48..=SEGMENT + 2)
            .chain(2 * SEGMENT - 44..2 * SEGMENT - 32);
        for (i, len) in lens.enumerate() {
            let sealed: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            let m = if i % 2 == 0 {
                Message::put_chunk(ChunkId([3; 32]), sealed)
            } else {
                Message::Chunk {
                    id: ChunkId([4; 32]),
                    sealed,
                }
            };
            let send = m.clone();
            let (r1, r2) = tokio::join!(c.send(&send), s.recv());
            r1.expect("send");
            assert_eq!(r2.expect("recv"), m);
        }
        s.send(&Message::GetKeyFile).await.expect("send");
        assert_eq!(c.recv().await.expect("recv"), Message::GetKeyFile);
    }

    #[tokio::test]
    async fn sealed_bytes_altered_in_transit_are_refused() {
        for at in [0usize, 1, 1000, 4095] {
            let (mut c, mut s, _) = pair().await;
            let m = Message::put_chunk(ChunkId([5; 32]), vec![9; 4096]);
            c.tx.queue(&m).expect("queue");
            // The sealed bytes are the last 4096 queued; flip one as a network attacker would.
            let end = c.tx.filled;
            c.tx.out[end - 4096 + at] ^= 0x40;
            let (r1, r2) = tokio::join!(c.tx.flush_queued(), s.recv());
            r1.expect("send");
            assert!(
                matches!(r2, Err(ChannelError::Altered(id)) if id == ChunkId([5; 32])),
                "{r2:?}"
            );
        }
    }

    #[tokio::test]
    async fn sealed_bytes_cut_short_are_a_truncated_frame() {
        let (mut c, mut s, _) = pair().await;
        c.tx.queue(&Message::Chunk {
            id: ChunkId([6; 32]),
            sealed: vec![1; 5000],
        })
        .expect("queue");
        c.tx.filled -= 1;
        c.tx.flush_queued().await.expect("send");
        c.tx.shutdown().await.expect("shutdown");
        let r = s.recv().await;
        assert!(
            matches!(r, Err(ChannelError::Wire(WireError::Truncated))),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_chunk_frame_behind_a_length_only_message_is_malformed() {
        // A first transport message holding only the frame's length, then the whole
        // encoding: the general path must not hand out a `PutChunk` with an unchecked hash.
        let (mut c, mut s, _) = pair().await;
        let body = Message::PutChunk {
            id: ChunkId([8; 32]),
            sealed_hash: [0xAA; 32],
            sealed: vec![3; 100],
        }
        .encode()
        .expect("encode");
        let len = (body.len() as u32).to_le_bytes();
        c.tx.encrypt_frame(&len, &[]).expect("length alone");
        let first: [u8; 4] = body[..4].try_into().expect("4 bytes");
        c.tx.encrypt_frame(&first, &[&body[4..]]).expect("the body");
        let (r1, r2) = tokio::join!(c.tx.flush_queued(), s.recv());
        r1.expect("send");
        assert!(
            matches!(r2, Err(ChannelError::Wire(WireError::Malformed(_)))),
            "{r2:?}"
        );
    }

    #[tokio::test]
    async fn a_chunk_frame_encrypted_whole_is_malformed() {
        // The sealed bytes inside the encrypted transport messages, as protocol 2 sent
        // them: the head does not fill the first message exactly.
        let (mut c, mut s, _) = pair().await;
        let body = Message::put_chunk(ChunkId([7; 32]), vec![2; 300])
            .encode()
            .expect("encode");
        let (r1, r2) = tokio::join!(c.tx.send_raw(&body), s.recv());
        r1.expect("send");
        assert!(
            matches!(r2, Err(ChannelError::Wire(WireError::Malformed(_)))),
            "{r2:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_initiator_is_dropped_after_the_opening_deadline() {
        let server = StaticKeypair::generate().expect("kp");
        let short = Duration::from_millis(200);
        // Nothing at all, then the preamble alone: both dropped after `short`, not after
        // the whole handshake's time.
        for send_preamble in [false, true] {
            let (mut a, b) = duplex(1 << 16);
            if send_preamble {
                a.write_all(&preamble()).await.expect("write");
            }
            let t = std::time::Instant::now();
            let r = accept_within(b, &server, short).await;
            assert!(matches!(r, Err(ChannelError::Timeout(_))), "{:?}", r.err());
            assert!(t.elapsed() < HANDSHAKE_TIMEOUT / 2, "{:?}", t.elapsed());
        }
        // An initiator that speaks at once gets through with the same deadline.
        let (a, b) = duplex(1 << 16);
        let client = StaticKeypair::generate().expect("kp");
        let spub = server.public();
        let srv = tokio::spawn(async move { accept_within(b, &server, short).await });
        connect(a, &client, &spub).await.expect("connect");
        let (_, seen) = srv.await.expect("join").expect("accept");
        assert_eq!(seen, client.public());
    }

    #[tokio::test]
    async fn unpinned_responder_is_refused() {
        let (a, b) = duplex(1 << 16);
        let server = StaticKeypair::generate().expect("kp");
        let client = StaticKeypair::generate().expect("kp");
        let other = StaticKeypair::generate().expect("kp").public();
        let srv = tokio::spawn(async move { accept(b, &server).await });
        let err = connect(a, &client, &other).await.err().expect("must fail");
        assert!(matches!(err, ChannelError::PinMismatch { .. }), "{err}");
        // The responder never learns the initiator's identity.
        assert!(srv.await.expect("join").is_err());
    }

    #[tokio::test]
    async fn version_mismatch_is_clear_on_both_sides() {
        let (mut a, b) = duplex(1 << 16);
        let server = StaticKeypair::generate().expect("kp");
        let srv = tokio::spawn(async move { accept(b, &server).await });
        let mut p = preamble();
        p[4..].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        a.write_all(&p).await.expect("write");
        let mut back = [0u8; 8];
        a.read_exact(&mut back).await.expect("read");
        // Our fake client sees the server's real version and reports it.
        let mut fake = back;
        fake[4..].copy_from_slice(&(PROTOCOL_VERSION + 7).to_le_bytes());
        assert!(matches!(
            check_preamble(&fake),
            Err(ChannelError::Version { .. })
        ));
        let err = srv.await.expect("join").err().expect("must fail");
        assert!(
            err.to_string().contains("protocol version mismatch"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn oversized_length_prefix_is_refused_without_allocating() {
        let (mut c, s, _) = pair().await;
        let (_, mut rx) = s.split();
        c.tx.send_with_claimed_len(u32::MAX, b"x")
            .await
            .expect("send");
        let err = rx.recv().await.expect_err("must fail");
        assert!(
            matches!(err, ChannelError::Wire(WireError::TooLarge { .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unknown_kind_and_short_frames_are_typed_errors() {
        let (mut c, mut s, _) = pair().await;
        c.tx.send_raw(&[250, 0, 0]).await.expect("send");
        assert!(matches!(
            s.recv().await,
            Err(ChannelError::Wire(WireError::UnknownKind(250)))
        ));
        // A claimed length longer than what arrives, then the peer goes away.
        c.tx.send_with_claimed_len(100, b"abc").await.expect("send");
        drop(c);
        assert!(matches!(
            s.recv().await,
            Err(ChannelError::Wire(WireError::Truncated))
        ));
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_fails_cleanly() {
        let (mut a, b) = duplex(1 << 16);
        let server = StaticKeypair::generate().expect("kp");
        let srv = tokio::spawn(async move { accept(b, &server).await });
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        assert!(matches!(
            srv.await.expect("join"),
            Err(ChannelError::BadPreamble)
        ));
    }

    #[test]
    fn public_key_text_round_trip() {
        let k = StaticKeypair::generate().expect("kp");
        let s = k.public().to_string();
        assert_eq!(s.len(), 43);
        assert_eq!(s.parse::<PublicKey>().expect("parse"), k.public());
        assert!("not-a-key".parse::<PublicKey>().is_err());
        let back = StaticKeypair::from_bytes(&k.to_bytes()).expect("bytes");
        assert_eq!(back.public(), k.public());
        assert!(!format!("{k:?}")
            .contains(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&k.private[..])));
    }
}
