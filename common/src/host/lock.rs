//! `flock` locks on files: a daemon's run lock (held for its lifetime), an editor's lock
//! (held while a file is rewritten), and the probe `status` uses to tell whether a daemon
//! holds its run lock.
//!
//! A probe holds a shared lock for an instant, so whoever takes the exclusive lock tries
//! again for a moment ([`Wait::For`]) before it counts the lock as another process's.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::fs::{Context, IoError};

/// How long to wait for a lock another process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Not at all.
    No,
    /// Up to this long, trying again every 20 ms.
    For(Duration),
    /// Until it is free.
    Forever,
}

/// Errors taking a lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("{} is held by another process", path.display())]
    Held { path: PathBuf },
    /// Opening the lock file or locking it failed (not because it was held).
    #[error(transparent)]
    Io(#[from] IoError),
}

/// A lock held until dropped.
#[derive(Debug)]
pub struct Lock {
    _held: Flock<File>,
}

impl Lock {
    /// Takes the exclusive lock on `path` (created if missing, never truncated).
    pub fn exclusive(path: &Path, wait: Wait) -> Result<Lock, LockError> {
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .ctx("opening lock file", path)
        };
        let mut file = open()?;
        let deadline = match wait {
            Wait::For(d) => Some(Instant::now() + d),
            Wait::No | Wait::Forever => None,
        };
        loop {
            let arg = match wait {
                Wait::Forever => FlockArg::LockExclusive,
                Wait::No | Wait::For(_) => FlockArg::LockExclusiveNonblock,
            };
            match Flock::lock(file, arg) {
                Ok(held) => return Ok(Lock { _held: held }),
                Err((back, Errno::EINTR)) => file = back,
                Err((back, Errno::EWOULDBLOCK)) if deadline.is_some_and(|d| Instant::now() < d) => {
                    file = back;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(LockError::Held {
                        path: path.to_path_buf(),
                    })
                }
                Err((_, e)) => {
                    return Err(IoError::new("locking", path, std::io::Error::from(e)).into())
                }
            }
        }
    }
}

/// True when another process holds a lock on `path` that excludes a shared one (a daemon's
/// run lock). A missing file is not held. The probe's own shared lock lasts an instant.
pub fn is_held(path: &Path) -> Result<bool, IoError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(IoError::new("opening lock file", path, e)),
    };
    let mut f = f;
    loop {
        match Flock::lock(f, FlockArg::LockSharedNonblock) {
            Ok(_) => return Ok(false),
            Err((back, Errno::EINTR)) => f = back,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(true),
            Err((_, e)) => return Err(IoError::new("probing lock", path, e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_does_not_keep_the_owner_out() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("run.lock");
        assert!(!is_held(&p).expect("probe of a missing file"));
        // What a probe does for an instant, held here for 200 ms.
        let f = File::create(&p).expect("create");
        let probe = Flock::lock(f, FlockArg::LockSharedNonblock)
            .map_err(|(_, e)| e)
            .expect("shared lock");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(probe);
        });
        let lock = Lock::exclusive(&p, Wait::For(Duration::from_secs(5)))
            .expect("taken once the probe is gone");
        release.join().expect("join");
        assert!(matches!(
            Lock::exclusive(&p, Wait::No),
            Err(LockError::Held { .. })
        ));
        assert!(is_held(&p).expect("probe"));
        drop(lock);
        assert!(!is_held(&p).expect("probe"));
        drop(Lock::exclusive(&p, Wait::No).expect("free again"));
    }

    #[test]
    fn an_unopenable_lock_file_is_an_io_error_not_another_process() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("no-such-dir").join("run.lock");
        match Lock::exclusive(&p, Wait::No) {
            Err(LockError::Io(e)) => assert!(e.to_string().contains("no-such-dir"), "{e}"),
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }
}
