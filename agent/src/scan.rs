//! Scans: compare a watched tree with the journal and mark what changed as dirty.
//!
//! The walk and the journal are compared in order, as two sorted streams ([`merge`]): each
//! folder's entries are sorted and walked depth first in the journal's key order while the
//! journal's rows under the scanned folder are read a page at a time in the same order, so
//! a scan holds no map of the known paths and its memory does not grow with their number.
//!
//! Only `lstat` is used: a file whose size, mtime (ns), ctime (ns) and inode equal those
//! recorded when it was last read is not read again. Paths in the journal that are no longer
//! on disk are marked dirty too; the uploader then records them as deletions.
//!
//! Folders have rows too (keyed `name/rel/`, the watch's own folder `name/`), compared the
//! same way by the stat their entry gives (one `fstatat` per folder, none per file): a
//! changed mode, owner (both change the ctime) or mtime makes the folder dirty, and the
//! uploader commits its metadata as a `Dir` version.

mod merge;

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

/// Whether a known row (a file's or a folder's) must be read again, given the stat found now.
fn changed(known: Option<Known>, cur: StatKey) -> bool {
    match known {
        None => true,
        Some(k) => match k.standing {
            Standing::BackedUp | Standing::Failed => k.stat != Some(cur),
            Standing::Deleted => true, // back after its deletion
            Standing::Queued => false, // read anyway
        },
    }
}

/// Changed files journaled per transaction during a walk.
const SCAN_FLUSH: usize = 4096;

/// A scan in progress: the walk's keys are compared, in order, with the journal's rows
/// under the scanned folder ([`merge`]), so what it holds is a page of rows, the folders
/// being walked, the changes not yet journaled and the paths found gone.
struct Merge<'a> {
    watch: &'a Watch,
    journal: &'a Mutex<Journal>,
    delay_ms: i64,
    rows: merge::JournalRows<'a>,
    stats: ScanStats,
    dirty: Vec<(Vec<u8>, String, Option<i64>)>,
    gone: Vec<Vec<u8>>,
    /// Rows passed that are backed up as present files: what deletions are a share of.
    backed_up_files: u64,
    /// The key of a folder that could not be listed (with its `/`): rows under it are not
    /// gone, whatever the walk found.
    unreadable: Option<Vec<u8>>,
}

impl Merge<'_> {
    /// Takes the journal's rows before `key` (those the walk did not find: gone), then
    /// `key`'s own row if there is one.
    fn row_for(&mut self, key: &[u8]) -> Result<Option<Known>, JournalError> {
        while let Some((k, _)) = self.rows.peek()? {
            match k.as_slice().cmp(key) {
                std::cmp::Ordering::Less => {
                    if let Some((k, known)) = self.rows.next()? {
                        self.unseen(k, known);
                    }
                }
                std::cmp::Ordering::Equal => {
                    let row = self.rows.next()?.map(|(_, known)| known);
                    if let Some(k) = row {
                        self.count(key, k);
                    }
                    return Ok(row);
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        Ok(None)
    }

    fn count(&mut self, key: &[u8], k: Known) {
        if k.standing == Standing::BackedUp && !is_folder_key(key) {
            self.backed_up_files += 1;
        }
    }

    /// A row the walk passed without finding its path: gone (unless under a folder that
    /// could not be listed).
    fn unseen(&mut self, key: Vec<u8>, k: Known) {
        self.count(&key, k);
        if let Some(u) = &self.unreadable {
            if key.starts_with(u) {
                return;
            }
            self.unreadable = None;
        }
        match k.standing {
            Standing::BackedUp if is_folder_key(&key) => self.gone.push(key),
            Standing::BackedUp => {
                self.stats.deleted += 1;
                self.gone.push(key);
            }
            Standing::Failed => self.gone.push(key),
            Standing::Deleted | Standing::Queued => {}
        }
    }

    /// A folder found at `rel`: its row is made dirty when its stat changed.
    fn folder(&mut self, rel: &Path, meta: &std::fs::Metadata) -> Result<(), JournalError> {
        self.stats.folders += 1;
        let key = folder_key(&journal_key(self.watch, rel));
        let known = self.row_for(&key)?;
        if changed(known, stat_key(meta)) {
            self.stats.folders_changed += 1;
            self.dirty.push((key, self.watch.name.clone(), None));
        }
        Ok(())
    }

    /// A file or symlink found at `rel`.
    fn file(&mut self, rel: &Path, meta: &std::fs::Metadata) -> Result<(), JournalError> {
        let key = journal_key(self.watch, rel);
        let known = self.row_for(&key)?;
        self.stats.files += 1;
        let cur = stat_key(meta);
        if changed(known, cur) {
            self.stats.changed += 1;
            self.dirty
                .push((key, self.watch.name.clone(), Some(cur.size)));
        }
        Ok(())
    }

    /// A folder at `key` (with its `/`) that could not be listed: the rows under it are
    /// left as they are.
    fn unlisted(&mut self, key: Vec<u8>) -> Result<(), JournalError> {
        // Rows before it were passed by the walk already.
        self.row_for(&key)?;
        self.unreadable = Some(key);
        Ok(())
    }

    /// Journals the changes found so far (the uploader starts on them while the walk goes
    /// on); with `all`, however few.
    fn flush(&mut self, all: bool) -> Result<(), JournalError> {
        if self.dirty.is_empty() || (!all && self.dirty.len() < SCAN_FLUSH) {
            return Ok(());
        }
        if let Ok(mut j) = self.journal.lock() {
            j.mark_dirty_sized(&self.dirty, now_ms(), self.delay_ms)?;
        }
        self.dirty.clear();
        Ok(())
    }
}

/// Scans `watch` (or only `sub`, a folder inside it) and marks changes in the journal.
/// The walk and the journal's rows under the scanned folder are compared as two streams in
/// the same order ([`merge`]): memory does not grow with the number of files. Rows that
/// change while the scan runs only cause extra dirty marks, never a missed change: the
/// comparison is with the file system as walked now.
/// `stopping` is asked before each folder: once it says true the walk ends early (see
/// [`ScanStats::interrupted`]).
pub fn scan(
    watch: &Watch,
    sub: Option<&Path>,
    journal: &Mutex<Journal>,
    delay_ms: i64,
    stopping: &dyn Fn() -> bool,
) -> Result<ScanStats, JournalError> {
    let start = match sub {
        Some(s) => s.to_path_buf(),
        None => watch.path.clone(),
    };
    let Ok(start_rel) = start.strip_prefix(&watch.path).map(Path::to_path_buf) else {
        return Ok(ScanStats::default());
    };
    let prefix = journal_key(watch, &start_rel);
    let mut m = Merge {
        watch,
        journal,
        delay_ms,
        rows: merge::JournalRows::under(journal, &prefix),
        stats: ScanStats::default(),
        dirty: Vec::new(),
        gone: Vec::new(),
        backed_up_files: 0,
        unreadable: None,
    };
    // The scanned folder's own row (a folder's row is checked where its parent lists it).
    if let Ok(meta) = std::fs::symlink_metadata(&start) {
        if meta.is_dir() {
            m.folder(&start_rel, &meta)?;
        }
    }
    let mut errors = 0u64;
    let mut on_error = |dir: &Path, e: std::io::Error| {
        tracing::warn!(path = %dir.display(), error = %e, "reading folder entry");
        errors += 1;
    };
    let mut stack: Vec<merge::Folder> = Vec::new();
    if stopping() {
        m.stats.interrupted = true;
        m.flush(true)?;
        return Ok(m.stats);
    }
    match merge::Folder::open(&start, &mut on_error) {
        Ok(f) => stack.push(f),
        Err(e) => {
            if sub.is_none() && e.kind() == std::io::ErrorKind::NotFound {
                tracing::warn!(watch = %watch.name, path = %start.display(), "watched folder does not exist");
            } else {
                tracing::warn!(path = %start.display(), error = %e, "cannot read folder; its files are left as they were");
            }
            m.stats.errors += 1;
            m.unlisted(folder_key(&prefix))?;
        }
    }
    while let Some(folder) = stack.last_mut() {
        let Some(e) = folder.next_entry() else {
            stack.pop();
            continue;
        };
        let path = e.entry.path();
        let rel = match path.strip_prefix(&watch.path) {
            Ok(r) => r.to_path_buf(),
            Err(_) => continue,
        };
        if watch.excluded(&rel) {
            continue;
        }
        if e.is_dir() {
            if let Ok(meta) = e.entry.metadata() {
                m.folder(&rel, &meta)?;
            }
            if stopping() {
                m.stats.interrupted = true;
                m.flush(true)?;
                m.stats.errors += errors;
                return Ok(m.stats);
            }
            match merge::Folder::open(&path, &mut on_error) {
                Ok(f) => stack.push(f),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read folder; its files are left as they were");
                    m.stats.errors += 1;
                    m.unlisted(folder_key(&journal_key(watch, &rel)))?;
                }
            }
            m.flush(false)?;
            continue;
        }
        // FIFOs, sockets and devices are backed up as such, as files are.
        // fstatat on the open folder: no walk of the whole path per file.
        let meta = match e.entry.metadata() {
            Ok(meta) => meta,
            Err(_) => continue, // vanished: a watcher event or the next scan handles it
        };
        m.file(&rel, &meta)?;
    }
    m.stats.errors += errors;
    // The rows after the last path walked were not found.
    while let Some((k, known)) = m.rows.next()? {
        m.unseen(k, known);
    }
    let mut stats = m.stats;
    let mut dirty = std::mem::take(&mut m.dirty);
    let gone = std::mem::take(&mut m.gone);
    // More than the watch's share of its files gone at once: held, not recorded. A whole
    // watch's scan passed all its rows; a folder's asks the journal for the watch's count.
    let files = if stats.deleted == 0 || sub.is_none() {
        m.backed_up_files
    } else {
        let (lo, hi) = merge::range_under(watch.name.as_bytes());
        match journal.lock() {
            Ok(j) => j.backed_up_files_in(&lo, &hi)?,
            Err(_) => return Ok(stats),
        }
    };
    let hold = crate::avail::holds(stats.deleted, files, watch.max_delete_share);
    let (held, recorded) = if hold {
        (gone, Vec::new())
    } else {
        (Vec::new(), gone)
    };
    if hold {
        stats.held = held.len() as u64;
        tracing::warn!(watch = %watch.name, deleted = stats.deleted, files,
            share = watch.max_delete_share,
            "more than max_delete_share of the watch's files are gone: their deletions are \
             held until `coffer-agent confirm-deletions {}`", watch.name);
    } else {
        dirty.extend(recorded.into_iter().map(|p| (p, watch.name.clone(), None)));
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
        let stats = scan(&watch, None, &j, 0, &|| false).expect("scan");
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
        let stats = scan(&watch, None, &j, 0, &stopping).expect("scan");
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
        let stats = scan(&watch, None, &j, 0, &|| false).expect("scan");
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
        let stats = scan(&watch, None, &j, 0, &|| false).expect("scan");
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
        let stats = scan(&watch, None, &j, 0, &|| false).expect("scan");
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
        let stats = scan(&watch, None, &j, 0, &|| false).expect("scan");
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
