//! Presence questions in flight: a worker asks the receiver which of a large file's chunks
//! it lacks (`HaveChunks`) and goes on reading while the answer travels, instead of
//! waiting a round trip per window of chunks.
//!
//! Each question covers up to [`ASK_BYTES`] of one file's chunks, held in memory until its
//! answer comes; then the missing ones are sealed and put on the file's connection (see
//! [`put_chunks`]). Answers are taken oldest first, as soon as they are there
//! ([`Asks::poll`]), and waited for only when the chunks held pass the window
//! (the window) or a file's commit is due. The window starts at [`WINDOW_BYTES`] and
//! doubles, up to [`MAX_WINDOW`], each time the worker had to wait for an answer on the
//! query lane: on a long link it grows until what the worker reads and seals during one
//! round trip fits in it (the link's bandwidth-delay product at the worker's pace), on
//! loopback it stays where it was.
//!
//! The puts of a file, and why its questions failed, are kept by the file's sequence
//! number until its commit is sent ([`Asks::take`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use coffer_common::chunk::{ChunkId, PlainChunk};
use coffer_common::wire::{sealed_hash, Message};

use super::{Outcome, WINDOW_BYTES};
use crate::conn::{Conn, ConnError, Pending};
use crate::daemon::Daemon;
use coffer_common::host::time::now_ms;

/// Plaintext bytes of one file's chunks asked about in one question at most.
pub const ASK_BYTES: usize = 4 << 20;
/// The largest window of chunks held while their questions travel.
pub const MAX_WINDOW: usize = 64 << 20;
/// A wait for an answer longer than this grows the window.
const LONG_WAIT: Duration = Duration::from_millis(2);

/// One question in flight.
struct Asked {
    seq: u64,
    shown: String,
    /// The file's connection: its puts go there, before its commit.
    conn: Conn,
    /// The answer (`Err`: the question could not be sent).
    answer: Result<Pending, ConnError>,
    /// It went on the query lane (on failure it is asked again on `conn`).
    on_lane: bool,
    chunks: Vec<(ChunkId, PlainChunk)>,
    bytes: usize,
}

/// A worker's questions in flight, oldest first, and the outcome of those answered.
pub struct Asks {
    q: VecDeque<Asked>,
    held: usize,
    limit: usize,
    next: u64,
    puts: HashMap<u64, Vec<Pending>>,
    failed: HashMap<u64, Outcome>,
}

impl Default for Asks {
    fn default() -> Self {
        Asks {
            q: VecDeque::new(),
            held: 0,
            limit: WINDOW_BYTES,
            next: 0,
            puts: HashMap::new(),
            failed: HashMap::new(),
        }
    }
}

impl Asks {
    /// A number for the next file read.
    pub fn begin(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Asks about `chunks` of file `seq` (each id once per file: the caller filters) and
    /// returns at once; answers already there are handled, and the oldest waited for while
    /// more than the window is held.
    pub fn ask(
        &mut self,
        sh: &Daemon,
        conn: &Conn,
        seq: u64,
        shown: &str,
        chunks: Vec<(ChunkId, PlainChunk)>,
    ) {
        if chunks.is_empty() {
            return;
        }
        let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
        let bytes = chunks.iter().map(|(_, d)| d.len()).sum();
        let (answer, on_lane) = sh.conn.start_missing(conn, ids);
        self.q.push_back(Asked {
            seq,
            shown: shown.to_string(),
            conn: conn.clone(),
            answer,
            on_lane,
            chunks,
            bytes,
        });
        self.held += bytes;
        self.poll(sh);
        while self.held > self.limit {
            self.resolve_front(sh);
        }
    }

    /// Handles the answers that have arrived, oldest first, without waiting.
    pub fn poll(&mut self, sh: &Daemon) {
        while let Some(front) = self.q.front_mut() {
            let got = match &mut front.answer {
                Ok(p) => match p.try_take() {
                    Some(r) => r,
                    None => return,
                },
                Err(e) => Err(e.clone()),
            };
            if let Some(a) = self.q.pop_front() {
                self.held -= a.bytes;
                self.handle(sh, a, got);
            }
        }
    }

    /// True while a question of file `seq` waits for its answer.
    pub fn waiting(&self, seq: u64) -> bool {
        self.q.iter().any(|a| a.seq == seq)
    }

    /// Waits for every answer up to file `seq`'s last.
    pub fn settle(&mut self, sh: &Daemon, seq: u64) {
        while self.q.front().is_some_and(|a| a.seq <= seq) {
            self.resolve_front(sh);
        }
    }

    /// File `seq`'s puts, once its questions are answered (see [`Asks::settle`]), or why
    /// they could not be made; forgets the file.
    pub fn take(&mut self, seq: u64) -> Result<Vec<Pending>, Outcome> {
        let puts = self.puts.remove(&seq).unwrap_or_default();
        match self.failed.remove(&seq) {
            Some(o) => Err(o),
            None => Ok(puts),
        }
    }

    /// True when file `seq` (settled) had chunks to put or failed.
    pub fn has_work(&self, seq: u64) -> bool {
        self.failed.contains_key(&seq) || self.puts.get(&seq).is_some_and(|p| !p.is_empty())
    }

    /// Forgets file `seq` (not committed after all): its questions in flight are dropped.
    pub fn forget(&mut self, seq: u64) {
        let held = &mut self.held;
        self.q.retain(|a| {
            if a.seq == seq {
                *held -= a.bytes;
            }
            a.seq != seq
        });
        self.puts.remove(&seq);
        self.failed.remove(&seq);
    }

    /// Waits for the oldest answer and handles it; a long wait grows the window.
    fn resolve_front(&mut self, sh: &Daemon) {
        let Some(mut a) = self.q.pop_front() else {
            return;
        };
        self.held -= a.bytes;
        let answer = std::mem::replace(&mut a.answer, Err(ConnError::Lost(String::new())));
        let got = match answer {
            Ok(mut p) => match p.try_take() {
                Some(r) => r,
                None => {
                    let t = Instant::now();
                    let r = p.wait_blocking();
                    let waited = t.elapsed();
                    sh.conn.note_wait(waited);
                    // Only the query lane's answers measure the link: on the main
                    // connection an answer also waits for earlier commits' fsync.
                    if a.on_lane && waited > LONG_WAIT && self.limit < MAX_WINDOW {
                        self.limit = (self.limit * 2).min(MAX_WINDOW);
                        tracing::debug!(
                            window_mib = self.limit >> 20,
                            waited_ms = waited.as_millis() as u64,
                            "waited for a presence answer; window grown"
                        );
                    }
                    r
                }
            },
            Err(e) => Err(e),
        };
        self.handle(sh, a, got);
    }

    /// Puts the chunks an answer says are missing, or records why it failed.
    fn handle(&mut self, sh: &Daemon, a: Asked, got: Result<Message, ConnError>) {
        if self.failed.contains_key(&a.seq) {
            return;
        }
        let got = match got {
            Err(e) if a.on_lane && e.is_connection() => {
                tracing::debug!(error = %e, "query lane lost; asking on the main connection");
                sh.conn.drop_query();
                let ids = a.chunks.iter().map(|(id, _)| *id).collect();
                a.conn.call_blocking(Message::HaveChunks { ids })
            }
            r => r,
        };
        let missing: HashSet<ChunkId> = match got {
            Ok(Message::Missing { ids }) => ids.into_iter().collect(),
            Ok(m) => {
                let o = Outcome::Failed(format!("unexpected reply {}", m.kind()));
                self.failed.insert(a.seq, o);
                return;
            }
            // A refused key's session ends: sent again (not failed) once let in.
            Err(e) if e.is_connection() || e.refusal().is_some() => {
                self.failed.insert(a.seq, Outcome::Lost(e));
                return;
            }
            Err(e) => {
                self.failed
                    .insert(a.seq, Outcome::Failed(format!("receiver: {e}")));
                return;
            }
        };
        let todo: Vec<(ChunkId, PlainChunk)> = a
            .chunks
            .into_iter()
            .filter(|(id, _)| missing.contains(id))
            .collect();
        let puts = self.puts.entry(a.seq).or_default();
        if let Err(o) = put_chunks(sh, &a.conn, &a.shown, todo, puts) {
            self.failed.insert(a.seq, o);
        }
    }
}

/// Seals `todo` and puts each chunk on `conn`, in order, without waiting for replies.
///
/// Sealing (zstd probe, XChaCha20-Poly1305) is the costliest step per byte: every other
/// chunk is sealed by a helper thread while this one seals the next, and the puts still
/// go out in order. At most two sealed chunks wait beside the window. Each chunk is
/// sealed in its own buffer (no copy when it does not compress). The hash that the
/// put carries of the sealed bytes is taken on the same thread.
pub fn put_chunks(
    sh: &Daemon,
    conn: &Conn,
    shown: &str,
    todo: Vec<(ChunkId, PlainChunk)>,
    puts: &mut Vec<Pending>,
) -> Result<(), Outcome> {
    if todo.is_empty() {
        return Ok(());
    }
    let seal = |id: &ChunkId, data: PlainChunk| {
        sh.crypto()
            .seal_chunk_owned(id, data)
            .map(|sealed| (sealed_hash(&sealed), sealed))
            .map_err(|e| format!("sealing {shown}: {e}"))
    };
    let ids: Vec<ChunkId> = todo.iter().map(|(id, _)| *id).collect();
    let (mut evens, mut odds) = (Vec::new(), Vec::new());
    for (i, item) in todo.into_iter().enumerate() {
        if i % 2 == 0 {
            evens.push(item);
        } else {
            odds.push(item);
        }
    }
    std::thread::scope(|scope| {
        type Sealed = Result<([u8; 32], Vec<u8>), String>;
        let (tx, rx) = crossbeam_channel::bounded::<Sealed>(1);
        if !odds.is_empty() {
            let seal = &seal;
            let spawned = std::thread::Builder::new()
                .name("coffer-seal".into())
                .spawn_scoped(scope, move || {
                    for (id, data) in odds {
                        if tx.send(seal(&id, data)).is_err() {
                            break;
                        }
                    }
                });
            if let Err(e) = spawned {
                return Err(Outcome::Retry(
                    format!("cannot start a thread: {e}"),
                    now_ms() + 1000,
                ));
            }
        } else {
            drop(tx);
        }
        let mut evens = evens.into_iter();
        for (i, id) in ids.iter().enumerate() {
            let (hash, sealed) = if i % 2 == 0 {
                match evens.next() {
                    Some((id, data)) => seal(&id, data),
                    None => Err(format!("sealing {shown}: chunk {i} missing")),
                }
            } else {
                rx.recv()
                    .unwrap_or_else(|_| Err(format!("sealing {shown}: helper thread ended")))
            }
            .map_err(Outcome::Failed)?;
            sh.counters
                .bytes_sent
                .fetch_add(sealed.len() as u64, Ordering::Relaxed);
            sh.counters.chunks_sent.fetch_add(1, Ordering::Relaxed);
            let put = Message::PutChunk {
                id: *id,
                sealed_hash: hash,
                sealed,
            };
            match conn.start_blocking(put) {
                Ok(p) => puts.push(p),
                Err(e) => return Err(Outcome::Lost(e)),
            }
        }
        Ok(())
    })
}
