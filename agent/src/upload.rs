//! The uploader: read -> chunk -> id -> seal -> ask -> put -> commit -> ack.
//!
//! Worker threads each take a due file, read it once (hashing, chunking and sealing on the
//! way, with memory bounded by a window of chunks), ask the receiver which chunks it lacks,
//! put only those (pipelined, no waiting per chunk), and queue the commit. Commits are sent
//! in batches after the batch's hashes and commit ids are in the journal; acknowledgements
//! are recorded in batches by a collector thread per class.
//!
//! Work comes in two queues, fresh (changes the watcher saw) and backlog (what scans
//! found). One worker, the fresh lane's, takes only fresh work and sends it on a session
//! of its own; the others take fresh work first and give the backlog every
//! [`BACKLOG_SHARE`]th pick. A batch holds one class and goes on one connection.

use std::collections::HashSet;
use std::io::Read as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use coffer_common::chunk::{chunk_stream_sized, ChunkId, PlainChunk, MIN_CHUNK};
use coffer_common::keys::fill_random;
use coffer_common::manifest::{ChunkRef, EntryKind, Manifest};
use coffer_common::wire::{
    CommitId, CommitResult, ErrorCode, FileCommit, Message, SealedChunk, MAX_BATCH_FILES, MAX_FRAME,
};
use crossbeam_channel::{select, Receiver, RecvTimeoutError, Sender};

use crate::conn::{quota_retry_ms, Conn, ConnError, Pending};
use crate::daemon::Daemon;
use crate::fidelity::{self, links, Extra};
use crate::journal::{is_folder_key, Ack, Class, CounterKey, FileRead, Job, StatKey};
use crate::scan::{fs_path, stat_key};
use coffer_common::host::time::now_ms;

mod asks;
use asks::{Asks, ASK_BYTES};

/// Plaintext bytes of chunks held, at first, while the receiver is asked which it lacks
/// (the window grows on a long link: see [`asks`]).
const WINDOW_BYTES: usize = 16 << 20;
/// Commits sent per journal transaction at most.
const BATCH_FILES: usize = 4096;
/// Bytes read per batch at most before its commits are sent.
const BATCH_BYTES: u64 = 64 << 20;
/// Bytes of small files' sealed chunks and manifests a worker holds at most before it
/// sends them (bounds memory; one `PutFiles` frame carries them).
const HELD_BYTES: usize = 2 << 20;
/// Encoded size of one `PutFiles` at most (well under the frame cap).
const PUT_FILES_BYTES: usize = MAX_FRAME - (512 << 10);

/// A file read and ready to commit.
struct Ready {
    read: FileRead,
    commit: FileCommit,
    /// A small file's one sealed chunk: sent together with its commit in a `PutFiles`.
    chunk: Option<SealedChunk>,
    /// Puts already sent for a large file's chunks.
    puts: Vec<Pending>,
    /// A large file's number in the worker's [`Asks`]: its puts are made as the answers
    /// to its presence questions come, and taken before its commit is sent.
    seq: Option<u64>,
    size: i64,
}

impl Ready {
    /// Bytes this file holds in memory until it is sent.
    fn held(&self) -> usize {
        self.chunk.as_ref().map_or(0, |c| c.sealed.len()) + self.commit.manifest.len() + 128
    }
}

/// A file whose commit is on its way.
struct AckItem {
    path: Vec<u8>,
    gen: i64,
    hash: [u8; 32],
    kind: &'static str,
    size: i64,
}

impl AckItem {
    fn new(r: &Ready) -> Self {
        AckItem {
            path: r.read.path.clone(),
            gen: r.read.gen,
            hash: r.read.hash,
            kind: r.read.kind,
            size: r.size,
        }
    }
}

/// Work for the ack collector: one `CommitFile` (with its file's puts) or one `PutFiles`.
pub struct AckWork {
    items: Vec<AckItem>,
    puts: Vec<Pending>,
    commit: Pending,
    /// It carried chunks (so its acknowledgement means the receiver takes data again).
    chunks: bool,
}

enum Outcome {
    Ready(Box<Ready>),
    Unchanged(Box<FileRead>),
    Forget,
    Failed(String),
    Retry(String, i64),
    Lost(ConnError),
}

fn backoff_ms(attempts: i64) -> i64 {
    let s = 1i64 << attempts.clamp(0, 12);
    (s * 1000).min(3_600_000)
}

/// The queues the scheduler fills: one per class, and the backlog's large files taken
/// ahead of their turn (for [`Lane::Large`]).
#[derive(Clone)]
pub struct Queues {
    pub fresh: Receiver<Job>,
    pub backlog: Receiver<Job>,
    pub large: Receiver<Job>,
}

/// The ack collectors' queues, one per class: a fresh file's acknowledgement is recorded
/// without waiting for the replies to the backlog's earlier commits.
#[derive(Clone)]
pub struct AckQueues {
    pub fresh: Sender<AckWork>,
    pub backlog: Sender<AckWork>,
}

impl AckQueues {
    fn of(&self, class: Class) -> &Sender<AckWork> {
        match class {
            Class::Fresh => &self.fresh,
            Class::Backlog => &self.backlog,
        }
    }
}

/// Which work a worker takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Fresh work only: the fresh lane's worker, free for the next fresh change whatever
    /// size the backlog's files are.
    Fresh,
    /// Fresh work first, else the backlog; and the backlog on every [`BACKLOG_SHARE`]th
    /// pick while both queues hold work, so it is never starved.
    Any,
    /// As [`Lane::Any`], but the backlog's large files (64 MiB and more) before its small
    /// ones: one shared worker (of two or more) starts them early, so that their long reads
    /// overlap the small files' instead of ending the backlog on one worker.
    Large,
}

/// A worker of [`Lane::Any`] takes from the backlog at least once in this many picks
/// while both queues hold work.
pub const BACKLOG_SHARE: u64 = 4;

enum Take {
    Job(Box<Job>),
    Empty,
    Closed,
}

/// The next job for a worker of `lane`; with `wait`, waits up to that long for one.
fn take(q: &Queues, lane: Lane, picks: &mut u64, wait: Option<Duration>) -> Take {
    let order = match lane {
        Lane::Fresh => [&q.fresh, &q.fresh, &q.fresh],
        Lane::Any | Lane::Large => {
            *picks += 1;
            let backlog = match lane {
                Lane::Large => [&q.large, &q.backlog],
                _ => [&q.backlog, &q.backlog],
            };
            if picks.is_multiple_of(BACKLOG_SHARE) {
                [backlog[0], backlog[1], &q.fresh]
            } else {
                [&q.fresh, backlog[0], backlog[1]]
            }
        }
    };
    for r in order {
        if let Ok(j) = r.try_recv() {
            return Take::Job(Box::new(j));
        }
    }
    let Some(wait) = wait else {
        return Take::Empty;
    };
    let got = match lane {
        Lane::Fresh => q.fresh.recv_timeout(wait),
        Lane::Any => select! {
            recv(q.fresh) -> j => j.map_err(|_| RecvTimeoutError::Disconnected),
            recv(q.backlog) -> j => j.map_err(|_| RecvTimeoutError::Disconnected),
            default(wait) => Err(RecvTimeoutError::Timeout),
        },
        Lane::Large => select! {
            recv(q.fresh) -> j => j.map_err(|_| RecvTimeoutError::Disconnected),
            recv(q.large) -> j => j.map_err(|_| RecvTimeoutError::Disconnected),
            recv(q.backlog) -> j => j.map_err(|_| RecvTimeoutError::Disconnected),
            default(wait) => Err(RecvTimeoutError::Timeout),
        },
    };
    match got {
        Ok(j) => Take::Job(Box::new(j)),
        Err(RecvTimeoutError::Timeout) => Take::Empty,
        Err(RecvTimeoutError::Disconnected) => Take::Closed,
    }
}

/// The connection `job` goes on: fresh work on the fresh lane when it is up, else (and
/// the backlog always) on the main connection. While the backlog is more than a moment's
/// work (files wait behind this one, or it is a large file) its workers open and keep the
/// fresh lane (see [`crate::conn::ConnManager::fresh`]), so that it is up when a fresh
/// change comes; fresh work alone never opens it (the main connection is free then), so
/// an agent with little to do holds one session.
fn lane_conn(sh: &Arc<Daemon>, job: &Job, backlog_waiting: usize) -> Option<Conn> {
    if job.class == Class::Fresh {
        if let Some(c) = sh.conn.fresh_if_up() {
            return Some(c);
        }
    }
    let main = sh.conn.get(sh)?;
    let busy = backlog_waiting > 0 || job.size.unwrap_or(0) >= WINDOW_BYTES as i64;
    if job.class == Class::Backlog && busy {
        // Opened beside the main connection, never before it.
        let _ = sh.conn.fresh();
    }
    Some(main)
}

/// A batch being gathered: one class's files, for one connection.
struct Batch {
    files: Vec<Ready>,
    bytes: u64,
    held: usize,
    class: Class,
    conn: Option<Conn>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            files: Vec::new(),
            bytes: 0,
            held: 0,
            class: Class::Backlog,
            conn: None,
        }
    }

    /// Sends what is gathered (see [`flush`]) and starts afresh. A large file whose
    /// presence questions are still in flight has its puts still to make: with `all`, their
    /// answers are waited for; without, the file stays in the batch (sent with a later
    /// call), so the worker reads on while the answers travel.
    fn send(&mut self, sh: &Daemon, acks: &AckQueues, asks: &mut Asks, all: bool) {
        let last = self.files.iter().filter_map(|r| r.seq).max();
        if all {
            if let Some(seq) = last {
                asks.settle(sh, seq);
            }
        } else if last.is_some() {
            asks.poll(sh);
        }
        let mut go = Vec::with_capacity(self.files.len());
        let mut keep = Vec::new();
        for mut r in self.files.drain(..) {
            let Some(seq) = r.seq else {
                go.push(r);
                continue;
            };
            if asks.waiting(seq) {
                keep.push(r);
                continue;
            }
            match asks.take(seq) {
                Ok(puts) => {
                    r.puts = puts;
                    r.seq = None;
                    go.push(r);
                }
                Err(o) => give_back(sh, &r.read, o),
            }
        }
        if !go.is_empty() {
            if let Some(conn) = &self.conn {
                flush(sh, &mut go, conn, acks.of(self.class));
            }
            let paths: Vec<_> = go.drain(..).map(|r| r.read.path).collect();
            if !paths.is_empty() {
                sh.abandon(paths);
            }
        }
        self.files = keep;
        self.bytes = self.files.iter().map(|r| r.size as u64).sum();
        self.held = self.files.iter().map(Ready::held).sum();
        if self.files.is_empty() {
            self.conn = None;
        }
    }

    /// Hands every file back unsent (the daemon is stopping).
    fn abandon(&mut self, sh: &Daemon, asks: &mut Asks, mut more: Vec<Vec<u8>>) {
        let mut paths: Vec<_> = self
            .files
            .drain(..)
            .map(|r| {
                if let Some(seq) = r.seq {
                    asks.forget(seq);
                }
                r.read.path
            })
            .collect();
        paths.append(&mut more);
        sh.abandon(paths);
        (self.bytes, self.held, self.conn) = (0, 0, None);
    }
}

/// A read file that cannot be committed after all: its presence questions or puts failed.
fn give_back(sh: &Daemon, read: &FileRead, o: Outcome) {
    let path = read.path.clone();
    match o {
        Outcome::Lost(e) => {
            sh.conn.invalidate();
            sh.journal(|j| {
                j.record_retry(&[(path, format!("receiver unreachable: {e}"))], now_ms())
            });
        }
        Outcome::Retry(reason, at) => {
            sh.journal(|j| j.record_retry(&[(path, reason)], at));
        }
        Outcome::Failed(reason) => {
            tracing::warn!(path = %String::from_utf8_lossy(&path), %reason, "backup of file failed; will retry");
            sh.journal(|j| j.record_failure(&path, read.gen, &reason, now_ms() + 5000));
        }
        Outcome::Ready(_) | Outcome::Unchanged(_) | Outcome::Forget => {
            sh.abandon(vec![path]);
            return;
        }
    }
    sh.wake();
}

/// A worker thread: takes jobs, reads files, sends batches of commits.
pub fn worker(sh: Arc<Daemon>, q: Queues, lane: Lane, acks: AckQueues) {
    let mut batch = Batch::new();
    let mut asks = Asks::default();
    let mut picks = 0u64;
    loop {
        if sh.pause.is_paused() {
            // Paused: what is gathered goes back to the journal, unsent; wait for resume.
            batch.abandon(&sh, &mut asks, vec![]);
            sh.pause.park(&sh.shutdown);
            if sh.shutdown.is_stopping() {
                return;
            }
            continue;
        }
        let job = if batch.files.is_empty() {
            match take(&q, lane, &mut picks, Some(Duration::from_millis(200))) {
                Take::Job(j) => *j,
                Take::Empty => {
                    if sh.shutdown.is_stopping() {
                        return;
                    }
                    continue;
                }
                Take::Closed => return,
            }
        } else {
            match take(&q, lane, &mut picks, None) {
                Take::Job(j) => *j,
                _ => {
                    // Nothing more to read now: send what is ready; files whose presence
                    // answers are on their way wait for them, or for the next job.
                    batch.send(&sh, &acks, &mut asks, false);
                    if batch.files.is_empty() {
                        continue;
                    }
                    match take(&q, lane, &mut picks, Some(Duration::from_millis(2))) {
                        Take::Job(j) => *j,
                        Take::Empty => {
                            if sh.shutdown.is_stopping() {
                                batch.abandon(&sh, &mut asks, vec![]);
                            }
                            continue;
                        }
                        Take::Closed => {
                            batch.send(&sh, &acks, &mut asks, true);
                            continue;
                        }
                    }
                }
            }
        };
        if sh.shutdown.is_stopping() {
            batch.abandon(&sh, &mut asks, vec![job.path]);
            continue;
        }
        let Some(conn) = lane_conn(&sh, &job, q.backlog.len()) else {
            sh.abandon(vec![job.path]);
            continue;
        };
        // A batch holds one class and goes on one connection (a large file's commit must
        // follow its puts on theirs): a job of another class or connection sends it first.
        if !batch.files.is_empty()
            && (batch.class != job.class || batch.conn.as_ref().is_some_and(|c| !c.same(&conn)))
        {
            batch.send(&sh, &acks, &mut asks, true);
        }
        let path = job.path.clone();
        match process(&sh, &conn, &job, &mut asks) {
            Outcome::Ready(r) => {
                if batch.files.is_empty() {
                    batch.class = job.class;
                    batch.conn = Some(conn);
                }
                batch.bytes += r.size as u64;
                batch.held += r.held();
                batch.files.push(*r);
                if batch.files.len() >= BATCH_FILES
                    || batch.bytes >= BATCH_BYTES
                    || batch.held >= HELD_BYTES
                {
                    // Full: what is ready goes now; at twice the limits, everything.
                    let over = batch.files.len() >= 2 * BATCH_FILES
                        || batch.bytes >= 2 * BATCH_BYTES
                        || batch.held >= 2 * HELD_BYTES;
                    batch.send(&sh, &acks, &mut asks, over);
                }
            }
            Outcome::Unchanged(read) => {
                sh.journal(|j| j.record_unchanged(std::slice::from_ref(&read)));
                sh.counters.done(job.class, 1, 0);
                sh.wake();
            }
            Outcome::Forget => {
                sh.journal(|j| j.forget(&path, job.gen));
                sh.wake();
            }
            Outcome::Failed(reason) => {
                tracing::warn!(path = %String::from_utf8_lossy(&path), %reason, "backup of file failed; will retry");
                let at = now_ms() + backoff_ms(job.attempts);
                sh.journal(|j| j.record_failure(&path, job.gen, &reason, at));
                sh.wake();
            }
            Outcome::Retry(reason, at) => {
                sh.journal(|j| j.record_retry(&[(path.clone(), reason)], at));
                sh.wake();
            }
            Outcome::Lost(e) => {
                sh.conn.invalidate();
                sh.journal(|j| {
                    j.record_retry(
                        &[(path.clone(), format!("receiver unreachable: {e}"))],
                        now_ms(),
                    )
                });
                sh.wake();
            }
        }
    }
}

fn flush(sh: &Daemon, batch: &mut Vec<Ready>, conn: &Conn, acks: &Sender<AckWork>) {
    if batch.is_empty() {
        return;
    }
    let reads: Vec<FileRead> = batch.iter().map(|r| r.read.clone()).collect();
    if sh.journal(|j| j.record_reads(&reads)).is_none() {
        let paths: Vec<_> = batch.drain(..).map(|r| r.read.path).collect();
        sh.abandon(paths);
        return;
    }
    tracing::debug!(files = batch.len(), "sending a batch");
    let send = |m: Message, items: Vec<AckItem>, puts: Vec<Pending>| -> bool {
        let chunks = !puts.is_empty()
            || matches!(&m, Message::PutFiles { chunks, .. } if !chunks.is_empty());
        let sent = conn.start_blocking(m).map_err(|e| e.to_string());
        match sent {
            Ok(commit) => acks
                .send(AckWork {
                    items,
                    puts,
                    commit,
                    chunks,
                })
                .is_ok(),
            Err(e) => {
                sh.conn.invalidate();
                let reason = format!("receiver unreachable: {e}");
                let paths: Vec<_> = items
                    .into_iter()
                    .map(|i| (i.path, reason.clone()))
                    .collect();
                sh.journal(|j| j.record_retry(&paths, now_ms()));
                sh.wake();
                true
            }
        }
    };
    // Large files whose chunks were put on their own: one commit each, answered after
    // their puts. Everything else (small files with their chunk, links, deletions): as
    // few `PutFiles` as fit in a frame.
    let mut chunks: Vec<SealedChunk> = Vec::new();
    let mut commits: Vec<FileCommit> = Vec::new();
    let mut items: Vec<AckItem> = Vec::new();
    let mut ids: HashSet<ChunkId> = HashSet::new();
    let mut bytes = 0usize;
    for r in batch.drain(..) {
        if !r.puts.is_empty() {
            let item = AckItem::new(&r);
            let c = r.commit;
            let m = Message::CommitFile {
                commit_id: c.commit_id,
                file_id: c.file_id,
                manifest: c.manifest,
                chunks: c.chunks,
                deleted: c.deleted,
            };
            if !send(m, vec![item], r.puts) {
                return;
            }
            continue;
        }
        let held = r.held();
        if !commits.is_empty()
            && (bytes + held > PUT_FILES_BYTES || commits.len() >= MAX_BATCH_FILES)
        {
            let m = Message::PutFiles {
                chunks: std::mem::take(&mut chunks),
                commits: std::mem::take(&mut commits),
            };
            if !send(m, std::mem::take(&mut items), vec![]) {
                return;
            }
            ids.clear();
            bytes = 0;
        }
        bytes += held;
        items.push(AckItem::new(&r));
        if let Some(c) = r.chunk {
            if ids.insert(c.id) {
                chunks.push(c);
            }
        }
        commits.push(r.commit);
    }
    if !commits.is_empty() {
        let m = Message::PutFiles { chunks, commits };
        send(m, items, vec![]);
    }
}

/// An ack collector (one per class): records acknowledgements in batches.
pub fn ack_collector(sh: Arc<Daemon>, rx: Receiver<AckWork>, class: Class) {
    let mut done: Vec<Ack> = Vec::new();
    let record = |done: &mut Vec<Ack>| {
        if done.is_empty() {
            return;
        }
        let t = std::time::Instant::now();
        sh.journal(|j| j.record_acks(done));
        tracing::debug!(
            files = done.len(),
            ms = t.elapsed().as_millis() as u64,
            "acks recorded"
        );
        sh.counters
            .files_acked
            .fetch_add(done.len() as u64, Ordering::Relaxed);
        let bytes: i64 = done.iter().map(|a| a.size.max(0)).sum();
        sh.counters.done(class, done.len() as u64, bytes as u64);
        done.clear();
        sh.wake();
    };
    loop {
        let mut w = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(w) => w,
            Err(RecvTimeoutError::Timeout) => {
                record(&mut done);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                record(&mut done);
                return;
            }
        };
        let reply = match w.commit.try_take() {
            Some(r) => r,
            None => {
                // Nothing more is ready: record what is, then wait.
                record(&mut done);
                w.commit.wait_blocking()
            }
        };
        let mut put_err = None;
        for p in w.puts.drain(..) {
            if let Err(e) = p.wait_blocking() {
                put_err.get_or_insert(e);
            }
        }
        if reply.is_err() && sh.shutdown.is_given_up() {
            // The daemon stopped waiting for the receiver: what is unanswered stays in
            // flight (the next start requeues it).
            record(&mut done);
            return;
        }
        settle(&sh, w.items, reply, put_err, w.chunks, &mut done);
        // Nothing more on its way: recorded now, not after the 100 ms without work (a
        // fresh change's acknowledgement would wait for it).
        if done.len() >= 2048 || rx.is_empty() {
            record(&mut done);
        }
    }
}

/// Turns the answer to one commit (a `CommitFile` or a `PutFiles`) into acknowledgements,
/// added to `done`, or into retries: a refusal after 5 s, a lost connection at once, a
/// receiver over quota (kept for `status`) after 30-60 s. `chunks`: it carried chunks.
fn settle(
    sh: &Daemon,
    items: Vec<AckItem>,
    reply: Result<Message, ConnError>,
    put_err: Option<ConnError>,
    chunks: bool,
    done: &mut Vec<Ack>,
) {
    if chunks
        && matches!(
            reply,
            Ok(Message::FileAcked { .. } | Message::FilesAcked { .. })
        )
    {
        sh.conn.clear_refusal(sh, Some(ErrorCode::QuotaExceeded));
    }
    let retry = |items: Vec<AckItem>, reason: String, delay: i64| {
        let paths: Vec<_> = items
            .into_iter()
            .map(|i| (i.path, reason.clone()))
            .collect();
        sh.journal(|j| j.record_retry(&paths, now_ms() + delay));
        sh.wake();
    };
    let acked = |i: AckItem, version: u64, commit_time: i64| Ack {
        path: i.path,
        gen: i.gen,
        version: version as i64,
        commit_time,
        hash: i.hash,
        kind: i.kind,
        size: i.size,
    };
    match (reply, put_err) {
        (
            Ok(Message::FileAcked {
                version,
                commit_time,
                ..
            }),
            _,
        ) if items.len() == 1 => {
            for i in items {
                done.push(acked(i, version, commit_time));
            }
        }
        (Ok(Message::FilesAcked { results }), _) if results.len() == items.len() => {
            let mut refused = Vec::new();
            let mut delay = 5000;
            let mut only_missing = true;
            for (i, r) in items.into_iter().zip(results) {
                match r {
                    CommitResult::Acked {
                        version,
                        commit_time,
                        ..
                    } => done.push(acked(i, version, commit_time)),
                    CommitResult::Failed { code, message } => {
                        if code == ErrorCode::QuotaExceeded {
                            sh.conn.note_refusal(sh, code, &message);
                            delay = delay.max(quota_retry_ms());
                        }
                        if code == ErrorCode::MissingChunks {
                            resent(&i.path, &message);
                        } else {
                            only_missing = false;
                        }
                        refused.push((
                            i.path,
                            format!("receiver refused the upload: {code:?}: {message}"),
                        ));
                    }
                }
            }
            if only_missing {
                delay = MISSING_RETRY_MS;
            }
            if !refused.is_empty() {
                sh.journal(|j| j.record_retry(&refused, now_ms() + delay));
                sh.wake();
            }
        }
        (Ok(m), _) => {
            retry(
                items,
                format!("unexpected reply {} to commit", m.kind()),
                5000,
            );
        }
        (Err(e), put_err) => {
            let e = put_err.unwrap_or(e);
            if e.is_connection() {
                sh.conn.invalidate();
            }
            let reason = if e.is_connection() {
                format!("receiver unreachable: {e}")
            } else {
                format!("receiver refused the upload: {e}")
            };
            let delay = match e.refusal() {
                Some((code, message)) => {
                    // Kept (not failed), sent again once the receiver has room.
                    sh.conn.note_refusal(sh, code, message);
                    quota_retry_ms()
                }
                None if e.is_connection() => 0,
                None => match &e {
                    ConnError::Remote {
                        code: ErrorCode::MissingChunks,
                        message,
                    } => {
                        for i in &items {
                            resent(&i.path, message);
                        }
                        MISSING_RETRY_MS
                    }
                    _ => 5000,
                },
            };
            retry(items, reason, delay);
        }
    }
}

/// How soon a file whose commit the receiver answered `MissingChunks` is read again: the
/// receiver lost those chunks since it said it had them (its prune removed them), so the
/// next try asks again and sends them; nothing the agent remembers says otherwise (it keeps
/// no record of what the receiver holds beyond one file's upload).
const MISSING_RETRY_MS: i64 = 500;

/// Logs a commit the receiver refused for chunks it no longer holds.
fn resent(path: &[u8], message: &str) {
    tracing::info!(
        path = %String::from_utf8_lossy(path),
        "the receiver no longer holds chunks this version references (pruned meanwhile?): \
         {message}; reading it again to send them"
    );
}

/// What is recorded of a read. `summary` is what tells one content apart from another: the
/// plain BLAKE3 of the bytes, or a folder's metadata; the journal gets only its keyed hash
/// (`Crypto::journal_hash`), which confirms no guess of the content to whoever reads it.
fn read_info(
    sh: &Daemon,
    job: &Job,
    kind: &'static str,
    stat: StatKey,
    mode: i64,
    summary: &[u8],
) -> FileRead {
    let hash = sh.crypto().journal_hash(summary);
    let commit_id = match (job.hash, job.commit_id) {
        (Some(h), Some(c)) if h == hash => c,
        _ => {
            let mut c = [0u8; 16];
            if fill_random(&mut c).is_err() {
                // Fall back to a hash-derived id; uniqueness per (path, content, time) holds.
                let mut h = blake3::Hasher::new();
                h.update(&job.path);
                h.update(&hash);
                h.update(&now_ms().to_le_bytes());
                c.copy_from_slice(&h.finalize().as_bytes()[..16]);
            }
            CommitId(c)
        }
    };
    FileRead {
        path: job.path.clone(),
        gen: job.gen,
        kind,
        stat,
        mode,
        hash,
        commit_id,
    }
}

/// A version's content: its kind, its plain content hash (zero for a folder or a deletion:
/// the sealed manifest keeps it, the journal never does), its chunks, and those still to
/// send with it.
struct Content {
    kind: EntryKind,
    hash: [u8; 32],
    chunks: Vec<ChunkRef>,
    chunk: Option<SealedChunk>,
    puts: Vec<Pending>,
    /// Extents, attributes, link.
    extra: Extra,
    /// A large file's number in the worker's [`Asks`].
    seq: Option<u64>,
}

impl Content {
    /// A version without chunks (a symlink, a folder, a deletion, a special file).
    fn bare(kind: EntryKind, hash: [u8; 32]) -> Self {
        Content {
            kind,
            hash,
            chunks: vec![],
            chunk: None,
            puts: vec![],
            extra: Extra::default(),
            seq: None,
        }
    }
}

fn ready(
    sh: &Daemon,
    job: &Job,
    read: FileRead,
    meta: Option<&std::fs::Metadata>,
    c: Content,
) -> Outcome {
    // A folder's row is keyed `name/rel/`; its versions are those of `name/rel`.
    let path = job.path.strip_suffix(b"/").unwrap_or(&job.path);
    let deleted = c.kind == EntryKind::Deleted;
    let manifest = Manifest {
        path: path.to_vec(),
        size: if c.kind == EntryKind::Dir {
            0
        } else {
            read.stat.size as u64
        },
        kind: c.kind,
        mtime_ns: read.stat.mtime_ns,
        mode: (read.mode & 0o7777) as u32,
        uid: meta.map(|m| m.uid()).unwrap_or(0),
        gid: meta.map(|m| m.gid()).unwrap_or(0),
        content_hash: c.hash,
        chunks: c.chunks,
        sparse: c.extra.sparse,
        xattrs: c.extra.xattrs,
        hardlink: c.extra.hardlink,
    };
    let (chunk, puts, seq) = (c.chunk, c.puts, c.seq);
    let file_id = sh.crypto().file_id(path);
    let sealed = match sh.crypto().seal_manifest(&file_id, &manifest.encode()) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("sealing manifest: {e}")),
    };
    let size = read.stat.size;
    let commit = FileCommit {
        commit_id: read.commit_id,
        file_id,
        manifest: sealed,
        chunks: manifest.chunks.iter().map(|c| c.id).collect(),
        deleted,
    };
    Outcome::Ready(Box::new(Ready {
        read,
        commit,
        chunk,
        puts,
        seq,
        size,
    }))
}

/// Reads one due file and makes it ready to commit (or says why not): a folder found at a
/// file's row, or a file whose watch was removed, is forgotten, a vanished one is a
/// deletion, a symlink's content is its target, a regular file is read whole (small) or
/// streamed through the chunker. A folder's row is a folder's metadata ([`folder`]).
fn process(sh: &Daemon, conn: &Conn, job: &Job, asks: &mut Asks) -> Outcome {
    if is_folder_key(&job.path) {
        return folder(sh, job);
    }
    let watches = sh.watches();
    let Some((_, path)) = fs_path(&watches, &job.path) else {
        return Outcome::Forget; // its watch was removed from the config
    };
    if let Ok(mut c) = sh.current.lock() {
        c.clear();
        c.push_str(&String::from_utf8_lossy(&job.path));
    }
    let shown = path.display().to_string();
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return deletion(sh, job),
        Err(e) => return Outcome::Failed(format!("reading {shown}: {e}")),
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Outcome::Forget;
    }
    if ft.is_symlink() {
        return symlink(sh, job, &path, &shown, &meta);
    }
    if let Some(kind) = fidelity::special::kind_of(&ft) {
        return special(sh, job, &meta, kind);
    }
    if !ft.is_file() {
        let _ = sh.journal(|j| j.bump(CounterKey::SkippedSpecial, 1));
        return Outcome::Forget;
    }
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return deletion(sh, job),
        Err(e) => return Outcome::Failed(format!("reading {shown}: {e}")),
    };
    let before = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Outcome::Failed(format!("reading {shown}: {e}")),
    };
    if !before.is_file() {
        return Outcome::Retry("replaced while being opened".into(), now_ms());
    }
    let (extra, xattrs) = fidelity_of(&file, &before, &shown);
    let f = Opened {
        job,
        path: &path,
        shown: &shown,
        file,
        before,
        mode: meta.mode() as i64,
        extra,
        xattrs,
    };
    if let Some(o) = shared_read(sh, &f) {
        return o;
    }
    if f.before.len() < MIN_CHUNK as u64 {
        read_small(sh, &f)
    } else {
        let seq = asks.begin();
        let o = read_large(sh, conn, &f, asks, seq);
        if !matches!(o, Outcome::Ready(_)) {
            asks.forget(seq);
        }
        o
    }
}

/// A regular file opened for reading, with its stat from before the read.
struct Opened<'a> {
    job: &'a Job,
    path: &'a Path,
    /// The path as messages show it.
    shown: &'a str,
    file: std::fs::File,
    before: std::fs::Metadata,
    /// The mode of the path, as first looked up.
    mode: i64,
    /// Its attributes and link (extents are found by [`read_large`]).
    extra: Extra,
    /// Digest of its attributes.
    xattrs: [u8; 32],
}

/// An open file's attributes (a warning, and none, when they cannot be read) and, when it
/// has more than one name, its inode.
fn fidelity_of(file: &std::fs::File, before: &std::fs::Metadata, shown: &str) -> (Extra, [u8; 32]) {
    let xattrs = fidelity::xattr::read_fd(file, fidelity::xattr::privileged(), shown)
        .unwrap_or_else(|e| {
            tracing::warn!(file = shown, error = %e, "cannot read extended attributes; backed up without them");
            vec![]
        });
    let digest = fidelity::xattr::digest(&xattrs);
    let hardlink = (before.nlink() > 1).then(|| coffer_common::manifest::HardLink {
        dev: before.dev(),
        ino: before.ino(),
        to: vec![],
    });
    let extra = Extra {
        sparse: None,
        xattrs,
        hardlink,
    };
    (extra, digest)
}

fn read_at(m: &std::fs::Metadata) -> links::At {
    let k = stat_key(m);
    links::At {
        size: m.len(),
        mtime_ns: k.mtime_ns,
        ctime_ns: k.ctime_ns,
    }
}

/// A file whose content was just read through another of its names, or whose attributes
/// alone changed since its last read ([`links`]): committed with that read's content, not
/// read again.
fn shared_read(sh: &Daemon, f: &Opened) -> Option<Outcome> {
    let (dev, ino) = (f.before.dev(), f.before.ino());
    let prior = links::reads()
        .lock()
        .ok()?
        .get(dev, ino, read_at(&f.before), &f.xattrs)?;
    // The same path at the same stat is read again: its last read may not have reached the
    // receiver (a retry must put its chunks).
    if prior.path == f.job.path && prior.at == read_at(&f.before) {
        return None;
    }
    let mut extra = f.extra.clone();
    if let Some(l) = &mut extra.hardlink {
        if prior.path != f.job.path {
            l.to = prior.path.clone();
        }
    }
    extra.sparse = prior.sparse.clone();
    if let Some(o) = changed_while_read(sh, &f.file, f.path, &f.before, f.before.len()) {
        return Some(o);
    }
    // Remembered at the new stat, still as the read of the path that read it.
    if let Ok(mut r) = links::reads().lock() {
        r.put(
            dev,
            ino,
            links::Read {
                at: read_at(&f.before),
                xattrs: f.xattrs,
                ..prior.clone()
            },
        );
    }
    let read = read_info(
        sh,
        f.job,
        "file",
        stat_key(&f.before),
        f.mode,
        &extra.summary(&prior.hash),
    );
    if unchanged(f.job, &read) {
        return Some(Outcome::Unchanged(Box::new(read)));
    }
    Some(ready(
        sh,
        f.job,
        read,
        Some(&f.before),
        Content {
            kind: EntryKind::File,
            hash: prior.hash,
            chunks: prior.chunks,
            chunk: None,
            puts: vec![],
            extra,
            seq: None,
        },
    ))
}

/// Remembers a file's read for its other names and its next attribute change.
fn remember(
    f: &Opened,
    hash: [u8; 32],
    chunks: &[ChunkRef],
    sparse: &Option<Vec<coffer_common::manifest::Extent>>,
) {
    if let Ok(mut r) = links::reads().lock() {
        r.put(
            f.before.dev(),
            f.before.ino(),
            links::Read {
                path: f.job.path.clone(),
                at: read_at(&f.before),
                xattrs: f.xattrs,
                hash,
                chunks: chunks.to_vec(),
                sparse: sparse.clone(),
            },
        );
    }
}

/// A FIFO, socket or device node: its kind, number, mode, owner and mtime, no content.
fn special(
    sh: &Daemon,
    job: &Job,
    meta: &std::fs::Metadata,
    kind: coffer_common::manifest::SpecialKind,
) -> Outcome {
    let stat = stat_key(meta);
    let summary = fidelity::special::summary(
        kind,
        meta.rdev(),
        meta.mode(),
        meta.uid(),
        meta.gid(),
        stat.mtime_ns,
    );
    let read = read_info(sh, job, "special", stat, meta.mode() as i64, &summary);
    if job.backed_hash == Some(read.hash) && job.backed_kind.as_deref() == Some("special") {
        return Outcome::Unchanged(Box::new(read));
    }
    let rdev = match kind {
        coffer_common::manifest::SpecialKind::CharDevice
        | coffer_common::manifest::SpecialKind::BlockDevice => meta.rdev(),
        _ => 0,
    };
    ready(
        sh,
        job,
        read,
        Some(meta),
        Content::bare(EntryKind::Special { kind, rdev }, [0; 32]),
    )
}

/// A folder's row: its mode, owner and mtime, committed as a `Dir` version when they differ
/// from those last backed up (no read of its entries: they have rows of their own).
fn folder(sh: &Daemon, job: &Job) -> Outcome {
    let key = &job.path[..job.path.len() - 1];
    let watches = sh.watches();
    let Some((_, path)) = fs_path(&watches, key) else {
        return Outcome::Forget; // its watch was removed from the config
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        // A watch's own folder missing is an unavailable watch, never a deletion.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && key.contains(&b'/') => {
            return deletion(sh, job)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Outcome::Forget,
        Err(e) => {
            return Outcome::Retry(
                format!("reading folder {}: {e}", path.display()),
                now_ms() + 3_600_000,
            )
        }
    };
    if !meta.is_dir() {
        // Replaced by a file or a link, which its own row backs up.
        return Outcome::Forget;
    }
    let stat = stat_key(&meta);
    let mut summary = [0u8; 24];
    summary[..4].copy_from_slice(b"dir\0");
    summary[4..8].copy_from_slice(&(meta.mode() & 0o7777).to_le_bytes());
    summary[8..12].copy_from_slice(&meta.uid().to_le_bytes());
    summary[12..16].copy_from_slice(&meta.gid().to_le_bytes());
    summary[16..].copy_from_slice(&stat.mtime_ns.to_le_bytes());
    // Its attributes (a default ACL among them) count when it has any.
    let xattrs =
        fidelity::xattr::read_path(&path, fidelity::xattr::privileged()).unwrap_or_default();
    let mut summary = summary.to_vec();
    if !xattrs.is_empty() {
        summary.extend(fidelity::xattr::digest(&xattrs));
    }
    let read = read_info(sh, job, "dir", stat, meta.mode() as i64, &summary);
    if job.backed_hash == Some(read.hash) && job.backed_kind.as_deref() == Some("dir") {
        return Outcome::Unchanged(Box::new(read));
    }
    let mut c = Content::bare(EntryKind::Dir, [0; 32]);
    c.extra.xattrs = xattrs;
    ready(sh, job, read, Some(&meta), c)
}

/// A symlink: its target is its content.
fn symlink(sh: &Daemon, job: &Job, path: &Path, shown: &str, meta: &std::fs::Metadata) -> Outcome {
    let target = match std::fs::read_link(path) {
        Ok(t) => t.as_os_str().as_bytes().to_vec(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return deletion(sh, job),
        Err(e) => return Outcome::Failed(format!("reading link {shown}: {e}")),
    };
    let hash = *blake3::hash(&target).as_bytes();
    let read = read_info(
        sh,
        job,
        "symlink",
        stat_key(meta),
        meta.mode() as i64,
        &hash,
    );
    if job.backed_hash == Some(read.hash) && job.backed_kind.as_deref() == Some("symlink") {
        return Outcome::Unchanged(Box::new(read));
    }
    ready(
        sh,
        job,
        read,
        Some(meta),
        Content::bare(EntryKind::Symlink { target }, hash),
    )
}

/// A small file (under one chunk): one read, hash first, and no presence query (the
/// receiver dedups puts); if its content is what was last backed up, nothing is sent.
fn read_small(sh: &Daemon, f: &Opened) -> Outcome {
    let (job, shown) = (f.job, f.shown);
    let mut data = Vec::with_capacity(f.before.len() as usize);
    if let Err(e) = (&f.file).take(MIN_CHUNK as u64).read_to_end(&mut data) {
        return Outcome::Failed(format!("reading {shown}: {e}"));
    }
    let hash = *blake3::hash(&data).as_bytes();
    let len = data.len() as u64;
    if let Some(o) = changed_while_read(sh, &f.file, f.path, &f.before, len) {
        return o;
    }
    let read = read_info(
        sh,
        job,
        "file",
        stat_key(&f.before),
        f.mode,
        &f.extra.summary(&hash),
    );
    let small_chunks = |data: &[u8]| {
        let id = sh.crypto().chunk_id(data);
        (!data.is_empty()).then_some(ChunkRef {
            id,
            len: data.len() as u32,
        })
    };
    if unchanged(job, &read) {
        remember(
            f,
            hash,
            &small_chunks(&data).into_iter().collect::<Vec<_>>(),
            &None,
        );
        return Outcome::Unchanged(Box::new(read));
    }
    sh.counters.bytes_read.fetch_add(len, Ordering::Relaxed);
    let mut chunks = Vec::new();
    let mut chunk = None;
    if !data.is_empty() {
        let id = sh.crypto().chunk_id(&data);
        let sealed = match sh.crypto().seal_chunk(&id, &data) {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(format!("sealing {shown}: {e}")),
        };
        sh.counters
            .bytes_sent
            .fetch_add(sealed.len() as u64, Ordering::Relaxed);
        chunks.push(ChunkRef {
            id,
            len: data.len() as u32,
        });
        chunk = Some(SealedChunk { id, sealed });
    }
    remember(f, hash, &chunks, &None);
    ready(
        sh,
        job,
        read,
        Some(&f.before),
        Content {
            kind: EntryKind::File,
            hash,
            chunks,
            chunk,
            puts: vec![],
            extra: f.extra.clone(),
            seq: None,
        },
    )
}

/// A large file: streamed through the chunker in one read, hashing on the way. Every
/// [`ASK_BYTES`] of chunks the receiver is asked which it lacks, and the read goes on while
/// the answer travels; the missing chunks are put as the answers come (see [`asks`]).
fn read_large(sh: &Daemon, conn: &Conn, f: &Opened, asks: &mut Asks, seq: u64) -> Outcome {
    let (job, shown) = (f.job, f.shown);
    let mut chunks = Vec::new();
    // A sparse file's data alone is read and chunked; its holes are hashed as zeros.
    let size = f.before.len();
    let sparse = fidelity::sparse::data_extents(&f.file, size, f.before.blocks());
    let data_len = sparse
        .as_ref()
        .map_or(size, |e| e.iter().map(|x| x.len).sum());
    let mut reader = fidelity::sparse::Source::new(&f.file, sparse.as_deref(), size);
    let mut window: Vec<(ChunkId, PlainChunk)> = Vec::new();
    let mut window_bytes = 0usize;
    // Each id is asked about once per file.
    let mut asked: HashSet<ChunkId> = HashSet::new();
    for c in chunk_stream_sized(&mut reader, data_len) {
        let data = match c {
            Ok(d) => d,
            Err(e) => return Outcome::Failed(format!("reading {shown}: {e}")),
        };
        let id = sh.crypto().chunk_id(&data);
        chunks.push(ChunkRef {
            id,
            len: data.len() as u32,
        });
        if asked.insert(id) {
            window_bytes += data.len();
            window.push((id, data));
        }
        if window_bytes >= ASK_BYTES {
            asks.ask(sh, conn, seq, shown, std::mem::take(&mut window));
            window_bytes = 0;
        }
        if sh.shutdown.is_stopping() {
            return Outcome::Retry("agent stopped while reading".into(), now_ms());
        }
        if sh.pause.is_paused() {
            return Outcome::Retry(
                "paused while sending; sent again at resume".into(),
                now_ms(),
            );
        }
    }
    asks.ask(sh, conn, seq, shown, window);
    let (hash, len) = reader.finish();
    sh.counters
        .bytes_read
        .fetch_add(len.min(data_len), Ordering::Relaxed);
    if let Some(o) = changed_while_read(sh, &f.file, f.path, &f.before, len) {
        return o;
    }
    remember(f, hash, &chunks, &sparse);
    let mut extra = f.extra.clone();
    extra.sparse = sparse;
    let read = read_info(
        sh,
        job,
        "file",
        stat_key(&f.before),
        f.mode,
        &extra.summary(&hash),
    );
    if unchanged(job, &read) {
        // Same content as backed up: committed again only if the receiver lacked chunks.
        asks.settle(sh, seq);
        if !asks.has_work(seq) {
            return Outcome::Unchanged(Box::new(read));
        }
    }
    ready(
        sh,
        job,
        read,
        Some(&f.before),
        Content {
            kind: EntryKind::File,
            hash,
            chunks,
            chunk: None,
            puts: vec![],
            extra,
            seq: Some(seq),
        },
    )
}

fn unchanged(job: &Job, read: &FileRead) -> bool {
    job.backed_hash == Some(read.hash)
        && job.backed_kind.as_deref() == Some(read.kind)
        && job.mode.is_none_or(|m| m == read.mode)
}

/// The settle check: the file must look the same after the read as before it, else the
/// bytes may be torn; it is read again once it settles.
fn changed_while_read(
    sh: &Daemon,
    file: &std::fs::File,
    path: &std::path::Path,
    before: &std::fs::Metadata,
    read_len: u64,
) -> Option<Outcome> {
    let again = Outcome::Retry(
        "changed while being read; will read again once it settles".into(),
        now_ms() + sh.cfg.debounce.as_millis() as i64,
    );
    let after = match file.metadata() {
        Ok(m) => m,
        Err(_) => return Some(again),
    };
    let by_path = std::fs::symlink_metadata(path).ok();
    if stat_key(before) != stat_key(&after)
        || read_len != after.len()
        || by_path.is_none_or(|m| m.ino() != after.ino())
    {
        return Some(again);
    }
    None
}

/// A path found gone. Its deletion is recorded only while its watch is available (looked
/// at after the path was found gone, so an unmount before that is seen): the path of an
/// unavailable watch waits, and its watch's rescan once back settles it.
fn deletion(sh: &Daemon, job: &Job) -> Outcome {
    let watches = sh.watches();
    if let Some(w) = watches.iter().find(|w| w.name == job.watch) {
        if let Err((why, _)) = sh.avail.check(w, &sh.journal) {
            return Outcome::Retry(
                format!(
                    "watch {} is unavailable ({}): no deletion is recorded until it is back",
                    w.name,
                    why.describe(&w.path)
                ),
                now_ms() + 60_000,
            );
        }
    }
    match job.backed_kind.as_deref() {
        None => Outcome::Forget,
        Some("deleted") => Outcome::Unchanged(Box::new(read_info(
            sh,
            job,
            "deleted",
            StatKey::default(),
            0,
            &[0; 32],
        ))),
        Some(_) => {
            let read = read_info(sh, job, "deleted", StatKey::default(), 0, &[0; 32]);
            ready(
                sh,
                job,
                read,
                None,
                Content::bare(EntryKind::Deleted, [0; 32]),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::FileState;

    /// A file is skipped as unchanged only when its backed-up hash is known and equal: one
    /// whose hash a migration dropped (NULL, "not known") is always committed.
    #[test]
    fn a_file_whose_backed_up_hash_is_not_known_is_committed() {
        let read = FileRead {
            path: b"w/a".to_vec(),
            gen: 2,
            kind: "file",
            stat: StatKey::default(),
            mode: 0o644,
            hash: [7; 32],
            commit_id: CommitId([1; 16]),
        };
        let job = |backed_hash| Job {
            path: b"w/a".to_vec(),
            watch: "w".into(),
            gen: 2,
            state: FileState::Dirty,
            attempts: 0,
            hash: None,
            commit_id: None,
            backed_hash,
            backed_kind: Some("file".into()),
            mode: Some(0o644),
            class: Class::Backlog,
            size: Some(1),
        };
        assert!(unchanged(&job(Some([7; 32])), &read));
        assert!(!unchanged(&job(Some([8; 32])), &read));
        assert!(!unchanged(&job(None), &read));
    }

    fn job(class: Class, i: usize) -> Job {
        Job {
            path: format!("w/{}-{i}", class.as_str()).into_bytes(),
            watch: "w".into(),
            gen: 1,
            state: FileState::Dirty,
            attempts: 0,
            hash: None,
            commit_id: None,
            backed_hash: None,
            backed_kind: None,
            mode: None,
            class,
            size: Some(1),
        }
    }

    /// While both queues hold work, a worker of either lane takes fresh work first, and the
    /// backlog gets every BACKLOG_SHARE-th pick of the others: it is never starved. The
    /// fresh lane's worker never takes backlog work.
    #[test]
    fn fresh_first_and_the_backlog_gets_its_share() {
        let (ftx, frx) = crossbeam_channel::bounded(100);
        let (btx, brx) = crossbeam_channel::bounded(100);
        for i in 0..100 {
            ftx.send(job(Class::Fresh, i)).expect("fresh");
            btx.send(job(Class::Backlog, i)).expect("backlog");
        }
        let (_ltx, lrx) = crossbeam_channel::bounded(1);
        let q = Queues {
            fresh: frx,
            backlog: brx,
            large: lrx,
        };
        let mut picks = 0;
        let classes: Vec<Class> = (0..40)
            .map(|_| match take(&q, Lane::Any, &mut picks, None) {
                Take::Job(j) => j.class,
                _ => panic!("both queues hold work"),
            })
            .collect();
        let backlog = classes.iter().filter(|c| **c == Class::Backlog).count();
        assert_eq!(backlog as u64, 40 / BACKLOG_SHARE);
        assert_eq!(classes[..3], [Class::Fresh; 3]);
        assert_eq!(classes[3], Class::Backlog);
        let mut fresh_picks = 0;
        for _ in 0..70 {
            assert!(
                matches!(take(&q, Lane::Fresh, &mut fresh_picks, None), Take::Job(j) if j.class == Class::Fresh)
            );
        }
        // Fresh work is gone: the fresh lane waits, the others take the backlog.
        assert!(matches!(
            take(
                &q,
                Lane::Fresh,
                &mut fresh_picks,
                Some(Duration::from_millis(10))
            ),
            Take::Empty
        ));
        assert!(
            matches!(take(&q, Lane::Any, &mut picks, None), Take::Job(j) if j.class == Class::Backlog)
        );
    }
}
