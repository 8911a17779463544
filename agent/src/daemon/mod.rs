//! `coffer-agent run`: the daemon that ties watcher, scanner, scheduler and uploader together.
//!
//! Threads: the notify callback feeds an event thread that batches dirty paths into the
//! journal; a scanner thread runs startup, periodic and requested scans; a scheduler claims
//! due files into a fresh and a backlog queue for the fresh lane's worker and
//! `upload_concurrency` shared workers; a collector per class records acks; a
//! control thread applies config reloads (SIGHUP or a changed config file) by watching only
//! the difference. The network side, signals and `/metrics` run on a small tokio runtime.
//! Readiness (`READY=1`) is reported to systemd once the first scan is journaled; the
//! scheduler loop pings the watchdog. SIGTERM/SIGINT stop taking work, let outstanding
//! acknowledgements arrive (with a deadline), and exit 0: pending work stays pending.
//!
//! This file holds `run` and its steps, the run lock and the errors that stop the daemon;
//! `shared.rs` the state the threads share ([`Daemon`]), `shutdown.rs` the one signal they
//! all stop on ([`Shutdown`]), `threads.rs` their loops (the uploader's are in
//! [`crate::upload`]).

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coffer_common::channel::StaticKeypair;
use coffer_common::host::fs::{Context as _, IoError};
use coffer_common::host::lock::{self, Lock, LockError, Wait};
use coffer_common::host::time::now_ms;
use coffer_common::keys::Passphrase;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::config::Config;
use crate::journal::{Class, Job, Journal, MetaKey};
use crate::state;
use crate::upload;
use crate::watch::{Change, ScanRequest, Watching};

mod shared;
mod shutdown;
mod threads;

pub use shared::{Counters, Daemon};
pub use shutdown::Shutdown;
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
    state::create_state_dir(&cfg.state_dir)?;
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

/// How often a running daemon records that it runs, and whether its receiver connection is
/// up ([`MetaKey::AgentSeenMs`], [`MetaKey::ReceiverConnectedMs`]): what a stopped agent's
/// `status` reports as the last time it watched and was connected.
pub const HEARTBEAT: Duration = Duration::from_secs(30);

/// Records that the daemon runs now, and that its receiver is connected if it is.
fn heartbeat(sh: &Daemon) {
    let now = now_ms().to_string();
    let connected = sh.conn.is_connected();
    sh.journal(|j| {
        j.set_meta(MetaKey::AgentSeenMs, &now)?;
        if connected {
            j.set_meta(MetaKey::ReceiverConnectedMs, &now)?;
        }
        Ok(())
    });
}

pub(crate) fn notify_systemd(state: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(false, state);
}

/// Runs the daemon until SIGTERM/SIGINT (or a fatal error). Every thread it starts is
/// stopped and joined before it returns.
pub fn run(cfg: Config, opts: RunOpts) -> Result<(), RunError> {
    let _lock = lock_state(&cfg)?;
    crate::rate::global().set(cfg.upload_limit, cfg.download_limit);
    let keys = read_keys(&cfg)?;
    let journal = open_journal(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("coffer-net")
        .build()
        .map_err(RunError::Runtime)?;
    let (sh, woken) = Daemon::new(
        cfg,
        journal,
        keys.keypair,
        keys.keyfile.clone(),
        rt.handle().clone(),
    );
    let mut threads = Threads::default();
    let served = serve(
        &sh,
        &rt,
        &opts,
        keys.keyfile,
        keys.pass,
        woken,
        &mut threads,
    );
    stop(&sh, threads);
    rt.shutdown_timeout(Duration::from_secs(1));
    if served.is_ok() {
        tracing::info!("stopped");
    }
    served
}

/// What `run` reads before it starts: the agent's key, the wrapped master key and the
/// passphrase.
struct StartKeys {
    keypair: StaticKeypair,
    keyfile: Vec<u8>,
    pass: Passphrase,
}

/// Reads the keys and the passphrase (asking for it now, on a terminal). Unwrapping the
/// master key (Argon2id, slow by design) waits: it runs beside the startup scan, which
/// needs no key, so a restart with nothing changed is settled as soon as the scan is.
fn read_keys(cfg: &Config) -> Result<StartKeys, RunError> {
    let keypair = state::load_agent_key(cfg)?;
    let path = cfg.keyfile_path();
    let keyfile = std::fs::read(&path).ctx("reading key file", &path)?;
    let pass = state::unlock_passphrase(cfg, &keyfile, &path)?;
    tracing::debug!("keys loaded; opening the journal");
    Ok(StartKeys {
        keypair,
        keyfile,
        pass,
    })
}

/// Opens the journal and hands back the files the last run left in flight.
fn open_journal(cfg: &Config) -> Result<Journal, RunError> {
    let mut journal = Journal::open(&cfg.journal_path())?;
    let requeued = journal.requeue_in_flight()?;
    if requeued > 0 {
        tracing::info!(files = requeued, "resuming work left from the last run");
    }
    journal.set_meta(MetaKey::AgentStartedMs, &now_ms().to_string())?;
    Ok(journal)
}

/// Starts everything and runs the scheduler on this thread until the daemon stops.
fn serve(
    sh: &Arc<Daemon>,
    rt: &tokio::runtime::Runtime,
    opts: &RunOpts,
    keyfile: Vec<u8>,
    pass: Passphrase,
    woken: Receiver<()>,
    threads: &mut Threads,
) -> Result<(), RunError> {
    let reloads = listen_for_signals(rt, sh);
    if let Some(addr) = &opts.metrics {
        crate::metrics::serve(rt, sh.clone(), addr).map_err(|source| RunError::Metrics {
            addr: addr.clone(),
            source,
        })?;
    }
    start_watching(sh, reloads, opts.progress, threads)?;
    // Started once the watches are in place, so that the walk adding them does not share
    // the two cores with it; it then runs beside the startup scan.
    let origin = sh.cfg.keyfile_path();
    // The receiver is connected to while the key is unlocked and the startup scan runs, so
    // the handshake's round trips are not in the first upload's way (a far receiver).
    let d = sh.clone();
    threads.start("coffer-connect", move || {
        let _ = d.conn.get(&d);
    })?;
    let unlocking = std::thread::Builder::new()
        .name("coffer-unlock".into())
        .spawn(move || state::unlock_with(&keyfile, &pass, &origin))
        .map_err(|source| RunError::Thread {
            name: "coffer-unlock".into(),
            source,
        })?;
    let crypto = match unlocking.join() {
        Ok(unlocked) => unlocked?,
        Err(_) => return Err(RunError::Unlock),
    };
    let _ = sh.keys.set(crypto);
    let jobs = start_uploader(sh, threads)?;
    scheduler(sh, jobs, woken);
    Ok(())
}

/// Handles signals on the runtime: SIGTERM/SIGINT stop the daemon, SIGHUP asks for a
/// reload. Returns the reload channel (both ends: the control thread keeps the sender).
fn listen_for_signals(rt: &tokio::runtime::Runtime, sh: &Arc<Daemon>) -> Reloads {
    let (reload_tx, reload_rx) = unbounded::<&'static str>();
    let (sh, tx) = (sh.clone(), reload_tx.clone());
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
                _ = hup.recv() => { let _ = tx.send("SIGHUP"); }
                _ = sh.shutdown.stopped() => return,
            }
        }
        tracing::info!(
            "stopping: finishing outstanding commits; pending work stays in the journal"
        );
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        sh.shutdown.stop();
    });
    (reload_tx, reload_rx)
}

/// The reload channel: SIGHUP is sent on it, the control thread receives.
type Reloads = (Sender<&'static str>, Receiver<&'static str>);

/// Adds the OS watches and starts the threads that turn changes into due files: events,
/// scanner (the startup scans first), timer, checkpointer, control, progress line.
fn start_watching(
    sh: &Arc<Daemon>,
    (reload_tx, reload_rx): Reloads,
    progress_line: bool,
    threads: &mut Threads,
) -> Result<(), RunError> {
    let (chg_tx, chg_rx) = unbounded::<Change>();
    let (scan_tx, scan_rx) = unbounded::<ScanRequest>();
    let mut watching = Watching::new(chg_tx);
    let startup_left = Arc::new(AtomicUsize::new(sh.cfg.watches.len()));
    tracing::debug!("journal open; adding watches");
    apply_watches(sh, &mut watching, &scan_tx, "startup");
    tracing::debug!("watches added");
    let (d, scans) = (sh.clone(), scan_tx.clone());
    threads.start("coffer-events", move || events(d, chg_rx, scans))?;
    let d = sh.clone();
    threads.start("coffer-scan", move || scanner(d, scan_rx, startup_left))?;
    let fallback = Arc::new(Mutex::new(
        watching.fallback.keys().cloned().collect::<Vec<_>>(),
    ));
    let (d, scans, fb) = (sh.clone(), scan_tx.clone(), fallback.clone());
    threads.start("coffer-timer", move || periodic(d, scans, fb))?;
    match crate::journal::Checkpointer::open(&sh.cfg.journal_path()) {
        Ok(c) => {
            let d = sh.clone();
            threads.start("coffer-checkpoint", move || checkpoints(d, c))?;
        }
        Err(e) => {
            tracing::warn!(error = %e, "no checkpoint thread; commits checkpoint the journal")
        }
    }
    let d = sh.clone();
    threads.start("coffer-control", move || {
        control(d, watching, scan_tx, reload_rx, reload_tx, fallback)
    })?;
    if progress_line && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let d = sh.clone();
        threads.start("coffer-progress", move || progress(d))?;
    }
    Ok(())
}

/// The scheduler's ends of the workers' queues, one per class.
pub(super) struct JobQueues {
    pub fresh: Sender<Job>,
    pub backlog: Sender<Job>,
    /// The backlog's large files taken ahead of their turn; `None` with one shared worker.
    pub large: Option<Sender<Job>>,
}

/// Jobs of each class waiting for a worker at most: the scheduler claims only as many
/// as there is room for, so a fresh change waits behind at most [`FRESH_QUEUE`] others.
const FRESH_QUEUE: usize = 256;
const BACKLOG_QUEUE: usize = 1024;

/// Starts the upload workers (the fresh lane's and `upload_concurrency` others) and an ack
/// collector per class; returns the workers' job queues.
fn start_uploader(sh: &Arc<Daemon>, threads: &mut Threads) -> Result<JobQueues, RunError> {
    let (fresh_tx, fresh_rx) = bounded(FRESH_QUEUE);
    let (backlog_tx, backlog_rx) = bounded(BACKLOG_QUEUE);
    let (large_tx, large_rx) = bounded(1);
    let queues = upload::Queues {
        fresh: fresh_rx,
        backlog: backlog_rx,
        large: large_rx,
    };
    // With two shared workers or more, the first starts the backlog's large files early.
    let n = sh.cfg.upload_concurrency;
    let (fresh_ack_tx, fresh_ack_rx) = bounded(16 * 1024);
    let (ack_tx, ack_rx) = bounded(16 * 1024);
    let acks = upload::AckQueues {
        fresh: fresh_ack_tx,
        backlog: ack_tx,
    };
    let lanes =
        std::iter::once(("coffer-fresh".to_string(), upload::Lane::Fresh)).chain((0..n).map(|i| {
            let lane = if i == 0 && n >= 2 {
                upload::Lane::Large
            } else {
                upload::Lane::Any
            };
            (format!("coffer-upload-{i}"), lane)
        }));
    for (name, lane) in lanes {
        let (d, q, acks) = (sh.clone(), queues.clone(), acks.clone());
        let worker = spawn(name, move || upload::worker(d, q, lane, acks))?;
        threads.workers.push(worker);
    }
    drop(acks);
    for (name, rx, class) in [
        ("coffer-acks", ack_rx, Class::Backlog),
        ("coffer-acks-fresh", fresh_ack_rx, Class::Fresh),
    ] {
        let d = sh.clone();
        threads.collectors.push(spawn(name.into(), move || {
            upload::ack_collector(d, rx, class)
        })?);
    }
    Ok(JobQueues {
        fresh: fresh_tx,
        backlog: backlog_tx,
        large: (n >= 2).then_some(large_tx),
    })
}

/// How long a stop waits for the workers to finish, and then for outstanding
/// acknowledgements to arrive.
const ACK_DRAIN: Duration = Duration::from_secs(10);

/// The daemon's threads, each joined before `run` returns.
#[derive(Default)]
struct Threads {
    /// Events, scanner, timer, checkpointer, control, progress line.
    background: Vec<JoinHandle<()>>,
    /// The upload workers and the ack collector, given [`ACK_DRAIN`] each to finish.
    workers: Vec<JoinHandle<()>>,
    collectors: Vec<JoinHandle<()>>,
}

impl Threads {
    /// Starts a background thread.
    fn start(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), RunError> {
        self.background.push(spawn(name.to_string(), f)?);
        Ok(())
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, RunError> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|source| RunError::Thread { name, source })
}

/// Stops the daemon and joins every thread:
/// 1. The shutdown signal: nothing new is taken; every loop and wait sees it.
/// 2. The workers finish the file in hand; the collector records the acknowledgements that
///    arrive (at most [`ACK_DRAIN`] for each).
/// 3. Past that, what still waits for the receiver is given up on: its connections are
///    closed, so every such wait returns. Unacknowledged files stay in flight; the next
///    start requeues them. Pending work stays pending.
/// 4. Every thread is joined.
fn stop(sh: &Daemon, threads: Threads) {
    // The last moment it watched and (if it was) was connected, for `status` once stopped.
    heartbeat(sh);
    sh.shutdown.stop();
    let answered = finished_by(&threads.workers, Instant::now() + ACK_DRAIN)
        && finished_by(&threads.collectors, Instant::now() + ACK_DRAIN);
    if !answered {
        tracing::warn!(
            "the receiver did not answer in time; unacknowledged files are sent again at the next start"
        );
        sh.shutdown.give_up();
        sh.conn.close("the agent is stopping");
    }
    let Threads {
        background,
        workers,
        collectors,
    } = threads;
    for t in workers.into_iter().chain(collectors).chain(background) {
        let _ = t.join();
    }
}

/// Waits until every thread of `threads` has finished, or `deadline`; true if they have.
fn finished_by(threads: &[JoinHandle<()>], deadline: Instant) -> bool {
    loop {
        if threads.iter().all(JoinHandle::is_finished) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> Config {
        Config::for_test(dir)
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

    /// The permission bits of `p` in octal (`None`: it does not exist).
    fn mode_of(p: &std::path::Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(p).ok()?.permissions().mode();
        Some(format!("{:04o}", m & 0o7777))
    }

    /// Other local users can read neither the state dir nor the journal (every path backed
    /// up, and a hash of every file's content), whatever the umask: a new state dir is made
    /// 0700 and the journal's files 0600; looser ones are tightened.
    #[test]
    fn the_state_dir_and_the_journal_are_private_with_umask_022() {
        use nix::sys::stat::{umask, Mode};
        use std::os::unix::fs::PermissionsExt;
        let old = umask(Mode::from_bits_truncate(0o022));
        let files = |cfg: &Config| {
            let j = cfg.journal_path();
            let side = |s: &str| {
                let mut p = j.clone().into_os_string();
                p.push(s);
                PathBuf::from(p)
            };
            [j.clone(), side("-wal"), side("-shm")]
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        let lock = lock_state(&cfg).expect("lock");
        let journal = open_journal(&cfg).expect("journal");
        assert_eq!(
            mode_of(&cfg.state_dir),
            Some("0700".into()),
            "new state dir"
        );
        for f in files(&cfg) {
            assert_eq!(mode_of(&f), Some("0600".into()), "new {}", f.display());
        }
        drop((journal, lock));

        // A state dir and a journal made loose (by an older agent, or by hand) are tightened,
        // the -wal and -shm files of an open journal included.
        let dir2 = tempfile::tempdir().expect("tempdir");
        let cfg2 = config(dir2.path());
        std::fs::create_dir(&cfg2.state_dir).expect("state dir");
        let first = crate::journal::Journal::open(&cfg2.journal_path()).expect("journal");
        let loose = |p: &std::path::Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
        };
        loose(&cfg2.state_dir, 0o755);
        for f in files(&cfg2) {
            loose(&f, 0o644);
        }
        let lock = lock_state(&cfg2).expect("lock");
        let second = open_journal(&cfg2).expect("journal");
        assert_eq!(
            mode_of(&cfg2.state_dir),
            Some("0700".into()),
            "tightened state dir"
        );
        for f in files(&cfg2) {
            assert_eq!(
                mode_of(&f),
                Some("0600".into()),
                "tightened {}",
                f.display()
            );
        }
        drop((second, first, lock));
        umask(old);
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
