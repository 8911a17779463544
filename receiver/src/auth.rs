//! Which agent keys may connect, and to which repository each one writes.
//!
//! The list lives in `<root>/authorized.toml`, written atomically by `authorize` and
//! `revoke` (under `<root>/authorized.lock`, so two commands never lose each other's
//! change). `serve` re-reads it whenever its identity or modification time changes, so a
//! change takes effect for new connections without a restart. A file that does not parse
//! authorizes nobody (fail closed) until it is fixed.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use coffer_common::channel::PublicKey;
use coffer_common::host::fs::{write_atomic, IoError};
use coffer_common::host::lock::{Lock, LockError, Wait};
use serde::{Deserialize, Serialize};

/// Longest repository name.
pub const MAX_REPO_NAME: usize = 64;

/// A repository name that is safe to use as one directory name under `<root>/repos/`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoName(String);

/// Why a repository name was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid repository name {name:?}: {why}")]
pub struct RepoNameError {
    name: String,
    why: &'static str,
}

impl RepoName {
    /// Validates a name: 1..=64 characters, no `/`, `\`, control characters, no leading `.`
    /// (which also excludes `.` and `..`).
    pub fn new(name: &str) -> Result<Self, RepoNameError> {
        let err = |why| RepoNameError {
            name: name.chars().take(80).collect(),
            why,
        };
        if name.is_empty() {
            return Err(err("it is empty"));
        }
        if name.chars().count() > MAX_REPO_NAME {
            return Err(err("it is longer than 64 characters"));
        }
        if name.starts_with('.') {
            return Err(err("it starts with '.'"));
        }
        if name.contains('/') || name.contains('\\') {
            return Err(err("it contains a path separator"));
        }
        if name.chars().any(|c| c.is_control()) {
            return Err(err("it contains a control character"));
        }
        Ok(Self(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for RepoName {
    type Error = RepoNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RepoName::new(&s)
    }
}

impl From<RepoName> for String {
    fn from(r: RepoName) -> String {
        r.0
    }
}

impl FromStr for RepoName {
    type Err = RepoNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RepoName::new(s)
    }
}

/// Errors about authorizations.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: {msg}")]
    Parse { path: String, msg: String },
    #[error(transparent)]
    Key(#[from] coffer_common::channel::ParseKeyError),
    #[error(transparent)]
    Name(#[from] RepoNameError),
    #[error(
        "agent key {key} is already authorized for repository {current:?}; one key writes one \
         repository (revoke it first to move it to {requested:?})"
    )]
    OtherRepo {
        key: PublicKey,
        current: String,
        requested: String,
    },
    #[error("agent key {0} is not authorized on this receiver")]
    NotAuthorized(PublicKey),
    #[error(transparent)]
    Lock(#[from] LockError),
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    keys: BTreeMap<String, RepoName>,
}

/// The authorized keys, each mapped to its repository.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Authorizations {
    keys: BTreeMap<String, (PublicKey, RepoName)>,
}

/// What `authorize` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Authorized {
    Added,
    AlreadyPresent,
}

impl Authorizations {
    /// Parses the file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, AuthError> {
        let f: AuthFile = toml::from_str(text).map_err(|e| AuthError::Parse {
            path: origin.to_string(),
            msg: e.to_string().trim().to_string(),
        })?;
        let mut keys = BTreeMap::new();
        for (k, repo) in f.keys {
            let key = PublicKey::from_str(&k)?;
            keys.insert(key.to_string(), (key, repo));
        }
        Ok(Self { keys })
    }

    /// Reads `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        match std::fs::read_to_string(path) {
            Ok(t) => Self::parse(&t, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(IoError::new("reading", path, e).into()),
        }
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# Agent keys allowed to connect, each mapped to the one repository it writes.\n\
             # Managed by `coffer-receiver authorize` and `revoke`; a running `serve` picks up\n\
             # changes for new connections without a restart.\n\n[keys]\n",
        );
        for (k, (_, repo)) in &self.keys {
            // Keys are base64url and names have no control characters; toml quoting via
            // serde keeps any quote or backslash in a name intact.
            let v = toml::Value::String(repo.to_string());
            out.push_str(&format!("\"{k}\" = {v}\n"));
        }
        out
    }

    /// Writes the list atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<(), AuthError> {
        write_atomic(path, self.render().as_bytes(), 0o600)?;
        Ok(())
    }

    /// Maps `key` to `repo`. A key already mapped to another repository is refused.
    pub fn authorize(&mut self, key: PublicKey, repo: RepoName) -> Result<Authorized, AuthError> {
        match self.keys.get(&key.to_string()) {
            Some((_, r)) if *r == repo => Ok(Authorized::AlreadyPresent),
            Some((_, r)) => Err(AuthError::OtherRepo {
                key,
                current: r.to_string(),
                requested: repo.to_string(),
            }),
            None => {
                self.keys.insert(key.to_string(), (key, repo));
                Ok(Authorized::Added)
            }
        }
    }

    /// Removes `key`; returns the repository it wrote to.
    pub fn revoke(&mut self, key: &PublicKey) -> Result<RepoName, AuthError> {
        self.keys
            .remove(&key.to_string())
            .map(|(_, r)| r)
            .ok_or(AuthError::NotAuthorized(*key))
    }

    /// The repository `key` writes to, if it is authorized.
    pub fn repo_of(&self, key: &PublicKey) -> Option<&RepoName> {
        self.keys.get(&key.to_string()).map(|(_, r)| r)
    }

    /// Every (key, repository) pair, ordered by key.
    pub fn iter(&self) -> impl Iterator<Item = (&PublicKey, &RepoName)> {
        self.keys.values().map(|(k, r)| (k, r))
    }
}

/// Holds `<root>/authorized.lock` for a read-modify-write of the list.
pub struct EditLock {
    _lock: Lock,
}

impl EditLock {
    /// Waits for the edit lock.
    pub fn acquire(path: &Path) -> Result<Self, AuthError> {
        Ok(Self {
            _lock: Lock::exclusive(path, Wait::Forever)?,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// The list as `serve` sees it: re-read whenever the file changes.
pub struct AuthWatcher {
    path: PathBuf,
    cached: Mutex<(Option<Stamp>, Arc<Authorizations>)>,
}

impl AuthWatcher {
    /// Starts watching `path` (read on first use).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: Mutex::new((None, Arc::new(Authorizations::default()))),
        }
    }

    /// The current list, re-read if the file changed since the last call.
    pub fn current(&self) -> Arc<Authorizations> {
        let now = stamp(&self.path);
        let mut g = match self.cached.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.0.is_some() && g.0 == now {
            return g.1.clone();
        }
        let list = match Authorizations::load(&self.path) {
            Ok(l) => {
                tracing::info!(path = %self.path.display(), keys = l.keys.len(), "loaded authorized keys");
                l
            }
            Err(e) => {
                tracing::error!("{e}; no agent is authorized until the file is fixed");
                Authorizations::default()
            }
        };
        *g = (now, Arc::new(list));
        g.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffer_common::channel::StaticKeypair;

    fn key() -> PublicKey {
        StaticKeypair::generate().expect("kp").public()
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in [
            "", ".", "..", ".hidden", "a/b", "a\\b", "../x", "a\nb", "a\0b", "tab\t",
        ] {
            assert!(RepoName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RepoName::new(&"x".repeat(65)).is_err());
        for good in [
            "laptop",
            "a.b",
            "My Machine",
            "x-1_2",
            &"y".repeat(64),
            "été",
        ] {
            assert!(RepoName::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn one_key_one_repo_many_keys_per_repo() {
        let (a, b) = (key(), key());
        let r1 = RepoName::new("one").expect("name");
        let r2 = RepoName::new("two").expect("name");
        let mut l = Authorizations::default();
        assert_eq!(l.authorize(a, r1.clone()).expect("add"), Authorized::Added);
        assert_eq!(
            l.authorize(a, r1.clone()).expect("again"),
            Authorized::AlreadyPresent
        );
        assert_eq!(l.authorize(b, r1.clone()).expect("add"), Authorized::Added);
        let e = l.authorize(a, r2).expect_err("other repo");
        assert!(e.to_string().contains("already authorized"), "{e}");
        assert_eq!(l.repo_of(&b), Some(&r1));
        assert_eq!(l.revoke(&a).expect("revoke"), r1);
        assert!(l.repo_of(&a).is_none());
        assert!(l.revoke(&a).is_err());
    }

    #[test]
    fn file_round_trip_and_watcher_sees_changes() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("authorized.toml");
        let w = AuthWatcher::new(p.clone());
        let k = key();
        assert!(w.current().repo_of(&k).is_none());
        let mut l = Authorizations::default();
        l.authorize(k, RepoName::new("we\"ird name").expect("name"))
            .expect("add");
        l.save(&p).expect("save");
        assert_eq!(Authorizations::load(&p).expect("load"), l);
        assert_eq!(
            w.current().repo_of(&k).map(|r| r.as_str()),
            Some("we\"ird name")
        );
        l.revoke(&k).expect("revoke");
        l.save(&p).expect("save");
        assert!(w.current().repo_of(&k).is_none());
        std::fs::write(&p, "garbage = [").expect("write");
        assert!(w.current().iter().next().is_none());
    }
}
