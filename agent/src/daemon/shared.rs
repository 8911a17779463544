//! What the daemon's threads share: the config, the journal, the keys, the connection
//! manager, the shutdown flag and the live counters.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use coffer_common::chunk::Crypto;
use crossbeam_channel::Sender;

use crate::config::Config;
use crate::conn::ConnManager;
use crate::journal::Journal;

/// Live counters (status line, metrics).
#[derive(Default)]
pub struct Counters {
    pub bytes_read: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub files_acked: AtomicU64,
    pub chunks_sent: AtomicU64,
}

/// The running daemon's state, shared by its threads (scanner, scheduler, workers,
/// collector, ...) and the `/metrics` endpoint.
pub struct Daemon {
    pub cfg: Config,
    /// The watched folders; replaced as a whole when the config is reloaded.
    pub watches: std::sync::RwLock<Arc<Vec<crate::config::Watch>>>,
    /// The file a worker is reading (progress line).
    pub current: Mutex<String>,
    pub journal: Mutex<Journal>,
    /// The keys, set once unwrapped (before any worker starts).
    pub keys: std::sync::OnceLock<Crypto>,
    pub shutdown: AtomicBool,
    pub wake: Sender<()>,
    pub conn: ConnManager,
    pub counters: Counters,
}

impl Daemon {
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
