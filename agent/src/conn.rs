//! The connection to the receiver: a pipelined [`Conn`], and the daemon's
//! [`ConnManager`] that keeps one up (reconnecting with back-off), opens the query lane
//! for presence questions, and escrows the wrapped key file once connected.
//!
//! Refusals are kept for `status` (`receiver_refusal`): `QuotaExceeded` (the repository
//! is over its quota, or the receiver's disk below its floor: the backlog is kept and
//! sent again every 30-60 s, see [`quota_retry_ms`]) and `Unauthorized` (the key is not,
//! or no longer, authorized: connecting is retried after [`UNAUTHORIZED_RETRY`], doubling
//! up to [`UNAUTHORIZED_RETRY_MAX`]). The repository's use and quota, from `Welcome`,
//! are kept too (`receiver_quota`).
//!
//! Requests go through a bounded queue to a writer task; replies come back in order and are
//! matched by a reader task to the oldest outstanding request. Callers may issue many
//! requests before waiting for any reply, from async code or from worker threads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use coffer_common::channel::{self, ChannelError, PublicKey, StaticKeypair};
use coffer_common::chunk::ChunkId;
use coffer_common::host::time::{now_ms, now_secs};
use coffer_common::wire::{ErrorCode, Message, QuotaInfo, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::config::Config;
use crate::daemon::Daemon;
use crate::journal::MetaKey;

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

    /// The receiver's refusal of new data (`QuotaExceeded`) or of this agent
    /// (`Unauthorized`), with its message: kept for `status` and retried slowly.
    pub fn refusal(&self) -> Option<(ErrorCode, &str)> {
        match self {
            ConnError::Remote { code, message } | ConnError::Refused { code, message, .. }
                if matches!(code, ErrorCode::QuotaExceeded | ErrorCode::Unauthorized) =>
            {
                Some((*code, message))
            }
            _ => None,
        }
    }
}

/// First wait before connecting again after the receiver refused this agent's key.
pub const UNAUTHORIZED_RETRY: Duration = Duration::from_secs(60);
/// Longest such wait.
pub const UNAUTHORIZED_RETRY_MAX: Duration = Duration::from_secs(600);

/// When a file refused with `QuotaExceeded` is sent again: in 30 to 60 s (spread, so many
/// agents of one receiver do not all come back at once).
pub fn quota_retry_ms() -> i64 {
    30_000 + now_ms().rem_euclid(30_000)
}

type Reply = oneshot::Sender<Result<Message, ConnError>>;

/// What a connection's handles and its writer and reader tasks share: the replies awaited
/// (oldest first), and whether and why the connection failed.
struct ConnState {
    pending: Mutex<VecDeque<Reply>>,
    /// Set while `pending` is locked: no reply is queued once it is.
    closed: AtomicBool,
    reason: Mutex<String>,
    /// The writer and reader tasks, stopped by [`Conn::close`].
    tasks: OnceLock<[AbortHandle; 2]>,
}

impl ConnState {
    fn fail_all(&self, why: &str) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_empty() {
                *r = why.to_string();
            }
        }
        let drained: Vec<Reply> = match self.pending.lock() {
            Ok(mut p) => {
                self.closed.store(true, Ordering::SeqCst);
                p.drain(..).collect()
            }
            Err(_) => {
                self.closed.store(true, Ordering::SeqCst);
                Vec::new()
            }
        };
        for tx in drained {
            let _ = tx.send(Err(ConnError::Lost(why.to_string())));
        }
    }

    /// Fails every awaited reply and stops both tasks: a request still queued is dropped
    /// (its reply fails), and a sender waiting for room in the queue wakes.
    fn close(&self, why: &str) {
        self.fail_all(why);
        if let Some(tasks) = self.tasks.get() {
            for t in tasks {
                t.abort();
            }
        }
    }
}

/// Closes the connection if its link goes quiet while a reply is awaited (see
/// [`crate::link::watch`]); the watchdog ends with the connection.
fn watch_link(state: &Arc<ConnState>, progress: Arc<crate::rate::Progress>) {
    let (seen, failed) = (Arc::downgrade(state), Arc::downgrade(state));
    crate::link::watch(
        progress,
        move || {
            let s = seen.upgrade()?;
            if s.closed.load(Ordering::SeqCst) {
                return None;
            }
            Some(s.pending.lock().ok().is_some_and(|p| !p.is_empty()))
        },
        move |why| {
            if let Some(s) = failed.upgrade() {
                tracing::warn!("{why}; connecting again");
                s.close(&why);
            }
        },
    );
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
    state: Arc<ConnState>,
    /// The repository the receiver maps this agent to.
    pub repo: String,
    /// Its use and quota when it connected (`None`: no quota).
    pub quota: Option<QuotaInfo>,
}

/// How many requests may wait unsent (bounds memory: each is at most one frame, `MAX_FRAME`).
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
        // Resolved again at each connect; keepalive; the bandwidth limits (`crate::link`).
        let stream = crate::link::dial(addr).await.map_err(unreachable)?;
        let progress = stream.progress();
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
        let (repo, quota) = match reply {
            Message::Welcome { repo, quota, .. } => (repo, quota),
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
        let state = Arc::new(ConnState {
            pending: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
            tasks: OnceLock::new(),
        });
        let (tx, mut rx) = mpsc::channel::<(Message, Reply)>(QUEUE);
        let sw = state.clone();
        let writer = tokio::spawn(async move {
            // Everything already waiting is encrypted into one buffer and written with one
            // system call (many small files cost one write, not one each).
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some((msg, reply)) = next.take() {
                    // Checked under the lock `fail_all` drains with: a reply is either
                    // queued before the drain (and failed by it) or refused here.
                    let refused = match sw.pending.lock() {
                        Ok(mut p) if !sw.closed.load(Ordering::SeqCst) => {
                            p.push_back(reply);
                            None
                        }
                        Ok(_) => Some(reply),
                        Err(_) => return,
                    };
                    if let Some(reply) = refused {
                        let why = sw.reason.lock().map(|r| r.clone()).unwrap_or_default();
                        let _ = reply.send(Err(ConnError::Lost(why)));
                    } else if let Err(e) = w.queue(&msg) {
                        sw.fail_all(&format!("sending: {e}"));
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
        let sr = state.clone();
        let reader = tokio::spawn(async move {
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
        let _ = state
            .tasks
            .set([writer.abort_handle(), reader.abort_handle()]);
        watch_link(&state, progress);
        Ok(Conn {
            tx,
            state,
            repo,
            quota,
        })
    }

    /// Closes the connection: every reply awaited on it fails with `why`, and its tasks
    /// stop (see [`ConnManager::close`]).
    pub fn close(&self, why: &str) {
        self.state.close(why);
    }

    /// True when `other` is a handle of this same connection.
    pub fn same(&self, other: &Conn) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    /// True once the connection has failed.
    pub fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::SeqCst) || self.tx.is_closed()
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

/// Keeps the connection to the receiver, reconnecting with capped exponential back-off, and
/// a second one for presence questions (the *query lane*).
///
/// Why two: the receiver answers a session's requests in order, and a reply that follows a
/// commit waits until that commit is durable (group commit: packs fsynced, one index
/// transaction). A worker that asks which chunks of a file the receiver lacks would wait,
/// idle, behind the fsync of earlier files' batches. On its own session the question is
/// answered at once. Chunks put and not yet
/// flushed by any session are visible to every session's presence query, and a commit's
/// flush makes every such chunk durable before it is acknowledged, so the answer is as
/// sound as on the main connection. A chunk whose put is still queued on the main
/// connection may be reported missing and be put twice; the receiver stores it once.
///
/// The query lane is connected in the background and used once it is up; until then, and
/// whenever it fails, questions go on the main connection, so it never delays an upload.
/// It is closed after [`QUERY_IDLE`] without a question, so an idle agent holds one of
/// the receiver's sessions (`max_sessions`), not two.
pub struct ConnManager {
    cfg: Config,
    keypair: Arc<coffer_common::channel::StaticKeypair>,
    rt: tokio::runtime::Handle,
    cur: Mutex<Option<Conn>>,
    /// The main connection, for [`ConnManager::close`], which cannot wait for `cur`: a
    /// connect or the escrow holds it while waiting for the receiver.
    main: Mutex<Weak<ConnState>>,
    query: Arc<Mutex<QueryLane>>,
    /// The fresh lane: a session of its own for fresh changes, so that their commits wait
    /// neither behind the backlog's chunks on the main connection nor for the main
    /// session's group commit on the receiver (opened and closed as the query lane is).
    fresh: Arc<Mutex<QueryLane>>,
    keyfile: Vec<u8>,
    /// When the escrow was last checked by this run.
    escrow_checked: Mutex<Option<std::time::Instant>>,
    /// The outcome of the escrow check, until recorded.
    escrowed: Arc<Mutex<Option<Escrow>>>,
    /// After the receiver refused this agent's key: no connect before this, and the wait
    /// after the next refusal.
    refused_until: Mutex<Option<std::time::Instant>>,
    unauthorized_wait: Mutex<Duration>,
    /// The refusal shown in `status`: its code and message.
    refusal: Mutex<Option<(ErrorCode, String)>>,
    /// Replies a worker waited for in series, and the time spent (see `note_wait`).
    waits: AtomicU64,
    waited_us: AtomicU64,
}

/// What the escrow check found.
enum Escrow {
    /// The receiver holds this agent's key file.
    Held,
    /// It did not; it was escrowed now.
    Stored,
    /// The receiver refused to store it (its message).
    Refused(String),
    /// The check could not be made (why): the next connect tries again.
    Retry(String),
}

/// The query lane's state.
#[derive(Default)]
struct QueryLane {
    conn: Option<Conn>,
    connecting: bool,
    /// Not before this (after a failed attempt).
    retry_at: Option<std::time::Instant>,
    /// When the lane last carried (or was opened for) a question.
    last_used: Option<std::time::Instant>,
}

/// The escrow is checked at a connect, at most this often.
pub const ESCROW_CHECK_EVERY: Duration = Duration::from_secs(3600);

/// Wait after a failed attempt to open the query lane.
const QUERY_RETRY: Duration = Duration::from_secs(30);
/// The query lane is closed after this long without a question.
pub const QUERY_IDLE: Duration = Duration::from_secs(10);

impl ConnManager {
    pub fn new(
        cfg: Config,
        keypair: coffer_common::channel::StaticKeypair,
        rt: tokio::runtime::Handle,
        keyfile: Vec<u8>,
    ) -> Self {
        Self {
            cfg,
            keypair: Arc::new(keypair),
            rt,
            cur: Mutex::new(None),
            main: Mutex::new(Weak::new()),
            query: Arc::default(),
            fresh: Arc::default(),
            keyfile,
            escrow_checked: Mutex::new(None),
            escrowed: Arc::default(),
            refused_until: Mutex::new(None),
            unauthorized_wait: Mutex::new(UNAUTHORIZED_RETRY),
            refusal: Mutex::new(None),
            waits: AtomicU64::new(0),
            waited_us: AtomicU64::new(0),
        }
    }

    /// Keeps the receiver's refusal for `status` (`receiver_refusal`: code, message and
    /// since when); a refusal of the same kind keeps its first time.
    pub fn note_refusal(&self, sh: &Daemon, code: ErrorCode, message: &str) {
        let Ok(mut r) = self.refusal.lock() else {
            return;
        };
        if r.as_ref().is_some_and(|(c, m)| *c == code && m == message) {
            return;
        }
        let same_kind = r.as_ref().is_some_and(|(c, _)| *c == code);
        *r = Some((code, message.to_string()));
        drop(r);
        tracing::warn!(code = ?code, "the receiver refused: {message}");
        let old = sh
            .journal(|j| j.meta(MetaKey::ReceiverRefusal))
            .flatten()
            .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok());
        let since = match old {
            Some(v) if same_kind => v["since_ms"].as_i64().unwrap_or_else(now_ms),
            _ => now_ms(),
        };
        let v = serde_json::json!({
            "code": format!("{code:?}"),
            "message": message,
            "since_ms": since,
        });
        sh.journal(|j| j.set_meta(MetaKey::ReceiverRefusal, &v.to_string()));
    }

    /// Forgets the refusal shown in `status` (of kind `code` only, when given): the
    /// receiver took data again, or let this agent in.
    pub fn clear_refusal(&self, sh: &Daemon, code: Option<ErrorCode>) {
        let Ok(mut r) = self.refusal.lock() else {
            return;
        };
        match r.as_ref() {
            Some((c, _)) if code.is_none_or(|k| k == *c) => {}
            _ => return,
        }
        *r = None;
        drop(r);
        tracing::info!("the receiver accepts this agent's data again");
        sh.journal(|j| j.set_meta(MetaKey::ReceiverRefusal, ""));
    }

    /// How long to wait before the next connect, after the receiver refused this key.
    fn refused_wait(&self) -> Option<Duration> {
        let until = (*self.refused_until.lock().ok()?)?;
        until.checked_duration_since(std::time::Instant::now())
    }

    /// The query lane if it is up; otherwise starts opening it in the background (at most
    /// one attempt at a time, one per [`QUERY_RETRY`] after a failure) and returns `None`.
    pub fn query(&self) -> Option<Conn> {
        self.side_lane(&self.query, "query")
    }

    /// The fresh lane if it is up; otherwise starts opening it in the background, as
    /// [`ConnManager::query`] does, and returns `None` (fresh work then goes on the main
    /// connection). Workers of the backlog call it too, so that the lane is up before a
    /// fresh change needs it.
    ///
    /// It is opened only while the main connection is up: a receiver at its session cap
    /// must not give the lane the slot the main connection needs.
    pub fn fresh(&self) -> Option<Conn> {
        if !self.is_connected() {
            return self.fresh_if_up();
        }
        self.side_lane(&self.fresh, "fresh")
    }

    /// The fresh lane if it is up, without opening it: a fresh change while the backlog is
    /// idle goes on the main connection, which then carries nothing else.
    pub fn fresh_if_up(&self) -> Option<Conn> {
        let mut q = self.fresh.lock().ok()?;
        match &q.conn {
            Some(c) if !c.is_closed() => {
                let c = c.clone();
                q.last_used = Some(std::time::Instant::now());
                Some(c)
            }
            _ => None,
        }
    }

    /// A second session beside the main connection (the query or the fresh lane).
    fn side_lane(&self, lane: &Arc<Mutex<QueryLane>>, what: &'static str) -> Option<Conn> {
        let mut q = lane.lock().ok()?;
        let now = std::time::Instant::now();
        if let Some(c) = &q.conn {
            if !c.is_closed() {
                let c = c.clone();
                q.last_used = Some(now);
                return Some(c);
            }
            q.conn = None;
        }
        if q.connecting || q.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        q.connecting = true;
        drop(q);
        let (lane, keypair) = (lane.clone(), self.keypair.clone());
        let (addr, key, name) = (
            self.cfg.receiver.clone(),
            self.cfg.receiver_key,
            self.cfg.name.clone(),
        );
        self.rt.spawn(async move {
            let r = Conn::connect(&addr, &key, &keypair, &name).await;
            let Ok(mut q) = lane.lock() else { return };
            q.connecting = false;
            match r {
                Ok(c) => {
                    tracing::debug!(receiver = %addr, lane = what, "lane connected");
                    q.conn = Some(c);
                    q.last_used = Some(std::time::Instant::now());
                }
                Err(e) => {
                    tracing::debug!(error = %e, lane = what, "lane not available; using the main connection");
                    q.retry_at = Some(std::time::Instant::now() + QUERY_RETRY);
                }
            }
        });
        None
    }

    /// Closes the query lane if it has carried no question for [`QUERY_IDLE`] (called
    /// periodically).
    pub fn close_idle_query(&self) {
        for (lane, what) in [(&self.query, "query"), (&self.fresh, "fresh")] {
            if let Ok(mut q) = lane.lock() {
                if q.conn.is_some() && q.last_used.is_none_or(|t| t.elapsed() >= QUERY_IDLE) {
                    tracing::debug!(lane = what, "lane idle; closing it");
                    q.conn = None;
                }
            }
        }
    }

    /// Forgets a query lane that failed.
    pub fn drop_query(&self) {
        if let Ok(mut q) = self.query.lock() {
            q.conn = None;
        }
    }

    /// The live connection, connecting first if needed; `None` once shutting down.
    pub fn get(&self, sh: &Daemon) -> Option<Conn> {
        let mut backoff = Duration::from_millis(200);
        loop {
            if sh.shutdown.is_stopping() {
                return None;
            }
            self.record_escrow(sh);
            let mut cur = self.cur.lock().ok()?;
            if let Some(c) = cur.as_ref() {
                if !c.is_closed() {
                    return Some(c.clone());
                }
                *cur = None;
            }
            if let Some(wait) = self.refused_wait() {
                // Refused this agent's key: one attempt per wait, for every worker.
                drop(cur);
                if sh.shutdown.sleep(wait) {
                    return None;
                }
                continue;
            }
            let connect = Conn::connect(
                &self.cfg.receiver,
                &self.cfg.receiver_key,
                &self.keypair,
                &self.cfg.name,
            );
            // A connect (up to its timeout) is given up as soon as the daemon stops.
            let res = self.rt.block_on(async {
                tokio::select! {
                    r = connect => Some(r),
                    _ = sh.shutdown.stopped() => None,
                }
            })?;
            match res {
                Ok(c) => {
                    tracing::info!(receiver = %self.cfg.receiver, repo = %c.repo, "connected to receiver");
                    if let Ok(mut m) = self.main.lock() {
                        *m = Arc::downgrade(&c.state);
                    }
                    sh.journal(|j| {
                        let now = now_ms().to_string();
                        j.set_meta(MetaKey::ReceiverState, "connected")?;
                        j.set_meta(MetaKey::ReceiverConnectedMs, &now)?;
                        j.set_meta(MetaKey::ReceiverStateAt, &now)?;
                        let quota = c.quota.map(|q| {
                            serde_json::json!({
                                "used": q.used,
                                "quota": q.quota,
                                "warn_at_percent": q.warn_at_percent,
                                "at_ms": now_ms(),
                            })
                            .to_string()
                        });
                        j.set_meta(MetaKey::ReceiverQuota, quota.as_deref().unwrap_or(""))
                    });
                    if let Ok(mut w) = self.unauthorized_wait.lock() {
                        *w = UNAUTHORIZED_RETRY;
                    }
                    self.clear_refusal(sh, Some(ErrorCode::Unauthorized));
                    self.escrow(&c);
                    *cur = Some(c.clone());
                    return Some(c);
                }
                Err(e) => {
                    drop(cur);
                    if let Some((ErrorCode::Unauthorized, message)) = e.refusal() {
                        let wait = self
                            .unauthorized_wait
                            .lock()
                            .map(|mut w| {
                                let now = *w;
                                *w = (now * 2).min(UNAUTHORIZED_RETRY_MAX);
                                now
                            })
                            .unwrap_or(UNAUTHORIZED_RETRY);
                        if let Ok(mut u) = self.refused_until.lock() {
                            *u = Some(std::time::Instant::now() + wait);
                        }
                        tracing::warn!(retry_in = ?wait, "the receiver refused this agent's key: {message}");
                        self.note_refusal(sh, ErrorCode::Unauthorized, message);
                        sh.journal(|j| {
                            j.set_meta(MetaKey::ReceiverState, &format!("refused: {e}"))?;
                            j.set_meta(MetaKey::ReceiverStateAt, &now_ms().to_string())
                        });
                        continue;
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "receiver not available");
                    sh.journal(|j| {
                        j.set_meta(MetaKey::ReceiverState, &format!("unreachable: {e}"))?;
                        j.set_meta(MetaKey::ReceiverStateAt, &now_ms().to_string())
                    });
                    if sh.shutdown.sleep(backoff) {
                        return None;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Forgets a connection that failed.
    pub fn invalidate(&self) {
        if let Ok(mut c) = self.cur.lock() {
            if c.as_ref().is_some_and(Conn::is_closed) {
                *c = None;
            }
        }
    }

    /// True while a reply is awaited on any of the connections (a pause counts as applied
    /// only once none is, see [`crate::pause`]).
    pub fn awaiting(&self) -> bool {
        let busy = |s: &ConnState| {
            !s.closed.load(Ordering::SeqCst) && s.pending.lock().is_ok_and(|p| !p.is_empty())
        };
        let main = self.main.lock().ok().and_then(|m| m.upgrade());
        main.is_some_and(|s| busy(s.as_ref()))
            || [&self.query, &self.fresh].iter().any(|lane| {
                lane.lock()
                    .is_ok_and(|q| q.conn.as_ref().is_some_and(|c| busy(c.state.as_ref())))
            })
    }

    /// True while the main connection is up.
    pub fn is_connected(&self) -> bool {
        self.main
            .lock()
            .ok()
            .and_then(|m| m.upgrade())
            .is_some_and(|s| !s.closed.load(Ordering::SeqCst))
    }

    /// Closes the main connection and the query lane (the last step of a stop, past its
    /// deadline): every wait for a reply on them returns an error.
    pub fn close(&self, why: &str) {
        let main = self.main.lock().ok().and_then(|m| m.upgrade());
        if let Some(state) = main {
            state.close(why);
        }
        for lane in [&self.query, &self.fresh] {
            if let Ok(q) = lane.lock() {
                if let Some(c) = &q.conn {
                    c.close(why);
                }
            }
        }
    }

    /// The escrow check, at a connect and at most once per [`ESCROW_CHECK_EVERY`]: the
    /// receiver must hold this agent's own key file among its escrowed ones (the bytes
    /// compared: no passphrase needed, and those bytes open with this agent's passphrase);
    /// when it does not, the key file is escrowed again. The questions travel in the
    /// background (a worker never waits their round trips); the outcome is recorded for
    /// `status` by [`ConnManager::record_escrow`].
    fn escrow(&self, c: &Conn) {
        if self.keyfile.is_empty() {
            return;
        }
        if let Ok(mut last) = self.escrow_checked.lock() {
            if last.is_some_and(|t| t.elapsed() < ESCROW_CHECK_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let (c, keyfile, slot) = (c.clone(), self.keyfile.clone(), self.escrowed.clone());
        self.rt.spawn(async move {
            let out = match c.call(Message::GetKeyFiles).await {
                Ok(Message::KeyFiles { files }) if files.iter().any(|f| f.data == keyfile) => {
                    Escrow::Held
                }
                Ok(Message::KeyFiles { .. }) => {
                    match c.call(Message::PutKeyFile { data: keyfile }).await {
                        Ok(Message::KeyFileStored) => Escrow::Stored,
                        Ok(Message::Error { message, .. }) => Escrow::Refused(message),
                        Ok(m) => {
                            Escrow::Retry(format!("unexpected reply {} to key escrow", m.kind()))
                        }
                        Err(e) => {
                            Escrow::Retry(format!("escrowing the key file failed; will retry: {e}"))
                        }
                    }
                }
                Ok(m) => {
                    Escrow::Retry(format!("unexpected reply {} to the escrow check", m.kind()))
                }
                Err(e) => Escrow::Retry(format!("checking the key escrow failed; will retry: {e}")),
            };
            if let Ok(mut s) = slot.lock() {
                *s = Some(out);
            }
        });
    }

    /// Records the outcome of the escrow check, once it has come (called by workers as
    /// they take the connection, and periodically).
    pub fn record_escrow(&self, sh: &Daemon) {
        let Some(out) = self.escrowed.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        let was_escrowed = sh
            .journal(|j| j.meta(MetaKey::KeyEscrowed))
            .flatten()
            .is_some_and(|v| v == "1");
        let state = match out {
            Escrow::Held => "ok".to_string(),
            Escrow::Stored if was_escrowed => {
                tracing::warn!(
                    "the receiver no longer held this agent's escrowed key file (missing or \
                     altered); escrowed it again"
                );
                "reescrowed".to_string()
            }
            Escrow::Stored => {
                tracing::info!(
                    "wrapped key file escrowed on the receiver (for recovery with the passphrase)"
                );
                "ok".to_string()
            }
            Escrow::Refused(message) => {
                tracing::warn!("escrowing the key file was refused: {message}");
                format!("failed: {message}")
            }
            Escrow::Retry(why) => {
                tracing::warn!("{why}");
                self.forget_escrow_check();
                return;
            }
        };
        sh.journal(|j| {
            if !state.starts_with("failed") {
                j.set_meta(MetaKey::KeyEscrowed, "1")?;
            }
            j.set_meta(MetaKey::EscrowState, &state)?;
            j.set_meta(MetaKey::EscrowCheckedAt, &now_secs().to_string())
        });
    }

    /// Lets the next connect check the escrow again (this one could not).
    fn forget_escrow_check(&self) {
        if let Ok(mut last) = self.escrow_checked.lock() {
            *last = None;
        }
    }

    /// Asks the receiver which of `ids` it lacks: on the query lane when it is up (falling back
    /// to the main connection if the lane fails), else on the main connection.
    pub fn ask_missing(&self, conn: &Conn, ids: Vec<ChunkId>) -> Result<Message, ConnError> {
        if let Some(q) = self.query() {
            match q.call_blocking(Message::HaveChunks { ids: ids.clone() }) {
                Err(e) if e.is_connection() => {
                    tracing::debug!(error = %e, "query lane lost; asking on the main connection");
                    self.drop_query();
                }
                r => return r,
            }
        }
        conn.call_blocking(Message::HaveChunks { ids })
    }
}

impl ConnManager {
    /// Starts asking which of `ids` the receiver lacks, without waiting for the answer: on
    /// the query lane when it is up (then `true`), else on `conn`. A question the lane
    /// loses is asked again on `conn` by whoever takes the answer.
    pub fn start_missing(
        &self,
        conn: &Conn,
        ids: Vec<ChunkId>,
    ) -> (Result<Pending, ConnError>, bool) {
        if let Some(q) = self.query() {
            match q.start_blocking(Message::HaveChunks { ids: ids.clone() }) {
                Ok(p) => return (Ok(p), true),
                Err(e) => {
                    tracing::debug!(error = %e, "query lane lost; asking on the main connection");
                    self.drop_query();
                }
            }
        }
        (conn.start_blocking(Message::HaveChunks { ids }), false)
    }

    /// Counts a worker's wait for a reply it needed before going on (a round trip in
    /// series), for the debug log and [`ConnManager::waits`].
    pub fn note_wait(&self, waited: Duration) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.waited_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
    }

    /// Replies waited for in series so far, and how long in all.
    pub fn waits(&self) -> (u64, Duration) {
        (
            self.waits.load(Ordering::Relaxed),
            Duration::from_micros(self.waited_us.load(Ordering::Relaxed)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_quota_and_authorization_refusals_are_kept_and_retried_slowly() {
        let remote = |code| ConnError::Remote {
            code,
            message: "why".into(),
        };
        assert_eq!(
            remote(ErrorCode::QuotaExceeded).refusal(),
            Some((ErrorCode::QuotaExceeded, "why"))
        );
        let refused = ConnError::Refused {
            addr: "a".into(),
            code: ErrorCode::Unauthorized,
            message: "not authorized".into(),
        };
        assert_eq!(
            refused.refusal(),
            Some((ErrorCode::Unauthorized, "not authorized"))
        );
        for code in [
            ErrorCode::Storage,
            ErrorCode::MissingChunks,
            ErrorCode::Internal,
        ] {
            assert_eq!(remote(code).refusal(), None, "{code:?}");
        }
        assert_eq!(ConnError::Lost("x".into()).refusal(), None);
        for _ in 0..100 {
            let ms = quota_retry_ms();
            assert!((30_000..60_000).contains(&ms), "{ms}");
        }
    }
}
