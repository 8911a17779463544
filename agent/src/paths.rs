//! Naming a file on the command line, the one way `status`, `ls`, `versions` and `restore`
//! share: a local path under a watched folder (absolute, or relative to the working
//! directory) or `watch-name/relative/path`, the name the journal and the repository use.
//! This module owns only the mapping; each command decides what a name it cannot place means.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::config::{Config, Watch};
use crate::scan::journal_key;

/// What a name given on the command line refers to.
#[derive(Debug)]
pub enum Named<'a> {
    /// A file or folder under a configured watch.
    Watched {
        watch: &'a Watch,
        /// `watch-name/relative/path`.
        key: Vec<u8>,
        /// Relative to the watched folder (empty for the folder itself).
        rel: PathBuf,
    },
    /// Under no watched folder of this config. `local` when it can only be a path on disk
    /// (absolute, or `./`, `../`); otherwise `key` may still name a file of the repository
    /// (one that a watch of another machine, or of an older config, backed up).
    Elsewhere { key: Vec<u8>, local: bool },
}

impl Named<'_> {
    /// The name the journal and the repository know it by.
    pub fn key(&self) -> &[u8] {
        match self {
            Named::Watched { key, .. } | Named::Elsewhere { key, .. } => key,
        }
    }

    /// Its path on disk, when it is under a watch.
    pub fn local_path(&self) -> Option<PathBuf> {
        match self {
            Named::Watched { watch, rel, .. } => Some(watch.path.join(rel)),
            Named::Elsewhere { .. } => None,
        }
    }
}

/// Maps a name given on the command line to what it refers to. A name that is both (a
/// relative path that exists under a watch, and `watch-name/...`) is read as the path on
/// disk when it exists there, else as `watch-name/relative/path`.
pub fn resolve<'a>(cfg: &'a Config, arg: &str) -> Named<'a> {
    let p = Path::new(arg);
    let only_local = p.is_absolute()
        || matches!(
            p.components().next(),
            Some(Component::CurDir | Component::ParentDir)
        );
    let on_disk = local(cfg, p);
    let exists = on_disk
        .as_ref()
        .and_then(Named::local_path)
        .is_some_and(|p| std::fs::symlink_metadata(p).is_ok());
    if only_local || exists {
        return on_disk.unwrap_or_else(|| Named::Elsewhere {
            key: arg.as_bytes().to_vec(),
            local: true,
        });
    }
    // `watch-name/relative/path`, without empty or `.` components.
    let parts: Vec<&[u8]> = arg
        .as_bytes()
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    let key = parts.join(&b'/');
    if let Some(w) = parts
        .first()
        .and_then(|name| cfg.watches.iter().find(|w| w.name.as_bytes() == *name))
    {
        let rel: PathBuf = parts[1..].iter().map(|c| OsStr::from_bytes(c)).collect();
        return Named::Watched { watch: w, key, rel };
    }
    on_disk.unwrap_or(Named::Elsewhere { key, local: false })
}

/// `p` as a path on disk, if it is under a watched folder: made absolute against the
/// working directory, `.` and `..` taken out, and its folder resolved through symlinks when
/// it exists (the name itself is not followed: a symlink is known by its own name).
fn local<'a>(cfg: &'a Config, p: &Path) -> Option<Named<'a>> {
    let abs = normalize(&std::path::absolute(p).ok()?);
    let mut candidates = vec![abs.clone()];
    if let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) {
        if let Ok(d) = std::fs::canonicalize(dir) {
            candidates.push(d.join(name));
        }
    }
    if let Ok(c) = std::fs::canonicalize(&abs) {
        if abs.is_dir() {
            candidates.push(c);
        }
    }
    for c in &candidates {
        for w in &cfg.watches {
            let roots = [Some(w.path.clone()), std::fs::canonicalize(&w.path).ok()];
            for root in roots.iter().flatten() {
                if let Ok(rel) = c.strip_prefix(root) {
                    return Some(Named::Watched {
                        watch: w,
                        key: journal_key(w, rel),
                        rel: rel.to_path_buf(),
                    });
                }
            }
        }
    }
    None
}

/// Takes `.` and `..` out of an absolute path, without asking the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// The watched folders, for a message that says a name is under none of them.
pub fn watched_list(cfg: &Config) -> String {
    let list: Vec<String> = cfg
        .watches
        .iter()
        .map(|w| format!("{} = {}", w.name, w.path.display()))
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// Which `exclude` pattern of `watch` leaves out `rel` (or a folder it is in), if any.
pub fn excluded_by<'w>(watch: &'w Watch, rel: &Path) -> Option<&'w str> {
    if watch.exclude_patterns.is_empty() {
        return None;
    }
    let mut anc: Vec<&Path> = rel
        .ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .collect();
    // The outermost folder first: the scan never enters an excluded folder.
    anc.reverse();
    anc.into_iter().find_map(|a| {
        watch
            .exclude
            .matches(a)
            .first()
            .and_then(|&i| watch.exclude_patterns.get(i))
            .map(String::as_str)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> Config {
        let p = dir.join("agent.toml");
        std::fs::create_dir_all(dir.join("w")).expect("test setup");
        std::fs::write(
            &p,
            format!(
                "receiver = \"127.0.0.1:1\"\nreceiver_key = \"{}\"\nstate_dir = \"{}\"\n\
                 [[watch]]\npath = \"{}\"\nname = \"w\"\nexclude = [\"*.tmp\", \"cache\"]\n",
                "A".repeat(43),
                dir.join("state").display(),
                dir.join("w").display()
            ),
        )
        .expect("test setup");
        Config::load(&p).expect("test setup")
    }

    #[test]
    fn local_paths_and_watch_names_map_to_one_key() {
        let tmp = tempfile::tempdir().expect("test setup");
        let root = std::fs::canonicalize(tmp.path()).expect("test setup");
        std::fs::create_dir_all(root.join("w/d")).expect("test setup");
        std::fs::write(root.join("w/d/x.txt"), b"x").expect("test setup");
        let c = cfg(&root);
        let abs = root.join("w/d/x.txt");
        for arg in [
            abs.to_str().expect("test setup").to_string(),
            root.join("w/d/../d/./x.txt")
                .to_str()
                .expect("test setup")
                .to_string(),
            "w/d/x.txt".into(),
            "w//d/./x.txt".into(),
        ] {
            let n = resolve(&c, &arg);
            assert_eq!(n.key(), b"w/d/x.txt", "{arg}");
            assert_eq!(n.local_path().as_deref(), Some(abs.as_path()), "{arg}");
        }
        assert_eq!(
            resolve(&c, root.join("w").to_str().expect("test setup")).key(),
            b"w"
        );
        assert_eq!(resolve(&c, "w/d/").key(), b"w/d");
        assert!(matches!(
            resolve(&c, "/elsewhere/x"),
            Named::Elsewhere { local: true, .. }
        ));
        let other = resolve(&c, "old/x");
        assert!(matches!(other, Named::Elsewhere { local: false, .. }));
        assert_eq!(other.key(), b"old/x");
    }

    #[test]
    fn names_the_exclude_pattern() {
        let tmp = tempfile::tempdir().expect("test setup");
        let c = cfg(tmp.path());
        let w = &c.watches[0];
        assert_eq!(excluded_by(w, Path::new("a/b.tmp")), Some("*.tmp"));
        assert_eq!(excluded_by(w, Path::new("cache/x.txt")), Some("cache"));
        assert_eq!(excluded_by(w, Path::new("a/x.txt")), None);
    }
}
