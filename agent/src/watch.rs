//! Watching: `notify` events become dirty paths in the journal.
//!
//! Events are batched for a few milliseconds and written in one transaction; the folder
//! holding a changed path is marked too (its mtime changes as entries come and go; the
//! debounce makes one version of many such changes). A new folder is
//! scanned (files created before its watch existed are not missed). An event-queue overflow
//! or notify's rescan flag schedules a rescan of the tree; nothing is dropped silently. When
//! the OS runs out of watches, the tree falls back to periodic scanning and `status` says so.
//! An unavailable watch ([`crate::avail`]) loses its OS watch until it is back
//! ([`Watching::suspend`], [`Watching::resume`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use notify::{EventKind, RecursiveMode, Watcher};

use crate::config::Watch;

/// Work for the scanner thread.
#[derive(Debug, Clone)]
pub struct ScanRequest {
    /// The watch's name.
    pub watch: String,
    /// A folder inside the watch, or the whole watch.
    pub sub: Option<PathBuf>,
    pub reason: &'static str,
}

/// What the notify callback passes on.
pub enum Change {
    /// Paths (absolute) that changed or may have.
    Paths(Vec<PathBuf>),
    /// The kernel queue overflowed or the backend lost track: rescan the trees holding
    /// these paths (all trees when empty).
    Rescan(Vec<PathBuf>),
}

/// The OS watches, and which trees fell back to periodic scanning.
pub struct Watching {
    watcher: Option<notify::RecommendedWatcher>,
    /// Watched folders by watch name.
    watched: HashMap<String, PathBuf>,
    /// Watch name -> why it has no OS watch.
    pub fallback: HashMap<String, String>,
}

/// The hint printed when the OS runs out of inotify watches.
pub const WATCH_LIMIT_HINT: &str = "the OS limit on inotify watches was reached; raise it with \
    `sysctl fs.inotify.max_user_watches=524288` (persist in /etc/sysctl.d/); \
    falling back to periodic scanning for this folder";

impl Watching {
    /// Starts the OS watcher (with no folders yet); events go to `out`.
    pub fn new(out: Sender<Change>) -> Self {
        let handler = move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                if ev.need_rescan() {
                    let _ = out.send(Change::Rescan(ev.paths));
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
                        let _ = out.send(Change::Paths(ev.paths));
                    }
                    EventKind::Access(_) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "watcher error; rescanning");
                let _ = out.send(Change::Rescan(e.paths));
            }
        };
        // Changes only: create, remove, data, metadata, names, and a written file closed.
        // notify's default also asks for every open and read-only close, so the agent's own
        // reads would feed its watcher and could overflow the kernel queue, forcing a
        // rescan of the whole tree.
        let kinds = notify::EventKindMask::CORE | notify::EventKindMask::ACCESS_CLOSE;
        let config = notify::Config::default().with_event_kinds(kinds);
        let watcher = match notify::RecommendedWatcher::new(handler, config) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %describe(&e), "cannot start the file watcher; folders fall back to periodic scanning");
                None
            }
        };
        Watching {
            watcher,
            watched: HashMap::new(),
            fallback: HashMap::new(),
        }
    }

    /// Makes the OS watches match `watches`, touching only the difference. Returns the
    /// names of watches added (to be scanned) and removed.
    pub fn sync(&mut self, watches: &[Watch]) -> (Vec<String>, Vec<String>) {
        let mut removed = Vec::new();
        let wanted: HashMap<&str, &Path> = watches
            .iter()
            .map(|w| (w.name.as_str(), w.path.as_path()))
            .collect();
        let gone: Vec<(String, PathBuf)> = self
            .watched
            .iter()
            .filter(|(n, p)| wanted.get(n.as_str()) != Some(&p.as_path()))
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        for (n, p) in gone {
            if let Some(w) = self.watcher.as_mut() {
                if !self.fallback.contains_key(&n) {
                    let _ = w.unwatch(&p);
                }
            }
            self.watched.remove(&n);
            self.fallback.remove(&n);
            removed.push(n);
        }
        let mut added = Vec::new();
        for w in watches {
            if self.watched.contains_key(&w.name) {
                continue;
            }
            match self.watcher.as_mut() {
                Some(watcher) => {
                    if let Err(e) = watcher.watch(&w.path, RecursiveMode::Recursive) {
                        let why = describe(&e);
                        tracing::warn!(watch = %w.name, path = %w.path.display(), error = %why, "cannot watch folder");
                        self.fallback.insert(w.name.clone(), why);
                    }
                }
                None => {
                    self.fallback
                        .insert(w.name.clone(), "the file watcher could not start".into());
                }
            }
            self.watched.insert(w.name.clone(), w.path.clone());
            added.push(w.name.clone());
        }
        (added, removed)
    }
}

impl Watching {
    /// Drops the OS watch of an unavailable watch (its folder is gone or unmounted: events
    /// from it, or from what took its place, are not its files').
    pub fn suspend(&mut self, name: &str) {
        if let (Some(w), Some(p)) = (self.watcher.as_mut(), self.watched.get(name)) {
            if !self.fallback.contains_key(name) {
                let _ = w.unwatch(p);
            }
        }
        self.fallback.remove(name);
        self.fallback.insert(
            name.to_string(),
            "unavailable: not watched until it is back".into(),
        );
    }

    /// Watches a watch's folder again once it is back (a remounted file system needs a new
    /// OS watch; the old one ended with the unmount).
    pub fn resume(&mut self, w: &Watch) {
        if let Some(watcher) = self.watcher.as_mut() {
            if !self.fallback.contains_key(&w.name) {
                let _ = watcher.unwatch(&w.path);
            }
            self.fallback.remove(&w.name);
            if let Err(e) = watcher.watch(&w.path, RecursiveMode::Recursive) {
                let why = describe(&e);
                tracing::warn!(watch = %w.name, path = %w.path.display(), error = %why, "cannot watch folder");
                self.fallback.insert(w.name.clone(), why);
            }
        }
        self.watched.insert(w.name.clone(), w.path.clone());
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
/// Returns the changed paths and the paths whose trees need a rescan (`Some(vec![])` = all).
pub fn collect_batch(
    rx: &Receiver<Change>,
    first: Change,
    window: Duration,
    max: usize,
) -> (Vec<PathBuf>, Option<Vec<PathBuf>>) {
    let mut paths = Vec::new();
    let mut rescan: Option<Vec<PathBuf>> = None;
    let mut push = |c: Change, paths: &mut Vec<PathBuf>| match c {
        Change::Paths(p) => paths.extend(p),
        Change::Rescan(p) => rescan.get_or_insert_with(Vec::new).extend(p),
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
    (paths, rescan)
}

/// The journal key of the folder holding `rel` (a path relative to `watch`): its row is
/// made dirty with each change in it, since an entry that comes or goes changes its mtime.
pub fn parent_folder_key(watch: &Watch, rel: &Path) -> Vec<u8> {
    let parent = rel.parent().unwrap_or(Path::new(""));
    crate::journal::folder_key(&crate::scan::journal_key(watch, parent))
}

/// Finds the watch a path belongs to and its path relative to the watch.
pub fn locate<'a>(watches: &'a [Watch], p: &'a Path) -> Option<(&'a Watch, &'a Path)> {
    watches
        .iter()
        .filter_map(|w| p.strip_prefix(&w.path).ok().map(|r| (w, r)))
        .max_by_key(|(w, _)| w.path.as_os_str().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects paths from `rx` until `want` has been seen (or the deadline passes).
    fn seen_until(rx: &Receiver<Change>, want: &Path, all: &mut Vec<PathBuf>) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Change::Paths(p)) = rx.recv_timeout(Duration::from_millis(100)) {
                all.extend(p);
                if all.iter().any(|p| p == want) {
                    return true;
                }
            }
        }
        false
    }

    /// Every kind of change the agent backs up reaches it: create, write, rename within and
    /// out of the tree, delete, a file in a new folder, a mode change (the event mask asks
    /// the kernel for all of these). Reading a file is not reported as a change: a read
    /// followed by a marker shows only the marker.
    #[test]
    fn changes_reach_the_agent_and_reads_do_not() {
        let dir = tempfile::tempdir().expect("test setup");
        let root = dir.path().join("w");
        std::fs::create_dir(&root).expect("test setup");
        std::fs::write(root.join("old"), b"x").expect("test setup");
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut w = Watching::new(tx);
        let watch = Watch {
            path: root.clone(),
            name: "w".into(),
            exclude: globset::GlobSet::empty(),
            exclude_patterns: vec![],
            max_delete_share: crate::config::DEFAULT_MAX_DELETE_SHARE,
        };
        let (added, _) = w.sync(std::slice::from_ref(&watch));
        assert_eq!(added, vec!["w".to_string()]);
        assert!(w.fallback.is_empty(), "{:?}", w.fallback);

        let mut all = Vec::new();
        let _ = std::fs::read(root.join("old")).expect("test setup");
        std::fs::write(root.join("marker"), b"m").expect("test setup");
        assert!(seen_until(&rx, &root.join("marker"), &mut all));
        assert!(
            !all.contains(&root.join("old")),
            "a read was reported as a change: {all:?}"
        );

        let steps: Vec<(PathBuf, Box<dyn Fn()>)> = vec![
            (root.join("new"), {
                let r = root.clone();
                Box::new(move || std::fs::write(r.join("new"), b"1").expect("test setup"))
            }),
            (root.join("renamed"), {
                let r = root.clone();
                Box::new(move || {
                    std::fs::rename(r.join("new"), r.join("renamed")).expect("test setup")
                })
            }),
            (root.join("renamed"), {
                let r = root.clone();
                let out = dir.path().join("outside");
                Box::new(move || std::fs::rename(r.join("renamed"), &out).expect("test setup"))
            }),
            (root.join("old"), {
                let r = root.clone();
                Box::new(move || std::fs::remove_file(r.join("old")).expect("test setup"))
            }),
            (root.join("sub/inner"), {
                let r = root.clone();
                Box::new(move || {
                    std::fs::create_dir(r.join("sub")).expect("test setup");
                    std::fs::write(r.join("sub/inner"), b"i").expect("test setup");
                })
            }),
            (root.join("marker"), {
                let r = root.clone();
                Box::new(move || {
                    use std::os::unix::fs::PermissionsExt;
                    let p = std::fs::Permissions::from_mode(0o600);
                    std::fs::set_permissions(r.join("marker"), p).expect("test setup");
                })
            }),
        ];
        for (want, act) in steps {
            all.clear();
            act();
            // A file in a new folder may be found by the folder's scan instead of an event.
            let found = seen_until(&rx, &want, &mut all)
                || (want.ends_with("sub/inner") && all.contains(&root.join("sub")));
            assert!(found, "no event for {}: {all:?}", want.display());
        }
    }
}
