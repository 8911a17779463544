//! What the daemon's threads share: the config, the journal, the keys, the connection
//! manager, the shutdown signal, the live counters and the watches' availability.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use coffer_common::channel::StaticKeypair;
use coffer_common::chunk::Crypto;
use crossbeam_channel::{Receiver, Sender};

use super::Shutdown;
use crate::config::Config;
use crate::conn::ConnManager;
use crate::journal::{Class, Journal};

/// Live counters (status line, metrics).
#[derive(Default)]
pub struct Counters {
    pub bytes_read: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub files_acked: AtomicU64,
    pub chunks_sent: AtomicU64,
    /// Per class (index: `Class as usize`): files taken off the queue (acknowledged, or
    /// found unchanged) and their bytes, for the queues' rates.
    pub done_files: [AtomicU64; 2],
    pub done_bytes: [AtomicU64; 2],
}

impl Counters {
    /// `files` of `class` (of `bytes` in all) left the queue.
    pub fn done(&self, class: Class, files: u64, bytes: u64) {
        self.done_files[class as usize].fetch_add(files, Ordering::Relaxed);
        self.done_bytes[class as usize].fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The running daemon's state, shared by its threads (scanner, scheduler, workers,
/// collector, ...) and the `/metrics` endpoint.
pub struct Daemon {
    pub cfg: Config,
    /// The watched folders; replaced as a whole when the config is reloaded.
    pub watches: RwLock<Arc<Vec<crate::config::Watch>>>,
    /// The file a worker is reading (progress line).
    pub current: Mutex<String>,
    pub journal: Mutex<Journal>,
    /// The keys, set once unwrapped (before any worker starts).
    pub keys: OnceLock<Crypto>,
    /// The one signal every thread stops on.
    pub shutdown: Shutdown,
    /// Wakes the scheduler (see [`Daemon::wake`]).
    pub wake: Sender<()>,
    pub conn: ConnManager,
    pub counters: Counters,
    /// Each watch's availability (see [`crate::avail`]).
    pub avail: crate::avail::Tracker,
    /// `pause`/`resume` (see [`crate::pause`]): read at start, polled by the timer thread.
    pub pause: crate::pause::Watcher,
}

impl Daemon {
    /// The daemon's state for `cfg`, with its journal open, and the receiving end of
    /// [`Daemon::wake`] for the scheduler. The connection manager escrows `keyfile`.
    pub fn new(
        cfg: Config,
        journal: Journal,
        keypair: StaticKeypair,
        keyfile: Vec<u8>,
        rt: tokio::runtime::Handle,
    ) -> (Arc<Daemon>, Receiver<()>) {
        let (wake, woken) = crossbeam_channel::bounded::<()>(1);
        let pause = crate::pause::Watcher::new(&cfg.state_dir);
        let sh = Daemon {
            conn: ConnManager::new(cfg.clone(), keypair, rt, keyfile),
            watches: RwLock::new(Arc::new(cfg.watches.clone())),
            current: Mutex::new(String::new()),
            cfg,
            journal: Mutex::new(journal),
            keys: OnceLock::new(),
            shutdown: Shutdown::default(),
            wake,
            counters: Counters::default(),
            avail: crate::avail::Tracker::default(),
            pause,
        };
        (Arc::new(sh), woken)
    }

    /// The keys (waits until they are unwrapped).
    pub fn crypto(&self) -> &Crypto {
        self.keys.wait()
    }

    /// The current watch list.
    pub fn watches(&self) -> Arc<Vec<crate::config::Watch>> {
        match self.watches.read() {
            Ok(w) => w.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Wakes the scheduler: files were released (their outcome written, which clears the
    /// claim) and more may be taken.
    pub fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    /// Hands claimed files back without an outcome.
    pub fn abandon(&self, paths: Vec<Vec<u8>>) {
        self.journal(|j| j.unclaim(&paths));
        self.wake();
    }

    /// Runs `f` on the journal; a failure is logged and answered `None`.
    pub fn journal<T>(
        &self,
        f: impl FnOnce(&mut Journal) -> Result<T, crate::journal::JournalError>,
    ) -> Option<T> {
        match self.journal.lock() {
            Ok(mut j) => match f(&mut j) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::error!(error = %e, "journal write failed");
                    None
                }
            },
            Err(_) => None,
        }
    }
}
