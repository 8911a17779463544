//! Watching: `notify` events become dirty paths in the journal.
//!
//! Events are batched for a few milliseconds and written in one transaction. A new folder is
//! scanned (files created before its watch existed are not missed). An event-queue overflow
//! or notify's rescan flag schedules a rescan of the tree; nothing is dropped silently. When
//! the OS runs out of watches, the tree falls back to periodic scanning and `status` says so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use notify::{EventKind, RecursiveMode, Watcher};

use crate::config::Watch;

/// Work for the scanner thread.
#[derive(Debug, Clone)]
pub struct ScanRequest {
    /// Index into the config's watches.
    pub watch: usize,
    /// A folder inside the watch, or the whole watch.
    pub sub: Option<PathBuf>,
    pub reason: &'static str,
}

/// What the event thread passes on.
pub enum Change {
    /// Paths (absolute) that changed or may have.
    Paths(Vec<PathBuf>),
    /// A tree to scan.
    Scan(ScanRequest),
}

/// The set of OS watches, and which trees fell back to periodic scanning.
pub struct Watching {
    _watcher: Option<notify::RecommendedWatcher>,
    /// (watch index, reason) for trees without OS watches.
    pub fallback: Vec<(usize, String)>,
}

/// The hint printed when the OS runs out of inotify watches.
pub const WATCH_LIMIT_HINT: &str = "the OS limit on inotify watches was reached; raise it with \
    `sysctl fs.inotify.max_user_watches=524288` (persist in /etc/sysctl.d/); \
    falling back to periodic scanning for this folder";

/// Starts OS watches on every folder; events go to `out`.
pub fn start(watches: &[Watch], out: Sender<Change>) -> Watching {
    let raw_tx = out.clone();
    let roots: Vec<PathBuf> = watches.iter().map(|w| w.path.clone()).collect();
    let handler = move |res: notify::Result<notify::Event>| match res {
        Ok(ev) => {
            if ev.need_rescan() {
                // The kernel queue overflowed or the backend lost track: rescan.
                let which: Vec<usize> = if ev.paths.is_empty() {
                    (0..roots.len()).collect()
                } else {
                    roots
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| ev.paths.iter().any(|p| p.starts_with(r)))
                        .map(|(i, _)| i)
                        .collect()
                };
                for i in if which.is_empty() {
                    (0..roots.len()).collect()
                } else {
                    which
                } {
                    let _ = raw_tx.send(Change::Scan(ScanRequest {
                        watch: i,
                        sub: None,
                        reason: "overflow",
                    }));
                }
                return;
            }
            match ev.kind {
                EventKind::Access(notify::event::AccessKind::Close(
                    notify::event::AccessMode::Write,
                ))
                | EventKind::Create(_)
                | EventKind::Modify(_)
                | EventKind::Remove(_)
                | EventKind::Any
                | EventKind::Other => {
                    let _ = raw_tx.send(Change::Paths(ev.paths));
                }
                EventKind::Access(_) => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "watcher error; rescanning");
            for i in 0..roots.len() {
                let _ = raw_tx.send(Change::Scan(ScanRequest {
                    watch: i,
                    sub: None,
                    reason: "overflow",
                }));
            }
        }
    };
    let mut fallback = Vec::new();
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => Some(w),
        Err(e) => {
            let why = describe(&e);
            tracing::error!(error = %why, "cannot start the file watcher; every folder falls back to periodic scanning");
            for i in 0..watches.len() {
                fallback.push((i, why.clone()));
            }
            None
        }
    };
    if let Some(w) = watcher.as_mut() {
        for (i, wt) in watches.iter().enumerate() {
            if let Err(e) = w.watch(&wt.path, RecursiveMode::Recursive) {
                let why = describe(&e);
                tracing::warn!(watch = %wt.name, path = %wt.path.display(), error = %why, "cannot watch folder");
                fallback.push((i, why));
            }
        }
    }
    Watching {
        _watcher: watcher,
        fallback,
    }
}

fn describe(e: &notify::Error) -> String {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => WATCH_LIMIT_HINT.to_string(),
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
            WATCH_LIMIT_HINT.to_string()
        }
        _ => e.to_string(),
    }
}

/// Collects changes for at most `window` after the first one arrives (or until `max`).
pub fn collect_batch(
    rx: &Receiver<Change>,
    first: Change,
    window: Duration,
    max: usize,
) -> (Vec<PathBuf>, Vec<ScanRequest>) {
    let mut paths = Vec::new();
    let mut scans = Vec::new();
    let mut push = |c: Change, paths: &mut Vec<PathBuf>| match c {
        Change::Paths(p) => paths.extend(p),
        Change::Scan(s) => scans.push(s),
    };
    push(first, &mut paths);
    let deadline = Instant::now() + window;
    while paths.len() < max {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(c) => push(c, &mut paths),
            Err(_) => break,
        }
    }
    (paths, scans)
}

/// Finds the watch a path belongs to and its path relative to the watch.
pub fn locate<'a>(watches: &'a [Watch], p: &'a Path) -> Option<(usize, &'a Path)> {
    watches
        .iter()
        .enumerate()
        .filter_map(|(i, w)| p.strip_prefix(&w.path).ok().map(|r| (i, r)))
        .max_by_key(|(i, _)| watches[*i].path.as_os_str().len())
}
