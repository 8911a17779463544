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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded};

use crate::config::Config;
use crate::conn::ConnManager;
use crate::journal::Journal;
use crate::state;
use crate::upload;
use crate::watch::{Change, ScanRequest, Watching};
use coffer_common::host::fs::{self as hostfs, Context as _, IoError};
use coffer_common::host::lock::{self, Lock, LockError, Wait};
use coffer_common::host::time::now_ms;

mod shared;
mod threads;

pub use shared::{Counters, Daemon};
use threads::{
    apply_watches, checkpoints, control, events, periodic, progress, scanner, scheduler,
};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("another `coffer-agent run` is using state dir {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("starting runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("metrics on {addr}: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("starting thread {name}: {source}")]
    Thread {
        name: String,
        source: std::io::Error,
    },
    /// The thread unwrapping the key file ended without an answer (it panicked).
    #[error("the key unwrapping thread failed")]
    Unlock,
}

/// Options of `run` beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOpts {
    /// Serve Prometheus metrics at this address (`/metrics`).
    pub metrics: Option<String>,
    /// Show a live progress line on a terminal.
    pub progress: bool,
}

/// How long a run lock held by someone else is tried again before it counts as another
/// daemon's: `status` probes it with a shared lock held for an instant.
const RUN_LOCK_WAIT: Duration = Duration::from_secs(2);

fn run_lock_path(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("agent.lock")
}

/// Takes the state dir's run lock (held until dropped, for the daemon's lifetime), or says
/// who holds it. A lock file that cannot be opened or locked is an I/O error, not another
/// daemon.
pub fn lock_state(cfg: &Config) -> Result<Lock, RunError> {
    hostfs::create_dir_all(&cfg.state_dir, state::STATE_DIR_MODE)?;
    Lock::exclusive(&run_lock_path(cfg), Wait::For(RUN_LOCK_WAIT)).map_err(|e| match e {
        LockError::Held { .. } => RunError::AlreadyRunning(cfg.state_dir.clone()),
        LockError::Io(e) => RunError::Io(e),
    })
}

/// True when a daemon holds the state dir's run lock. A probe that fails (the lock file
/// cannot be opened) is logged and answered `false`, as a missing lock file is.
pub fn is_running(cfg: &Config) -> bool {
    match lock::is_held(&run_lock_path(cfg)) {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether `coffer-agent run` is running");
            false
        }
    }
}

pub(crate) fn notify_systemd(state: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(false, state);
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(cfg: Config, opts: RunOpts) -> Result<(), RunError> {
    let _lock = lock_state(&cfg)?;
    let keypair = state::load_agent_key(&cfg)?;
    let keyfile = std::fs::read(cfg.keyfile_path()).ctx("reading key file", &cfg.keyfile_path())?;
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
    journal.set_meta("agent_started_ms", &now_ms().to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("coffer-net")
        .build()
        .map_err(RunError::Runtime)?;
    let (wake_tx, wake_rx) = bounded::<()>(1);
    let sh = Arc::new(Daemon {
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
        crate::metrics::serve(&rt, sh.clone(), addr).map_err(|source| RunError::Metrics {
            addr: addr.clone(),
            source,
        })?;
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
            .map_err(|source| RunError::Thread {
                name: "coffer-unlock".into(),
                source,
            })?
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
        Ok(r) => r.map_err(RunError::from),
        Err(_) => Err(RunError::Unlock),
    };
    let crypto = match unlocked {
        Ok(c) => c,
        Err(e) => {
            sh.shutdown.store(true, Ordering::SeqCst);
            return Err(e);
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

    #[test]
    fn a_lock_file_that_cannot_be_opened_is_not_another_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        // A folder where the lock file should be: opening it for writing fails.
        std::fs::create_dir_all(run_lock_path(&cfg)).expect("folder");
        let e = match lock_state(&cfg) {
            Err(e) => e,
            Ok(_) => panic!("a folder was locked as the run lock"),
        };
        let text = e.to_string();
        assert!(matches!(e, RunError::Io(_)), "{text}");
        assert!(text.contains("agent.lock"), "{text}");
        assert!(!text.contains("another"), "{text}");
    }

    #[test]
    fn a_state_dir_that_cannot_be_made_is_not_another_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        std::fs::write(&cfg.state_dir, b"a file, not a folder").expect("blocker");
        let e = match lock_state(&cfg) {
            Err(e) => e,
            Ok(_) => panic!("locked inside a file"),
        };
        assert!(matches!(e, RunError::Io(_)), "{e}");
        assert!(!e.to_string().contains("another"), "{e}");
    }
}
