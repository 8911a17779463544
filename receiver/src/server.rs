//! `serve`: the listener, per-connection authentication, session slots and shutdown.
//! What happens inside a session is [`crate::session`]'s.
//!
//! A connection goes: handshake (Noise XX, 10 s timeout, at most [`MAX_HANDSHAKES`] at
//! once) -> authorization of the agent's static key (unknown: `Error{Unauthorized}`,
//! logged with the key, closed) -> a session slot (a semaphore of `max_sessions`; a
//! connection over the cap waits up to [`BUSY_WAIT`], then gets a "busy" error) ->
//! `Hello`/`Welcome` -> requests.
//!
//! SIGTERM/SIGINT stop the listener; each session handles what it has already received,
//! flushes, answers `Error{ShuttingDown}` and closes, within `shutdown_grace_secs`.
//!
//! With `--metrics ADDR`, [`crate::metrics`] serves the counters the sessions keep at
//! `http://ADDR/metrics`, on this same runtime.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use coffer_common::channel::{self, PublicKey, StaticKeypair};
use coffer_common::host::fs::{describe, write_atomic, IoError};
use coffer_common::host::lock::{Lock, LockError, Wait};
use coffer_common::wire::{ErrorCode, Message};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::{AuthWatcher, RepoName};
use crate::config::Config;
use crate::layout::Layout;
use crate::metrics::{Metrics, Rejected};
use crate::repo::{Repo, RepoError};
use crate::store::PackStores;
use crate::Error;

/// Handshakes in progress at once; connections past this are dropped at once.
pub const MAX_HANDSHAKES: usize = 512;
/// How long a connection over `max_sessions` waits for a slot.
pub const BUSY_WAIT: Duration = Duration::from_secs(5);
/// How long a closing connection keeps reading what the peer already sent.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// How long `serve` retries the root's lock (a `status` may hold it for an instant).
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Options of `serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub root: PathBuf,
    /// Overrides the configured listen address.
    pub listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (off when `None`). Used as given:
    /// keep it on loopback unless the network path to it is trusted.
    pub metrics: Option<SocketAddr>,
    /// Where repositories keep their packs.
    pub stores: Arc<dyn PackStores>,
}

/// A running `serve`: what every connection and session shares.
pub(crate) struct Server {
    layout: Layout,
    pub(crate) config: Config,
    keypair: StaticKeypair,
    auth: AuthWatcher,
    /// Repositories opened so far, each opened once and shared by its sessions.
    repos: tokio::sync::Mutex<HashMap<RepoName, Arc<Repo>>>,
    /// Session slots (`max_sessions`).
    sessions: Arc<Semaphore>,
    /// Handshakes in progress ([`MAX_HANDSHAKES`]).
    handshakes: Arc<Semaphore>,
    /// Cancelled by SIGTERM/SIGINT.
    pub(crate) cancel: CancellationToken,
    /// Every connection's task, waited for on shutdown.
    tracker: TaskTracker,
    pub(crate) metrics: Arc<Metrics>,
    stores: Arc<dyn PackStores>,
}

/// Takes the root's serve lock, refusing when another `serve` holds it. Failing to open
/// or lock the file is an I/O error, not another `serve`.
fn lock_root(layout: &Layout) -> Result<Lock, Error> {
    match Lock::exclusive(&layout.serve_lock(), Wait::For(LOCK_WAIT)) {
        Ok(l) => Ok(l),
        Err(LockError::Held { .. }) => Err(Error::AlreadyServing(layout.root().to_path_buf())),
        Err(LockError::Io(e)) => Err(e.into()),
    }
}

/// Runs `serve` until SIGTERM/SIGINT. `on_ready` is called once with the bound address.
pub fn serve(opts: ServeOptions, on_ready: impl FnOnce(SocketAddr)) -> Result<(), Error> {
    let layout = Layout::new(&opts.root);
    let mut config = layout.load_config()?;
    if let Some(l) = opts.listen {
        config.listen = l;
    }
    let _lock = lock_root(&layout)?;
    let keypair = layout.load_keypair()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("coffer-receiver")
        .build()
        .map_err(|e| Error::Runtime(e.to_string()))?;
    let server = Server::new(layout.clone(), config, keypair, opts.stores);
    let r = rt.block_on(run(server, opts.metrics, on_ready));
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_file(layout.serve_addr());
    r
}

/// Listens, serves until cancelled, then shuts down.
async fn run(
    server: Arc<Server>,
    metrics_addr: Option<SocketAddr>,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), Error> {
    let listen = server.config.listen;
    let bind_error = |e: std::io::Error| Error::Bind {
        addr: listen,
        msg: describe(&e),
    };
    let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let metrics_listener = match metrics_addr {
        Some(a) => Some(TcpListener::bind(a).await.map_err(|e| Error::MetricsBind {
            addr: a,
            msg: describe(&e),
        })?),
        None => None,
    };
    write_atomic(
        &server.layout.serve_addr(),
        format!("{addr}\n").as_bytes(),
        0o644,
    )?;
    // Load the list once now so a broken file is reported at start.
    let _ = server.auth.current();
    tracing::info!(
        %addr,
        key = %server.keypair.public(),
        root = %server.layout.root().display(),
        max_sessions = server.config.max_sessions,
        "listening"
    );
    if let Some(l) = metrics_listener {
        serve_metrics(&server, l);
    }
    on_ready(addr);
    spawn_signal_handler(server.cancel.clone())?;
    crate::notify::notify(&format!("READY=1\nSTATUS=listening on {addr}"));
    spawn_watchdog(server.cancel.clone());
    accept(&server, &listener).await;
    drop(listener);
    server.shut_down().await;
    Ok(())
}

impl Server {
    fn new(
        layout: Layout,
        config: Config,
        keypair: StaticKeypair,
        stores: Arc<dyn PackStores>,
    ) -> Arc<Self> {
        Arc::new(Server {
            auth: AuthWatcher::new(layout.authorized()),
            layout,
            sessions: Arc::new(Semaphore::new(config.max_sessions)),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            config,
            keypair,
            repos: tokio::sync::Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            metrics: Arc::new(Metrics::new()),
            stores,
        })
    }

    /// After the listener is closed: lets sessions finish within the grace period, then
    /// flushes every repository once more.
    async fn shut_down(&self) {
        crate::notify::notify("STOPPING=1");
        tracing::info!("shutting down: no new connections; letting sessions finish");
        self.tracker.close();
        let grace = self.config.shutdown_grace();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "sessions still running after the shutdown grace of {}s; exiting anyway \
                 (anything unacknowledged will be sent again)",
                grace.as_secs()
            );
        }
        let repos: Vec<Arc<Repo>> = self.repos.lock().await.values().cloned().collect();
        for repo in repos {
            let r = tokio::task::spawn_blocking(move || {
                let name = repo.name().clone();
                (name, repo.flush(&[]))
            })
            .await;
            if let Ok((name, Err(e))) = r {
                tracing::warn!(repo = %name, "final flush: {e}");
            }
        }
        tracing::info!("stopped");
    }

    /// The repository `name`, opened (and recovered) on first use.
    pub(crate) async fn open_repo(&self, name: &RepoName) -> Result<Arc<Repo>, RepoError> {
        let mut repos = self.repos.lock().await;
        if let Some(r) = repos.get(name) {
            return Ok(r.clone());
        }
        let dir = self.layout.repo(name);
        let packs = self.stores.open(&dir);
        let n = name.clone();
        let max = self.config.pack_max_bytes;
        let (repo, rec) = tokio::task::spawn_blocking(move || Repo::open(&dir, n, packs, max))
            .await
            .map_err(|e| {
                RepoError::Io(IoError::new(
                    "opening repository",
                    self.layout.repo(name).path(),
                    std::io::Error::other(e.to_string()),
                ))
            })??;
        if rec.reindexed > 0 || rec.cut_bytes > 0 {
            tracing::info!(
                repo = %name,
                reindexed = rec.reindexed,
                cut_bytes = rec.cut_bytes,
                "recovered after an unclean stop"
            );
        }
        let repo = Arc::new(repo);
        repos.insert(name.clone(), repo.clone());
        Ok(repo)
    }
}

/// Serves `/metrics` on `listener` until shutdown.
fn serve_metrics(server: &Arc<Server>, listener: TcpListener) {
    match listener.local_addr() {
        Ok(a) => tracing::info!("metrics at http://{a}/metrics"),
        Err(e) => tracing::warn!("metrics listener: {}", describe(&e)),
    }
    let s = server.clone();
    tokio::spawn(crate::metrics::serve_http(
        listener,
        server.cancel.clone(),
        move || scrape(&s),
    ));
}

/// The metrics text, with the stored bytes of every repository opened so far (runs on a
/// blocking thread).
fn scrape(server: &Server) -> String {
    let repos: Vec<Arc<Repo>> = server.repos.blocking_lock().values().cloned().collect();
    for r in repos {
        server
            .metrics
            .set_repository_bytes(r.name().as_str(), r.stored_bytes());
    }
    server.metrics.render()
}

fn spawn_signal_handler(cancel: CancellationToken) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Runtime(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Runtime(e.to_string()))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        cancel.cancel();
    });
    Ok(())
}

/// Tells systemd we are alive, as often as its watchdog asks (when it does).
fn spawn_watchdog(cancel: CancellationToken) {
    let Some(every) = crate::notify::watchdog_interval() else {
        return;
    };
    tokio::spawn(async move {
        loop {
            crate::notify::notify("WATCHDOG=1");
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = cancel.cancelled() => return,
            }
        }
    });
}

/// Accepts connections until shutdown, each on a task of its own (past
/// [`MAX_HANDSHAKES`] handshakes in progress, a connection is dropped at once).
async fn accept(server: &Arc<Server>, listener: &TcpListener) {
    loop {
        tokio::select! {
            _ = server.cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let Ok(hs) = server.handshakes.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "too many handshakes in progress; dropping connection");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let s = server.clone();
                    let span = tracing::info_span!("conn", %peer);
                    server.tracker.spawn(connection(s, stream, hs).instrument(span));
                }
                Err(e) => {
                    tracing::warn!("accepting a connection: {}", describe(&e));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = server.cancel.cancelled() => return,
                    }
                }
            }
        }
    }
}

pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error {
        code,
        message: message.into(),
    }
}

/// One connection: handshake, authorization, a session slot, then the session.
async fn connection(server: Arc<Server>, stream: TcpStream, handshake_slot: OwnedSemaphorePermit) {
    let hs = tokio::select! {
        r = channel::accept(stream, &server.keypair) => r,
        _ = server.cancel.cancelled() => return,
    };
    drop(handshake_slot);
    let (ch, key) = match hs {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!("handshake failed: {e}");
            server.metrics.rejected(Rejected::Failed);
            return;
        }
    };
    let Some(repo) = server.auth.current().repo_of(&key).cloned() else {
        server.metrics.rejected(Rejected::Unauthorized);
        tracing::warn!(%key, "refused: agent key {key} is not authorized on this receiver");
        let m = error(
            ErrorCode::Unauthorized,
            format!("agent key {key} is not authorized on this receiver"),
        );
        return refuse(ch, m).await;
    };
    let permit = match session_slot(&server).await {
        Slot::Free(p) => p,
        Slot::Busy => return refuse(ch, busy(&server, &key)).await,
        Slot::ShuttingDown => return,
    };
    let span = tracing::info_span!("session", %repo, key = %short(&key));
    let metrics = server.metrics.clone();
    let active = metrics.session();
    crate::session::session(server, ch, repo)
        .instrument(span)
        .await;
    drop(active);
    drop(permit);
}

/// What waiting for a session slot came to.
enum Slot {
    Free(OwnedSemaphorePermit),
    /// None freed up within [`BUSY_WAIT`].
    Busy,
    ShuttingDown,
}

/// A session slot, waiting up to [`BUSY_WAIT`] for one when all are in use.
async fn session_slot(server: &Server) -> Slot {
    if let Ok(p) = server.sessions.clone().try_acquire_owned() {
        return Slot::Free(p);
    }
    let waited = tokio::select! {
        r = tokio::time::timeout(BUSY_WAIT, server.sessions.clone().acquire_owned()) => r,
        _ = server.cancel.cancelled() => return Slot::ShuttingDown,
    };
    match waited {
        Ok(Ok(p)) => Slot::Free(p),
        _ => Slot::Busy,
    }
}

/// The refusal of a connection that found every session slot taken.
fn busy(server: &Server, key: &PublicKey) -> Message {
    let max = server.config.max_sessions;
    tracing::warn!(%key, "refused: all {max} sessions in use");
    error(
        ErrorCode::Internal,
        format!(
            "receiver busy: all {max} sessions are in use (max_sessions in receiver.toml); \
             try again later"
        ),
    )
}

/// Sends a last message, closes our side, and reads (discarding) what the peer had already
/// sent for a moment, so that the close does not turn into a reset that could swallow the
/// message before the agent reads it.
pub(crate) async fn refuse(ch: channel::Channel<TcpStream>, m: Message) {
    let (mut tx, mut rx) = ch.split();
    let _ = tokio::time::timeout(Duration::from_secs(5), tx.send(&m)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), tx.shutdown()).await;
    let _ = tokio::time::timeout(LINGER, async { while rx.recv_raw().await.is_ok() {} }).await;
}

fn short(k: &PublicKey) -> String {
    k.to_string().chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_another_serve_and_an_io_failure_is_not() {
        let d = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(d.path());
        let held = lock_root(&layout).expect("free");
        match lock_root(&layout) {
            Err(Error::AlreadyServing(root)) => assert_eq!(root, d.path()),
            other => panic!("expected AlreadyServing, got {other:?}"),
        }
        drop(held);
        drop(lock_root(&layout).expect("free again"));
        // A root that cannot hold the lock file: an I/O error naming the file.
        let missing = Layout::new(&d.path().join("no-such-root"));
        match lock_root(&missing) {
            Err(e @ Error::Io(_)) => {
                assert!(e.to_string().contains("serve.lock"), "{e}");
                assert!(!e.to_string().contains("already running"), "{e}");
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }
}
