//! A pipelined connection to the receiver.
//!
//! Requests go through a bounded queue to a writer task; replies come back in order and are
//! matched by a reader task to the oldest outstanding request. Callers may issue many
//! requests before waiting for any reply, from async code or from worker threads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffer_common::channel::{self, ChannelError, PublicKey, StaticKeypair};
use coffer_common::wire::{ErrorCode, Message, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};

/// Errors talking to the receiver.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnError {
    #[error("cannot reach receiver {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("receiver {addr} refused this agent: {message}")]
    Refused {
        addr: String,
        code: ErrorCode,
        message: String,
    },
    #[error("receiver answered {code:?}: {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("connection to the receiver was lost: {0}")]
    Lost(String),
    #[error("unexpected reply {0} from the receiver")]
    Unexpected(&'static str),
}

impl ConnError {
    /// True when the failure is the connection's, not the request's: retry after reconnecting.
    pub fn is_connection(&self) -> bool {
        matches!(self, ConnError::Unreachable { .. } | ConnError::Lost(_))
    }
}

type Reply = oneshot::Sender<Result<Message, ConnError>>;

struct Shared {
    pending: Mutex<VecDeque<Reply>>,
    closed: AtomicBool,
    reason: Mutex<String>,
}

impl Shared {
    fn fail_all(&self, why: &str) {
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut r) = self.reason.lock() {
            if r.is_empty() {
                *r = why.to_string();
            }
        }
        let drained: Vec<Reply> = match self.pending.lock() {
            Ok(mut p) => p.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for tx in drained {
            let _ = tx.send(Err(ConnError::Lost(why.to_string())));
        }
    }
}

/// A reply not yet received.
pub struct Pending(oneshot::Receiver<Result<Message, ConnError>>);

impl Pending {
    /// Waits for the reply (async).
    pub async fn wait(self) -> Result<Message, ConnError> {
        self.0
            .await
            .unwrap_or_else(|_| Err(ConnError::Lost("connection closed".into())))
            .and_then(check_error)
    }

    /// Waits for the reply from a non-async thread.
    pub fn wait_blocking(self) -> Result<Message, ConnError> {
        self.0
            .blocking_recv()
            .unwrap_or_else(|_| Err(ConnError::Lost("connection closed".into())))
            .and_then(check_error)
    }

    /// The reply if it has already arrived.
    pub fn try_take(&mut self) -> Option<Result<Message, ConnError>> {
        match self.0.try_recv() {
            Ok(r) => Some(r.and_then(check_error)),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                Some(Err(ConnError::Lost("connection closed".into())))
            }
        }
    }
}

fn check_error(m: Message) -> Result<Message, ConnError> {
    match m {
        Message::Error { code, message } => Err(ConnError::Remote { code, message }),
        m => Ok(m),
    }
}

/// A live, pipelined connection. Cheap to clone.
#[derive(Clone)]
pub struct Conn {
    tx: mpsc::Sender<(Message, Reply)>,
    shared: Arc<Shared>,
    /// The repository the receiver maps this agent to.
    pub repo: String,
}

/// How many requests may wait unsent (bounds memory: each may hold a 4 MiB chunk).
const QUEUE: usize = 8;
/// Bytes gathered into one write at most.
const WRITE_BATCH: usize = 1 << 20;

impl Conn {
    /// Connects, authenticates the receiver by its pinned key, and says hello.
    pub async fn connect(
        addr: &str,
        receiver_key: &PublicKey,
        keypair: &StaticKeypair,
        agent_name: &str,
    ) -> Result<Conn, ConnError> {
        let unreachable = |reason: String| ConnError::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut ch = channel::connect(stream, keypair, receiver_key)
            .await
            .map_err(|e| match e {
                ChannelError::PinMismatch { .. } | ChannelError::Version { .. } => {
                    ConnError::Refused {
                        addr: addr.to_string(),
                        code: ErrorCode::ProtocolVersion,
                        message: e.to_string(),
                    }
                }
                e => unreachable(e.to_string()),
            })?;
        let hello = Message::Hello {
            protocol: PROTOCOL_VERSION,
            agent_name: agent_name.to_string(),
            software: coffer_common::SOFTWARE.to_string(),
        };
        let reply = ch
            .request(&hello)
            .await
            .map_err(|e| unreachable(format!("hello: {e}")))?;
        let repo = match reply {
            Message::Welcome { repo, .. } => repo,
            Message::Error { code, message } => {
                return Err(ConnError::Refused {
                    addr: addr.to_string(),
                    code,
                    message,
                })
            }
            m => return Err(ConnError::Unexpected(m.kind())),
        };
        let (mut w, mut r) = ch.split();
        let shared = Arc::new(Shared {
            pending: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
        });
        let (tx, mut rx) = mpsc::channel::<(Message, Reply)>(QUEUE);
        let sw = shared.clone();
        tokio::spawn(async move {
            // Everything already waiting is encrypted into one buffer and written with one
            // system call (many small files cost one write, not one each).
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some((msg, reply)) = next.take() {
                    if sw.closed.load(Ordering::SeqCst) {
                        let why = sw.reason.lock().map(|r| r.clone()).unwrap_or_default();
                        let _ = reply.send(Err(ConnError::Lost(why)));
                    } else {
                        match sw.pending.lock() {
                            Ok(mut p) => p.push_back(reply),
                            Err(_) => return,
                        }
                        if let Err(e) = w.queue(&msg) {
                            sw.fail_all(&format!("sending: {e}"));
                        }
                    }
                    if w.queued() < WRITE_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if let Err(e) = w.flush_queued().await {
                    sw.fail_all(&format!("sending: {e}"));
                }
            }
            let _ = w.shutdown().await;
        });
        let sr = shared.clone();
        tokio::spawn(async move {
            loop {
                match r.recv().await {
                    Ok(m) => {
                        let front = sr.pending.lock().ok().and_then(|mut p| p.pop_front());
                        match front {
                            Some(tx) => {
                                let _ = tx.send(Ok(m));
                            }
                            None => {
                                // A reply nobody asked for: the receiver is telling us why it
                                // is closing (e.g. an error), or misbehaving.
                                let why = match m {
                                    Message::Error { message, .. } => message,
                                    m => format!("unsolicited {}", m.kind()),
                                };
                                sr.fail_all(&why);
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        sr.fail_all(&e.to_string());
                        break;
                    }
                }
            }
        });
        Ok(Conn { tx, shared, repo })
    }

    /// True once the connection has failed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst) || self.tx.is_closed()
    }

    /// Queues a request (async); the reply is awaited separately.
    pub async fn start(&self, m: Message) -> Result<Pending, ConnError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((m, tx))
            .await
            .map_err(|_| ConnError::Lost("connection closed".into()))?;
        Ok(Pending(rx))
    }

    /// Queues a request from a non-async thread.
    pub fn start_blocking(&self, m: Message) -> Result<Pending, ConnError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .blocking_send((m, tx))
            .map_err(|_| ConnError::Lost("connection closed".into()))?;
        Ok(Pending(rx))
    }

    /// Sends a request and waits for its reply.
    pub async fn call(&self, m: Message) -> Result<Message, ConnError> {
        self.start(m).await?.wait().await
    }

    /// Sends a request and waits for its reply, from a non-async thread.
    pub fn call_blocking(&self, m: Message) -> Result<Message, ConnError> {
        self.start_blocking(m)?.wait_blocking()
    }
}
