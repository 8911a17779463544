//! The secure channel: Noise XX (`Noise_XX_25519_ChaChaPoly_BLAKE2s`, crate `snow`) over any
//! async byte stream, with pinned static keys, as WireGuard does.
//!
//! Connection layout:
//!
//! ```text
//! preamble   8 bytes each way, in the clear: "COFR" || protocol version (u32 LE).
//!            The initiator sends first; the responder always answers with its own, so
//!            both sides can report a version mismatch clearly.
//! handshake  three Noise messages (-> e; <- e, ee, s, es; -> s, se), each framed by a
//!            u16 big-endian length. The prologue binds the protocol version.
//! transport  Noise transport messages (u16 BE length, at most 65535 bytes with the tag).
//!            An application frame is u32 LE length || body, split across as many
//!            transport messages as needed; the length is checked against `MAX_FRAME`
//!            before any buffer for the body is allocated.
//! ```
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
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use zeroize::Zeroizing;

use crate::wire::{check_len, Message, WireError, PROTOCOL_VERSION};

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
    stream.write_all(&preamble()).await?;
    stream.flush().await?;
    let mut theirs = [0u8; 8];
    stream.read_exact(&mut theirs).await?;
    check_preamble(&theirs)?;
    let pro = prologue();
    let mut hs = builder()
        .local_private_key(&local.private[..])?
        .prologue(&pro)?
        .build_initiator()?;
    let mut buf = vec![0u8; NOISE_MAX];
    let mut msg = Vec::new();
    let n = hs.write_message(&[], &mut buf)?;
    write_noise(&mut stream, &buf[..n]).await?;
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
    tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_inner(stream, local))
        .await
        .map_err(|_| ChannelError::Timeout(HANDSHAKE_TIMEOUT))?
}

async fn accept_inner<S>(
    mut stream: S,
    local: &StaticKeypair,
) -> Result<(Channel<S>, PublicKey), ChannelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut theirs = [0u8; 8];
    stream.read_exact(&mut theirs).await?;
    if &theirs[..4] != MAGIC {
        return Err(ChannelError::BadPreamble);
    }
    stream.write_all(&preamble()).await?;
    stream.flush().await?;
    check_preamble(&theirs)?;
    let pro = prologue();
    let mut hs = builder()
        .local_private_key(&local.private[..])?
        .prologue(&pro)?
        .build_responder()?;
    let mut buf = vec![0u8; NOISE_MAX];
    let mut msg = Vec::new();
    read_noise(&mut stream, &mut msg).await?;
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
    out: Vec<u8>,
    seg: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> SendHalf<W> {
    /// Sends one message.
    pub async fn send(&mut self, m: &Message) -> Result<(), ChannelError> {
        let body = m.encode()?;
        self.send_raw(&body).await
    }

    /// Sends an already encoded body as one frame (also used by tests to send garbage).
    pub async fn send_raw(&mut self, body: &[u8]) -> Result<(), ChannelError> {
        self.encrypt_frame(&(body.len() as u32).to_le_bytes(), body)?;
        self.flush_queued().await
    }

    /// Sends a frame whose length prefix claims `claimed` bytes but carries `body` (tests).
    pub async fn send_with_claimed_len(
        &mut self,
        claimed: u32,
        body: &[u8],
    ) -> Result<(), ChannelError> {
        self.encrypt_frame(&claimed.to_le_bytes(), body)?;
        self.flush_queued().await
    }

    /// Encrypts one message and appends it to the outgoing buffer without writing it;
    /// [`SendHalf::flush_queued`] writes everything queued with one system call.
    pub fn queue(&mut self, m: &Message) -> Result<(), ChannelError> {
        let body = m.encode()?;
        self.encrypt_frame(&(body.len() as u32).to_le_bytes(), &body)
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Writes everything queued.
    pub async fn flush_queued(&mut self) -> Result<(), ChannelError> {
        if !self.out.is_empty() {
            let r = self.w.write_all(&self.out).await;
            self.out.clear();
            r?;
        }
        self.w.flush().await?;
        Ok(())
    }

    /// Appends the encrypted frame to `self.out`.
    fn encrypt_frame(&mut self, header: &[u8; 4], body: &[u8]) -> Result<(), ChannelError> {
        let total = 4 + body.len();
        let segments = total.div_ceil(SEGMENT).max(1);
        self.out.reserve(total + segments * (2 + TAG));
        let mut pos = 0usize; // position in header || body
        while pos < total {
            let end = (pos + SEGMENT).min(total);
            self.seg.clear();
            if pos < 4 {
                self.seg.extend_from_slice(&header[pos..]);
                self.seg.extend_from_slice(&body[..end - 4]);
            } else {
                self.seg.extend_from_slice(&body[pos - 4..end - 4]);
            }
            let at = self.out.len();
            let n = self.seg.len() + TAG;
            self.out.extend_from_slice(&(n as u16).to_be_bytes());
            self.out.resize(at + 2 + n, 0);
            let written = self
                .t
                .write_message(self.nonce, &self.seg, &mut self.out[at + 2..])?;
            debug_assert_eq!(written, n);
            self.nonce += 1;
            pos = end;
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
    async fn next_segment(&mut self) -> Result<usize, ChannelError> {
        read_noise(&mut self.r, &mut self.msg).await?;
        let n = self
            .t
            .read_message(self.nonce, &self.msg, &mut self.plain)
            .map_err(|e| ChannelError::Noise(format!("transport message rejected: {e}")))?;
        self.nonce += 1;
        Ok(n)
    }

    /// Receives one frame's body.
    pub async fn recv_raw(&mut self) -> Result<Vec<u8>, ChannelError> {
        let mut n = self.next_segment().await?;
        if n < 4 {
            return Err(WireError::Malformed("frame header split across messages".into()).into());
        }
        let len = check_len(u32::from_le_bytes([
            self.plain[0],
            self.plain[1],
            self.plain[2],
            self.plain[3],
        ]) as u64)?;
        let mut body = Vec::with_capacity(len);
        let mut from = 4;
        loop {
            if body.len() + (n - from) > len {
                return Err(
                    WireError::Malformed("frame longer than its length prefix".into()).into(),
                );
            }
            body.extend_from_slice(&self.plain[from..n]);
            if body.len() == len {
                return Ok(body);
            }
            n = match self.next_segment().await {
                Err(ChannelError::Wire(WireError::Closed)) => {
                    return Err(WireError::Truncated.into())
                }
                r => r?,
            };
            from = 0;
        }
    }

    /// Receives one message.
    pub async fn recv(&mut self) -> Result<Message, ChannelError> {
        let body = self.recv_raw().await?;
        Ok(Message::decode(&body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkId;
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
        for len in [
            0usize,
            1,
            SEGMENT - 5,
            SEGMENT - 4,
            SEGMENT - 3,
            SEGMENT * 3 + 7,
            8 << 20,
        ] {
            let m = Message::PutChunk {
                id: ChunkId([3; 32]),
                sealed: vec![0xAB; len],
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
