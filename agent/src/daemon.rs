//! `coffer-agent run`: the daemon that ties watcher, scanner, scheduler and uploader together.
//!
//! Threads: the notify callback feeds an event thread that batches dirty paths into the
//! journal; a scanner thread runs startup, periodic and requested scans; a scheduler claims
//! due files and hands them to `upload_concurrency` workers; one collector records acks; a
//! control thread applies config reloads (SIGHUP or a changed config file) by watching only
//! the difference. The network side, signals and `/metrics` run on a small tokio runtime.
//! Readiness (`READY=1`) is reported to systemd once the first scan is journaled; the
//! scheduler loop pings the watchdog. SIGTERM/SIGINT stop taking work, let outstanding
//! acknowledgements arrive (with a deadline), and exit 0: pending work stays pending.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::config::{Config, Watch};
use crate::journal::{CounterKey, Journal, Known, MetaKey};
use crate::scan;
use crate::state;
use crate::upload::{self, ConnManager, Counters, Shared};
use crate::watch::{self, Change, ScanRequest, Watching};
use coffer_common::host::time::now_ms;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("another `coffer-agent run` is using state dir {0}")]
    AlreadyRunning(String),
    #[error("{0}")]
    Other(String),
}

/// Options of `run` beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOpts {
    /// Serve Prometheus metrics at this address (`/metrics`).
    pub metrics: Option<String>,
    /// Show a live progress line on a terminal.
    pub progress: bool,
}

/// Holds the state dir's run lock for the daemon's lifetime.
pub struct RunLock {
    _f: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the state dir's run lock, or says who holds it.
pub fn lock_state(cfg: &Config) -> Result<RunLock, RunError> {
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| RunError::Other(format!("creating {}: {e}", cfg.state_dir.display())))?;
    let p = cfg.state_dir.join("agent.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| RunError::Other(format!("opening {}: {e}", p.display())))?;
    // `status` probes the lock with a shared lock held for an instant (`is_running`), so
    // a held lock is tried again for a moment before it counts as another daemon's: a
    // daemon holds it for as long as it runs.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut f = f;
    loop {
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(RunLock { _f: lock }),
            Err((back, errno))
                if matches!(
                    errno,
                    nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR
                ) && Instant::now() < deadline =>
            {
                f = back;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => {
                return Err(RunError::AlreadyRunning(
                    cfg.state_dir.display().to_string(),
                ))
            }
        }
    }
}

/// True when a daemon holds the state dir's run lock.
pub fn is_running(cfg: &Config) -> bool {
    let p = cfg.state_dir.join("agent.lock");
    match std::fs::OpenOptions::new().write(true).open(&p) {
        Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_err(),
        Err(_) => false,
    }
}

fn notify_systemd(state: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(false, state);
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(cfg: Config, opts: RunOpts) -> Result<(), RunError> {
    let _lock = lock_state(&cfg)?;
    let keypair = state::load_agent_key(&cfg)?;
    let keyfile = std::fs::read(cfg.keyfile_path()).map_err(|e| {
        RunError::Other(format!(
            "reading key file {}: {e}",
            cfg.keyfile_path().display()
        ))
    })?;
    // The passphrase is read (or asked for) now; unwrapping the keys (Argon2id, a few
    // hundred ms by design) runs beside the startup scan, which needs no key: a restart with
    // nothing changed is settled as soon as the scan is.
    let pass = state::unlock_passphrase(&cfg, &keyfile, &cfg.keyfile_path())?;
    tracing::debug!("keys loaded; opening the journal");
    let mut journal = Journal::open(&cfg.journal_path())?;
    let requeued = journal.requeue_in_flight()?;
    if requeued > 0 {
        tracing::info!(files = requeued, "resuming work left from the last run");
    }
    journal.set_meta(MetaKey::AgentStartedMs, &now_ms().to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("coffer-net")
        .build()
        .map_err(|e| RunError::Other(format!("starting runtime: {e}")))?;
    let (wake_tx, wake_rx) = bounded::<()>(1);
    let sh = Arc::new(Shared {
        conn: ConnManager::new(cfg.clone(), keypair, rt.handle().clone(), keyfile.clone()),
        watches: RwLock::new(Arc::new(cfg.watches.clone())),
        current: Mutex::new(String::new()),
        cfg: cfg.clone(),
        journal: Mutex::new(journal),
        keys: std::sync::OnceLock::new(),
        shutdown: Default::default(),
        wake: wake_tx,
        counters: Counters::default(),
    });

    // Signals: TERM/INT stop, HUP reloads.
    let (reload_tx, reload_rx) = unbounded::<&'static str>();
    {
        let sh = sh.clone();
        let reload_tx = reload_tx.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => { let _ = reload_tx.send("SIGHUP"); }
                }
            }
            tracing::info!(
                "stopping: finishing outstanding commits; pending work stays in the journal"
            );
            notify_systemd(&[sd_notify::NotifyState::Stopping]);
            sh.shutdown.store(true, Ordering::SeqCst);
            let _ = sh.wake.try_send(());
        });
    }
    if let Some(addr) = &opts.metrics {
        crate::metrics::serve(&rt, sh.clone(), addr)
            .map_err(|e| RunError::Other(format!("metrics on {addr}: {e}")))?;
    }

    // Watcher, event thread, scanner.
    let (chg_tx, chg_rx) = unbounded::<Change>();
    let (scan_tx, scan_rx) = unbounded::<ScanRequest>();
    let mut watching = Watching::new(chg_tx.clone());
    let startup_left = Arc::new(AtomicUsize::new(cfg.watches.len()));
    // The startup scan's journal rows are read while the watches are added (reading them
    // takes as long as walking a large tree's folders).
    let preload = {
        let sh = sh.clone();
        let names: Vec<String> = cfg.watches.iter().map(|w| w.name.clone()).collect();
        std::thread::Builder::new()
            .name("coffer-preload".into())
            .spawn(move || {
                let mut out = HashMap::new();
                for n in names {
                    let rows = match sh.journal.lock() {
                        Ok(j) => j.known(&n),
                        Err(_) => break,
                    };
                    if let Ok(rows) = rows {
                        out.insert(n, rows);
                    }
                }
                out
            })
            .ok()
    };
    tracing::debug!("journal open; adding watches");
    apply_watches(&sh, &mut watching, &scan_tx, "startup");
    tracing::debug!("watches added");
    // Started once the watches are in place, so that the walk adding them does not share
    // the two cores with it; it then runs beside the startup scan.
    let unlocking = {
        let (keyfile, origin) = (keyfile.clone(), cfg.keyfile_path());
        std::thread::Builder::new()
            .name("coffer-unlock".into())
            .spawn(move || state::unlock_with(&keyfile, &pass, &origin))
            .map_err(|e| RunError::Other(format!("starting a thread: {e}")))?
    };
    let mut threads = Vec::new();
    {
        let (sh, scan_tx) = (sh.clone(), scan_tx.clone());
        threads.push(spawn("coffer-events", move || events(sh, chg_rx, scan_tx)));
    }
    {
        let (sh, left) = (sh.clone(), startup_left.clone());
        threads.push(spawn("coffer-scan", move || {
            scanner(sh, scan_rx, left, preload)
        }));
    }
    let fallback = Arc::new(Mutex::new(
        watching.fallback.keys().cloned().collect::<Vec<_>>(),
    ));
    {
        let (sh, scan_tx, fb) = (sh.clone(), scan_tx.clone(), fallback.clone());
        threads.push(spawn("coffer-timer", move || periodic(sh, scan_tx, fb)));
    }
    match crate::journal::Checkpointer::open(&cfg.journal_path()) {
        Ok(c) => {
            let sh = sh.clone();
            threads.push(spawn("coffer-checkpoint", move || checkpoints(sh, c)));
        }
        Err(e) => {
            tracing::warn!(error = %e, "no checkpoint thread; commits checkpoint the journal")
        }
    }
    {
        let (sh, scan_tx, fb) = (sh.clone(), scan_tx.clone(), fallback.clone());
        threads.push(spawn("coffer-control", move || {
            control(sh, watching, scan_tx, reload_rx, reload_tx, fb)
        }));
    }
    if opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let sh = sh.clone();
        threads.push(spawn("coffer-progress", move || progress(sh)));
    }

    // Uploader: once the keys are unwrapped.
    let unlocked = match unlocking.join() {
        Ok(r) => r,
        Err(_) => Err(state::StateError::Passphrase(
            "unwrapping the key file failed unexpectedly".into(),
        )),
    };
    let crypto = match unlocked {
        Ok(c) => c,
        Err(e) => {
            sh.shutdown.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
    };
    let _ = sh.keys.set(crypto);
    let (job_tx, job_rx) = bounded(1024);
    let (ack_tx, ack_rx) = bounded(16 * 1024);
    let mut workers = Vec::new();
    for n in 0..cfg.upload_concurrency {
        let (sh, jobs, acks) = (sh.clone(), job_rx.clone(), ack_tx.clone());
        workers.push(spawn(&format!("coffer-upload-{n}"), move || {
            upload::worker(sh, jobs, acks)
        }));
    }
    drop(ack_tx);
    let collector = {
        let sh = sh.clone();
        spawn("coffer-acks", move || upload::ack_collector(sh, ack_rx))
    };
    scheduler(&sh, job_tx, wake_rx);

    // Shutdown: workers stop taking files; the collector records the last acks.
    for w in workers {
        let _ = w.join();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !collector.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(chg_tx);
    drop(scan_tx);
    rt.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("stopped");
    Ok(())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    match std::thread::Builder::new().name(name.to_string()).spawn(f) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(thread = name, error = %e, "cannot start thread");
            std::process::exit(1);
        }
    }
}

/// Brings the OS watches in line with `sh.watches()`, records fallbacks, and scans what was
/// added.
fn apply_watches(
    sh: &Shared,
    watching: &mut Watching,
    scans: &Sender<ScanRequest>,
    reason: &'static str,
) {
    let ws = sh.watches();
    let (added, removed) = watching.sync(&ws);
    if let Ok(mut j) = sh.journal.lock() {
        for w in ws.iter() {
            let v = watching.fallback.get(&w.name).cloned().unwrap_or_default();
            let _ = j.set_meta(MetaKey::WatchFallback(&w.name), &v);
        }
    }
    for name in &removed {
        tracing::info!(watch = %name, "stopped watching (removed from the config)");
    }
    for name in added {
        if reason != "startup" {
            tracing::info!(watch = %name, "now watching (added to the config)");
        }
        let _ = scans.send(ScanRequest {
            watch: name,
            sub: None,
            reason,
        });
    }
}

/// Applies config reloads: on SIGHUP, or when the config file's mtime changes.
fn control(
    sh: Arc<Shared>,
    mut watching: Watching,
    scans: Sender<ScanRequest>,
    reloads: Receiver<&'static str>,
    _keep: Sender<&'static str>,
    fallback: Arc<Mutex<Vec<String>>>,
) {
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = mtime(&sh.cfg.file);
    loop {
        if sh.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let why = match reloads.recv_timeout(Duration::from_secs(2)) {
            Ok(w) => w,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                let now = mtime(&sh.cfg.file);
                if now == last {
                    continue;
                }
                "config file changed"
            }
            Err(_) => return,
        };
        last = mtime(&sh.cfg.file);
        notify_systemd(&[sd_notify::NotifyState::Reloading]);
        match Config::load(&sh.cfg.file) {
            Ok(new) => {
                let old = sh.watches();
                if same_watches(&old, &new.watches) {
                    tracing::info!(trigger = why, "config reloaded; watch list unchanged");
                } else {
                    if let Ok(mut w) = sh.watches.write() {
                        *w = Arc::new(new.watches.clone());
                    }
                    apply_watches(&sh, &mut watching, &scans, "added to the config");
                    if let Ok(mut fb) = fallback.lock() {
                        *fb = watching.fallback.keys().cloned().collect();
                    }
                    tracing::info!(
                        trigger = why,
                        watches = new.watches.len(),
                        "config reloaded; watch list updated"
                    );
                }
                let changed_other = new.receiver != sh.cfg.receiver
                    || new.receiver_key != sh.cfg.receiver_key
                    || new.state_dir != sh.cfg.state_dir
                    || new.upload_concurrency != sh.cfg.upload_concurrency;
                if changed_other {
                    tracing::warn!("receiver, state_dir and upload_concurrency changes take effect after a restart");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; keeping the running configuration")
            }
        }
        notify_systemd(&[sd_notify::NotifyState::Ready]);
    }
}

fn same_watches(a: &[Watch], b: &[Watch]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name && x.path == y.path && x.exclude_patterns == y.exclude_patterns
        })
}

/// Claims due files and feeds the workers until shutdown; pings the systemd watchdog.
fn scheduler(sh: &Arc<Shared>, jobs: Sender<crate::journal::Job>, wake: Receiver<()>) {
    let mut usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec);
    let ping_every = Duration::from_micros(usec / 2);
    let mut last_ping = Instant::now();
    loop {
        if watchdog && last_ping.elapsed() >= ping_every {
            notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            last_ping = Instant::now();
        }
        if sh.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let now = now_ms();
        let claimed = {
            let r = match sh.journal.lock() {
                Ok(mut j) => j.claim_due(now, 1024),
                Err(_) => return,
            };
            match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "reading the journal");
                    Vec::new()
                }
            }
        };
        if claimed.is_empty() {
            let next = sh
                .journal
                .lock()
                .ok()
                .and_then(|j| j.next_due().ok().flatten());
            let wait = match next {
                Some(t) if t > now => {
                    Duration::from_millis((t - now) as u64).min(Duration::from_secs(1))
                }
                Some(_) => Duration::from_millis(50),
                None => Duration::from_secs(1),
            };
            let _ = wake.recv_timeout(wait);
            continue;
        }
        for job in claimed {
            let mut job = job;
            loop {
                match jobs.send_timeout(job, Duration::from_millis(200)) {
                    Ok(()) => break,
                    Err(crossbeam_channel::SendTimeoutError::Timeout(j)) => {
                        if sh.shutdown.load(Ordering::SeqCst) {
                            return;
                        }
                        if watchdog && last_ping.elapsed() >= ping_every {
                            notify_systemd(&[sd_notify::NotifyState::Watchdog]);
                            last_ping = Instant::now();
                        }
                        job = j;
                    }
                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return,
                }
            }
        }
    }
}

/// Turns watcher events into dirty rows (and scans of new folders).
fn events(sh: Arc<Shared>, rx: Receiver<Change>, scans: Sender<ScanRequest>) {
    let debounce = sh.cfg.debounce.as_millis() as i64;
    while let Ok(first) = rx.recv() {
        let (paths, rescan) = watch::collect_batch(&rx, first, Duration::from_millis(20), 20_000);
        let watches = sh.watches();
        if let Some(rp) = rescan {
            let names: Vec<String> = watches
                .iter()
                .filter(|w| rp.is_empty() || rp.iter().any(|p| p.starts_with(&w.path)))
                .map(|w| w.name.clone())
                .collect();
            let names = if names.is_empty() {
                watches.iter().map(|w| w.name.clone()).collect()
            } else {
                names
            };
            tracing::warn!(watches = ?names, "file events were lost (queue overflow); rescanning");
            if let Ok(mut j) = sh.journal.lock() {
                let _ = j.bump(CounterKey::RescansOverflow, 1);
            }
            for n in names {
                let _ = scans.send(ScanRequest {
                    watch: n,
                    sub: None,
                    reason: "overflow",
                });
            }
        }
        let mut dirty: Vec<(Vec<u8>, String)> = Vec::with_capacity(paths.len());
        let mut seen = HashSet::new();
        let mut gone: Vec<(Vec<u8>, String)> = Vec::new();
        for p in &paths {
            let Some((w, rel)) = watch::locate(&watches, p) else {
                continue;
            };
            if rel.as_os_str().is_empty() || w.excluded(rel) {
                continue;
            }
            let jp = scan::journal_key(w, rel);
            if !seen.insert(jp.clone()) {
                continue;
            }
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => {
                    // A new or moved-in folder: scan it, its files may predate the watch.
                    let _ = scans.send(ScanRequest {
                        watch: w.name.clone(),
                        sub: Some(p.clone()),
                        reason: "new folder",
                    });
                }
                Ok(_) => dirty.push((jp, w.name.clone())),
                Err(_) => {
                    // Gone: a file, or a folder whose known files are gone with it.
                    dirty.push((jp.clone(), w.name.clone()));
                    gone.push((jp, w.name.clone()));
                }
            }
        }
        if let Ok(mut j) = sh.journal.lock() {
            for (g, name) in gone {
                if let Ok(rows) = j.rows_under(&[&g[..], b"/"].concat(), usize::MAX >> 1) {
                    dirty.extend(rows.into_iter().map(|r| (r.path, name.clone())));
                }
            }
            if let Err(e) = j.mark_dirty(&dirty, now_ms(), debounce) {
                tracing::error!(error = %e, "recording changes");
            }
        }
        let _ = sh.wake.try_send(());
    }
}

/// Runs scans one at a time; reports readiness once the startup scans are journaled.
/// Each watch's journal rows, read for its startup scan while the watches are added.
type Preloaded = HashMap<String, HashMap<Vec<u8>, Known>>;

fn scanner(
    sh: Arc<Shared>,
    rx: Receiver<ScanRequest>,
    startup_left: Arc<AtomicUsize>,
    preload: Option<std::thread::JoinHandle<Preloaded>>,
) {
    if startup_left.load(Ordering::SeqCst) == 0 {
        notify_systemd(&[sd_notify::NotifyState::Ready]);
    }
    let mut preload = preload;
    let mut preloaded: Preloaded = HashMap::new();
    while let Ok(req) = rx.recv() {
        if sh.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let watches = sh.watches();
        let Some(w) = watches.iter().find(|w| w.name == req.watch) else {
            continue;
        };
        let t = Instant::now();
        let rows = if req.reason == "startup" && req.sub.is_none() {
            if let Some(h) = preload.take() {
                preloaded = h.join().unwrap_or_default();
            }
            preloaded.remove(&w.name)
        } else {
            None
        };
        match scan::scan(w, req.sub.as_deref(), &sh.journal, 0, rows) {
            Ok(s) => {
                tracing::info!(watch = %w.name, reason = req.reason, files = s.files, changed = s.changed,
                    deleted = s.deleted, skipped = s.skipped_special, errors = s.errors,
                    ms = t.elapsed().as_millis() as u64, "scan done");
                if let Ok(mut j) = sh.journal.lock() {
                    if req.sub.is_none() {
                        let _ = j.bump(CounterKey::Scans, 1);
                        let _ = j.set_meta(MetaKey::LastScanMs(&w.name), &now_ms().to_string());
                    }
                }
            }
            Err(e) => tracing::error!(watch = %w.name, error = %e, "scan failed"),
        }
        if req.reason == "startup"
            && req.sub.is_none()
            && startup_left.fetch_sub(1, Ordering::SeqCst) == 1
        {
            tracing::info!("first scan journaled; ready");
            notify_systemd(&[sd_notify::NotifyState::Ready]);
        }
        let _ = sh.wake.try_send(());
    }
}

/// Periodic full rescans (more often for trees without OS watches).
fn periodic(sh: Arc<Shared>, scans: Sender<ScanRequest>, fallback: Arc<Mutex<Vec<String>>>) {
    let full = sh.cfg.rescan_interval;
    let fast = full.min(Duration::from_secs(10));
    let mut last_full = Instant::now();
    let mut last_fast = Instant::now();
    while !sh.shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        sh.conn.close_idle_query();
        if last_full.elapsed() >= full {
            last_full = Instant::now();
            for w in sh.watches().iter() {
                let _ = scans.send(ScanRequest {
                    watch: w.name.clone(),
                    sub: None,
                    reason: "periodic",
                });
            }
        }
        if last_fast.elapsed() >= fast {
            last_fast = Instant::now();
            let names = fallback.lock().map(|f| f.clone()).unwrap_or_default();
            for n in names {
                let _ = scans.send(ScanRequest {
                    watch: n,
                    sub: None,
                    reason: "no OS watch",
                });
            }
        }
    }
}

/// WAL bytes after which the checkpoint thread copies the journal's WAL into the database.
const CHECKPOINT_WAL_BYTES: u64 = 64 << 20;

/// Checkpoints the journal off the writers' path (see [`crate::journal::Checkpointer`]).
fn checkpoints(sh: Arc<Shared>, c: crate::journal::Checkpointer) {
    while !sh.shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        match c.maybe_run(CHECKPOINT_WAL_BYTES) {
            Ok(Some((frames, done))) => tracing::debug!(
                frames,
                done,
                ms = t.elapsed().as_millis() as u64,
                "journal checkpointed"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "checkpointing the journal failed; will retry");
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    }
}

/// A live progress line on a terminal: pending files and bytes, rate, current file.
fn progress(sh: Arc<Shared>) {
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(st) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
        bar.set_style(st);
    }
    let mut last_bytes = 0u64;
    let mut last = Instant::now();
    while !sh.shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(500));
        let s = sh.journal.lock().ok().and_then(|j| j.summary().ok());
        let bytes = sh.counters.bytes_read.load(Ordering::Relaxed);
        let rate = (bytes - last_bytes) as f64 / last.elapsed().as_secs_f64().max(0.001);
        last_bytes = bytes;
        last = Instant::now();
        let cur = sh.current.lock().map(|c| c.clone()).unwrap_or_default();
        if let Some(s) = s {
            let pending = s.pending();
            bar.set_message(if pending == 0 {
                format!("all {} files backed up; watching", s.backed_up)
            } else {
                format!(
                    "{pending} files pending ({:.1} MiB), {:.1} MiB/s, {cur}",
                    s.pending_bytes as f64 / 1048576.0,
                    rate / 1048576.0
                )
            });
        }
        bar.tick();
    }
    bar.finish_and_clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> Config {
        let p = dir.join("agent.toml");
        std::fs::write(
            &p,
            format!(
                "receiver = \"127.0.0.1:1\"\nreceiver_key = \"{}\"\nstate_dir = \"{}\"\n",
                "A".repeat(43),
                dir.join("state").display()
            ),
        )
        .expect("write config");
        Config::load(&p).expect("config")
    }

    #[test]
    fn a_status_probe_does_not_stop_the_daemon_from_starting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        std::fs::create_dir_all(&cfg.state_dir).expect("state dir");
        // What `status` does for an instant (`is_running`), held here for 200 ms.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(cfg.state_dir.join("agent.lock"))
            .expect("open");
        let probe = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock)
            .map_err(|(_, e)| e)
            .expect("shared lock");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(probe);
        });
        let lock = lock_state(&cfg).expect("the daemon starts once the probe is gone");
        release.join().expect("join");
        // A daemon that holds the lock still keeps a second one out.
        assert!(matches!(lock_state(&cfg), Err(RunError::AlreadyRunning(_))));
        assert!(is_running(&cfg));
        drop(lock);
        assert!(!is_running(&cfg));
    }
}
