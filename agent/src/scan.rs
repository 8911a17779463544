//! Scans: compare a watched tree with the journal and mark what changed as dirty.
//!
//! Only `lstat` is used: a file whose size, mtime (ns), ctime (ns) and inode equal those
//! recorded when it was last read is not read again. Paths in the journal that are no longer
//! on disk are marked dirty too; the uploader then records them as deletions.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::Watch;
use crate::journal::{now_ms, Journal, JournalError, Known, StatKey};

/// What a scan found.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanStats {
    pub files: u64,
    pub changed: u64,
    pub deleted: u64,
    pub skipped_special: u64,
    pub errors: u64,
}

/// The journal path (`name/rel`) of a path relative to a watch.
pub fn journal_path(watch: &Watch, rel: &Path) -> Vec<u8> {
    let mut p = Vec::with_capacity(watch.name.len() + 1 + rel.as_os_str().len());
    p.extend_from_slice(watch.name.as_bytes());
    if !rel.as_os_str().is_empty() {
        p.push(b'/');
        p.extend_from_slice(rel.as_os_str().as_bytes());
    }
    p
}

/// The file-system path of a journal path, if it belongs to one of `watches`.
pub fn fs_path<'a>(watches: &'a [Watch], jpath: &[u8]) -> Option<(&'a Watch, PathBuf)> {
    let slash = jpath.iter().position(|&b| b == b'/');
    let (name, rel) = match slash {
        Some(i) => (&jpath[..i], &jpath[i + 1..]),
        None => (jpath, &b""[..]),
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

/// Changed files journaled per transaction during a walk.
const SCAN_FLUSH: usize = 4096;

/// Scans `watch` (or only `sub`, a folder inside it) and marks changes in the journal.
/// `preloaded`: the watch's journal rows read earlier (the startup scan reads them while the
/// OS watches are being added). Rows that changed since only cause extra dirty marks,
/// never a missed change: the comparison is with the file system as walked now.
pub fn scan(
    watch: &Watch,
    sub: Option<&Path>,
    journal: &Mutex<Journal>,
    delay_ms: i64,
    preloaded: Option<HashMap<Vec<u8>, Known>>,
) -> Result<ScanStats, JournalError> {
    let known = match preloaded {
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
    let mut seen: HashSet<Vec<u8>> = HashSet::with_capacity(known.len());
    let mut unreadable: Vec<Vec<u8>> = Vec::new();
    let mut dirty: Vec<(Vec<u8>, String)> = Vec::new();
    let mut stack = vec![start.clone()];
    while let Some(dir) = stack.pop() {
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
                    unreadable.push(journal_path(watch, rel));
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
                stack.push(path);
                continue;
            }
            let jp = journal_path(watch, &rel);
            if !(ft.is_file() || ft.is_symlink()) {
                stats.skipped_special += 1;
                continue;
            }
            // fstatat on the open folder: no walk of the whole path per file.
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(_) => continue, // vanished: a watcher event or the next scan handles it
            };
            stats.files += 1;
            let cur = stat_key(&meta);
            let changed = match known.get(&jp) {
                None => true,
                Some(k) => match k.state.as_str() {
                    "backed_up" => k.stat != Some(cur) || k.kind.as_deref() == Some("deleted"),
                    "failed" => k.stat != Some(cur),
                    _ => false, // already queued
                },
            };
            if changed {
                stats.changed += 1;
                dirty.push((jp.clone(), watch.name.clone()));
            }
            seen.insert(jp);
        }
        if dirty.len() >= SCAN_FLUSH {
            // Journal what was found so far: the uploader starts on it while the walk goes
            // on (a first scan of 100,000 files walks for about a second).
            if let Ok(mut j) = journal.lock() {
                j.mark_dirty(&dirty, now_ms(), delay_ms)?;
            }
            dirty.clear();
        }
    }
    // Paths known under the scanned folder but not seen are gone (unless their folder could
    // not be read).
    let prefix = journal_path(
        watch,
        start.strip_prefix(&watch.path).unwrap_or(Path::new("")),
    );
    for (p, k) in &known {
        if seen.contains(p) || !under(p, &prefix) || unreadable.iter().any(|u| under(p, u)) {
            continue;
        }
        let already_deleted = k.state == "backed_up" && k.kind.as_deref() == Some("deleted");
        if !already_deleted && k.state == "backed_up" {
            stats.deleted += 1;
            dirty.push((p.clone(), watch.name.clone()));
        } else if k.state == "failed" {
            dirty.push((p.clone(), watch.name.clone()));
        }
    }
    if let Ok(mut j) = journal.lock() {
        j.mark_dirty(&dirty, now_ms(), delay_ms)?;
        if stats.skipped_special > 0 {
            j.set_counter(
                &format!("skipped_special:{}", watch.name),
                stats.skipped_special as i64,
            )?;
        }
    }
    Ok(stats)
}

fn under(p: &[u8], prefix: &[u8]) -> bool {
    p.len() > prefix.len() && p.starts_with(prefix) && p[prefix.len()] == b'/'
}
