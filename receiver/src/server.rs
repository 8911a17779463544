//! `serve`: the listener, per-connection authentication, session slots and shutdown.
//! What happens inside a session is [`crate::session`]'s.
//!
//! A connection goes: counted for its address (at most `max_handshakes_per_address` not yet
//! authorized; past that it is closed at accept) -> a handshake slot (at most
//! [`MAX_HANDSHAKES`] at once; past that it waits its turn in a queue of [`MAX_QUEUED`],
//! and is closed at accept when that is full) -> the handshake (Noise XX: the preamble and
//! first message within `handshake_timeout_secs`, all of it within 10 s) -> authorization
//! of the agent's static key (unknown: `Error{Unauthorized}`, closed) -> a session slot of
//! its key (`max_sessions_per_key`), of its repository (`max_sessions_per_repo`) and of the
//! receiver (`max_sessions`), waiting up to [`BUSY_WAIT`] in all before a "busy" error ->
//! `Hello`/`Welcome` -> requests.
//!
//! Connections turned away are counted and summarised in one log line per interval
//! ([`crate::logs::Tally`]); only the first few refusals with a key are logged one by one.
//!
//! SIGTERM/SIGINT stop the listener; each session handles what it has already received,
//! flushes, answers `Error{ShuttingDown}` and closes, within `shutdown_grace_secs`.
//!
//! SIGHUP re-reads `receiver.toml` and applies its quota keys (`quota`, `[repos.NAME]`,
//! `min_free`, `warn_at`) and its retention settings (`[retention]`,
//! `[repos.NAME.retention]`: the next scheduled prune uses them) at once; other changed
//! keys wait for a restart (logged).
//!
//! Every [`REVOCATION_CHECK`] the authorization list is looked at (a `stat`; re-read when
//! it changed): a session whose key no longer writes its repository ends with
//! `Error{Unauthorized}`, and each flush checks again before it records or acknowledges
//! anything (see [`Access`]).
//!
//! With `--metrics ADDR`, [`crate::metrics`] serves the counters the sessions keep at
//! `http://ADDR/metrics`, on this same runtime.
//!
//! Prune while serving: every repository with a `prune_interval` is pruned that often (the
//! first time one interval after its last prune, as its index records it, or after
//! `serve` starts if it was never pruned), on a blocking thread, while its sessions
//! go on (the engine takes the repository's locks per batch, see [`crate::prune`]); a
//! `coffer-receiver prune` run meanwhile reaches this process over the control socket
//! ([`crate::control`]) and its prune is done here, in turn. One prune per repository at a
//! time: a scheduled one finding another running skips its turn, a requested one waits.
//! Each is logged with its report; a failed one is logged (and recorded as the index's
//! `last_prune` by the engine) and tried again at the next interval.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_common::channel::{self, PublicKey, StaticKeypair, HANDSHAKE_TIMEOUT};
use coffer_common::host::fs::{describe, write_atomic, IoError};
use coffer_common::host::lock::{Lock, LockError, Wait};
use coffer_common::wire::{ErrorCode, Message};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::{AddressSlot, Caps, PerAddress};
use crate::auth::{AuthWatcher, RepoName};
use crate::config::Config;
use crate::control::{self, Outcome, Reply, Request};
use crate::layout::Layout;
use crate::logs::{Refusal, Tally, SUMMARY_INTERVAL};
use crate::metrics::{Metrics, Rejected};
use crate::prune::{PruneOptions, PruneReport};
use crate::quota::{DiskFloor, QuotaState};
use crate::repo::{Repo, RepoError};
use crate::store::PackStores;
use crate::Error;

/// Handshakes in progress at once; connections past this wait in a queue.
pub const MAX_HANDSHAKES: usize = 512;
/// Connections waiting for a handshake slot; past this, connections are closed at accept.
pub const MAX_QUEUED: usize = 512;
/// How long a connection waits for its session slot (its key's, its repository's and the
/// receiver's, in all) when one is taken.
pub const BUSY_WAIT: Duration = Duration::from_secs(5);
/// How long a closing connection keeps reading what the peer already sent.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// How long `serve` retries the root's lock (a `status` may hold it for an instant).
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// How often open sessions are checked against the authorization list (a revoked key's
/// sessions end within about this long).
pub const REVOCATION_CHECK: Duration = Duration::from_millis(250);
/// How often the prune schedule looks for a repository whose prune is due.
const PRUNE_TICK: Duration = Duration::from_millis(250);

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
    /// The configuration as last (re)read: its quota keys apply at once on SIGHUP.
    live_config: RwLock<Arc<Config>>,
    /// The free-space floor of the packs' file system, shared by every repository.
    floor: Arc<DiskFloor>,
    /// Size of that file system (for `min_free`'s default).
    fs_size: u64,
    keypair: StaticKeypair,
    auth: Arc<AuthWatcher>,
    /// Sessions running, by number, with their key and repository (for revocation).
    live: std::sync::Mutex<HashMap<u64, Access>>,
    next_session: AtomicU64,
    /// Repositories opened so far, each opened once and shared by its sessions.
    repos: tokio::sync::Mutex<HashMap<RepoName, Arc<Repo>>>,
    /// Repositories refused because their index needs `repair`, with the reason last
    /// logged: each reason is logged once, and every new connection tries the open again.
    refused: std::sync::Mutex<HashMap<RepoName, String>>,
    /// Session slots (`max_sessions`).
    sessions: Arc<Semaphore>,
    /// Handshakes in progress ([`MAX_HANDSHAKES`]).
    handshakes: Arc<Semaphore>,
    /// Connections waiting for a handshake slot ([`MAX_QUEUED`]).
    queued: Arc<Semaphore>,
    /// Connections not yet authorized, per address.
    addresses: Arc<PerAddress>,
    /// Session slots per agent key and per repository.
    key_sessions: Caps<PublicKey>,
    repo_sessions: Caps<RepoName>,
    /// Connections turned away since the last summary line.
    refusals: Tally,
    /// Cancelled by SIGTERM/SIGINT.
    pub(crate) cancel: CancellationToken,
    /// Every connection's task, waited for on shutdown.
    tracker: TaskTracker,
    pub(crate) metrics: Arc<Metrics>,
    stores: Arc<dyn PackStores>,
    /// One lock per repository, held by the prune running on it.
    pruning: std::sync::Mutex<HashMap<RepoName, Arc<tokio::sync::Mutex<()>>>>,
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
    tracing::info!(
        min_free = server.floor.min_free(),
        default_quota = server.config.quota.0,
        "quotas and free-space floor"
    );
    let r = rt.block_on(run(server, opts.metrics, on_ready));
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_file(layout.serve_addr());
    let _ = std::fs::remove_file(control::socket_path(&layout));
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
    serve_control(&server)?;
    on_ready(addr);
    spawn_signal_handler(server.clone())?;
    spawn_revocation_watch(server.clone());
    crate::notify::notify(&format!("READY=1\nSTATUS=listening on {addr}"));
    spawn_watchdog(server.cancel.clone());
    spawn_refusal_summaries(server.clone());
    spawn_prune_schedule(server.clone());
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
        // The floor is on the file system that holds the repositories (the root's, until
        // `repos/` exists).
        let floor_path = if layout.repos().is_dir() {
            layout.repos()
        } else {
            layout.root().to_path_buf()
        };
        let fs_size = crate::quota::fs_size(&floor_path).unwrap_or(0);
        let floor = Arc::new(DiskFloor::new(floor_path, config.min_free_for(fs_size)));
        Arc::new(Server {
            auth: Arc::new(AuthWatcher::new(layout.authorized())),
            live_config: RwLock::new(Arc::new(config.clone())),
            floor,
            fs_size,
            live: std::sync::Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(0),
            layout,
            sessions: Arc::new(Semaphore::new(config.max_sessions)),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            queued: Arc::new(Semaphore::new(MAX_QUEUED)),
            addresses: Arc::default(),
            key_sessions: Caps::new(config.max_sessions_per_key),
            repo_sessions: Caps::new(config.max_sessions_per_repo),
            refusals: Tally::default(),
            config,
            keypair,
            repos: tokio::sync::Mutex::new(HashMap::new()),
            refused: std::sync::Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            metrics: Arc::new(Metrics::new()),
            stores,
            pruning: std::sync::Mutex::new(HashMap::new()),
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
        let opened = tokio::task::spawn_blocking(move || Repo::open(&dir, n, packs, max))
            .await
            .map_err(|e| {
                RepoError::Io(IoError::new(
                    "opening repository",
                    self.layout.repo(name).path(),
                    std::io::Error::other(e.to_string()),
                ))
            })?;
        let mut refused = match self.refused.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (repo, rec) = match opened {
            Ok(r) => {
                if refused.remove(name).is_some() {
                    tracing::info!(repo = %name, "repository opened; no longer refused");
                }
                r
            }
            Err(RepoError::NeedsRepair(e)) => {
                // Only this repository is refused; logged once per reason.
                let why = e.to_string();
                if refused.get(name) != Some(&why) {
                    tracing::error!(repo = %name, "refusing sessions: {why}");
                    refused.insert(name.clone(), why);
                }
                return Err(RepoError::NeedsRepair(e));
            }
            Err(e) => return Err(e),
        };
        drop(refused);
        if rec.reindexed > 0 || rec.cut_bytes > 0 {
            tracing::info!(
                repo = %name,
                reindexed = rec.reindexed,
                cut_bytes = rec.cut_bytes,
                "recovered after an unclean stop"
            );
        }
        repo.limits.set_quota(self.live_config().quota_of(name));
        repo.limits.set_floor(self.floor.clone());
        let repo = Arc::new(repo);
        repos.insert(name.clone(), repo.clone());
        Ok(repo)
    }

    /// The configuration as last read (at start or on SIGHUP).
    pub(crate) fn live_config(&self) -> Arc<Config> {
        match self.live_config.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// SIGHUP: re-reads `receiver.toml` and applies its quota keys to every repository
    /// (and to those opened later). A file that does not load keeps the running settings.
    async fn reload(&self) {
        let config = match self.layout.load_config() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("SIGHUP: {e}; keeping the running configuration");
                return;
            }
        };
        self.floor.set_min_free(config.min_free_for(self.fs_size));
        for (name, repo) in self.repos.lock().await.iter() {
            repo.limits.set_quota(config.quota_of(name));
        }
        let quota_keys = Config {
            quota: config.quota,
            min_free: config.min_free,
            warn_at: config.warn_at,
            repos: config.repos.clone(),
            retention: config.retention.clone(),
            listen: self.config.listen,
            ..self.config.clone()
        };
        if quota_keys != config {
            tracing::warn!(
                "SIGHUP: receiver.toml changed keys other than quota, min_free, warn_at, \
                 [retention] and [repos.NAME]; those apply at the next restart"
            );
        }
        tracing::info!(
            min_free = self.floor.min_free(),
            default_quota = config.quota.0,
            "SIGHUP: quotas reloaded from receiver.toml"
        );
        match self.live_config.write() {
            Ok(mut c) => *c = Arc::new(config),
            Err(p) => *p.into_inner() = Arc::new(config),
        }
    }

    /// Ends the sessions whose key no longer writes their repository.
    fn revoke_sessions(&self) {
        let auth = self.auth.current();
        let live = match self.live.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        for a in live.values() {
            if !a.revoked.is_cancelled() && auth.repo_of(&a.key) != Some(&a.repo) {
                tracing::info!(key = %a.key, repo = %a.repo, "agent key revoked: ending its session");
                a.revoked.cancel();
            }
        }
    }
}

/// Repositories of the root: the folders under `repos/` (an authorized key's repository
/// has one from `authorize` on), sorted.
fn repo_dirs(layout: &Layout) -> Vec<RepoName> {
    let dir = layout.repos();
    let mut out = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let name = e.file_name();
                if let Some(n) = name.to_str().and_then(|n| RepoName::new(n).ok()) {
                    if e.path().is_dir() {
                        out.push(n);
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("listing {}: {}", dir.display(), describe(&e)),
    }
    out.sort();
    out
}

/// Why a prune runs (for its log line).
#[derive(Clone, Copy, Debug)]
enum PruneCause {
    Scheduled,
    Requested,
}

impl Server {
    /// The lock of `name`'s prunes.
    fn prune_slot(&self, name: &RepoName) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = match self.pruning.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(name.clone()).or_default().clone()
    }

    /// Prunes repository `name` (opened if no session has yet) on a blocking thread,
    /// holding its prune lock `slot`, and logs the outcome.
    async fn prune_locked(
        &self,
        name: &RepoName,
        dry_run: bool,
        cause: PruneCause,
    ) -> Result<PruneReport, String> {
        let repo = self
            .open_repo(name)
            .await
            .map_err(|e| format!("opening repository {name}: {e}"))?;
        let retention = self.live_config().retention(name);
        let opts = PruneOptions {
            dry_run,
            progress: false,
        };
        tracing::info!(repo = %name, ?cause, dry_run, "prune starting");
        let t = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            crate::prune::prune(
                &repo,
                &retention,
                coffer_common::host::time::now_secs(),
                &opts,
            )
        })
        .await;
        let secs = t.elapsed().as_secs_f64();
        match r {
            Ok(Ok(report)) => {
                tracing::info!(
                    repo = %name,
                    ?cause,
                    dry_run,
                    secs,
                    files = report.files,
                    versions_kept = report.versions_kept,
                    versions_removed = report.versions_removed,
                    bytes_freed = report.bytes_freed,
                    packs_rewritten = report.packs_rewritten,
                    packs_deleted = report.packs_deleted,
                    "prune done"
                );
                Ok(report)
            }
            Ok(Err(e)) => {
                tracing::error!(repo = %name, ?cause, secs, "prune failed: {e}");
                Err(e.to_string())
            }
            Err(e) => {
                tracing::error!(repo = %name, ?cause, "prune failed: {e}");
                Err(format!("the prune of {name} ended abnormally: {e}"))
            }
        }
    }

    /// A prune asked for over the control socket: `repo` (every repository when `None`),
    /// each after any prune of it already running.
    async fn prune_request(&self, repo: Option<String>, dry_run: bool) -> Reply<PruneReport> {
        let names = match crate::repair::repositories(&self.layout, repo.as_deref()) {
            Ok(n) => n,
            Err(e) => return Reply::Error(e.to_string()),
        };
        let mut outcomes = Vec::with_capacity(names.len());
        for name in names {
            let slot = self.prune_slot(&name);
            let _running = slot.lock().await;
            let r = self
                .prune_locked(&name, dry_run, PruneCause::Requested)
                .await;
            let (report, error) = match r {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e)),
            };
            outcomes.push(Outcome {
                repo: name.to_string(),
                report,
                error,
            });
        }
        Reply::Reports(outcomes)
    }
}

/// Listens on the control socket until shutdown (see [`crate::control`]).
fn serve_control(server: &Arc<Server>) -> Result<(), Error> {
    let listener = control::bind(&server.layout)?;
    let s = server.clone();
    tokio::spawn(control::serve(
        listener,
        control::socket_path(&server.layout),
        server.cancel.clone(),
        move |req| {
            let s = s.clone();
            async move {
                match req {
                    Request::Prune { repo, dry_run } => s.prune_request(repo, dry_run).await,
                }
            }
        },
    ));
    Ok(())
}

/// How long ago repository `name` was last pruned, by the `last_prune` row its index keeps
/// (written by every prune, whichever process ran it); `None` if never, or unreadable.
fn last_pruned_ago(layout: &Layout, name: &RepoName) -> Option<Duration> {
    let index =
        crate::index::Index::open(&layout.repo(name).index(), crate::index::Mode::Read).ok()?;
    let row = index.last_prune_json().ok()??;
    let v: serde_json::Value = serde_json::from_str(&row).ok()?;
    let at = coffer_common::host::time::parse_time(v.get("at")?.as_str()?).ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(Duration::from_secs(now.saturating_sub(at).max(0) as u64))
}

/// Prunes each repository every `prune_interval` of its retention settings (as last read).
/// The first prune after `serve` starts is due one interval after the repository's last
/// prune (its index's `last_prune`, so a receiver restarted more often than the interval
/// still prunes on time), or one interval after the start if it was never pruned; then
/// one interval after the start of the previous one. A repository whose prune is still
/// running when the next is due skips that turn.
fn spawn_prune_schedule(server: Arc<Server>) {
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut last: HashMap<RepoName, tokio::time::Instant> = HashMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PRUNE_TICK) => {}
                _ = server.cancel.cancelled() => return,
            }
            let config = server.live_config();
            for name in repo_dirs(&server.layout) {
                let Some(every) = config.retention(&name).prune_interval else {
                    continue;
                };
                let since = match last.get(&name) {
                    Some(t) => *t,
                    None => {
                        // First sight: the last prune's time, from before this start too.
                        let layout = server.layout.clone();
                        let n = name.clone();
                        let ago = tokio::task::spawn_blocking(move || last_pruned_ago(&layout, &n))
                            .await
                            .ok()
                            .flatten();
                        let now = tokio::time::Instant::now();
                        let t = match ago {
                            Some(ago) => now.checked_sub(ago.min(every)).unwrap_or(started),
                            None => started,
                        };
                        last.insert(name.clone(), t);
                        t
                    }
                };
                if since.elapsed() < every {
                    continue;
                }
                let slot = server.prune_slot(&name);
                let Ok(running) = slot.try_lock_owned() else {
                    continue;
                };
                last.insert(name.clone(), tokio::time::Instant::now());
                let s = server.clone();
                tokio::spawn(async move {
                    let _running = running;
                    let _ = s.prune_locked(&name, false, PruneCause::Scheduled).await;
                });
            }
        }
    });
}

/// A session's authorization: its key, its repository, and a token cancelled once the key
/// no longer writes that repository (revoked, or moved to another).
#[derive(Clone)]
pub(crate) struct Access {
    key: PublicKey,
    repo: RepoName,
    pub(crate) revoked: CancellationToken,
    auth: Arc<AuthWatcher>,
}

impl Access {
    /// The session's agent key.
    pub(crate) fn key(&self) -> &PublicKey {
        &self.key
    }

    /// Looks at the authorization list now (a `stat`, and a read when it changed): true
    /// while the key still writes the repository. Once false, stays false.
    pub(crate) fn still_authorized(&self) -> bool {
        if self.revoked.is_cancelled() {
            return false;
        }
        let ok = self.auth.current().repo_of(&self.key) == Some(&self.repo);
        if !ok {
            self.revoked.cancel();
        }
        ok
    }
}

/// A session registered for revocation, removed when it ends.
struct Registered<'a> {
    server: &'a Server,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut live = match self.server.live.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        live.remove(&self.id);
    }
}

/// Checks open sessions against the authorization list every [`REVOCATION_CHECK`].
fn spawn_revocation_watch(server: Arc<Server>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(REVOCATION_CHECK) => {}
                _ = server.cancel.cancelled() => return,
            }
            server.revoke_sessions();
        }
    });
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
    let warn_at = server.live_config().warn_at.0;
    for r in repos {
        let name = r.name().as_str();
        server.metrics.set_repository_bytes(name, r.stored_bytes());
        let (used, quota) = (r.used_bytes(), r.limits.quota());
        let state = QuotaState::of(used, quota, warn_at);
        server
            .metrics
            .set_repository_quota(name, used, quota, state);
        if server.metrics.usage_due(name) {
            match crate::status::RepoUsage::read(&server.layout.repo(r.name())) {
                Ok(u) => server.metrics.set_repository_usage(name, &u),
                Err(e) => tracing::warn!(repo = name, "metrics: reading the index: {e}"),
            }
        }
    }
    let free = server.floor.free_now().unwrap_or(0);
    server.metrics.set_disk(free, server.floor.min_free());
    server.metrics.render()
}

fn spawn_signal_handler(server: Arc<Server>) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Runtime(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Runtime(e.to_string()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::Runtime(e.to_string()))?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received: reloading quotas");
                    server.reload().await;
                    continue;
                }
            }
            server.cancel.cancel();
            return;
        }
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

/// Logs the refusals counted, one line per [`SUMMARY_INTERVAL`] that had any, until
/// shutdown.
fn spawn_refusal_summaries(server: Arc<Server>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SUMMARY_INTERVAL) => {}
                _ = server.cancel.cancelled() => return,
            }
            if let Some(line) = server.refusals.summary() {
                tracing::warn!("{line}");
            }
        }
    });
}

/// How a connection comes to its handshake.
enum Opening {
    /// A handshake slot was free.
    Now(OwnedSemaphorePermit),
    /// It waits in the queue (holding a place in it) for a handshake slot.
    Queued(OwnedSemaphorePermit),
}

/// Accepts connections until shutdown, each on a task of its own. A connection from an
/// address at its cap, or finding every handshake slot taken and the queue full, is
/// closed at once (counted for the summary).
async fn accept(server: &Arc<Server>, listener: &TcpListener) {
    loop {
        tokio::select! {
            _ = server.cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let cap = server.config.max_handshakes_per_address;
                    let Some(address) = server.addresses.enter(peer.ip(), cap) else {
                        server.refusals.count(Refusal::AddressCap);
                        continue;
                    };
                    let opening = match server.handshakes.clone().try_acquire_owned() {
                        Ok(p) => Opening::Now(p),
                        Err(_) => match server.queued.clone().try_acquire_owned() {
                            Ok(q) => Opening::Queued(q),
                            Err(_) => {
                                server.refusals.count(Refusal::QueueFull);
                                continue;
                            }
                        },
                    };
                    // Keepalive and a user timeout: an agent that vanished without
                    // closing is noticed within 30 s (`coffer_common::host::net`).
                    if let Err(e) = coffer_common::host::net::tune(&stream) {
                        tracing::debug!(%peer, "cannot set TCP keepalive: {}", describe(&e));
                    }
                    let s = server.clone();
                    let span = tracing::info_span!("conn", %peer);
                    server
                        .tracker
                        .spawn(connection(s, stream, address, opening).instrument(span));
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

/// A handshake slot for a connection, waiting in the queue for one if need be (FIFO, up
/// to the handshake's whole time, after which the agent has given up anyway).
async fn handshake_slot(server: &Server, opening: Opening) -> Option<OwnedSemaphorePermit> {
    let place = match opening {
        Opening::Now(p) => return Some(p),
        Opening::Queued(place) => place,
    };
    let waited = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, server.handshakes.clone().acquire_owned()) => r,
        _ = server.cancel.cancelled() => return None,
    };
    drop(place);
    match waited {
        Ok(Ok(p)) => Some(p),
        _ => {
            server.refusals.count(Refusal::Waited);
            None
        }
    }
}

/// One connection: a handshake slot, the handshake, authorization, a session slot, then
/// the session. It counts for its address until it is authorized.
async fn connection(
    server: Arc<Server>,
    stream: TcpStream,
    address: AddressSlot,
    opening: Opening,
) {
    let Some(handshake) = handshake_slot(&server, opening).await else {
        return;
    };
    let hs = tokio::select! {
        r = channel::accept_within(stream, &server.keypair, server.config.handshake_timeout()) => r,
        _ = server.cancel.cancelled() => return,
    };
    drop(handshake);
    let (ch, key) = match hs {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!("handshake failed: {e}");
            server.metrics.rejected(Rejected::Failed);
            server.refusals.count(Refusal::Handshake);
            return;
        }
    };
    let Some(repo) = server.auth.current().repo_of(&key).cloned() else {
        server.metrics.rejected(Rejected::Unauthorized);
        if server.refusals.count(Refusal::Unauthorized) {
            tracing::warn!(%key, "refused: agent key {key} is not authorized on this receiver");
        }
        let m = error(
            ErrorCode::Unauthorized,
            format!("agent key {key} is not authorized on this receiver"),
        );
        return refuse(ch, m).await;
    };
    drop(address);
    let permit = match session_slot(&server, &key, &repo).await {
        Slot::Free(p) => p,
        Slot::Busy(cap) => return refuse(ch, busy(&server, cap, &key, &repo)).await,
        Slot::ShuttingDown => return,
    };
    let span = tracing::info_span!("session", %repo, key = %short(&key));
    let metrics = server.metrics.clone();
    let active = metrics.session();
    let access = Access {
        key,
        repo: repo.clone(),
        revoked: CancellationToken::new(),
        auth: server.auth.clone(),
    };
    let id = server.next_session.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut live) = server.live.lock() {
        live.insert(id, access.clone());
    }
    let registered = Registered {
        server: &server,
        id,
    };
    // Revoked while it waited for its slot: checked once more now that it is registered.
    access.still_authorized();
    crate::session::session(server.clone(), ch, repo, access)
        .instrument(span)
        .await;
    drop(registered);
    drop(active);
    drop(permit);
}

/// A session's slots: its key's, its repository's and the receiver's, held until it ends.
struct SessionSlot {
    _key: OwnedSemaphorePermit,
    _repo: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

/// Which cap left a connection without a session slot.
#[derive(Clone, Copy)]
enum Cap {
    Key,
    Repo,
    All,
}

/// What waiting for a session slot came to.
enum Slot {
    Free(SessionSlot),
    /// None freed up within [`BUSY_WAIT`].
    Busy(Cap),
    ShuttingDown,
}

/// A session slot for `key` of `repo`: one of the key's, one of the repository's, then
/// one of the receiver's (always in that order), waiting up to [`BUSY_WAIT`] in all.
async fn session_slot(server: &Server, key: &PublicKey, repo: &RepoName) -> Slot {
    let until = tokio::time::Instant::now() + BUSY_WAIT;
    let key_sessions = server.key_sessions.semaphore(key);
    let key = match permit(server, key_sessions, Cap::Key, until).await {
        Ok(p) => p,
        Err(s) => return s,
    };
    let repo_sessions = server.repo_sessions.semaphore(repo);
    let repo = match permit(server, repo_sessions, Cap::Repo, until).await {
        Ok(p) => p,
        Err(s) => return s,
    };
    match permit(server, server.sessions.clone(), Cap::All, until).await {
        Ok(all) => Slot::Free(SessionSlot {
            _key: key,
            _repo: repo,
            _all: all,
        }),
        Err(s) => s,
    }
}

/// A permit of `sem`, waiting until `until` at most; else what the wait came to.
async fn permit(
    server: &Server,
    sem: Arc<Semaphore>,
    cap: Cap,
    until: tokio::time::Instant,
) -> Result<OwnedSemaphorePermit, Slot> {
    if let Ok(p) = sem.clone().try_acquire_owned() {
        return Ok(p);
    }
    tokio::select! {
        r = tokio::time::timeout_at(until, sem.acquire_owned()) => match r {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Slot::Busy(cap)),
        },
        _ = server.cancel.cancelled() => Err(Slot::ShuttingDown),
    }
}

/// The refusal of a connection that found no session slot: its key's, its repository's,
/// or the receiver's all taken.
fn busy(server: &Server, cap: Cap, key: &PublicKey, repo: &RepoName) -> Message {
    let (logged, text) = match cap {
        Cap::Key => {
            let max = server.key_sessions.cap();
            (
                format!("agent key holds all its {max} sessions"),
                format!(
                    "receiver busy: agent key {key} already holds {max} sessions \
                     (max_sessions_per_key in receiver.toml); try again later"
                ),
            )
        }
        Cap::Repo => {
            let max = server.repo_sessions.cap();
            (
                format!("repository {repo} holds all its {max} sessions"),
                format!(
                    "receiver busy: repository {repo} already holds {max} sessions \
                     (max_sessions_per_repo in receiver.toml); try again later"
                ),
            )
        }
        Cap::All => {
            let max = server.config.max_sessions;
            (
                format!("all {max} sessions in use"),
                format!(
                    "receiver busy: all {max} sessions are in use (max_sessions in \
                     receiver.toml); try again later"
                ),
            )
        }
    };
    if server.refusals.count(Refusal::Busy) {
        tracing::warn!(%key, "refused: {logged}");
    }
    error(ErrorCode::Internal, text)
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
