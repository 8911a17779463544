//! One agent's session, from its `Hello` to its close.
//!
//! A session is two tasks. The *reader* decodes frames into a bounded queue (bounded in
//! messages and in bytes). The *processor* handles them in order and runs the group
//! commit: a `CommitFile` is queued in the session's batch, and whenever the queue is
//! momentarily empty (or the batch reaches [`MAX_BATCH_COMMITS`] commits,
//! [`MAX_BATCH_BYTES`] bytes, or holds [`MAX_HELD_REPLIES`] replies or [`MAX_HELD_BYTES`]
//! of them) the batch is flushed: packs fsynced, one index transaction, then the batch's
//! `FileAcked` replies. The flush runs on a blocking thread while the processor goes on
//! storing what arrives, which becomes the next batch (one flush in flight per session;
//! a full batch waits for it, and the session reads nothing more meanwhile). Replies keep
//! request order: while a commit is unacknowledged, every later reply waits for the flush
//! that acknowledges it.
//!
//! A malformed frame, an unknown kind, a reply sent as a request, or a count or size
//! past the protocol's limits ends that session only (after a best-effort
//! `Error{Malformed}`). On shutdown a session handles what it has already received,
//! flushes, answers `Error{ShuttingDown}` and closes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use coffer_common::channel::{self, ChannelError, RecvHalf, SendHalf};
use coffer_common::chunk::{ChunkId, SEAL_OVERHEAD};
use coffer_common::wire::{
    CommitResult, ErrorCode, FileCommit, Message, QuotaInfo, SealedChunk, WireError,
    MAX_BATCH_FILES, MAX_IDS, MAX_MANIFEST, MAX_NAME, MAX_SEALED_CHUNK, PROTOCOL_VERSION,
};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::RepoName;
use crate::index::{CommitOutcome, NewCommit};
use crate::logs::peer_text;
use crate::metrics::{ErrorKind, Metrics};
use crate::repo::{KeyFileStored, Repo, RepoError};
use crate::server::{error, refuse, Access, Server, LINGER};

/// Commits in one batch before it is flushed regardless.
pub const MAX_BATCH_COMMITS: usize = 4096;
/// Bytes stored and committed (chunks, manifests, chunk ids) by a session before its batch
/// is flushed regardless.
pub const MAX_BATCH_BYTES: u64 = 64 << 20;
/// Replies held behind unacknowledged commits before the batch is flushed regardless.
pub const MAX_HELD_REPLIES: usize = 4096;
/// Bytes of replies held behind unacknowledged commits before the same.
pub const MAX_HELD_BYTES: u64 = 4 << 20;
/// Messages queued between a session's reader and processor.
const QUEUE_MESSAGES: usize = 4096;
/// Bytes of messages queued per session (a single larger message still passes alone).
const QUEUE_BYTES: usize = 2 << 20;
/// Bytes of queued `Chunk` replies written at once.
const REPLY_BATCH: usize = 1 << 20;
/// `GetChunk` requests read together on one blocking thread, in one index transaction:
/// a thread hand-off and an index lookup per chunk would cost more than reading the
/// chunks.
const READ_GROUP: usize = 8;
/// Groups of chunk reads in flight per session, ahead of the replies being encrypted and
/// written (each chunk read holds at most one sealed chunk, in a buffer that is reused:
/// the receiver's peak RSS grows with their count). One group reads while the next is
/// gathered; more groups ahead only raise the receiver's memory.
const GROUPS_AHEAD: usize = 1;
/// Capacity of a chunk read's buffer: the largest chunk the agent's chunker cuts, sealed.
const READ_BUF: usize = MAX_SEALED_CHUNK;

type Tx = SendHalf<WriteHalf<TcpStream>>;
type Rx = RecvHalf<ReadHalf<TcpStream>>;

/// Runs one agent's session on an authenticated, authorized connection: `Hello`, the
/// repository opened, `Welcome`, then requests until the session ends.
pub(crate) async fn session(
    server: Arc<Server>,
    mut ch: channel::Channel<TcpStream>,
    repo_name: RepoName,
    access: Access,
) {
    let agent = match hello(&server, &mut ch).await {
        Hello::Agent(a) => a,
        Hello::Refuse(m) => return refuse(ch, m).await,
        Hello::Gone => return,
    };
    let repo = match open_repo(&server, &repo_name).await {
        Ok(r) => r,
        Err(m) => return refuse(ch, m).await,
    };
    let quota = repo.limits.quota();
    let welcome = Message::Welcome {
        protocol: PROTOCOL_VERSION,
        repo: repo_name.to_string(),
        quota: (quota > 0).then(|| QuotaInfo {
            used: repo.used_bytes(),
            quota,
            warn_at_percent: server.live_config().warn_at.0,
        }),
    };
    if ch.send(&welcome).await.is_err() {
        return;
    }
    serve_requests(&server, ch, repo, &agent, access).await;
}

/// What the agent's first message came to.
enum Hello {
    /// A `Hello` of our protocol version, from the agent so named.
    Agent(String),
    /// Anything else: the connection is refused with this message.
    Refuse(Message),
    /// The agent closed the connection, went quiet past the idle timeout, or the receiver
    /// is shutting down.
    Gone,
}

/// Reads the agent's first message, which must be a `Hello` of our protocol version.
async fn hello(server: &Server, ch: &mut channel::Channel<TcpStream>) -> Hello {
    let first = tokio::select! {
        r = tokio::time::timeout(server.config.idle_timeout(), ch.recv()) => r,
        _ = server.cancel.cancelled() => return Hello::Gone,
    };
    let (code, msg) = match first {
        Err(_) => {
            tracing::info!("no Hello within the idle timeout; closing");
            return Hello::Gone;
        }
        Ok(Ok(Message::Hello {
            protocol,
            agent_name,
            software,
        })) => {
            if protocol != PROTOCOL_VERSION {
                let msg = format!(
                    "protocol version mismatch: the receiver speaks {PROTOCOL_VERSION}, the \
                     agent speaks {protocol}; upgrade the older side"
                );
                tracing::warn!("{msg}");
                (ErrorCode::ProtocolVersion, msg)
            } else if let Some(msg) = bad_names(&agent_name, &software) {
                tracing::warn!("{msg}");
                (ErrorCode::Malformed, msg)
            } else {
                tracing::info!(
                    agent = %peer_text(&agent_name),
                    software = %peer_text(&software),
                    "session started"
                );
                return Hello::Agent(agent_name);
            }
        }
        Ok(Ok(other)) => {
            let msg = format!("expected Hello as the first message, got {}", other.kind());
            tracing::warn!("{msg}");
            (ErrorCode::Malformed, msg)
        }
        Ok(Err(ChannelError::Wire(WireError::Closed))) => return Hello::Gone,
        Ok(Err(e)) => {
            tracing::warn!("bad first frame: {e}");
            (ErrorCode::Malformed, e.to_string())
        }
    };
    server.metrics.error(ErrorKind::Protocol);
    Hello::Refuse(error(code, msg))
}

/// The session's repository, or the message refusing the session when it cannot be
/// opened.
async fn open_repo(server: &Server, name: &RepoName) -> Result<Arc<Repo>, Message> {
    server.open_repo(name).await.map_err(|e| {
        // A refusal for `repair` is logged once, by the server.
        if !matches!(e, RepoError::NeedsRepair(_)) {
            tracing::error!("opening repository {name}: {e}");
        }
        server.metrics.error(error_kind(&e));
        let code = if e.is_storage() {
            ErrorCode::Storage
        } else {
            ErrorCode::Internal
        };
        error(code, format!("opening repository {name}: {e}"))
    })
}

/// Reads requests on a task of its own and answers them in order until the session
/// ends; then closes the connection.
async fn serve_requests(
    server: &Server,
    ch: channel::Channel<TcpStream>,
    repo: Arc<Repo>,
    agent: &str,
    access: Access,
) {
    let (tx, rx) = ch.split();
    let (qtx, qrx) = mpsc::channel(QUEUE_MESSAGES);
    let reader_cancel = server.cancel.child_token();
    let mut reader = tokio::spawn(
        read_loop(rx, qtx, reader_cancel.clone()).instrument(tracing::Span::current()),
    );
    let mut s = Session::new(
        repo,
        tx,
        server.config.idle_timeout(),
        server.metrics.clone(),
        access,
    );
    let end = s.run(qrx, &server.cancel).await;
    // Close our side after the last reply; let the reader drain what the agent had already
    // pipelined (so the close is not a reset), for a moment.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.tx.shutdown()).await;
    let _ = tokio::time::timeout(LINGER, &mut reader).await;
    reader_cancel.cancel();
    reader.abort();
    if matches!(end, Err(End::Internal(_))) {
        server.metrics.error(ErrorKind::Internal);
    }
    let agent = peer_text(agent);
    match end {
        Ok(()) => {
            tracing::info!(%agent, files = s.acked, bytes = s.stored_bytes, "session ended")
        }
        Err(e) => {
            tracing::info!(%agent, files = s.acked, bytes = s.stored_bytes, "session ended: {e}")
        }
    }
}

enum Incoming {
    Msg(Message, OwnedSemaphorePermit),
    Bad(ChannelError),
}

async fn read_loop(mut rx: Rx, q: mpsc::Sender<Incoming>, cancel: CancellationToken) {
    let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
    // Once the processor is gone, frames are read and dropped until the peer closes.
    let mut draining = false;
    loop {
        let r = tokio::select! {
            r = rx.recv_sized() => r,
            _ = cancel.cancelled() => return,
        };
        if draining {
            if r.is_err() {
                return;
            }
            continue;
        }
        let item = match r {
            Ok((m, n)) => {
                let want = n.clamp(1, QUEUE_BYTES) as u32;
                let permit = tokio::select! {
                    p = budget.clone().acquire_many_owned(want) => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = cancel.cancelled() => return,
                };
                Incoming::Msg(m, permit)
            }
            Err(ChannelError::Wire(WireError::Closed)) => return,
            Err(e) => Incoming::Bad(e),
        };
        if matches!(item, Incoming::Bad(_)) {
            // After a frame error the stream cannot be read on.
            let _ = q.send(item).await;
            return;
        }
        if q.send(item).await.is_err() {
            draining = true;
        }
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("sending to the agent failed: {0}")]
    Send(ChannelError),
    #[error("the agent did not read replies within the idle timeout")]
    Stalled,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("idle timeout")]
    Idle,
    #[error("receiver shutting down")]
    Shutdown,
    #[error("the agent's key was revoked")]
    Revoked,
}

enum Reply {
    Now(Message),
    Commit(usize),
    /// The `FilesAcked` of a `PutFiles`: commits `start..start + len` of the batch.
    Commits(usize, usize),
}

/// Commits and the replies queued behind them, in request order.
#[derive(Default)]
struct Batch {
    commits: Vec<NewCommit>,
    replies: Vec<Reply>,
    /// Bytes of the `Reply::Now` messages in `replies` (roughly: their variable parts).
    held_bytes: u64,
}

type FlushResult = (Vec<NewCommit>, Result<Vec<CommitOutcome>, RepoError>);

/// A batch being made durable on a blocking thread while the session reads on.
struct Flushing {
    task: tokio::task::JoinHandle<FlushResult>,
    replies: Vec<Reply>,
}

struct Session {
    repo: Arc<Repo>,
    tx: Tx,
    idle: Duration,
    /// The batch being gathered.
    batch: Batch,
    /// The batch being flushed (at most one at a time).
    flushing: Option<Flushing>,
    /// Bytes stored since the gathered batch began.
    batch_bytes: u64,
    /// Chunks were stored since the last flush began.
    unflushed: bool,
    acked: u64,
    stored_bytes: u64,
    metrics: Arc<Metrics>,
    /// Groups of `GetChunk` reads started and not yet answered, oldest first.
    reads: VecDeque<(Vec<ChunkId>, ChunkReads)>,
    /// `GetChunk` requests not yet started, gathered into the next group.
    gathering: Vec<ChunkId>,
    /// Buffers of answered chunk reads, reused by the next ones: a fresh buffer per read,
    /// allocated on whichever blocking thread ran it, spreads freed memory over glibc's
    /// per-thread arenas and inflates the receiver's resident memory.
    read_bufs: Vec<Vec<u8>>,
    /// The key's authorization: a revoked key's session ends, and nothing more of it is
    /// acknowledged.
    access: Access,
}

type ChunkReads = tokio::task::JoinHandle<Vec<Result<Option<Vec<u8>>, RepoError>>>;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, End> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| End::Internal(e.to_string()))
}

fn error_kind(e: &RepoError) -> ErrorKind {
    if matches!(e, RepoError::Refused(_)) {
        ErrorKind::Quota
    } else if e.is_storage() {
        ErrorKind::Storage
    } else {
        ErrorKind::Internal
    }
}

fn repo_error(e: &RepoError) -> Message {
    let code = if matches!(e, RepoError::Refused(_)) {
        ErrorCode::QuotaExceeded
    } else if e.is_storage() {
        ErrorCode::Storage
    } else {
        ErrorCode::Internal
    };
    error(code, e.to_string())
}

/// Logs a chunk that could not be stored: a refusal (quota, disk floor) is counted in
/// `/metrics` and only logged at debug level (the agent retries it), anything else warned.
fn log_store_error(id: &ChunkId, e: &RepoError) {
    if matches!(e, RepoError::Refused(_)) {
        tracing::debug!("refused chunk {id}: {e}");
    } else {
        tracing::warn!("storing chunk {id}: {e}");
    }
}

enum Event {
    Flushed(Result<FlushResult, tokio::task::JoinError>),
    Item(Option<Incoming>),
    Cancel,
    Idle,
    Revoked,
}

impl Session {
    fn new(repo: Arc<Repo>, tx: Tx, idle: Duration, metrics: Arc<Metrics>, access: Access) -> Self {
        Session {
            repo,
            tx,
            idle,
            batch: Batch::default(),
            flushing: None,
            batch_bytes: 0,
            unflushed: false,
            acked: 0,
            stored_bytes: 0,
            metrics,
            reads: VecDeque::new(),
            gathering: Vec::new(),
            read_bufs: Vec::new(),
            access,
        }
    }

    /// Answers the requests of `q` until the agent closes, an error ends the session or the
    /// receiver shuts down; then makes what was received durable and acknowledges it.
    async fn run(
        &mut self,
        mut q: mpsc::Receiver<Incoming>,
        cancel: &CancellationToken,
    ) -> Result<(), End> {
        let r = self.serve_queue(&mut q, cancel).await;
        if matches!(r, Err(End::Revoked)) {
            // Nothing more of a revoked key's session is made durable or acknowledged.
            tracing::warn!("agent key revoked: ending its session");
            let m = format!(
                "agent key {} was revoked on this receiver; session closed",
                self.access.key()
            );
            let _ = self.send(error(ErrorCode::Unauthorized, m)).await;
            return r;
        }
        let r = match r {
            Ok(()) => self.answer_reads().await,
            e => e,
        };
        // Whatever happened, make what was received durable (an ack that cannot be sent
        // is simply asked for again: commits are idempotent).
        let f = self.flush_now().await;
        if matches!(r, Err(End::Shutdown)) {
            let _ = self
                .send(error(
                    ErrorCode::ShuttingDown,
                    "the receiver is shutting down; reconnect later",
                ))
                .await;
        }
        r.and(f)
    }

    /// True while some commit is not yet acknowledged (so replies must wait their turn).
    fn pending(&self) -> bool {
        self.flushing.is_some() || !self.batch.commits.is_empty()
    }

    /// True when the gathered batch must be flushed before anything more is read: too
    /// many commits or bytes, or too many replies (or reply bytes) held behind them.
    fn batch_full(&self) -> bool {
        self.batch.commits.len() >= MAX_BATCH_COMMITS
            || self.batch_bytes >= MAX_BATCH_BYTES
            || self.batch.replies.len() >= MAX_HELD_REPLIES
            || self.batch.held_bytes >= MAX_HELD_BYTES
    }

    /// Handles queued requests in order. Whenever the queue is momentarily empty, answers
    /// the chunk reads asked for, starts flushing the gathered commits and waits for what
    /// comes next; a full batch is flushed at once.
    async fn serve_queue(
        &mut self,
        q: &mut mpsc::Receiver<Incoming>,
        cancel: &CancellationToken,
    ) -> Result<(), End> {
        let mut shutting_down = false;
        loop {
            let item = match q.try_recv() {
                Ok(i) => i,
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.answer_reads().await?;
                    if shutting_down {
                        return Err(End::Shutdown);
                    }
                    // Make the gathered commits durable, while reading on.
                    if self.flushing.is_none() && !self.batch.commits.is_empty() {
                        self.start_flush();
                    }
                    match self.next_event(q, cancel, shutting_down).await {
                        Event::Flushed(r) => {
                            self.finish_flush(r).await?;
                            continue;
                        }
                        Event::Item(Some(i)) => i,
                        Event::Item(None) => return Ok(()),
                        Event::Cancel => {
                            shutting_down = true;
                            continue;
                        }
                        Event::Idle => return Err(End::Idle),
                        Event::Revoked => return Err(End::Revoked),
                    }
                }
            };
            if self.access.revoked.is_cancelled() {
                return Err(End::Revoked);
            }
            match item {
                Incoming::Msg(m, permit) => {
                    self.handle(m).await?;
                    drop(permit);
                }
                Incoming::Bad(e) => return self.malformed(e.to_string()).await,
            }
            if self.batch_full() {
                self.wait_flush().await?;
                self.start_flush();
            }
        }
    }

    /// Waits for the first of: the flush in flight finishing, the next request, shutdown
    /// (once), or the idle timeout (only while no commit is pending).
    async fn next_event(
        &mut self,
        q: &mut mpsc::Receiver<Incoming>,
        cancel: &CancellationToken,
        shutting_down: bool,
    ) -> Event {
        let idle = !self.pending();
        let revoked = self.access.revoked.clone();
        let flushing = async {
            match self.flushing.as_mut() {
                Some(f) => (&mut f.task).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = revoked.cancelled() => Event::Revoked,
            r = flushing => Event::Flushed(r),
            i = q.recv() => Event::Item(i),
            _ = cancel.cancelled(), if !shutting_down => Event::Cancel,
            _ = tokio::time::sleep(self.idle), if idle => Event::Idle,
        }
    }

    /// The reply for a failed request, counted.
    fn failed(&self, e: &RepoError) -> Message {
        self.metrics.error(error_kind(e));
        repo_error(e)
    }

    async fn send(&mut self, m: Message) -> Result<(), End> {
        self.answer_reads().await?;
        match tokio::time::timeout(self.idle, self.tx.send(&m)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Send(e)),
            Err(_) => Err(End::Stalled),
        }
    }

    /// Adds a reply to the outgoing buffer (after the chunk reads in flight, which come
    /// first), writing it out once enough waits; many small replies then cost one system
    /// call. [`Session::write_queued`] writes the rest.
    async fn send_queued(&mut self, m: Message) -> Result<(), End> {
        self.start_reads().await?;
        while !self.reads.is_empty() {
            self.answer_oldest_reads().await?;
        }
        self.tx.queue(&m).map_err(End::Send)?;
        if self.tx.queued() >= REPLY_BATCH {
            self.write_queued().await?;
        }
        Ok(())
    }

    /// Starts reading the gathered `GetChunk` requests on a blocking thread, after
    /// answering the oldest group when [`GROUPS_AHEAD`] are in flight already.
    async fn start_reads(&mut self) -> Result<(), End> {
        if self.gathering.is_empty() {
            return Ok(());
        }
        if self.reads.len() >= GROUPS_AHEAD {
            self.answer_oldest_reads().await?;
        }
        let ids = std::mem::take(&mut self.gathering);
        let repo = self.repo.clone();
        // Buffers are allocated here, on the session's thread, with room for any chunk
        // the agent cuts, so the blocking thread never grows one.
        let bufs: Vec<Vec<u8>> = (0..ids.len())
            .map(|_| {
                self.read_bufs
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(READ_BUF))
            })
            .collect();
        let group = ids.clone();
        let read = tokio::task::spawn_blocking(move || repo.get_many(&group, bufs));
        self.reads.push_back((ids, read));
        Ok(())
    }

    /// Answers the oldest group of chunk reads in flight: its replies are encrypted into
    /// the outgoing buffer, written with the replies queued after them (one system call
    /// for a run of restore reads) once [`REPLY_BATCH`] bytes wait, when the request queue
    /// is momentarily empty, or by the next `send`.
    async fn answer_oldest_reads(&mut self) -> Result<(), End> {
        let Some((ids, read)) = self.reads.pop_front() else {
            return Ok(());
        };
        let results = read.await.map_err(|e| End::Internal(e.to_string()))?;
        if results.len() != ids.len() {
            // Every request gets its reply, or the agent would wait for it forever.
            return Err(End::Internal(format!(
                "{} chunk reads gave {} results",
                ids.len(),
                results.len()
            )));
        }
        for (id, result) in ids.into_iter().zip(results) {
            let reply = match result {
                Ok(Some(sealed)) => Message::Chunk { id, sealed },
                Ok(None) => not_found(&id),
                Err(e) => {
                    tracing::error!("reading chunk {id}: {e}");
                    self.metrics.error(ErrorKind::Internal);
                    error(ErrorCode::Internal, format!("reading chunk {id}: {e}"))
                }
            };
            self.tx.queue(&reply).map_err(End::Send)?;
            // The reply's bytes are in the outgoing buffer now; its buffer serves a later
            // read.
            if let Message::Chunk { sealed, .. } = reply {
                if self.read_bufs.len() < READ_GROUP * GROUPS_AHEAD {
                    self.read_bufs.push(sealed);
                }
            }
            if self.tx.queued() >= REPLY_BATCH {
                self.write_queued().await?;
            }
        }
        Ok(())
    }

    /// Answers every chunk read asked for (gathered or in flight) and writes what is
    /// queued. Runs before any other reply is sent, so replies keep request order.
    async fn answer_reads(&mut self) -> Result<(), End> {
        self.start_reads().await?;
        while !self.reads.is_empty() {
            self.answer_oldest_reads().await?;
        }
        self.write_queued().await
    }

    /// Writes the replies queued by [`Session::answer_oldest_read`].
    async fn write_queued(&mut self) -> Result<(), End> {
        if self.tx.queued() == 0 {
            return Ok(());
        }
        match tokio::time::timeout(self.idle, self.tx.flush_queued()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Send(e)),
            Err(_) => Err(End::Stalled),
        }
    }

    /// Sends a reply now, or queues it behind unacknowledged commits (counted towards the
    /// batch: see [`Session::batch_full`]).
    async fn reply(&mut self, m: Message) -> Result<(), End> {
        if self.pending() {
            self.batch.held_bytes += held_size(&m);
            self.batch.replies.push(Reply::Now(m));
            Ok(())
        } else {
            self.send(m).await
        }
    }

    async fn malformed(&mut self, msg: String) -> Result<(), End> {
        tracing::warn!("ending session: {msg}");
        self.metrics.error(ErrorKind::Protocol);
        self.flush_now().await?;
        let _ = self.send(error(ErrorCode::Malformed, msg.clone())).await;
        Err(End::Protocol(msg))
    }

    /// Handles one request.
    async fn handle(&mut self, m: Message) -> Result<(), End> {
        match m {
            Message::HaveChunks { ids } => self.have_chunks(ids).await,
            Message::PutChunk {
                id,
                sealed_hash,
                sealed,
            } => self.put_chunk(id, sealed_hash, sealed).await,
            Message::CommitFile {
                commit_id,
                file_id,
                manifest,
                chunks,
                deleted,
            } => {
                self.commit_file(NewCommit {
                    commit_id,
                    file_id,
                    manifest,
                    chunks,
                    deleted,
                })
                .await
            }
            Message::PutFiles { chunks, commits } => self.put_files(chunks, commits).await,
            Message::PutKeyFile { data } => self.put_keyfile(data).await,
            Message::GetKeyFile => self.get_keyfile().await,
            Message::GetKeyFiles => self.get_keyfiles().await,
            Message::ListVersions { after, limit } => self.list_versions(after, limit).await,
            Message::GetChunk { id } => self.get_chunk(id).await,
            Message::Hello { .. } => self.malformed("Hello sent twice".into()).await,
            other => {
                self.malformed(format!("{} is a reply, not a request", other.kind()))
                    .await
            }
        }
    }

    /// `HaveChunks`: answered with the ids the repository lacks.
    async fn have_chunks(&mut self, ids: Vec<ChunkId>) -> Result<(), End> {
        if ids.len() > MAX_IDS {
            return self
                .malformed(format!("HaveChunks with {} ids (max {MAX_IDS})", ids.len()))
                .await;
        }
        let repo = self.repo.clone();
        let r = blocking(move || repo.missing(&ids)).await?;
        let reply = match r {
            Ok(ids) => Message::Missing { ids },
            Err(e) => self.failed(&e),
        };
        self.reply(reply).await
    }

    /// `PutChunk`: the chunk is appended to a pack (made durable by the next flush) and
    /// answered with `Stored` at once.
    async fn put_chunk(
        &mut self,
        id: ChunkId,
        sealed_hash: [u8; 32],
        sealed: Vec<u8>,
    ) -> Result<(), End> {
        if let Some(msg) = oversized_chunk(&id, sealed.len()) {
            return self.malformed(msg).await;
        }
        if let Some(msg) = bad_sealed_len(&id, sealed.len()) {
            self.metrics.error(ErrorKind::Protocol);
            return self.reply(error(ErrorCode::Malformed, msg)).await;
        }
        let n = sealed.len() as u64;
        let repo = self.repo.clone();
        // The channel checked the sealed bytes against `sealed_hash`.
        let r = blocking(move || repo.put_hashed(&id, &sealed, sealed_hash)).await?;
        let reply = match r {
            Ok(written) => {
                self.count_chunk(written.then_some(n));
                Message::Stored { id }
            }
            Err(e) => {
                log_store_error(&id, &e);
                self.failed(&e)
            }
        };
        self.reply(reply).await
    }

    /// Counts a chunk stored (`Some(bytes)`) or found already present (`None`).
    fn count_chunk(&mut self, stored: Option<u64>) {
        match stored {
            Some(n) => {
                self.unflushed = true;
                self.batch_bytes += n;
                self.stored_bytes += n;
                self.metrics.chunk_stored(n);
            }
            None => self.metrics.chunk_deduplicated(),
        }
    }

    /// `CommitFile`: joins the batch; answered with `FileAcked` once the batch is durable.
    async fn commit_file(&mut self, c: NewCommit) -> Result<(), End> {
        if c.chunks.len() > MAX_IDS {
            return self
                .malformed(format!(
                    "CommitFile with {} chunks (max {MAX_IDS})",
                    c.chunks.len()
                ))
                .await;
        }
        if let Some(msg) = oversized_manifest(c.manifest.len()) {
            return self.malformed(msg).await;
        }
        self.batch_bytes += commit_bytes(&c.manifest, &c.chunks);
        self.batch.commits.push(c);
        let i = self.batch.commits.len() - 1;
        self.batch.replies.push(Reply::Commit(i));
        Ok(())
    }

    /// `PutFiles`: its chunks are stored in one blocking call, then its commits join the
    /// batch; answered with one `FilesAcked` once the batch is durable. A chunk that cannot
    /// be stored fails the whole request (nothing of it is acknowledged).
    async fn put_files(
        &mut self,
        chunks: Vec<SealedChunk>,
        commits: Vec<FileCommit>,
    ) -> Result<(), End> {
        if let Some(msg) = bad_put_files(&chunks, &commits) {
            return self.malformed(msg).await;
        }
        if let Some(msg) = chunks
            .iter()
            .find_map(|c| bad_sealed_len(&c.id, c.sealed.len()))
        {
            self.metrics.error(ErrorKind::Protocol);
            return self.reply(error(ErrorCode::Malformed, msg)).await;
        }
        if !chunks.is_empty() {
            if let Some(reply) = self.store_chunks(chunks).await? {
                return self.reply(reply).await;
            }
        }
        let start = self.batch.commits.len();
        let n = commits.len();
        for c in commits {
            self.batch_bytes += commit_bytes(&c.manifest, &c.chunks);
            self.batch.commits.push(NewCommit {
                commit_id: c.commit_id,
                file_id: c.file_id,
                manifest: c.manifest,
                chunks: c.chunks,
                deleted: c.deleted,
            });
        }
        self.batch.replies.push(Reply::Commits(start, n));
        Ok(())
    }

    /// Stores a `PutFiles`'s chunks on one blocking thread and counts them; on a failure,
    /// the reply that fails the request.
    async fn store_chunks(&mut self, chunks: Vec<SealedChunk>) -> Result<Option<Message>, End> {
        let repo = self.repo.clone();
        let r = blocking(move || {
            if let Err(e) = crate::quota::room_for(&repo, &chunks) {
                let id = chunks.first().map(|c| c.id).unwrap_or(ChunkId([0; 32]));
                return Err(Box::new((id, e)));
            }
            let mut stored = Vec::with_capacity(chunks.len());
            for c in &chunks {
                match repo.put(&c.id, &c.sealed) {
                    Ok(w) => stored.push(w.then_some(c.sealed.len() as u64)),
                    Err(e) => return Err(Box::new((c.id, e))),
                }
            }
            Ok(stored)
        })
        .await?;
        match r {
            Ok(stored) => {
                for s in stored {
                    self.count_chunk(s);
                }
                Ok(None)
            }
            Err(b) => {
                let (id, e) = *b;
                // Nothing of this request is acknowledged; the agent sends it again.
                log_store_error(&id, &e);
                Ok(Some(self.failed(&e)))
            }
        }
    }

    /// `PutKeyFile`: the key file joins the escrow's history (nothing is replaced); one
    /// that is not a well-formed key file, or past the history's cap, is refused.
    async fn put_keyfile(&mut self, data: Vec<u8>) -> Result<(), End> {
        let repo = self.repo.clone();
        let r = blocking(move || repo.put_keyfile(&data)).await?;
        let reply = match r {
            Ok(stored) => {
                if let KeyFileStored::Added(n) = stored {
                    tracing::info!(repo = %self.repo.name(), entry = n, "escrowed key file added");
                }
                Message::KeyFileStored
            }
            Err(e @ (RepoError::KeyFileTooLarge(_) | RepoError::KeyFileMalformed(_))) => {
                self.metrics.error(ErrorKind::Protocol);
                error(ErrorCode::Malformed, e.to_string())
            }
            Err(e @ RepoError::KeyFilesFull) => {
                tracing::warn!(repo = %self.repo.name(), "{e}");
                self.metrics.error(ErrorKind::Storage);
                error(ErrorCode::Storage, e.to_string())
            }
            Err(e) => self.failed(&e),
        };
        self.reply(reply).await
    }

    /// `GetKeyFiles`: every escrowed key file, newest first.
    async fn get_keyfiles(&mut self) -> Result<(), End> {
        let repo = self.repo.clone();
        let reply = match blocking(move || repo.get_keyfiles()).await? {
            Ok(files) => Message::KeyFiles { files },
            Err(e) => self.failed(&e),
        };
        self.reply(reply).await
    }

    /// `GetKeyFile`: the newest escrowed key file, if any.
    async fn get_keyfile(&mut self) -> Result<(), End> {
        let repo = self.repo.clone();
        let reply = match blocking(move || repo.get_keyfile()).await? {
            Ok(data) => Message::KeyFile { data },
            Err(e) => self.failed(&e),
        };
        self.reply(reply).await
    }

    /// `ListVersions`: a page of versions, this session's own commits included.
    async fn list_versions(&mut self, after: u64, limit: u32) -> Result<(), End> {
        if self.pending() {
            self.flush_now().await?;
        }
        let repo = self.repo.clone();
        let reply = match blocking(move || repo.list_versions(after, limit)).await? {
            Ok((entries, more)) => Message::Versions { entries, more },
            Err(e) => self.failed(&e),
        };
        self.reply(reply).await
    }

    /// `GetChunk`: gathered, then read in a group on a blocking thread while earlier
    /// chunks are encrypted and written; answered in order by [`Session::answer_reads`].
    async fn get_chunk(&mut self, id: ChunkId) -> Result<(), End> {
        // Sent at once rather than held (with its data) behind pending commits.
        if self.pending() {
            self.flush_now().await?;
        }
        self.gathering.push(id);
        if self.gathering.len() >= READ_GROUP {
            self.start_reads().await?;
        }
        Ok(())
    }

    /// Starts making the gathered batch durable (packs fsynced, one index transaction)
    /// on a blocking thread. The caller has checked that no flush is in flight.
    fn start_flush(&mut self) {
        if self.batch.commits.is_empty() && !self.unflushed {
            return;
        }
        if !self.batch.commits.is_empty() && !self.access.still_authorized() {
            // Revoked since these were sent: none is recorded (the session ends).
            self.batch = Batch::default();
            self.batch_bytes = 0;
            return;
        }
        let Batch {
            commits, replies, ..
        } = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.unflushed = false;
        let repo = self.repo.clone();
        let task = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let r = repo.flush(&commits);
            tracing::debug!(
                commits = commits.len(),
                ms = t.elapsed().as_millis() as u64,
                "flushed"
            );
            (commits, r)
        });
        self.flushing = Some(Flushing { task, replies });
    }

    /// Waits for the flush in flight, if any, and sends its replies.
    async fn wait_flush(&mut self) -> Result<(), End> {
        if let Some(f) = self.flushing.as_mut() {
            let r = (&mut f.task).await;
            self.finish_flush(r).await?;
        }
        Ok(())
    }

    /// Flushes everything gathered so far and sends every waiting reply.
    async fn flush_now(&mut self) -> Result<(), End> {
        self.wait_flush().await?;
        self.start_flush();
        self.wait_flush().await
    }

    /// The answer to the `i`th commit of a flushed batch (acknowledgements counted).
    fn commit_result(
        &mut self,
        outcomes: &[CommitOutcome],
        commits: &[NewCommit],
        i: usize,
    ) -> CommitResult {
        let failed = |code, message: String| CommitResult::Failed { code, message };
        match (outcomes.get(i), commits.get(i)) {
            (
                Some(CommitOutcome::Acked {
                    version,
                    commit_time,
                }),
                Some(c),
            ) => {
                self.acked += 1;
                self.metrics.commit();
                CommitResult::Acked {
                    commit_id: c.commit_id,
                    version: *version,
                    commit_time: *commit_time,
                }
            }
            (Some(CommitOutcome::MissingChunks(ids)), _) => {
                failed(ErrorCode::MissingChunks, missing_chunks_text(ids))
            }
            (None, _) => failed(ErrorCode::Internal, "commit outcome lost".into()),
            (Some(_), None) => failed(ErrorCode::Internal, "commit lost".into()),
        }
    }

    /// Sends the replies of a finished flush, in order, then any replies that only waited
    /// for it.
    async fn finish_flush(
        &mut self,
        r: Result<FlushResult, tokio::task::JoinError>,
    ) -> Result<(), End> {
        let Some(f) = self.flushing.take() else {
            return Ok(());
        };
        let (commits, outcome) = r.map_err(|e| End::Internal(e.to_string()))?;
        if !commits.is_empty() && !self.access.still_authorized() {
            return Err(End::Revoked);
        }
        if let Err(e) = &outcome {
            tracing::warn!("flushing a batch of {} commits: {e}", commits.len());
            // One failure, however many commits it answers.
            self.metrics.error(error_kind(e));
        }
        for reply in f.replies {
            let m = self.flushed_reply(reply, &outcome, &commits);
            self.send_queued(m).await?;
        }
        if self.batch.commits.is_empty() {
            self.batch.held_bytes = 0;
            for reply in std::mem::take(&mut self.batch.replies) {
                if let Reply::Now(m) = reply {
                    self.send_queued(m).await?;
                }
            }
        }
        self.write_queued().await
    }

    /// The message answering `reply` once its batch, `commits`, was flushed with `outcome`.
    fn flushed_reply(
        &mut self,
        reply: Reply,
        outcome: &Result<Vec<CommitOutcome>, RepoError>,
        commits: &[NewCommit],
    ) -> Message {
        match reply {
            Reply::Now(m) => m,
            Reply::Commit(i) => match outcome {
                Err(e) => repo_error(e),
                Ok(o) => match self.commit_result(o, commits, i) {
                    CommitResult::Acked {
                        commit_id,
                        version,
                        commit_time,
                    } => Message::FileAcked {
                        commit_id,
                        version,
                        commit_time,
                    },
                    CommitResult::Failed { code, message } => Message::Error { code, message },
                },
            },
            Reply::Commits(start, n) => match outcome {
                Err(e) => repo_error(e),
                Ok(o) => Message::FilesAcked {
                    results: (start..start + n)
                        .map(|i| self.commit_result(o, commits, i))
                        .collect(),
                },
            },
        }
    }
}

fn not_found(id: &ChunkId) -> Message {
    error(
        ErrorCode::NotFound,
        format!("chunk {id} is not in this repository"),
    )
}

/// Why a sealed chunk of `len` bytes is refused, if it is shorter than any sealed blob
/// (that request fails; the session goes on).
fn bad_sealed_len(id: &ChunkId, len: usize) -> Option<String> {
    (len < SEAL_OVERHEAD).then(|| {
        format!(
            "sealed chunk {id} is {len} bytes; a sealed chunk has {SEAL_OVERHEAD} to \
             {MAX_SEALED_CHUNK} bytes"
        )
    })
}

/// Why a sealed chunk of `len` bytes is refused, if it is longer than any chunk the
/// chunker cuts, sealed (the session ends: no honest agent sends one).
fn oversized_chunk(id: &ChunkId, len: usize) -> Option<String> {
    (len > MAX_SEALED_CHUNK).then(|| {
        format!(
            "sealed chunk {id} is {len} bytes, more than the largest chunk an agent cuts, \
             sealed ({MAX_SEALED_CHUNK} bytes)"
        )
    })
}

/// Why a sealed manifest of `len` bytes is refused, if it is.
fn oversized_manifest(len: usize) -> Option<String> {
    (len > MAX_MANIFEST)
        .then(|| format!("manifest of {len} bytes exceeds the limit of {MAX_MANIFEST} bytes"))
}

/// Why a `Hello`'s names are refused, if they are.
fn bad_names(agent_name: &str, software: &str) -> Option<String> {
    let long = |what: &str, s: &str| {
        (s.len() > MAX_NAME)
            .then(|| format!("{what} of {} bytes in Hello (max {MAX_NAME})", s.len()))
    };
    long("agent name", agent_name).or_else(|| long("software name", software))
}

/// Why a `PutFiles` is malformed (past the protocol's limits), if it is.
fn bad_put_files(chunks: &[SealedChunk], commits: &[FileCommit]) -> Option<String> {
    if chunks.len() > MAX_BATCH_FILES || commits.len() > MAX_BATCH_FILES {
        return Some(format!(
            "PutFiles with {} chunks and {} commits (max {MAX_BATCH_FILES} each)",
            chunks.len(),
            commits.len()
        ));
    }
    if let Some(m) = chunks
        .iter()
        .find_map(|c| oversized_chunk(&c.id, c.sealed.len()))
    {
        return Some(m);
    }
    commits.iter().find_map(|c| {
        if c.chunks.len() > MAX_IDS {
            return Some(format!(
                "PutFiles commit with {} chunks (max {MAX_IDS})",
                c.chunks.len()
            ));
        }
        oversized_manifest(c.manifest.len())
    })
}

/// What a commit adds to its batch's bytes: its manifest and its chunk ids, held until the
/// batch is flushed.
fn commit_bytes(manifest: &[u8], chunks: &[ChunkId]) -> u64 {
    (manifest.len() + std::mem::size_of_val(chunks)) as u64
}

/// Roughly the bytes a reply held behind a commit occupies: its variable part, plus a
/// little for the rest.
fn held_size(m: &Message) -> u64 {
    let variable = match m {
        Message::Missing { ids } => ids.len() * std::mem::size_of::<ChunkId>(),
        Message::KeyFile { data } => data.as_ref().map_or(0, Vec::len),
        Message::KeyFiles { files } => files.iter().map(|f| 16 + f.data.len()).sum(),
        Message::Error { message, .. } => message.len(),
        Message::Chunk { sealed, .. } => sealed.len(),
        Message::Versions { entries, .. } => entries.iter().map(|e| 64 + e.manifest.len()).sum(),
        _ => 0,
    };
    (64 + variable) as u64
}

fn missing_chunks_text(ids: &[ChunkId]) -> String {
    let first = ids.first().map(|i| i.to_hex()).unwrap_or_default();
    format!(
        "commit references {} chunk(s) the receiver does not have (first: {first}); \
         send them and commit again",
        ids.len()
    )
}
