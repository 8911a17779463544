//! The restore target, walked by folder handles.
//!
//! Nothing a restore writes is reached by a path from the top. The target is opened once
//! (`O_DIRECTORY | O_NOFOLLOW`); each folder under it is created with `mkdirat` and opened
//! relative to its parent's handle the same way; every file, temporary file and symlink is
//! created (`O_CREAT | O_EXCL | O_NOFOLLOW`, `symlinkat`), renamed (`renameat`) and removed
//! (`unlinkat`) relative to its folder's handle. So a folder swapped for a symlink after it
//! was checked is never followed: a file lands in the folder this restore opened (wherever
//! that has been moved since) or fails. Handles are cached, at most [`HANDLES`] besides the
//! target's own; an evicted one is opened again from its parent's handle and must still be
//! the folder first opened (same device and inode), or its files fail saying it was
//! replaced.
//!
//! Folders are created 0700, so no one else can look into one while it is filled; once
//! every file is written, [`Tree::settle_folders`] gives each its recorded mode, owner and
//! mtime (a folder backed up with a version of its own), or the mode a new folder gets
//! under the umask (one without, from a backup made before folders had versions), deepest
//! first, through the same handles.
//!
//! This file owns those handles and two rules: whose folders a restore writes into
//! ([`Shared`]), and the mode a restored file or folder gets ([`restored_mode`]). `mod.rs`
//! decides what is written where.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use coffer_common::host::fs::{describe, Context as _, IoError};
use coffer_common::manifest::{safe_components, Manifest};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::RestoreError;

/// Folder handles kept open at most, besides the target's. Files are restored in path
/// order, so the folders in use at once are few; a deep tree evicts and reopens.
const HANDLES: usize = 32;

/// A folder of the target (the target itself, or one found in it) that another user could
/// change while the restore writes into it.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to restore into {}: it {why}, so another user could swap what the restore writes \
     (restore into a folder of your own that only you can write to, or pass --allow-shared-target)",
    path.display()
)]
pub struct Shared {
    pub path: PathBuf,
    pub why: String,
}

/// Why a folder with this owner and mode is not the restoring user's alone (`None`: it is).
/// Group and other write bits on a folder this restore `created` are the umask's doing, not
/// another user's, and are let be.
fn exposure(uid: u32, mode: u32, me: u32, created: bool) -> Option<String> {
    if uid != me {
        return Some(format!(
            "is owned by uid {uid}, not by this user (uid {me})"
        ));
    }
    if !created && mode & 0o022 != 0 {
        return Some(format!(
            "is writable by group or others (mode {:04o}; `chmod go-w` it if that is not meant)",
            mode & 0o7777
        ));
    }
    None
}

/// Whether a restored file's owner was set (only root sets it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Not restoring as root: the file is the restoring user's.
    Unchanged,
    /// Set to the recorded owner.
    Set,
    /// Setting it failed: the file is root's.
    Failed,
}

/// The mode a restored file gets: the recorded one, without setuid and setgid when restoring
/// as root unless `keep_setuid`, and always when setting the owner failed (the file would
/// run as root instead of as its recorded owner).
pub fn restored_mode(mode: u32, owner: Owner, keep_setuid: bool) -> u32 {
    let mode = mode & 0o7777;
    match owner {
        Owner::Unchanged => mode,
        Owner::Set if keep_setuid => mode,
        Owner::Set | Owner::Failed => mode & !0o6000,
    }
}

/// Why a path cannot be prepared: this file fails (`File`), or the restore is refused.
pub enum Refusal {
    File(String),
    Shared(Shared),
}

/// Where one file is restored: a name in a folder of the tree.
pub struct Dest {
    pub folder: usize,
    pub name: OsString,
    /// Nothing is there (a file of at most one chunk may be created under its own name).
    pub fresh: bool,
}

/// A folder of the target, as first opened.
struct Folder {
    /// The folder it is in (the target's own entry, 0, names itself).
    parent: usize,
    name: OsString,
    /// Its path, for messages.
    shown: PathBuf,
    /// Device and inode: a reopened handle must be the same folder.
    id: (u64, u64),
    /// Created by this restore, or the target found empty: each name in it is free
    /// (manifest paths are distinct, and an exclusive create fails on anything that
    /// appeared meanwhile), so no name needs a look of its own.
    fresh: bool,
    /// Created by this restore (0700 until [`Tree::settle_folders`]).
    created: bool,
}

/// Recently used folder handles.
#[derive(Default)]
struct Cache {
    open: HashMap<usize, (Arc<File>, u64)>,
    tick: u64,
}

/// The restore target: its handle, the folders found or created in it, and their handles.
pub struct Tree {
    root: Arc<File>,
    folders: Vec<Folder>,
    /// Each folder by its path relative to the target (manifest bytes; the target's is "").
    index: HashMap<Vec<u8>, usize>,
    cache: Mutex<Cache>,
    me: u32,
    allow_shared: bool,
    /// The process's umask when the target was opened: a folder made without a recorded
    /// mode ends as `0777 & !umask`, as any new folder would.
    umask: u32,
}

fn io(e: Errno) -> std::io::Error {
    e.into()
}

/// Opens folder `name` in `dir`, never through a symlink.
fn open_dir(dir: &File, name: &OsStr, shown: &Path) -> Result<File, String> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => Ok(File::from(fd)),
        Err(e) => Err(
            match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                    FileType::Symlink => symlink_refused(shown),
                    FileType::Directory => {
                        format!("opening {}: {}", shown.display(), describe(&io(e)))
                    }
                    _ => format!("{} exists and is not a folder", shown.display()),
                },
                Err(_) => format!("opening {}: {}", shown.display(), describe(&io(e))),
            },
        ),
    }
}

/// Sets a folder's recorded owner (as root), mode and mtime through its handle.
fn set_folder_meta(h: &File, m: &Manifest, as_root: bool, keep_setuid: bool) -> Result<(), String> {
    let owner = if !as_root {
        Owner::Unchanged
    } else if m.uid != u32::MAX
        && m.gid != u32::MAX
        && std::os::unix::fs::fchown(h, Some(m.uid), Some(m.gid)).is_ok()
    {
        Owner::Set
    } else {
        Owner::Failed
    };
    let mode = restored_mode(m.mode, owner, keep_setuid);
    rustix::fs::fchmod(h, Mode::from_bits_truncate(mode))
        .map_err(|e| format!("setting mode {mode:04o}: {}", describe(&io(e))))?;
    for w in crate::fidelity::xattr::restore_fd(
        h,
        &m.xattrs,
        Path::new(&String::from_utf8_lossy(&m.path).into_owned()),
    ) {
        eprintln!("warning: {w}");
    }
    let ts = rustix::fs::Timespec {
        tv_sec: m.mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: m.mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::futimens(h, &times).map_err(|e| format!("setting mtime: {}", describe(&io(e))))
}

/// The process's umask (set and set back: nothing else creates files meanwhile).
fn current_umask() -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    nix::sys::stat::umask(old);
    old.bits() as u32 & 0o777
}

fn symlink_refused(shown: &Path) -> String {
    format!(
        "{} is a symlink in the target; refusing to write through it",
        shown.display()
    )
}

/// Whether the folder behind `dir` holds no entry.
fn is_empty(dir: &File, shown: &Path) -> Result<bool, IoError> {
    let entries =
        rustix::fs::Dir::read_from(dir).map_err(|e| IoError::new("reading", shown, io(e)))?;
    for e in entries {
        let e = e.map_err(|e| IoError::new("reading", shown, io(e)))?;
        if !matches!(e.file_name().to_bytes(), b"." | b"..") {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A name for a temporary file beside a destination.
pub fn temp_name() -> OsString {
    let mut r = [0u8; 6];
    let _ = coffer_common::keys::fill_random(&mut r);
    format!(".coffer-restore-{}", coffer_common::chunk::to_hex(&r)).into()
}

impl Tree {
    /// Opens the target `to` (creating it and its parents if missing). One that exists and
    /// is not empty is refused unless `overwrite`; one that another user owns, or that
    /// group or others may write to (unless this restore made it), unless `allow_shared`.
    pub fn open(to: &Path, overwrite: bool, allow_shared: bool) -> Result<Self, RestoreError> {
        let created = match std::fs::symlink_metadata(to) {
            Ok(m) if m.is_dir() => false,
            Ok(_) => {
                return Err(RestoreError::Usage(format!(
                    "{} exists and is not a folder",
                    to.display()
                )))
            }
            Err(_) => {
                std::fs::create_dir_all(to).ctx("creating", to)?;
                true
            }
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let root = rustix::fs::open(to, flags, Mode::empty())
            .map(File::from)
            .map_err(|e| IoError::new("opening", to, io(e)))?;
        let empty = created || is_empty(&root, to)?;
        if !empty && !overwrite {
            return Err(RestoreError::Usage(format!(
                "{} is not empty; pass --overwrite to restore into it",
                to.display()
            )));
        }
        let meta = root.metadata().ctx("reading", to)?;
        let me = nix::unistd::geteuid().as_raw();
        if !allow_shared {
            if let Some(why) = exposure(meta.uid(), meta.mode(), me, created) {
                return Err(Shared {
                    path: to.to_path_buf(),
                    why,
                }
                .into());
            }
        }
        Ok(Tree {
            root: Arc::new(root),
            folders: vec![Folder {
                parent: 0,
                name: OsString::new(),
                shown: to.to_path_buf(),
                id: (meta.dev(), meta.ino()),
                fresh: empty,
                created: false,
            }],
            index: HashMap::from([(Vec::new(), 0)]),
            cache: Mutex::default(),
            me,
            allow_shared,
            umask: current_umask(),
        })
    }

    /// Where manifest path `path` is restored, its folders created (or found, never through
    /// a symlink). Unsafe paths fail that file; a folder found that another user could
    /// change refuses the restore.
    pub fn prepare(&mut self, path: &[u8]) -> Result<Dest, Refusal> {
        let parts = safe_components(path).map_err(|e| Refusal::File(e.to_string()))?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(Refusal::File("empty path".into()));
        };
        // The folder's path is the manifest path up to its last '/' (components are
        // checked: no empty or dot ones), usually known already.
        let dir_len = path.len() - name.len() - usize::from(!dirs.is_empty());
        let folder = match self.index.get(&path[..dir_len]) {
            Some(&f) => f,
            None => self.walk(path, dirs)?,
        };
        let name = OsStr::from_bytes(name).to_os_string();
        let fresh = self.folders.get(folder).is_some_and(|f| f.fresh)
            || self.is_free(folder, &name).map_err(Refusal::File)?;
        Ok(Dest {
            folder,
            name,
            fresh,
        })
    }

    /// The folder at manifest path `path` (a folder's version), created if missing, with the
    /// folders above it; refused as [`Tree::prepare`] refuses a file's folders.
    pub fn folder(&mut self, path: &[u8]) -> Result<usize, Refusal> {
        if let Some(&f) = self.index.get(path) {
            return Ok(f);
        }
        let parts = safe_components(path).map_err(|e| Refusal::File(e.to_string()))?;
        self.walk(path, &parts)
    }

    /// Finds or creates each of `dirs` (the folders of `path`), one below the other.
    fn walk(&mut self, path: &[u8], dirs: &[&[u8]]) -> Result<usize, Refusal> {
        let (mut folder, mut end) = (0, 0);
        for (i, part) in dirs.iter().enumerate() {
            end += part.len() + usize::from(i > 0);
            let key = &path[..end];
            folder = match self.index.get(key) {
                Some(&f) => f,
                None => {
                    let f = self.enter(folder, OsStr::from_bytes(part))?;
                    self.index.insert(key.to_vec(), f);
                    f
                }
            };
        }
        Ok(folder)
    }

    /// Opens folder `name` in folder `parent`, creating it if missing; refuses a symlink,
    /// anything but a folder, and a folder found that another user could change.
    fn enter(&mut self, parent: usize, name: &OsStr) -> Result<usize, Refusal> {
        let shown = self.shown(parent, name);
        let dir = self.handle(parent).map_err(Refusal::File)?;
        let (handle, created) = match rustix::fs::statat(&*dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => (open_dir(&dir, name, &shown), false),
                FileType::Symlink => return Err(Refusal::File(symlink_refused(&shown))),
                _ => {
                    return Err(Refusal::File(format!(
                        "{} exists and is not a folder",
                        shown.display()
                    )))
                }
            },
            Err(Errno::NOENT) => {
                // Made 0700 (its final mode is set last); until it is opened below, it may
                // be swapped, and what is opened is checked.
                rustix::fs::mkdirat(&*dir, name, Mode::from_bits_truncate(0o700)).map_err(|e| {
                    Refusal::File(format!(
                        "creating {}: {}",
                        shown.display(),
                        describe(&io(e))
                    ))
                })?;
                (open_dir(&dir, name, &shown), true)
            }
            Err(e) => {
                return Err(Refusal::File(format!(
                    "{}: {}",
                    shown.display(),
                    describe(&io(e))
                )))
            }
        };
        let handle = handle.map_err(Refusal::File)?;
        let meta = handle
            .metadata()
            .map_err(|e| Refusal::File(format!("{}: {}", shown.display(), describe(&e))))?;
        if !self.allow_shared {
            if let Some(why) = exposure(meta.uid(), meta.mode(), self.me, created) {
                return Err(Refusal::Shared(Shared { path: shown, why }));
            }
        }
        let f = self.folders.len();
        self.folders.push(Folder {
            parent,
            name: name.to_os_string(),
            shown,
            id: (meta.dev(), meta.ino()),
            fresh: created,
            created,
        });
        self.keep(f, Arc::new(handle));
        Ok(f)
    }

    /// Gives folders their final metadata once every file is written, deepest first (a
    /// folder's mtime is set after everything in it is): one in `recorded` (by folder) gets
    /// the owner (as root), mode (setuid and setgid as [`restored_mode`] says) and mtime of
    /// its version; one this restore created without a version gets `0777 & !umask`, the
    /// mode it had before folders had versions; others are left as found. Returns what
    /// failed, one message each.
    pub fn settle_folders(
        &self,
        recorded: &HashMap<usize, &Manifest>,
        as_root: bool,
        keep_setuid: bool,
    ) -> Vec<String> {
        let depth = |mut f: usize| {
            let mut d = 0;
            while f != 0 {
                f = self.folders.get(f).map_or(0, |x| x.parent);
                d += 1;
            }
            d
        };
        let mut order: Vec<(usize, usize)> = (1..self.folders.len())
            .filter(|f| recorded.contains_key(f) || self.folders[*f].created)
            .map(|f| (depth(f), f))
            .collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        let mut errors = Vec::new();
        for (_, f) in order {
            let shown = &self.folders[f].shown;
            let r = self.handle(f).and_then(|h| match recorded.get(&f) {
                Some(m) => set_folder_meta(&h, m, as_root, keep_setuid)
                    .map_err(|e| format!("{}: {e}", shown.display())),
                None => rustix::fs::fchmod(&*h, Mode::from_bits_truncate(0o777 & !self.umask))
                    .map_err(|e| {
                        format!("setting mode of {}: {}", shown.display(), describe(&io(e)))
                    }),
            });
            if let Err(e) = r {
                errors.push(e);
            }
        }
        errors
    }

    /// Whether nothing is at `name` in `folder` yet. A folder there fails the file.
    fn is_free(&self, folder: usize, name: &OsStr) -> Result<bool, String> {
        let dir = self.handle(folder)?;
        match rustix::fs::statat(&*dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Err(format!(
                "{} exists and is a folder",
                self.shown(folder, name).display()
            )),
            Ok(_) => Ok(false),
            Err(_) => Ok(true),
        }
    }

    /// `name` in `folder`, as a path for messages.
    pub fn shown(&self, folder: usize, name: &OsStr) -> PathBuf {
        match self.folders.get(folder) {
            Some(f) => f.shown.join(name),
            None => PathBuf::from(name),
        }
    }

    /// The handle of `folder`: cached, or opened again from its parent's and checked to be
    /// the folder first opened.
    fn handle(&self, folder: usize) -> Result<Arc<File>, String> {
        if folder == 0 {
            return Ok(self.root.clone());
        }
        if let Some(h) = self.cached(folder) {
            return Ok(h);
        }
        let f = self
            .folders
            .get(folder)
            .ok_or_else(|| format!("no folder {folder} in the restore target"))?;
        let parent = self.handle(f.parent)?;
        let h = open_dir(&parent, &f.name, &f.shown)?;
        let meta = h
            .metadata()
            .map_err(|e| format!("{}: {}", f.shown.display(), describe(&e)))?;
        if (meta.dev(), meta.ino()) != f.id {
            return Err(format!(
                "{} was replaced during the restore; refusing to write into what took its place",
                f.shown.display()
            ));
        }
        let h = Arc::new(h);
        self.keep(folder, h.clone());
        Ok(h)
    }

    fn cached(&self, folder: usize) -> Option<Arc<File>> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.tick += 1;
        let tick = c.tick;
        let (h, used) = c.open.get_mut(&folder)?;
        *used = tick;
        Some(h.clone())
    }

    /// Caches a handle, closing the least recently used one beyond [`HANDLES`] (a file
    /// still using it keeps it open until done).
    fn keep(&self, folder: usize, h: Arc<File>) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.tick += 1;
        let tick = c.tick;
        if c.open.len() >= HANDLES && !c.open.contains_key(&folder) {
            let oldest = c.open.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k);
            if let Some(k) = oldest {
                c.open.remove(&k);
            }
        }
        c.open.insert(folder, (h, tick));
    }

    /// Creates file `name` in `folder` for writing, mode 0600 (readable by no one else until
    /// it is finished); fails on anything already there, a symlink included.
    pub fn create(&self, folder: usize, name: &OsStr) -> Result<File, String> {
        let dir = self.handle(folder)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        rustix::fs::openat(&*dir, name, flags, Mode::from_bits_truncate(0o600))
            .map(File::from)
            .map_err(|e| {
                format!(
                    "creating {}: {}",
                    self.shown(folder, name).display(),
                    describe(&io(e))
                )
            })
    }

    /// Renames `from` over `to`, both in `folder`.
    pub fn rename(&self, folder: usize, from: &OsStr, to: &OsStr) -> Result<(), String> {
        let dir = self.handle(folder)?;
        rustix::fs::renameat(&*dir, from, &*dir, to).map_err(|e| {
            format!(
                "renaming into {}: {}",
                self.shown(folder, to).display(),
                describe(&io(e))
            )
        })
    }

    /// Removes `name` from `folder`, if it can.
    pub fn remove(&self, folder: usize, name: &OsStr) {
        if let Ok(dir) = self.handle(folder) {
            let _ = rustix::fs::unlinkat(&*dir, name, AtFlags::empty());
        }
    }

    /// Makes `to` in `to_folder` a hard link to `from` in `from_folder` (restored by this
    /// restore): linked beside `to` first, checked to be a regular file of `size` bytes
    /// (not something swapped in for `from`), then renamed into place.
    pub fn link(
        &self,
        from_folder: usize,
        from: &OsStr,
        to: &Dest,
        size: u64,
    ) -> Result<(), String> {
        let src = self.handle(from_folder)?;
        let dir = self.handle(to.folder)?;
        let tmp = temp_name();
        rustix::fs::linkat(&*src, from, &*dir, &tmp, AtFlags::empty()).map_err(|e| {
            format!(
                "linking {} to {}: {}",
                self.shown(to.folder, &to.name).display(),
                self.shown(from_folder, from).display(),
                describe(&io(e))
            )
        })?;
        let fail = |e: String| {
            let _ = rustix::fs::unlinkat(&*dir, &tmp, AtFlags::empty());
            e
        };
        match rustix::fs::statat(&*dir, &tmp, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st)
                if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                    && st.st_size as u64 == size => {}
            _ => {
                return Err(fail(format!(
                    "{} changed during the restore; not linked",
                    self.shown(from_folder, from).display()
                )))
            }
        }
        self.rename(to.folder, &tmp, &to.name).map_err(fail)
    }

    /// Makes a FIFO, socket or device node at `dest` (beside it, then renamed), with its
    /// owner (as root), mode and mtime. A device by a restore that is not root is skipped:
    /// `Ok(Some(warning))`.
    pub fn place_special(
        &self,
        dest: &Dest,
        kind: coffer_common::manifest::SpecialKind,
        rdev: u64,
        m: &Manifest,
        as_root: bool,
    ) -> Result<Option<String>, String> {
        use coffer_common::manifest::SpecialKind;
        let device = matches!(kind, SpecialKind::CharDevice | SpecialKind::BlockDevice);
        if device && !as_root {
            return Ok(Some(format!(
                "{}: {} not restored (only root makes device nodes)",
                self.shown(dest.folder, &dest.name).display(),
                kind.name()
            )));
        }
        let dir = self.handle(dest.folder)?;
        let tmp = temp_name();
        let fd = dir.as_raw_fd();
        nix::sys::stat::mknodat(
            Some(fd),
            tmp.as_os_str(),
            crate::fidelity::special::sflag(kind),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            if device { rdev as nix::libc::dev_t } else { 0 },
        )
        .map_err(|e| {
            format!(
                "making {} {}: {}",
                kind.name(),
                self.shown(dest.folder, &tmp).display(),
                describe(&std::io::Error::from(e))
            )
        })?;
        let fail = |e: String| {
            let _ = rustix::fs::unlinkat(&*dir, &tmp, AtFlags::empty());
            e
        };
        let owner = if !as_root {
            Owner::Unchanged
        } else if nix::unistd::fchownat(
            Some(fd),
            tmp.as_os_str(),
            Some(nix::unistd::Uid::from_raw(m.uid)),
            Some(nix::unistd::Gid::from_raw(m.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok()
        {
            Owner::Set
        } else {
            Owner::Failed
        };
        let mode = restored_mode(m.mode, owner, false);
        rustix::fs::chmodat(
            &*dir,
            &tmp,
            Mode::from_bits_truncate(mode),
            AtFlags::empty(),
        )
        .map_err(|e| {
            fail(format!(
                "setting mode of {}: {}",
                self.shown(dest.folder, &tmp).display(),
                describe(&io(e))
            ))
        })?;
        let ts = nix::sys::time::TimeSpec::new(
            m.mtime_ns.div_euclid(1_000_000_000),
            m.mtime_ns.rem_euclid(1_000_000_000),
        );
        let _ = nix::sys::stat::utimensat(
            Some(fd),
            tmp.as_os_str(),
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
        self.rename(dest.folder, &tmp, &dest.name).map_err(fail)?;
        Ok(None)
    }

    /// Creates symlink `dest` pointing at `target`, beside it first (owner as root, mtime),
    /// then renamed into place.
    pub fn place_symlink(
        &self,
        dest: &Dest,
        target: &[u8],
        m: &Manifest,
        as_root: bool,
    ) -> Result<(), String> {
        let dir = self.handle(dest.folder)?;
        let tmp = temp_name();
        rustix::fs::symlinkat(OsStr::from_bytes(target), &*dir, &tmp).map_err(|e| {
            format!(
                "creating symlink {}: {}",
                self.shown(dest.folder, &tmp).display(),
                describe(&io(e))
            )
        })?;
        let fd = Some(dir.as_raw_fd());
        if as_root {
            let _ = nix::unistd::fchownat(
                fd,
                tmp.as_os_str(),
                Some(nix::unistd::Uid::from_raw(m.uid)),
                Some(nix::unistd::Gid::from_raw(m.gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
        }
        let ts = nix::sys::time::TimeSpec::new(
            m.mtime_ns.div_euclid(1_000_000_000),
            m.mtime_ns.rem_euclid(1_000_000_000),
        );
        let _ = nix::sys::stat::utimensat(
            fd,
            tmp.as_os_str(),
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
        self.rename(dest.folder, &tmp, &dest.name).inspect_err(|_| {
            let _ = rustix::fs::unlinkat(&*dir, &tmp, AtFlags::empty());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn setuid_and_setgid_are_dropped_as_root_unless_asked_and_always_without_the_owner() {
        for (owner, keep, want) in [
            (Owner::Unchanged, false, 0o4755),
            (Owner::Unchanged, true, 0o4755),
            (Owner::Set, false, 0o0755),
            (Owner::Set, true, 0o4755),
            (Owner::Failed, false, 0o0755),
            (Owner::Failed, true, 0o0755),
        ] {
            assert_eq!(
                restored_mode(0o104755, owner, keep),
                want,
                "{owner:?} keep={keep}"
            );
        }
        assert_eq!(restored_mode(0o2750, Owner::Set, false), 0o750);
        assert_eq!(restored_mode(0o2750, Owner::Set, true), 0o2750);
        assert_eq!(restored_mode(0o6755, Owner::Failed, true), 0o755);
        // The sticky bit is no privilege: kept.
        assert_eq!(restored_mode(0o1777, Owner::Set, false), 0o1777);
    }

    #[test]
    fn a_target_another_user_could_change_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |p: &Path, allow: bool| Tree::open(p, true, allow).map(|_| ());
        let mine = dir.path().join("mine");
        std::fs::create_dir(&mine).expect("mkdir");
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        open(&mine, false).expect("a folder of this user's that only it can write");
        for mode in [0o775, 0o757, 0o777, 0o1777] {
            let p = dir.path().join(format!("shared-{mode:o}"));
            std::fs::create_dir(&p).expect("mkdir");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let e = open(&p, false).expect_err("writable by others");
            let text = e.to_string();
            assert!(matches!(e, RestoreError::Shared(_)), "{text}");
            assert!(text.contains("writable by group or others"), "{text}");
            assert!(text.contains("--allow-shared-target"), "{text}");
            open(&p, true).expect("allowed");
        }
        // A target this restore creates is checked for its owner only: its mode is the
        // umask's.
        open(&dir.path().join("new/deeper"), false).expect("created");
        if nix::unistd::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).expect("mkdir");
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
            let e = open(&theirs, false).expect_err("owned by another user");
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
            open(&theirs, true).expect("allowed");
        }
        assert_eq!(exposure(1000, 0o40755, 0, false).map(|_| ()), Some(()));
        assert_eq!(exposure(0, 0o40775, 0, true), None);
        assert_eq!(exposure(0, 0o40775, 0, false).map(|_| ()), Some(()));
    }

    /// A folder found in the target is held to the same rule as the target; one swapped for
    /// a symlink after it was opened is written into through the handle, never through the
    /// symlink, and one that replaced it is refused when its handle is opened again.
    #[test]
    fn folders_are_reached_by_handle_never_by_a_swapped_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let to = dir.path().join("to");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(to.join("shared")).expect("mkdir");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::set_permissions(to.join("shared"), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let mut tree = Tree::open(&to, true, false).expect("open");
        assert!(matches!(tree.prepare(b"shared/x"), Err(Refusal::Shared(_))));

        let d = match tree.prepare(b"a/b/file") {
            Ok(d) => d,
            Err(_) => panic!("prepare a/b/file"),
        };
        assert!(d.fresh);
        // `a/b` is moved aside and a symlink to a folder outside takes its place.
        std::fs::rename(to.join("a/b"), to.join("a/moved")).expect("move");
        std::os::unix::fs::symlink(&outside, to.join("a/b")).expect("symlink");
        drop(tree.create(d.folder, &d.name).expect("created by handle"));
        assert!(to.join("a/moved/file").exists());
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0);
        // Evicted and opened again: the path now leads through a symlink.
        tree.cache.lock().expect("cache").open.clear();
        let e = tree
            .create(d.folder, OsStr::new("other"))
            .expect_err("symlink");
        assert!(e.contains("is a symlink in the target"), "{e}");
        // Replaced by another folder: not the one first opened.
        std::fs::remove_file(to.join("a/b")).expect("unlink");
        std::fs::create_dir(to.join("a/b")).expect("mkdir");
        let e = tree
            .create(d.folder, OsStr::new("other"))
            .expect_err("replaced");
        assert!(e.contains("was replaced during the restore"), "{e}");
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0);
    }

    fn folder_manifest(path: &str, mode: u32, mtime_s: i64) -> Manifest {
        Manifest {
            path: path.as_bytes().to_vec(),
            kind: coffer_common::manifest::EntryKind::Dir,
            size: 0,
            mtime_ns: mtime_s * 1_000_000_000 + 5,
            mode,
            uid: 0,
            gid: 0,
            content_hash: [0; 32],
            chunks: vec![],
            sparse: None,
            xattrs: vec![],
            hardlink: None,
        }
    }

    /// Folders are made 0700 while the restore fills them; once settled, one with a version
    /// of its own has its mode and mtime (a parent's mtime kept, though its child was
    /// settled after files were written), setuid and setgid dropped as for files, and one
    /// without (a backup made before folders had versions) the mode a new folder gets.
    #[test]
    fn folders_are_private_while_filled_and_settled_deepest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let to = dir.path().join("to");
        let mut tree = Tree::open(&to, false, false).expect("open");
        let d = match tree.prepare(b"w/plain/deep/file") {
            Ok(d) => d,
            Err(_) => panic!("prepare"),
        };
        let (Ok(kept), Ok(empty)) = (tree.folder(b"w/kept"), tree.folder(b"w/kept/empty")) else {
            panic!("folders");
        };
        for f in ["w", "w/plain", "w/plain/deep", "w/kept", "w/kept/empty"] {
            let m = std::fs::metadata(to.join(f)).expect("stat").mode() & 0o7777;
            assert_eq!(m, 0o700, "{f} while restoring");
        }
        drop(tree.create(d.folder, &d.name).expect("file"));
        let parent = folder_manifest("w/kept", 0o2750, 1_500_000_000);
        let child = folder_manifest("w/kept/empty", 0o1755, 1_400_000_000);
        let recorded = HashMap::from([(kept, &parent), (empty, &child)]);
        let errors = tree.settle_folders(&recorded, false, false);
        assert!(errors.is_empty(), "{errors:?}");
        let stat = |f: &str| std::fs::metadata(to.join(f)).expect("stat");
        // Not root: the owner is this user's, so setgid stays (as for files).
        assert_eq!(stat("w/kept").mode() & 0o7777, 0o2750);
        assert_eq!(stat("w/kept/empty").mode() & 0o7777, 0o1755);
        assert_eq!(
            (stat("w/kept").mtime(), stat("w/kept").mtime_nsec()),
            (1_500_000_000, 5)
        );
        assert_eq!(stat("w/kept/empty").mtime(), 1_400_000_000);
        let new_folder = 0o777 & !current_umask();
        for f in ["w", "w/plain", "w/plain/deep"] {
            assert_eq!(stat(f).mode() & 0o7777, new_folder, "{f}");
        }
        // As root, setuid and setgid are dropped unless kept (the rule of files).
        if nix::unistd::geteuid().is_root() {
            let h = File::open(to.join("w/plain")).expect("open");
            set_folder_meta(&h, &folder_manifest("w/plain", 0o2755, 1), true, false).expect("set");
            assert_eq!(stat("w/plain").mode() & 0o7777, 0o755);
            set_folder_meta(&h, &folder_manifest("w/plain", 0o2755, 1), true, true).expect("set");
            assert_eq!(stat("w/plain").mode() & 0o7777, 0o2755);
        }
    }
}
