//! `coffer-agent run`: the daemon that ties watcher, scanner, scheduler and uploader together.
//!
//! Threads: the notify callback feeds an event thread that batches dirty paths into the
//! journal; a scanner thread runs startup, periodic and requested scans; a scheduler claims
//! due files and hands them to `upload_concurrency` workers; one collector records acks. The
//! network side runs on a small tokio runtime. SIGTERM/SIGINT stop taking work, let the
//! outstanding acknowledgements arrive (with a deadline), and exit 0: pending work stays
//! pending in the journal.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::config::Config;
use crate::journal::{now_ms, Journal};
use crate::scan;
use crate::state;
use crate::upload::{self, ConnManager, Counters, Shared};
use crate::watch::{self, Change, ScanRequest};

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
    let f = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| RunError::AlreadyRunning(cfg.state_dir.display().to_string()))?;
    Ok(RunLock { _f: f })
}

/// True when a daemon holds the state dir's run lock.
pub fn is_running(cfg: &Config) -> bool {
    let p = cfg.state_dir.join("agent.lock");
    match std::fs::OpenOptions::new().write(true).open(&p) {
        Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_err(),
        Err(_) => false,
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(cfg: Config) -> Result<(), RunError> {
    let _lock = lock_state(&cfg)?;
    let keypair = state::load_agent_key(&cfg)?;
    let keyfile = std::fs::read(cfg.keyfile_path()).map_err(|e| {
        RunError::Other(format!(
            "reading key file {}: {e}",
            cfg.keyfile_path().display()
        ))
    })?;
    let crypto = state::unlock_bytes(&cfg, &keyfile, &cfg.keyfile_path())?;
    let mut journal = Journal::open(&cfg.journal_path())?;
    let requeued = journal.requeue_in_flight()?;
    if requeued > 0 {
        tracing::info!(files = requeued, "resuming work left from the last run");
    }
    journal.set_meta("agent_started_ms", &now_ms().to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("coffer-net")
        .build()
        .map_err(|e| RunError::Other(format!("starting runtime: {e}")))?;
    let (wake_tx, wake_rx) = bounded::<()>(1);
    let sh = Arc::new(Shared {
        conn: ConnManager::new(cfg.clone(), keypair, rt.handle().clone(), keyfile),
        cfg: cfg.clone(),
        journal: Mutex::new(journal),
        crypto,
        busy: Mutex::new(HashSet::new()),
        shutdown: Default::default(),
        wake: wake_tx,
        counters: Counters::default(),
    });

    // Signals.
    {
        let sh = sh.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!(
                "stopping: finishing outstanding commits; pending work stays in the journal"
            );
            sh.shutdown.store(true, Ordering::SeqCst);
            let _ = sh.wake.try_send(());
        });
    }

    // Watcher and event thread.
    let (chg_tx, chg_rx) = unbounded::<Change>();
    let (scan_tx, scan_rx) = unbounded::<ScanRequest>();
    let watching = watch::start(&cfg.watches, chg_tx.clone());
    let fallback: Vec<usize> = watching.fallback.iter().map(|(i, _)| *i).collect();
    if let Ok(mut j) = sh.journal.lock() {
        for (i, w) in cfg.watches.iter().enumerate() {
            let v = watching
                .fallback
                .iter()
                .find(|(k, _)| *k == i)
                .map(|(_, r)| r.clone())
                .unwrap_or_default();
            let _ = j.set_meta(&format!("watch_fallback:{}", w.name), &v);
        }
    }
    let mut threads = Vec::new();
    {
        let sh = sh.clone();
        let scan_tx = scan_tx.clone();
        threads.push(spawn("coffer-events", move || events(sh, chg_rx, scan_tx)));
    }
    // Startup scan of every tree, then periodic ones.
    for i in 0..cfg.watches.len() {
        let _ = scan_tx.send(ScanRequest {
            watch: i,
            sub: None,
            reason: "startup",
        });
    }
    {
        let sh = sh.clone();
        threads.push(spawn("coffer-scan", move || scanner(sh, scan_rx)));
    }
    {
        let sh = sh.clone();
        let scan_tx = scan_tx.clone();
        threads.push(spawn("coffer-timer", move || {
            periodic(sh, scan_tx, fallback)
        }));
    }

    // Uploader.
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
    drop(watching);
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

/// Claims due files and feeds the workers until shutdown.
fn scheduler(sh: &Arc<Shared>, jobs: Sender<crate::journal::Job>, wake: Receiver<()>) {
    loop {
        if sh.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let now = now_ms();
        let claimed = {
            let busy = match sh.busy.lock() {
                Ok(b) => b,
                Err(_) => return,
            };
            let r = match sh.journal.lock() {
                Ok(j) => j.claim_due(now, 256, &busy),
                Err(_) => return,
            };
            drop(busy);
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
        if let Ok(mut b) = sh.busy.lock() {
            for j in &claimed {
                b.insert(j.path.clone());
            }
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
        let (paths, reqs) = watch::collect_batch(&rx, first, Duration::from_millis(20), 20_000);
        for r in reqs {
            if r.reason == "overflow" {
                if let Ok(mut j) = sh.journal.lock() {
                    let _ = j.bump("rescans_overflow", 1);
                }
            }
            let _ = scans.send(r);
        }
        let mut dirty: Vec<(Vec<u8>, String)> = Vec::with_capacity(paths.len());
        let mut seen = HashSet::new();
        let mut gone_dirs: Vec<Vec<u8>> = Vec::new();
        for p in &paths {
            let Some((wi, rel)) = watch::locate(&sh.cfg.watches, p) else {
                continue;
            };
            let w = &sh.cfg.watches[wi];
            if rel.as_os_str().is_empty() || w.excluded(rel) {
                continue;
            }
            let jp = scan::journal_path(w, rel);
            if !seen.insert(jp.clone()) {
                continue;
            }
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => {
                    // A new or moved-in folder: scan it, its files may predate the watch.
                    let _ = scans.send(ScanRequest {
                        watch: wi,
                        sub: Some(p.clone()),
                        reason: "new folder",
                    });
                }
                Ok(_) => dirty.push((jp, w.name.clone())),
                Err(_) => {
                    // Gone: a file, or a folder whose known files are gone with it.
                    dirty.push((jp.clone(), w.name.clone()));
                    gone_dirs.push(jp);
                }
            }
        }
        if let Ok(mut j) = sh.journal.lock() {
            for g in gone_dirs {
                if let Ok(rows) = j.rows_under(&[&g[..], b"/"].concat(), usize::MAX >> 1) {
                    let name =
                        String::from_utf8_lossy(g.split(|&b| b == b'/').next().unwrap_or(b""))
                            .into_owned();
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

/// Runs scans one at a time.
fn scanner(sh: Arc<Shared>, rx: Receiver<ScanRequest>) {
    while let Ok(req) = rx.recv() {
        if sh.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let Some(w) = sh.cfg.watches.get(req.watch) else {
            continue;
        };
        let t = Instant::now();
        match scan::scan(w, req.sub.as_deref(), &sh.journal, 0) {
            Ok(s) => {
                tracing::info!(watch = %w.name, reason = req.reason, files = s.files, changed = s.changed,
                    deleted = s.deleted, skipped = s.skipped_special, errors = s.errors,
                    ms = t.elapsed().as_millis() as u64, "scan done");
                if let Ok(mut j) = sh.journal.lock() {
                    if req.sub.is_none() {
                        let _ = j.bump("scans", 1);
                        let _ =
                            j.set_meta(&format!("last_scan_ms:{}", w.name), &now_ms().to_string());
                    }
                }
            }
            Err(e) => tracing::error!(watch = %w.name, error = %e, "scan failed"),
        }
        let _ = sh.wake.try_send(());
    }
}

/// Periodic full rescans (more often for trees without OS watches).
fn periodic(sh: Arc<Shared>, scans: Sender<ScanRequest>, fallback: Vec<usize>) {
    let full = sh.cfg.rescan_interval;
    let fast = full.min(Duration::from_secs(10));
    let mut last_full = Instant::now();
    let mut last_fast = Instant::now();
    while !sh.shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        if last_full.elapsed() >= full {
            last_full = Instant::now();
            for i in 0..sh.cfg.watches.len() {
                let _ = scans.send(ScanRequest {
                    watch: i,
                    sub: None,
                    reason: "periodic",
                });
            }
        }
        if !fallback.is_empty() && last_fast.elapsed() >= fast {
            last_fast = Instant::now();
            for &i in &fallback {
                let _ = scans.send(ScanRequest {
                    watch: i,
                    sub: None,
                    reason: "no OS watch",
                });
            }
        }
    }
}
