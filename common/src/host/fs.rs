//! File-system helpers: I/O errors that name their operation and path, atomic small-file
//! writes, directory creation and fsync.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// An I/O error that says what was being done and to which path.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {}", path.display(), describe(source))]
pub struct IoError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl IoError {
    /// Wraps `source` with what was being done to `path`.
    pub fn new(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self {
            what,
            path: path.into(),
            source,
        }
    }

    /// True when the device is full (or a quota is exhausted).
    pub fn is_no_space(&self) -> bool {
        is_no_space(&self.source)
    }
}

/// True when `e` says the device is full (or a quota is exhausted).
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

/// A short lowercase description of an I/O error ("no space left on device").
pub fn describe(e: &io::Error) -> String {
    if is_no_space(e) {
        return "no space left on device".into();
    }
    let s = e.to_string();
    let s = match s.find(" (os error") {
        Some(i) => &s[..i],
        None => &s[..],
    };
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Extension to attach a path to `io::Result`s.
pub trait Context<T> {
    fn ctx(self, what: &'static str, path: &Path) -> Result<T, IoError>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: &'static str, path: &Path) -> Result<T, IoError> {
        self.map_err(|e| IoError::new(what, path, e))
    }
}

/// Flushes a directory's entries to disk (after a create, rename or unlink in it).
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("syncing directory", dir)
}

/// Creates a directory (and its parents) with the given mode for the new ones.
pub fn create_dir_all(dir: &Path, mode: u32) -> Result<(), IoError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .ctx("creating directory", dir)
}

/// Writes `data` to `path` atomically: a temporary file in the same directory (created with
/// `mode`, and set to it should a stale one be left over), fsync, rename over `path`, fsync
/// of the directory. A crash leaves the old or the new content; every error is returned,
/// the directory's fsync included.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), IoError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .ctx("creating", &tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .ctx("setting the mode of", &tmp)?;
        f.write_all(data).ctx("writing", &tmp)?;
        f.sync_all().ctx("syncing", &tmp)?;
        drop(f);
        fs::rename(&tmp, path).ctx("renaming into place", path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        write_atomic(&p, b"one", 0o600).expect("write");
        write_atomic(&p, b"two", 0o600).expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        let mode = fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read_dir(d.path()).expect("ls").count(), 1);
    }

    #[test]
    fn a_stale_temp_file_does_not_lend_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let stale = d.path().join(".key.tmp");
        fs::write(&stale, b"old").expect("stale");
        fs::set_permissions(&stale, fs::Permissions::from_mode(0o644)).expect("chmod");
        let p = d.path().join("key");
        write_atomic(&p, b"secret", 0o600).expect("write");
        let mode = fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read(&p).expect("read"), b"secret");
    }

    #[test]
    fn a_failed_write_names_the_path_and_leaves_nothing() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("missing-dir").join("f");
        let e = write_atomic(&p, b"x", 0o600).expect_err("no such folder");
        assert!(e.to_string().contains("missing-dir"), "{e}");
        assert_eq!(fs::read_dir(d.path()).expect("ls").count(), 0);
    }

    #[test]
    fn errors_name_the_path_and_say_no_space() {
        let e = IoError::new(
            "writing",
            "/srv/x.pack",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(
            e.to_string(),
            "writing /srv/x.pack: no space left on device"
        );
        assert!(e.is_no_space());
        let e = IoError::new(
            "reading",
            "/srv/y",
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(e.to_string(), "reading /srv/y: permission denied");
    }
}
