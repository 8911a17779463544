//! Extended attributes: `user.*` always; `security.*`, `trusted.*` and the POSIX ACLs
//! (`system.posix_acl_access`, `system.posix_acl_default`) when the agent runs as root
//! (others cannot read `trusted.*` and could not set most of them back). Read from the
//! open file (a folder's by its path, not following a link), set back on restore, where a
//! file system that refuses one is warned about, not failed.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use coffer_common::manifest::{Xattr, MAX_XATTR_BYTES};
use rustix::io::Errno;

/// Whether the attribute `name` is kept, for an agent running as root (`privileged`) or
/// not.
pub fn wanted(name: &[u8], privileged: bool) -> bool {
    if name.starts_with(b"user.") {
        return true;
    }
    privileged
        && (name.starts_with(b"security.")
            || name.starts_with(b"trusted.")
            || name == b"system.posix_acl_access"
            || name == b"system.posix_acl_default")
}

/// Whether this process runs as root.
pub fn privileged() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A digest of the attributes (for the journal's summary of a version).
pub fn digest(xattrs: &[Xattr]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for x in xattrs {
        h.update(&(x.name.len() as u64).to_le_bytes());
        h.update(&x.name);
        h.update(&(x.value.len() as u64).to_le_bytes());
        h.update(&x.value);
    }
    *h.finalize().as_bytes()
}

/// How attributes are read: from an open file or from a path (not followed).
/// An empty buffer (`len` 0) asks for the size needed.
trait Source {
    fn list(&self, buf: &mut [u8]) -> rustix::io::Result<usize>;
    fn get(&self, name: &OsStr, buf: &mut [u8]) -> rustix::io::Result<usize>;
}

struct Fd<F: AsFd>(F);
impl<F: AsFd> Source for Fd<F> {
    fn list(&self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        if buf.is_empty() {
            return rustix::fs::flistxattr_query(&self.0);
        }
        rustix::fs::flistxattr(&self.0, buf)
    }
    fn get(&self, name: &OsStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
        if buf.is_empty() {
            return rustix::fs::fgetxattr_query(&self.0, name);
        }
        rustix::fs::fgetxattr(&self.0, name, buf)
    }
}

struct ByPath<'a>(&'a Path);
impl Source for ByPath<'_> {
    fn list(&self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        if buf.is_empty() {
            return rustix::fs::llistxattr_query(self.0);
        }
        rustix::fs::llistxattr(self.0, buf)
    }
    fn get(&self, name: &OsStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
        if buf.is_empty() {
            return rustix::fs::lgetxattr_query(self.0, name);
        }
        rustix::fs::lgetxattr(self.0, name, buf)
    }
}

/// The kept attributes of an open file, sorted by name. A file system without extended
/// attributes has none.
pub fn read_fd(fd: impl AsFd, privileged: bool, shown: &str) -> std::io::Result<Vec<Xattr>> {
    read(&Fd(fd), privileged, shown)
}

/// The kept attributes of `path` itself (a link is not followed).
pub fn read_path(path: &Path, privileged: bool) -> std::io::Result<Vec<Xattr>> {
    read(&ByPath(path), privileged, &path.display().to_string())
}

/// Calls `f` with a buffer of the size it asks for (a size query first), again while the
/// value grows between the query and the read.
fn sized(f: impl Fn(&mut [u8]) -> rustix::io::Result<usize>) -> rustix::io::Result<Vec<u8>> {
    for _ in 0..8 {
        let n = f(&mut [])?;
        if n == 0 {
            return Ok(vec![]);
        }
        let mut buf = vec![0u8; n];
        match f(&mut buf) {
            Ok(k) => {
                buf.truncate(k);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

fn read(src: &dyn Source, privileged: bool, shown: &str) -> std::io::Result<Vec<Xattr>> {
    let names = match sized(|b| src.list(b)) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    let mut total = 0usize;
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if !wanted(name, privileged) {
            continue;
        }
        let value = match sized(|b| src.get(OsStr::from_bytes(name), b)) {
            Ok(v) => v,
            // Removed since listed.
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(e.into()),
        };
        total += name.len() + value.len();
        if total > MAX_XATTR_BYTES {
            tracing::warn!(file = shown, attribute = %String::from_utf8_lossy(name),
                "extended attributes past {MAX_XATTR_BYTES} bytes are not backed up");
            break;
        }
        out.push(Xattr {
            name: name.to_vec(),
            value,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Sets `xattrs` on an open file; each one refused is a warning naming the file and the
/// attribute (a file system without user attributes, a name this user may not set).
pub fn restore_fd(fd: impl AsFd, xattrs: &[Xattr], shown: &Path) -> Vec<String> {
    let fd = fd.as_fd();
    xattrs
        .iter()
        .filter_map(|x| {
            rustix::fs::fsetxattr(
                fd,
                OsStr::from_bytes(&x.name),
                &x.value,
                rustix::fs::XattrFlags::empty(),
            )
            .err()
            .map(|e| refused(shown, &x.name, e))
        })
        .collect()
}

/// [`restore_fd`] for a path itself (a folder, not followed).
pub fn restore_path(path: &Path, xattrs: &[Xattr], shown: &Path) -> Vec<String> {
    xattrs
        .iter()
        .filter_map(|x| {
            rustix::fs::lsetxattr(
                path,
                OsStr::from_bytes(&x.name),
                &x.value,
                rustix::fs::XattrFlags::empty(),
            )
            .err()
            .map(|e| refused(shown, &x.name, e))
        })
        .collect()
}

fn refused(shown: &Path, name: &[u8], e: Errno) -> String {
    format!(
        "{}: extended attribute {} not restored: {}",
        shown.display(),
        String::from_utf8_lossy(name),
        std::io::Error::from(e)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `user.*` is kept by anyone; `security.*`, `trusted.*` and the ACLs only by root;
    /// other `system.*` names never.
    #[test]
    fn which_attributes_are_kept_as_root_and_not() {
        for (name, user, root) in [
            (&b"user.tag"[..], true, true),
            (b"security.selinux", false, true),
            (b"security.capability", false, true),
            (b"trusted.overlay.opaque", false, true),
            (b"system.posix_acl_access", false, true),
            (b"system.posix_acl_default", false, true),
            (b"system.nfs4_acl", false, false),
            (b"usertag", false, false),
        ] {
            assert_eq!(wanted(name, false), user, "{name:?}");
            assert_eq!(wanted(name, true), root, "{name:?}");
        }
    }

    /// Attributes set on a file are read back sorted; as a non-root reader `trusted.*` is
    /// left out; restored onto another file they read the same. Skipped where the file
    /// system has no user attributes.
    #[test]
    fn attributes_are_read_and_set_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").expect("write");
        let set =
            |n: &str, v: &[u8]| rustix::fs::setxattr(&p, n, v, rustix::fs::XattrFlags::empty());
        if set("user.b", b"2").is_err() {
            eprintln!("no user attributes here; skipped");
            return;
        }
        set("user.a", b"\x001").expect("user.a");
        let root = privileged() && set("trusted.t", b"t").is_ok();
        let f = std::fs::File::open(&p).expect("open");
        let as_user = read_fd(&f, false, "f").expect("read");
        let names: Vec<&[u8]> = as_user.iter().map(|x| &x.name[..]).collect();
        assert_eq!(names, vec![&b"user.a"[..], b"user.b"]);
        assert_eq!(as_user[0].value, b"\x001");
        if root {
            let all = read_fd(&f, true, "f").expect("read");
            assert!(all.iter().any(|x| x.name == b"trusted.t"));
        }
        let q = dir.path().join("g");
        let g = std::fs::File::create(&q).expect("create");
        assert!(restore_fd(&g, &as_user, &q).is_empty());
        assert_eq!(read_path(&q, false).expect("read"), as_user);
        // A name no file system takes is a warning naming file and attribute.
        let bad = [Xattr {
            name: b"bogus.name".to_vec(),
            value: vec![],
        }];
        let w = restore_fd(&g, &bad, &q);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("bogus.name") && w[0].contains("/g"),
            "{}",
            w[0]
        );
    }
}
