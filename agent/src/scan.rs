//! Scans: compare a watched tree with the journal and mark what changed as dirty.
//!
//! Only `lstat` is used: a file whose size, mtime (ns), ctime (ns) and inode equal those
//! recorded when it was last read is not read again. Paths in the journal that are no longer
//! on disk are marked dirty too; the uploader then records them as deletions.
//!
//! Folders have rows too (keyed `name/rel/`, the watch's own folder `name/`), compared the
//! same way by the stat their entry gives (one `fstatat` per folder, none per file): a
//! changed mode, owner (both change the ctime) or mtime makes the folder dirty, and the
//! uploader commits its metadata as a `Dir` version.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::Watch;
use crate::journal::{
    folder_key, is_folder_key, CounterKey, Journal, JournalError, Known, Standing, StatKey,
};
use coffer_common::host::time::now_ms;

/// What a scan found.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanStats {
    pub files: u64,
    /// Folders walked (the scanned folder included), and those whose row was made dirty.
    pub folders: u64,
    pub folders_changed: u64,
    pub changed: u64,
    pub deleted: u64,
    /// Deletions held for confirmation instead of recorded (more than the watch's
    /// `max_delete_share` of its files): every gone path of the scan, folders included.
    pub held: u64,
    pub skipped_special: u64,
    pub errors: u64,
    /// The walk was stopped (the daemon is stopping) before it finished: what it found was
    /// journaled, but nothing was counted as deleted, since unseen files may not be gone.
    pub interrupted: bool,
    /// The watch was unavailable ([`crate::avail`]): it was not scanned.
    pub unavailable: bool,
}

/// The journal key of a path relative to a watch: `name/rel`, the path a file is known by
/// (its row in the journal, its manifest's path).
pub fn journal_key(watch: &Watch, rel: &Path) -> Vec<u8> {
    let mut p = Vec::with_capacity(watch.name.len() + 1 + rel.as_os_str().len());
    p.extend_from_slice(watch.name.as_bytes());
    if !rel.as_os_str().is_empty() {
        p.push(b'/');
        p.extend_from_slice(rel.as_os_str().as_bytes());
    }
    p
}

/// The file-system path of a journal key, if it belongs to one of `watches`.
pub fn fs_path<'a>(watches: &'a [Watch], key: &[u8]) -> Option<(&'a Watch, PathBuf)> {
    let slash = key.iter().position(|&b| b == b'/');
    let (name, rel) = match slash {
        Some(i) => (&key[..i], &key[i + 1..]),
        None => (key, &b""[..]),
    };
    let w = watches.iter().find(|w| w.name.as_bytes() == name)?;
    Some((w, w.path.join(OsStr::from_bytes(rel))))
}

/// The stat key of a file's metadata.
pub fn stat_key(m: &std::fs::Metadata) -> StatKey {
    StatKey {
        size: m.len() as i64,
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        inode: m.ino() as i64,
    }
}

/// Whether a known row (a file's or a folder's) must be read again, given the stat found now;
/// marks it seen.
fn changed(known: &mut HashMap<Vec<u8>, Known>, key: &[u8], cur: StatKey) -> bool {
    match known.get_mut(key) {
        None => true,
        Some(k) => {
            k.seen = true;
            match k.standing {
                Standing::BackedUp | Standing::Failed => k.stat != Some(cur),
                Standing::Deleted => true, // back after its deletion
                Standing::Queued => false, // read anyway
            }
        }
    }
}

/// A folder found at `rel`: its row is made dirty when its stat changed.
fn folder(
    watch: &Watch,
    known: &mut HashMap<Vec<u8>, Known>,
    dirty: &mut Vec<(Vec<u8>, String, Option<i64>)>,
    stats: &mut ScanStats,
    rel: &Path,
    meta: &std::fs::Metadata,
) {
    stats.folders += 1;
    let key = folder_key(&journal_key(watch, rel));
    if changed(known, &key, stat_key(meta)) {
        stats.folders_changed += 1;
        dirty.push((key, watch.name.clone(), None));
    }
}

/// Changed files journaled per transaction during a walk.
const SCAN_FLUSH: usize = 4096;

/// Scans `watch` (or only `sub`, a folder inside it) and marks changes in the journal.
/// `preloaded`: the watch's journal rows read earlier (the startup scan reads them while the
/// OS watches are being added). Rows that changed since only cause extra dirty marks,
/// never a missed change: the comparison is with the file system as walked now.
/// `stopping` is asked before each folder: once it says true the walk ends early (see
/// [`ScanStats::interrupted`]).
pub fn scan(
    watch: &Watch,
    sub: Option<&Path>,
    journal: &Mutex<Journal>,
    delay_ms: i64,
    preloaded: Option<HashMap<Vec<u8>, Known>>,
    stopping: &dyn Fn() -> bool,
) -> Result<ScanStats, JournalError> {
    let mut known = match preloaded {
        Some(k) => k,
        None => match journal.lock() {
            Ok(j) => j.known(&watch.name)?,
            Err(_) => return Ok(ScanStats::default()),
        },
    };
    let start = match sub {
        Some(s) => s.to_path_buf(),
        None => watch.path.clone(),
    };
    let mut stats = ScanStats::default();
    let mut unreadable: Vec<Vec<u8>> = Vec::new();
    let mut dirty: Vec<(Vec<u8>, String, Option<i64>)> = Vec::new();
    // The scanned folder's own row (a folder's row is checked where its parent lists it).
    if let (Ok(rel), Ok(meta)) = (
        start.strip_prefix(&watch.path),
        std::fs::symlink_metadata(&start),
    ) {
        if meta.is_dir() {
            folder(watch, &mut known, &mut dirty, &mut stats, rel, &meta);
        }
    }
    let mut stack = vec![start.clone()];
    while let Some(dir) = stack.pop() {
        if stopping() {
            stats.interrupted = true;
            if let Ok(mut j) = journal.lock() {
                j.mark_dirty_sized(&dirty, now_ms(), delay_ms)?;
            }
            return Ok(stats);
        }
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                if dir == watch.path && e.kind() == std::io::ErrorKind::NotFound {
                    tracing::warn!(watch = %watch.name, path = %dir.display(), "watched folder does not exist");
                } else {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot read folder; its files are left as they were");
                }
                stats.errors += 1;
                if let Ok(rel) = dir.strip_prefix(&watch.path) {
                    unreadable.push(journal_key(watch, rel));
                }
                continue;
            }
        };
        for entry in rd {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(path = %dir.display(), error = %e, "reading folder entry");
                    stats.errors += 1;
                    continue;
                }
            };
            let path = entry.path();
            let rel = match path.strip_prefix(&watch.path) {
                Ok(r) => r.to_path_buf(),
                Err(_) => continue,
            };
            if watch.excluded(&rel) {
                continue;
            }
            let ft = match entry.file_type() {
                Ok(t) => t,
                Err(_) => continue,
            };
            if ft.is_dir() {
                if let Ok(meta) = entry.metadata() {
                    folder(watch, &mut known, &mut dirty, &mut stats, &rel, &meta);
                }
                stack.push(path);
                continue;
            }
            // FIFOs, sockets and devices are backed up as such, as files are.
            let jp = journal_key(watch, &rel);
            // fstatat on the open folder: no walk of the whole path per file.
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(_) => continue, // vanished: a watcher event or the next scan handles it
            };
            stats.files += 1;
            let cur = stat_key(&meta);
            if changed(&mut known, &jp, cur) {
                stats.changed += 1;
                dirty.push((jp, watch.name.clone(), Some(cur.size)));
            }
        }
        if dirty.len() >= SCAN_FLUSH {
            // Journal what was found so far, so the uploader starts on it while the walk goes on.
            if let Ok(mut j) = journal.lock() {
                j.mark_dirty_sized(&dirty, now_ms(), delay_ms)?;
            }
            dirty.clear();
        }
    }
    // Paths known under the scanned folder but not seen are gone (unless their folder could
    // not be read).
    let prefix = journal_key(
        watch,
        start.strip_prefix(&watch.path).unwrap_or(Path::new("")),
    );
    let mut gone: Vec<Vec<u8>> = Vec::new();
    for (p, k) in &known {
        if k.seen || !under(p, &prefix) || unreadable.iter().any(|u| under(p, u)) {
            continue;
        }
        match k.standing {
            Standing::BackedUp if is_folder_key(p) => gone.push(p.clone()),
            Standing::BackedUp => {
                stats.deleted += 1;
                gone.push(p.clone());
            }
            Standing::Failed => gone.push(p.clone()),
            Standing::Deleted | Standing::Queued => {}
        }
    }
    // More than the watch's share of its files gone at once: held, not recorded.
    let files = known
        .iter()
        .filter(|(p, k)| k.standing == Standing::BackedUp && !is_folder_key(p))
        .count() as u64;
    let hold = crate::avail::holds(stats.deleted, files, watch.max_delete_share);
    let held: Vec<Vec<u8>> = if hold {
        std::mem::take(&mut gone)
    } else {
        Vec::new()
    };
    if hold {
        stats.held = held.len() as u64;
        tracing::warn!(watch = %watch.name, deleted = stats.deleted, files,
            share = watch.max_delete_share,
            "more than max_delete_share of the watch's files are gone: their deletions are \
             held until `coffer-agent confirm-deletions {}`", watch.name);
    } else {
        dirty.extend(gone.into_iter().map(|p| (p, watch.name.clone(), None)));
    }
    if let Ok(mut j) = journal.lock() {
        j.mark_dirty_sized(&dirty, now_ms(), delay_ms)?;
        j.hold_deletions(&watch.name, &prefix, &held, now_ms())?;
        if stats.skipped_special > 0 {
            j.set_counter(
                CounterKey::SkippedSpecialIn(&watch.name),
                stats.skipped_special as i64,
            )?;
        }
    }
    Ok(stats)
}

fn under(p: &[u8], prefix: &[u8]) -> bool {
    p.len() > prefix.len() && p.starts_with(prefix) && p[prefix.len()] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Ack, FileRead, FileState};
    use coffer_common::wire::CommitId;

    /// Claims `path` once it was marked dirty.
    fn claim(j: &mut Journal, path: &[u8]) -> i64 {
        j.mark_dirty(&[(path.to_vec(), "w".into())], 0, 0)
            .expect("dirty");
        j.claim_due(i64::MAX, 1000)
            .expect("claim")
            .into_iter()
            .find(|job| job.path == path)
            .expect("claimed")
            .gen
    }

    /// Takes `path` through the journal to backed up (as `kind`, with `stat`), then, with
    /// `fail`, through a failed read.
    fn settle(j: &mut Journal, path: &[u8], kind: &'static str, stat: StatKey, fail: bool) {
        let gen = claim(j, path);
        let read = FileRead {
            path: path.to_vec(),
            gen,
            kind,
            stat,
            mode: 0o644,
            hash: [1; 32],
            commit_id: CommitId([2; 16]),
        };
        j.record_reads(&[read]).expect("reads");
        j.record_acks(&[Ack {
            path: path.to_vec(),
            gen,
            version: 1,
            commit_time: 5,
            hash: [1; 32],
            kind,
            size: stat.size,
        }])
        .expect("ack");
        if fail {
            let gen = claim(j, path);
            j.record_failure(path, gen, "reading: permission denied", 0)
                .expect("fail");
        }
    }

    #[test]
    fn a_scan_queues_exactly_what_changed_appeared_or_went() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("tree");
        std::fs::create_dir(&root).expect("mkdir");
        for name in ["same", "changed", "back", "failed-same", "new"] {
            std::fs::write(root.join(name), name).expect("write");
        }
        let stat_of = |n: &str| stat_key(&std::fs::symlink_metadata(root.join(n)).expect("stat"));
        let other = StatKey {
            size: 999,
            ..stat_of("changed")
        };
        let watch = Watch {
            path: root.clone(),
            name: "w".into(),
            exclude: globset::GlobSet::empty(),
            exclude_patterns: Vec::new(),
            max_delete_share: crate::config::DEFAULT_MAX_DELETE_SHARE,
        };
        let mut j = Journal::open(&d.path().join("j.sqlite")).expect("journal");
        settle(&mut j, b"w/same", "file", stat_of("same"), false);
        settle(&mut j, b"w/changed", "file", other, false);
        settle(&mut j, b"w/back", "deleted", StatKey::default(), false);
        settle(
            &mut j,
            b"w/failed-same",
            "file",
            stat_of("failed-same"),
            true,
        );
        settle(&mut j, b"w/gone", "file", other, false);
        settle(&mut j, b"w/gone-failed", "file", other, true);
        settle(
            &mut j,
            b"w/gone-long-ago",
            "deleted",
            StatKey::default(),
            false,
        );
        j.mark_dirty(&[(b"w/queued-gone".to_vec(), "w".into())], 0, 0)
            .expect("dirty");
        let j = Mutex::new(j);
        let stats = scan(&watch, None, &j, 0, None, &|| false).expect("scan");
        assert_eq!(stats.files, 5);
        // changed, back (it returned after its deletion), new
        assert_eq!(stats.changed, 3);
        assert_eq!(stats.deleted, 1);
        let j = j.lock().expect("journal");
        let state = |p: &[u8]| j.row(p).expect("row").expect("exists").state;
        for p in [&b"w/same"[..], b"w/gone-long-ago"] {
            assert_eq!(
                state(p),
                FileState::BackedUp,
                "{}",
                String::from_utf8_lossy(p)
            );
        }
        assert_eq!(state(b"w/failed-same"), FileState::Failed);
        for p in [
            &b"w/changed"[..],
            b"w/back",
            b"w/new",
            b"w/gone",
            b"w/gone-failed",
            b"w/queued-gone",
        ] {
            assert_eq!(state(p), FileState::Dirty, "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn a_scan_stopped_by_shutdown_records_no_deletion() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("tree");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub").join("kept"), b"x").expect("write");
        let watch = Watch {
            path: root.clone(),
            name: "w".into(),
            exclude: globset::GlobSet::empty(),
            exclude_patterns: Vec::new(),
            max_delete_share: crate::config::DEFAULT_MAX_DELETE_SHARE,
        };
        let stat = stat_key(&std::fs::symlink_metadata(root.join("sub/kept")).expect("stat"));
        let mut j = Journal::open(&d.path().join("j.sqlite")).expect("journal");
        settle(&mut j, b"w/sub/kept", "file", stat, false);
        let j = Mutex::new(j);
        // Stopping after the first folder: `sub` is never walked, so `kept` is unseen.
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let stopping = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1;
        let stats = scan(&watch, None, &j, 0, None, &stopping).expect("scan");
        assert!(stats.interrupted);
        assert_eq!(stats.deleted, 0);
        let j = j.lock().expect("journal");
        let row = j.row(b"w/sub/kept").expect("row").expect("exists");
        assert_eq!(row.state, FileState::BackedUp);
    }

    /// Folders have rows of their own (the watch's folder too), made dirty when first seen
    /// and when their mode changes, and marked for a deletion record when gone; files are
    /// counted apart from them.
    #[test]
    fn folders_have_rows_made_dirty_when_they_change_or_go() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("tree");
        std::fs::create_dir_all(root.join("sub/deeper")).expect("mkdir");
        std::fs::create_dir_all(root.join("gone")).expect("mkdir");
        std::fs::write(root.join("sub/f"), b"x").expect("write");
        let watch = Watch {
            path: root.clone(),
            name: "w".into(),
            exclude: globset::GlobSet::empty(),
            exclude_patterns: Vec::new(),
            max_delete_share: crate::config::DEFAULT_MAX_DELETE_SHARE,
        };
        let j = Mutex::new(Journal::open(&d.path().join("j.sqlite")).expect("journal"));
        let stats = scan(&watch, None, &j, 0, None, &|| false).expect("scan");
        assert_eq!(
            (stats.files, stats.folders, stats.folders_changed),
            (1, 4, 4)
        );
        let folders = [&b"w/"[..], b"w/sub/", b"w/sub/deeper/", b"w/gone/"];
        {
            let mut j = j.lock().expect("journal");
            for f in folders {
                let row = j.row(f).expect("row").expect("a folder's row");
                assert_eq!(
                    row.state,
                    FileState::Dirty,
                    "{}",
                    String::from_utf8_lossy(f)
                );
            }
            assert_eq!(j.summary().expect("summary").dirty, 1, "files only");
            // All backed up as they are now.
            for f in folders {
                let p = fs_path(std::slice::from_ref(&watch), &f[..f.len() - 1])
                    .expect("in the watch")
                    .1;
                let stat = stat_key(&std::fs::symlink_metadata(p).expect("stat"));
                // Each settled on its own: hand back what the last claim took besides.
                let all: Vec<Vec<u8>> = folders.iter().map(|f| f.to_vec()).collect();
                j.unclaim(&all).expect("unclaim");
                settle(&mut j, f, "dir", stat, false);
            }
        }
        std::fs::set_permissions(root.join("sub"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        std::fs::remove_dir(root.join("gone")).expect("rmdir");
        let stats = scan(&watch, None, &j, 0, None, &|| false).expect("scan");
        // `sub` (its mode) and the watch's folder (`gone` went from it).
        assert_eq!(stats.folders_changed, 2);
        assert_eq!(stats.deleted, 0, "deletions counted are files'");
        let j = j.lock().expect("journal");
        let state = |p: &[u8]| j.row(p).expect("row").expect("exists").state;
        assert_eq!(state(b"w/sub/"), FileState::Dirty);
        assert_eq!(state(b"w/"), FileState::Dirty);
        assert_eq!(state(b"w/gone/"), FileState::Dirty);
        assert_eq!(state(b"w/sub/deeper/"), FileState::BackedUp);
    }

    /// More than the watch's share of its files gone at once: held, their rows left backed
    /// up; once few enough are gone (most came back), the rest are recorded and nothing is
    /// held.
    #[test]
    fn a_scan_that_finds_most_files_gone_holds_them() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("tree");
        std::fs::create_dir(&root).expect("mkdir");
        let watch = Watch {
            path: root.clone(),
            name: "w".into(),
            exclude: globset::GlobSet::empty(),
            exclude_patterns: Vec::new(),
            max_delete_share: crate::config::DEFAULT_MAX_DELETE_SHARE,
        };
        let mut j = Journal::open(&d.path().join("j.sqlite")).expect("journal");
        for i in 0..10 {
            let name = format!("f{i}");
            std::fs::write(root.join(&name), b"x").expect("write");
            let stat = stat_key(&std::fs::symlink_metadata(root.join(&name)).expect("stat"));
            settle(&mut j, format!("w/{name}").as_bytes(), "file", stat, false);
        }
        for i in 0..8 {
            std::fs::rename(root.join(format!("f{i}")), d.path().join(format!("f{i}")))
                .expect("move away");
        }
        let j = Mutex::new(j);
        let stats = scan(&watch, None, &j, 0, None, &|| false).expect("scan");
        assert_eq!((stats.deleted, stats.held), (8, 8));
        {
            let j = j.lock().expect("journal");
            assert_eq!(j.held(Some("w")).expect("held").len(), 8);
            for i in 0..8 {
                let row = j
                    .row(format!("w/f{i}").as_bytes())
                    .expect("row")
                    .expect("row");
                assert_eq!(row.state, FileState::BackedUp, "f{i} is held, not dirty");
            }
        }
        // Five come back: 3 of 10 gone is not more than half; recorded, nothing held.
        for i in 0..5 {
            std::fs::rename(d.path().join(format!("f{i}")), root.join(format!("f{i}")))
                .expect("move back");
        }
        let stats = scan(&watch, None, &j, 0, None, &|| false).expect("scan");
        assert_eq!((stats.deleted, stats.held), (3, 0));
        let j = j.lock().expect("journal");
        assert!(j.held(None).expect("held").is_empty());
        for i in 5..8 {
            let row = j
                .row(format!("w/f{i}").as_bytes())
                .expect("row")
                .expect("row");
            assert_eq!(row.state, FileState::Dirty, "f{i} is to be recorded");
        }
    }
}
