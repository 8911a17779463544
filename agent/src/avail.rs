//! Whether a watch's folder is there to back up, and how many deletions a scan may record.
//!
//! A watch is *unavailable* when its root is missing (or not a folder, or cannot be
//! looked up), is an empty mount point, or is on another file system than before; then
//! nothing under it is recorded as deleted (not by a scan, not by the watcher's events of
//! an unmount, not by the uploader), `status` and `/metrics` say so, and the daemon polls
//! the root (a few `stat`s every [`POLL`]) and rescans it once it is back. The rules, in
//! [`check`], are in docs/design.md ("Unavailable watches").
//!
//! A scan that would record more than `max_delete_share` of a watch's files as deleted at
//! once holds those deletions ([`holds`]) until `confirm-deletions`.
//!
//! This file holds the pure rules and [`Tracker`], the daemon's record of each watch's
//! device and state (kept in the journal's `meta`: `watch_device:<watch>`,
//! `watch_unavailable:<watch>`). Only the tracker writes those keys.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

use crate::config::Watch;
use crate::journal::{Journal, MetaKey};
use coffer_common::host::time::now_ms;

/// How often the daemon looks at each watch's root.
pub const POLL: Duration = Duration::from_secs(2);

/// Where a watch's folder was when last available: its file system's device (`st_dev`)
/// and the folder that file system is mounted at (the highest of the root and its
/// ancestors on that device; `/` for the root file system).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub dev: u64,
    pub mount: PathBuf,
}

/// Why a watch is unavailable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The root does not exist (or a folder above it does not).
    Missing,
    /// The root exists but is not a folder.
    NotAFolder,
    /// The root cannot be looked up (permission denied...).
    Unreadable(String),
    /// The root is a mount point with nothing in it, or was one and is now an empty folder
    /// of the file system below (the disk is not mounted).
    EmptyMountPoint,
    /// The root is no longer on the file system it was on, nor where that one was mounted:
    /// the disk that held it is gone and another folder took its place.
    OtherDevice { was: Place, now: Place },
}

impl Reason {
    /// A stable one-word name (`status --json`'s `reason`).
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::NotAFolder => "not_a_folder",
            Reason::Unreadable(_) => "unreadable",
            Reason::EmptyMountPoint => "empty_mount_point",
            Reason::OtherDevice { .. } => "other_device",
        }
    }

    /// What is wrong with `root`, in words.
    pub fn describe(&self, root: &Path) -> String {
        let r = root.display();
        match self {
            Reason::Missing => format!("root {r} is missing"),
            Reason::NotAFolder => format!("root {r} is not a folder"),
            Reason::Unreadable(e) => format!("root {r} cannot be looked up: {e}"),
            Reason::EmptyMountPoint => format!("root {r} is an empty mount point"),
            Reason::OtherDevice { was, now } => format!(
                "root {r} is another device: it was on device {} mounted at {}, it is now on \
                 device {} mounted at {}",
                dev_name(was.dev),
                was.mount.display(),
                dev_name(now.dev),
                now.mount.display()
            ),
        }
    }
}

fn dev_name(dev: u64) -> String {
    format!(
        "{}:{}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    )
}

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    Available(Place),
    Unavailable(Reason),
}

/// True when `dir` has no entry (or cannot be listed: then it is not known to be empty).
fn is_empty(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => rd.next().is_none(),
        Err(_) => false,
    }
}

/// The device of `p` (following symlinks), if it can be looked up.
fn dev_of(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.dev())
}

/// Whether `dir` (on device `dev`) is a mount point: the root of the file system tree, or
/// on another device than its parent. A bind mount of a folder of the same file system is
/// not told apart (`st_dev` is all this looks at).
fn is_mount_point(dir: &Path, dev: u64) -> bool {
    match dir.parent() {
        None => true,
        Some(parent) => dev_of(parent).is_some_and(|d| d != dev),
    }
}

/// The folder the file system holding `dir` (on `dev`) is mounted at: the highest of `dir`
/// and its ancestors on the same device.
fn mount_of(dir: &Path, dev: u64) -> PathBuf {
    let mut top = dir.to_path_buf();
    let mut cur = dir;
    while let Some(parent) = cur.parent() {
        if dev_of(parent) != Some(dev) {
            break;
        }
        top = parent.to_path_buf();
        cur = parent;
    }
    top
}

/// Whether the watch rooted at `root` is available, given where it was when last
/// available (`last`, `None` when never recorded):
/// 1. the root cannot be looked up: missing, not a folder, or unreadable;
/// 2. the root is a mount point now: available unless empty (an empty mount point);
/// 3. it is not a mount point, and both its device and its file system's mount folder
///    differ from those recorded: it was a mount point and is empty (an empty mount point)
///    or something else took the disk's place (another device);
/// 4. otherwise available, an empty ordinary folder included (a new user's first folder):
///    a device number that changed while the file system is mounted where it was (a
///    remount gives tmpfs, btrfs and network file systems a new one) is the same place.
pub fn check(root: &Path, last: Option<&Place>) -> Availability {
    let meta = match std::fs::metadata(root) {
        Ok(m) => m,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            return Availability::Unavailable(Reason::Missing)
        }
        Err(e) => {
            return Availability::Unavailable(Reason::Unreadable(
                coffer_common::host::fs::describe(&e),
            ))
        }
    };
    if !meta.is_dir() {
        return Availability::Unavailable(Reason::NotAFolder);
    }
    let dev = meta.dev();
    if is_mount_point(root, dev) {
        if is_empty(root) {
            return Availability::Unavailable(Reason::EmptyMountPoint);
        }
        return Availability::Available(Place {
            dev,
            mount: root.to_path_buf(),
        });
    }
    let now = Place {
        dev,
        mount: mount_of(root, dev),
    };
    if let Some(was) = last {
        if was.dev != now.dev && was.mount != now.mount {
            if was.mount == root && is_empty(root) {
                return Availability::Unavailable(Reason::EmptyMountPoint);
            }
            return Availability::Unavailable(Reason::OtherDevice {
                was: was.clone(),
                now,
            });
        }
    }
    Availability::Available(now)
}

/// Whether a scan that finds `deleted` of a watch's `files` gone must hold those
/// deletions: when they are more than `share` (0.0 to 1.0) of its files. A watch with no
/// files has nothing to delete.
pub fn holds(deleted: u64, files: u64, share: f64) -> bool {
    deleted > 0 && (deleted as f64) > share * files as f64
}

/// `Place` as kept in `meta` (`{"dev": N, "mount": "hex of the path's bytes"}`).
fn place_to_meta(p: &Place) -> String {
    let hex: String = p
        .mount
        .as_os_str()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    json!({"dev": p.dev, "mount": hex}).to_string()
}

fn place_from_meta(s: &str) -> Option<Place> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    let dev = v["dev"].as_u64()?;
    let hex = v["mount"].as_str()?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(Place {
        dev,
        mount: PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)),
    })
}

/// Where the watch named `name` was when last available, as recorded in the journal.
pub fn recorded_place(j: &Journal, name: &str) -> Option<Place> {
    j.meta(MetaKey::WatchDevice(name))
        .ok()
        .flatten()
        .and_then(|s| place_from_meta(&s))
}

/// Since when (unix ms) the daemon has found the watch named `name` unavailable, if it has.
pub fn unavailable_since(j: &Journal, name: &str) -> Option<i64> {
    let s = j.meta(MetaKey::WatchUnavailable(name)).ok().flatten()?;
    let v: serde_json::Value = serde_json::from_str(&s).ok()?;
    v["since_ms"].as_i64()
}

/// A change of a watch's availability found by [`Tracker::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// As it was.
    Same,
    /// It became unavailable.
    Lost,
    /// It is available again (or was found available for the first time after being
    /// unavailable at start).
    Back,
}

#[derive(Debug, Default)]
struct Entry {
    loaded: bool,
    place: Option<Place>,
    /// Since when it is unavailable (unix ms), and why.
    down: Option<(i64, Reason)>,
}

/// The daemon's view of each watch's availability. Each check looks at the root now; the
/// tracker keeps the place last seen available and the state, mirrored in the journal.
#[derive(Debug, Default)]
pub struct Tracker {
    watches: Mutex<HashMap<String, Entry>>,
}

impl Tracker {
    /// Looks at `w`'s root now and records what changed (in the journal too, on a
    /// change): `Ok` with the change when it is available, `Err` with why it is not.
    pub fn check(&self, w: &Watch, journal: &Mutex<Journal>) -> Result<Change, (Reason, Change)> {
        let Ok(mut all) = self.watches.lock() else {
            return Ok(Change::Same);
        };
        let e = all.entry(w.name.clone()).or_default();
        if !e.loaded || e.down.is_some() {
            // While it is down, `confirm-deletions` may forget its place (a new device).
            if let Ok(j) = journal.lock() {
                e.place = recorded_place(&j, &w.name);
                if !e.loaded {
                    e.down = unavailable_since(&j, &w.name).map(|s| (s, Reason::Missing));
                }
            }
            e.loaded = true;
        }
        match check(&w.path, e.place.as_ref()) {
            Availability::Available(place) => {
                let back = e.down.take().is_some();
                if e.place.as_ref() != Some(&place) || back {
                    if let Ok(mut j) = journal.lock() {
                        let _ = j.set_meta(MetaKey::WatchDevice(&w.name), &place_to_meta(&place));
                        if back {
                            let _ = j.set_meta(MetaKey::WatchUnavailable(&w.name), "");
                        }
                    }
                    e.place = Some(place);
                }
                if back {
                    tracing::warn!(watch = %w.name, path = %w.path.display(),
                        "watched folder is available again; rescanning it");
                    return Ok(Change::Back);
                }
                Ok(Change::Same)
            }
            Availability::Unavailable(reason) => {
                let lost = match &e.down {
                    Some((_, r)) => *r != reason,
                    None => true,
                };
                if !lost {
                    return Err((reason, Change::Same));
                }
                let since = e.down.as_ref().map(|(s, _)| *s).unwrap_or_else(now_ms);
                let first = e.down.is_none();
                e.down = Some((since, reason.clone()));
                if let Ok(mut j) = journal.lock() {
                    let v = json!({"since_ms": since, "reason": reason.code(),
                        "message": reason.describe(&w.path)});
                    let _ = j.set_meta(MetaKey::WatchUnavailable(&w.name), &v.to_string());
                }
                tracing::error!(watch = %w.name, why = %reason.describe(&w.path),
                    "watched folder is UNAVAILABLE: nothing under it is backed up and no \
                     deletions are recorded until it is back");
                Err((reason, if first { Change::Lost } else { Change::Same }))
            }
        }
    }

    /// Whether `w` is available now (a check; see [`Tracker::check`]).
    pub fn available(&self, w: &Watch, journal: &Mutex<Journal>) -> bool {
        self.check(w, journal).is_ok()
    }

    /// Forgets the place recorded for the watch named `name` (`confirm-deletions` of a
    /// watch on another device): the next check records where it is now.
    pub fn forget_place(j: &mut Journal, name: &str) -> Result<(), crate::journal::JournalError> {
        j.set_meta(MetaKey::WatchDevice(name), "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place_of(p: &Path) -> Place {
        match check(p, None) {
            Availability::Available(pl) => pl,
            other => panic!("{} not available: {other:?}", p.display()),
        }
    }

    #[test]
    fn a_missing_root_or_a_file_is_unavailable() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            check(&d.path().join("nope"), None),
            Availability::Unavailable(Reason::Missing)
        );
        std::fs::write(d.path().join("f"), b"x").expect("write");
        assert_eq!(
            check(&d.path().join("f"), None),
            Availability::Unavailable(Reason::NotAFolder)
        );
        assert_eq!(
            check(&d.path().join("f/below"), None),
            Availability::Unavailable(Reason::Missing)
        );
    }

    /// A new user's empty folder is a folder to back up, before and after it is recorded.
    #[test]
    fn an_ordinary_empty_folder_is_available() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("empty");
        std::fs::create_dir(&root).expect("mkdir");
        let pl = place_of(&root);
        assert_eq!(check(&root, Some(&pl)), Availability::Available(pl.clone()));
        assert!(pl.mount != root, "not a mount point: {pl:?}");
    }

    #[test]
    fn a_place_with_another_device_and_mount_is_another_device_or_an_empty_mount_point() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("w");
        std::fs::create_dir(&root).expect("mkdir");
        let now = place_of(&root);
        // Recorded as the mount point of another device: it is now an empty folder.
        let was = Place {
            dev: now.dev.wrapping_add(1),
            mount: root.clone(),
        };
        assert_eq!(
            check(&root, Some(&was)),
            Availability::Unavailable(Reason::EmptyMountPoint)
        );
        std::fs::write(root.join("stray"), b"x").expect("write");
        assert!(matches!(
            check(&root, Some(&was)),
            Availability::Unavailable(Reason::OtherDevice { .. })
        ));
        // Recorded on a file system mounted higher up that is gone: another device.
        let was = Place {
            dev: now.dev.wrapping_add(1),
            mount: d.path().to_path_buf(),
        };
        assert!(matches!(
            check(&root, Some(&was)),
            Availability::Unavailable(Reason::OtherDevice { .. })
        ));
        // A new device number where the same mount folder is: a remount, available.
        let was = Place {
            dev: now.dev.wrapping_add(1),
            mount: now.mount.clone(),
        };
        assert_eq!(check(&root, Some(&was)), Availability::Available(now));
    }

    #[test]
    fn the_share_is_exceeded_only_above_it() {
        assert!(!holds(0, 0, 0.5));
        assert!(!holds(0, 10, 0.5));
        assert!(!holds(5, 10, 0.5), "half is not more than half");
        assert!(holds(6, 10, 0.5));
        assert!(holds(24, 30, 0.5), "80%");
        assert!(holds(1, 1, 0.5), "a small folder's user confirms");
        assert!(!holds(1, 3, 0.5));
        assert!(!holds(10, 10, 1.0), "100% never holds");
        assert!(holds(1, 100, 0.0), "0% holds every deletion");
    }

    /// The tracker records the place while available, the state and its time while not
    /// (in the journal, for `status`), and says when a watch is lost and back.
    #[test]
    fn the_tracker_records_each_change_once() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("w");
        std::fs::create_dir(&root).expect("mkdir");
        let w = Watch {
            path: root.clone(),
            name: "w".into(),
            exclude: globset::GlobSet::empty(),
            exclude_patterns: Vec::new(),
            max_delete_share: crate::config::DEFAULT_MAX_DELETE_SHARE,
        };
        let j = Mutex::new(Journal::open(&d.path().join("j.sqlite")).expect("journal"));
        let t = Tracker::default();
        assert_eq!(t.check(&w, &j), Ok(Change::Same));
        let place = recorded_place(&j.lock().expect("journal"), "w").expect("recorded");
        assert_eq!(place, place_of(&root));
        std::fs::rename(&root, d.path().join("moved")).expect("rename");
        assert_eq!(t.check(&w, &j), Err((Reason::Missing, Change::Lost)));
        assert_eq!(t.check(&w, &j), Err((Reason::Missing, Change::Same)));
        let since = unavailable_since(&j.lock().expect("journal"), "w").expect("since");
        // A new tracker (a restart) keeps the time it was first found unavailable.
        let t2 = Tracker::default();
        assert_eq!(t2.check(&w, &j), Err((Reason::Missing, Change::Same)));
        assert_eq!(
            unavailable_since(&j.lock().expect("journal"), "w"),
            Some(since)
        );
        std::fs::rename(d.path().join("moved"), &root).expect("rename back");
        assert_eq!(t2.check(&w, &j), Ok(Change::Back));
        assert_eq!(t2.check(&w, &j), Ok(Change::Same));
        assert_eq!(unavailable_since(&j.lock().expect("journal"), "w"), None);
    }

    #[test]
    fn a_place_round_trips_through_meta() {
        let p = Place {
            dev: 2049,
            mount: PathBuf::from(std::ffi::OsStr::from_bytes(b"/mnt/\xffodd")),
        };
        assert_eq!(place_from_meta(&place_to_meta(&p)), Some(p));
        assert_eq!(place_from_meta(""), None);
        assert_eq!(place_from_meta("{\"dev\":1,\"mount\":\"zz\"}"), None);
    }
}
