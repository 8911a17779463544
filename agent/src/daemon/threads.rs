//! The daemon's long-lived threads besides the uploader's: the event thread, the scanner,
//! the timer of periodic scans, the control thread (config reloads), the journal's
//! checkpointer, the progress line, and the scheduler that feeds the workers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use super::{notify_systemd, Daemon, JobQueues};
use crate::config::{Config, Watch};
use crate::journal::{Class, CounterKey, Job, MetaKey};
use crate::scan;
use crate::watch::{self, Change, ScanRequest, Watching};
use coffer_common::host::time::now_ms;

/// Brings the OS watches in line with `sh.watches()`, records fallbacks, and scans what was
/// added.
pub(super) fn apply_watches(
    sh: &Daemon,
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
pub(super) fn control(
    sh: Arc<Daemon>,
    mut watching: Watching,
    scans: Sender<ScanRequest>,
    reloads: Receiver<&'static str>,
    _keep: Sender<&'static str>,
    fallback: Arc<Mutex<Vec<String>>>,
) {
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = mtime(&sh.cfg.file);
    let mut suspended = HashSet::new();
    loop {
        poll_availability(&sh, &mut watching, &scans, &fallback, &mut suspended);
        let why = select! {
            recv(reloads) -> w => match w {
                Ok(w) => w,
                Err(_) => return,
            },
            recv(sh.shutdown.signal()) -> _ => return,
            default(crate::avail::POLL) => {
                let now = mtime(&sh.cfg.file);
                if now == last {
                    continue;
                }
                "config file changed"
            }
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
                crate::rate::global().set(new.upload_limit, new.download_limit);
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

/// Looks at every watch's root ([`crate::avail`]): an unavailable watch loses its OS watch
/// (`suspended`); one that is back is watched again and rescanned, without a restart.
fn poll_availability(
    sh: &Daemon,
    watching: &mut Watching,
    scans: &Sender<ScanRequest>,
    fallback: &Mutex<Vec<String>>,
    suspended: &mut HashSet<String>,
) {
    let ws = sh.watches();
    let mut changed = false;
    for w in ws.iter() {
        let up = sh.avail.available(w, &sh.journal);
        if !up && suspended.insert(w.name.clone()) {
            watching.suspend(&w.name);
            changed = true;
        } else if up && suspended.remove(&w.name) {
            watching.resume(w);
            changed = true;
            let _ = scans.send(ScanRequest {
                watch: w.name.clone(),
                sub: None,
                reason: "available again",
            });
        }
    }
    suspended.retain(|n| ws.iter().any(|w| &w.name == n));
    if changed {
        if let Ok(mut j) = sh.journal.lock() {
            for w in ws.iter() {
                let v = if suspended.contains(&w.name) {
                    String::new()
                } else {
                    watching.fallback.get(&w.name).cloned().unwrap_or_default()
                };
                let _ = j.set_meta(MetaKey::WatchFallback(&w.name), &v);
            }
        }
        if let Ok(mut fb) = fallback.lock() {
            *fb = watching
                .fallback
                .keys()
                .filter(|n| !suspended.contains(*n))
                .cloned()
                .collect();
        }
    }
}

fn same_watches(a: &[Watch], b: &[Watch]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name && x.path == y.path && x.exclude_patterns == y.exclude_patterns
        })
}

/// Claims due files and feeds the workers until shutdown; pings the systemd watchdog.
///
/// Each class has its own queue, and the scheduler claims only as many files of a class
/// as its queue has room for: a fresh change is claimed as soon as it is due, whatever
/// the backlog, and waits behind at most the fresh changes before it.
pub(super) fn scheduler(sh: &Arc<Daemon>, queues: JobQueues, wake: Receiver<()>) {
    let mut usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec);
    let ping_every = Duration::from_micros(usec / 2);
    let mut last_ping = Instant::now();
    loop {
        if watchdog && last_ping.elapsed() >= ping_every {
            notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            last_ping = Instant::now();
        }
        if sh.shutdown.is_stopping() {
            return;
        }
        if sh.pause.is_paused() {
            // Paused: changes are journaled, nothing is claimed (see `crate::pause`).
            select! {
                recv(wake) -> _ => {}
                recv(sh.shutdown.signal()) -> _ => {}
                default(crate::pause::POLL) => {}
            }
            continue;
        }
        let now = now_ms();
        let room = |q: &Sender<Job>| q.capacity().unwrap_or(0).saturating_sub(q.len());
        let (fresh_room, backlog_room) = (room(&queues.fresh), room(&queues.backlog));
        let large_room = queues.large.as_ref().map_or(0, room);
        let claimed = {
            let mut j = match sh.journal.lock() {
                Ok(j) => j,
                Err(_) => return,
            };
            let r = j
                .claim_class(now, Class::Fresh, fresh_room)
                .and_then(|mut f| {
                    f.extend(j.claim_large(now, large_room)?);
                    f.extend(j.claim_class(now, Class::Backlog, backlog_room)?);
                    Ok(f)
                });
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
                .and_then(|j| j.next_due(now).ok().flatten());
            let mut wait = match next {
                Some(t) if t > now => {
                    Duration::from_millis((t - now) as u64).min(Duration::from_secs(1))
                }
                Some(_) => Duration::from_millis(50),
                None => Duration::from_secs(1),
            };
            if fresh_room == 0 || backlog_room == 0 {
                // A full queue gains room as workers take from it.
                wait = wait.min(Duration::from_millis(50));
            }
            select! {
                recv(wake) -> _ => {}
                recv(sh.shutdown.signal()) -> _ => {}
                default(wait) => {}
            }
            continue;
        }
        // The large files claimed ahead of their turn come right after the fresh ones.
        let mut large_left = large_room;
        for job in claimed {
            let q = match (job.class, &queues.large) {
                (Class::Fresh, _) => &queues.fresh,
                (Class::Backlog, Some(large))
                    if large_left > 0 && job.size.unwrap_or(0) >= LARGE =>
                {
                    large_left -= 1;
                    large
                }
                (Class::Backlog, _) => &queues.backlog,
            };
            let mut job = job;
            loop {
                match q.send_timeout(job, Duration::from_millis(200)) {
                    Ok(()) => break,
                    Err(crossbeam_channel::SendTimeoutError::Timeout(j)) => {
                        if sh.shutdown.is_stopping() {
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

/// A backlog file of this size or more is large (the tier `claim_large` takes from).
const LARGE: i64 = 64 << 20;

/// Turns watcher events into dirty rows (and scans of new folders).
pub(super) fn events(sh: Arc<Daemon>, rx: Receiver<Change>, scans: Sender<ScanRequest>) {
    let debounce = sh.cfg.debounce.as_millis() as i64;
    loop {
        let first = select! {
            recv(rx) -> c => match c {
                Ok(c) => c,
                Err(_) => return,
            },
            recv(sh.shutdown.signal()) -> _ => return,
        };
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
        let mut dirty: Vec<(Vec<u8>, String, Option<i64>)> = Vec::with_capacity(paths.len());
        let mut seen = HashSet::new();
        let mut gone: Vec<(Vec<u8>, String)> = Vec::new();
        // Events of an unavailable watch (an unmount's among them) are not its files':
        // nothing is recorded from them; it is rescanned once it is back.
        let mut available: HashMap<String, bool> = HashMap::new();
        for p in &paths {
            let Some((w, rel)) = watch::locate(&watches, p) else {
                continue;
            };
            if rel.as_os_str().is_empty() || w.excluded(rel) {
                continue;
            }
            let up = *available
                .entry(w.name.clone())
                .or_insert_with(|| sh.avail.available(w, &sh.journal));
            if !up {
                continue;
            }
            let jp = scan::journal_key(w, rel);
            if !seen.insert(jp.clone()) {
                continue;
            }
            // The folder it is in may have changed too (its mtime, as an entry came or went).
            let parent = watch::parent_folder_key(w, rel);
            if seen.insert(parent.clone()) {
                dirty.push((parent, w.name.clone(), None));
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
                Ok(m) => dirty.push((jp, w.name.clone(), Some(m.len() as i64))),
                Err(_) => {
                    // Gone: a file, or a folder whose known files are gone with it.
                    dirty.push((jp.clone(), w.name.clone(), None));
                    gone.push((jp, w.name.clone()));
                }
            }
        }
        if let Ok(mut j) = sh.journal.lock() {
            for (g, name) in gone {
                if let Ok(keys) = j.keys_under(&[&g[..], b"/"].concat()) {
                    dirty.extend(keys.into_iter().map(|k| (k, name.clone(), None)));
                }
            }
            if let Err(e) = j.mark_seen_sized(&dirty, now_ms(), debounce) {
                tracing::error!(error = %e, "recording changes");
            }
        }
        let _ = sh.wake.try_send(());
    }
}

/// Runs scans one at a time; reports readiness once the startup scans are journaled.
pub(super) fn scanner(sh: Arc<Daemon>, rx: Receiver<ScanRequest>, startup_left: Arc<AtomicUsize>) {
    if startup_left.load(Ordering::SeqCst) == 0 {
        notify_systemd(&[sd_notify::NotifyState::Ready]);
    }
    loop {
        let req = select! {
            recv(rx) -> r => match r {
                Ok(r) => r,
                Err(_) => break,
            },
            recv(sh.shutdown.signal()) -> _ => break,
        };
        if sh.shutdown.is_stopping() {
            break;
        }
        let watches = sh.watches();
        let Some(w) = watches.iter().find(|w| w.name == req.watch) else {
            continue;
        };
        let t = Instant::now();
        let stopping = || sh.shutdown.is_stopping();
        let result = match sh.avail.check(w, &sh.journal) {
            Ok(_) => scan::scan(w, req.sub.as_deref(), &sh.journal, 0, &stopping),
            Err((why, _)) => {
                tracing::info!(watch = %w.name, reason = req.reason, why = %why.describe(&w.path),
                    "not scanned: the watch is unavailable (nothing recorded as deleted)");
                Ok(scan::ScanStats {
                    unavailable: true,
                    ..Default::default()
                })
            }
        };
        match result {
            Ok(s) if s.unavailable => {}
            Ok(s) if s.interrupted => {
                tracing::info!(watch = %w.name, reason = req.reason, files = s.files,
                    changed = s.changed, "scan stopped by shutdown; the next start scans again");
                break;
            }
            Ok(s) => {
                tracing::info!(watch = %w.name, reason = req.reason, files = s.files, changed = s.changed,
                    deleted = s.deleted, held = s.held, skipped = s.skipped_special, errors = s.errors,
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

/// Periodic full rescans (more often for trees without OS watches), and the daemon's
/// heartbeat.
pub(super) fn periodic(
    sh: Arc<Daemon>,
    scans: Sender<ScanRequest>,
    fallback: Arc<Mutex<Vec<String>>>,
) {
    let full = sh.cfg.rescan_interval;
    let fast = full.min(Duration::from_secs(10));
    let mut last_full = Instant::now();
    let mut last_fast = Instant::now();
    let mut last_beat = Instant::now();
    let mut rates = Rates::default();
    super::heartbeat(&sh);
    while !sh.shutdown.sleep(crate::pause::POLL) {
        poll_pause(&sh);
        sh.conn.close_idle_query();
        sh.conn.record_escrow(&sh);
        rates.tick(&sh);
        if last_beat.elapsed() >= super::HEARTBEAT {
            last_beat = Instant::now();
            super::heartbeat(&sh);
        }
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

/// Follows `pause`/`resume` (see [`crate::pause`]): wakes the scheduler when a pause
/// ends, and says when one is applied (every worker parked, no reply awaited).
fn poll_pause(sh: &Daemon) {
    if sh.pause.poll() {
        sh.wake();
        if !sh.pause.is_paused() {
            crate::pause::forget_applied(&sh.cfg.state_dir);
        }
    }
    if sh.pause.is_paused() {
        // The fresh lane's worker and `upload_concurrency` shared ones.
        sh.pause
            .note_applied(sh.cfg.upload_concurrency + 1, sh.conn.awaiting());
    }
}

/// How often the queues' rates are recorded, and over how long a window they are taken.
const RATE_EVERY: Duration = Duration::from_secs(2);
const RATE_WINDOW: Duration = Duration::from_secs(20);

/// The queues' rates over the last [`RATE_WINDOW`], recorded in the journal
/// ([`MetaKey::QueueRate`]) every [`RATE_EVERY`] for `status` and `/metrics`.
#[derive(Default)]
struct Rates {
    /// Samples of the per-class done counters (files, bytes), oldest first.
    samples: std::collections::VecDeque<(Instant, [u64; 4])>,
    /// The last record said nothing moved: another such is not written.
    idle_written: bool,
}

impl Rates {
    fn tick(&mut self, sh: &Daemon) {
        let now = Instant::now();
        if self
            .samples
            .back()
            .is_some_and(|(t, _)| now - *t < RATE_EVERY)
        {
            return;
        }
        let c = &sh.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let cur = [
            load(&c.done_files[0]),
            load(&c.done_bytes[0]),
            load(&c.done_files[1]),
            load(&c.done_bytes[1]),
        ];
        self.samples.push_back((now, cur));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now - *t > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let Some(&(t0, first)) = self.samples.front() else {
            return;
        };
        // Nothing moved over the window, and the last record said so: no write.
        let idle = first == cur;
        if idle && self.idle_written {
            return;
        }
        let dt = (now - t0).as_secs_f64();
        let rate = |i: usize| {
            if dt > 0.0 {
                (cur[i] - first[i]) as f64 / dt
            } else {
                0.0
            }
        };
        let v = format!(
            "{} {:.3} {:.0} {:.3} {:.0}",
            now_ms(),
            rate(0),
            rate(1),
            rate(2),
            rate(3)
        );
        if sh.journal(|j| j.set_meta(MetaKey::QueueRate, &v)).is_some() {
            self.idle_written = idle;
        }
    }
}

/// WAL bytes after which the checkpoint thread copies the journal's WAL into the database.
const CHECKPOINT_WAL_BYTES: u64 = 64 << 20;

/// Checkpoints the journal off the writers' path (see [`crate::journal::Checkpointer`]).
pub(super) fn checkpoints(sh: Arc<Daemon>, c: crate::journal::Checkpointer) {
    while !sh.shutdown.sleep(Duration::from_millis(100)) {
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
                if sh.shutdown.sleep(Duration::from_secs(5)) {
                    return;
                }
            }
        }
    }
}

/// A live progress line on a terminal: pending files and bytes, rate, current file.
pub(super) fn progress(sh: Arc<Daemon>) {
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(st) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
        bar.set_style(st);
    }
    let mut last_bytes = 0u64;
    let mut last = Instant::now();
    while !sh.shutdown.sleep(Duration::from_millis(500)) {
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
            } else if sh.pause.is_paused() {
                format!(
                    "paused: {pending} files ({:.1} MiB) wait; `coffer-agent resume` sends them",
                    s.pending_bytes as f64 / 1048576.0
                )
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
