//! The agent's state directory (created 0700, tightened if open to others): its static
//! key, the wrapped master key, the passphrase.

use std::path::{Path, PathBuf};

use coffer_common::channel::StaticKeypair;
use coffer_common::chunk::Crypto;
use coffer_common::host::fs::{self as hostfs, Context as _, IoError};
use coffer_common::keys::{self, KdfParams, KeyError, Passphrase};

use crate::config::Config;

/// Mode of the state directory: it holds the journal (every path backed up, and a hash of
/// every file's content), so only the agent's user may enter it, whatever the umask.
pub const STATE_DIR_MODE: u32 = 0o700;
/// Mode of folders above the state directory that the agent creates (the umask applies).
const PARENT_DIR_MODE: u32 = 0o777;
/// Mode of the key files.
const KEY_FILE_MODE: u32 = 0o600;

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: {source}")]
    Key { path: PathBuf, source: KeyError },
    #[error("agent key {0} is damaged (expected 64 bytes)")]
    BadAgentKey(PathBuf),
    #[error("passphrase: {0}")]
    Passphrase(String),
    #[error("no passphrase: set COFFER_PASSPHRASE, set `passphrase_file` in the config, or run on a terminal to be asked")]
    NoPassphrase,
}

/// Writes a private file (mode 0600) atomically, creating its folder first: temp + fsync +
/// rename + fsync of the folder, every error returned.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_state_dir(dir)?;
    }
    hostfs::write_atomic(path, bytes, KEY_FILE_MODE)?;
    Ok(())
}

/// Creates the state directory with [`STATE_DIR_MODE`] (the folders above it as any other
/// folder), or tightens an existing one that group or others may enter to it, with a
/// warning that says so. One that cannot be tightened (another user's) is warned about and
/// used as it is.
pub fn create_state_dir(dir: &Path) -> Result<(), IoError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
        hostfs::create_dir_all(parent, PARENT_DIR_MODE)?;
    }
    match std::fs::DirBuilder::new().mode(STATE_DIR_MODE).create(dir) {
        // The umask may have taken bits off, never added any.
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(IoError::new("creating", dir, e)),
    }
    let mode = std::fs::metadata(dir)
        .ctx("reading", dir)?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let tight = mode & !0o077;
    match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(tight)) {
        Ok(()) => tracing::warn!(
            "state dir {} was open to group or others (mode {mode:04o}); made it {tight:04o}",
            dir.display()
        ),
        Err(e) => tracing::warn!(
            "state dir {} is open to group or others (mode {mode:04o}) and cannot be made \
             {tight:04o}: {}; other users may read the journal",
            dir.display(),
            hostfs::describe(&e)
        ),
    }
    Ok(())
}

/// Reads the agent's static Noise key.
pub fn load_agent_key(cfg: &Config) -> Result<StaticKeypair, StateError> {
    let p = cfg.agent_key_path();
    let b = std::fs::read(&p).ctx("reading agent key", &p)?;
    StaticKeypair::from_bytes(&b).ok_or(StateError::BadAgentKey(p))
}

/// Gets the passphrase: `COFFER_PASSPHRASE`, then `passphrase_file`, then a terminal prompt
/// (asked twice when `confirm`).
pub fn passphrase(file: Option<&Path>, confirm: bool) -> Result<Passphrase, StateError> {
    let wrap = |s: String| Passphrase::new(s).map_err(|e| StateError::Passphrase(e.to_string()));
    if let Some(p) = std::env::var("COFFER_PASSPHRASE")
        .ok()
        .filter(|p| !p.is_empty())
    {
        return wrap(p);
    }
    if let Some(f) = file {
        let s = std::fs::read_to_string(f).ctx("reading passphrase file", f)?;
        warn_if_exposed(f);
        return wrap(s);
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(StateError::NoPassphrase);
    }
    // rpassword prompts on and reads from the controlling terminal.
    let tty = Path::new("/dev/tty");
    let first = rpassword::prompt_password("Coffer passphrase: ")
        .ctx("reading the passphrase from", tty)?;
    if confirm {
        let second = rpassword::prompt_password("Repeat passphrase: ")
            .ctx("reading the passphrase from", tty)?;
        if first != second {
            return Err(StateError::Passphrase("the two entries differ".into()));
        }
    }
    wrap(first)
}

/// Warns, once per file and process, when the passphrase file is open to group or others
/// or owned by another user: whoever can read it holds the master key (with the key file),
/// whoever can write it chooses the passphrase `init` wraps the key with.
fn warn_if_exposed(f: &Path) {
    use std::os::unix::fs::MetadataExt;
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let Ok(meta) = std::fs::metadata(f) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let why = if meta.uid() != me {
        format!(
            "is owned by uid {}, not by this user (uid {me}): `chown` it to this user and `chmod 600` it",
            meta.uid()
        )
    } else if mode & 0o077 != 0 {
        format!("is open to group or others (mode {mode:04o}): run `chmod 600` on it")
    } else {
        return;
    };
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if warned.iter().any(|w| w == f) {
        return;
    }
    warned.push(f.to_path_buf());
    tracing::warn!("passphrase file {} {why}", f.display());
}

/// Opens the wrapped master key with the passphrase and builds the sealing context.
pub fn unlock(cfg: &Config) -> Result<Crypto, StateError> {
    let p = cfg.keyfile_path();
    let bytes = std::fs::read(&p).ctx("reading key file", &p)?;
    unlock_bytes(cfg, &bytes, &p)
}

/// Opens key-file bytes (from disk or fetched from the receiver).
pub fn unlock_bytes(cfg: &Config, bytes: &[u8], origin: &Path) -> Result<Crypto, StateError> {
    let pass = unlock_passphrase(cfg, bytes, origin)?;
    unlock_with(bytes, &pass, origin)
}

/// Checks the key file's structure, then gets the passphrase (which may prompt): the
/// cheap half of [`unlock_bytes`].
pub fn unlock_passphrase(
    cfg: &Config,
    bytes: &[u8],
    origin: &Path,
) -> Result<Passphrase, StateError> {
    key_params(bytes, origin)?;
    passphrase(cfg.passphrase_file.as_deref(), false)
}

/// Checks a key file's structure and parameters (no passphrase): what a fetched escrow
/// entry must pass before it is tried.
pub fn check_key_file(bytes: &[u8], origin: &Path) -> Result<(), StateError> {
    key_params(bytes, origin).map(|_| ())
}

/// Unwraps the master secret (Argon2id: the expensive half of [`unlock_bytes`]).
pub fn unlock_with(bytes: &[u8], pass: &Passphrase, origin: &Path) -> Result<Crypto, StateError> {
    key_params(bytes, origin)?;
    let master = keys::unwrap_master(bytes, pass).map_err(|source| StateError::Key {
        path: origin.to_path_buf(),
        source,
    })?;
    Ok(Crypto::new(&master.sub_keys()))
}

/// A key file's Argon2id parameters, once its structure is checked and its memory cost is
/// within what this machine can give ([`kdf_memory_ceiling_kib`]): a key file from a
/// hostile receiver is refused with an error naming them, never run into an allocation
/// that aborts the process.
fn key_params(bytes: &[u8], origin: &Path) -> Result<KdfParams, StateError> {
    let err = |source| StateError::Key {
        path: origin.to_path_buf(),
        source,
    };
    let params = keys::key_file_params(bytes).map_err(err)?;
    params.check_within(kdf_memory_ceiling_kib()).map_err(err)?;
    Ok(params)
}

/// The most memory (KiB) Argon2id may take here: half the machine's RAM, at most
/// [`KdfParams::MAX_M_KIB`] (that alone where the RAM is not known).
fn kdf_memory_ceiling_kib() -> u32 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let ram = nix::sys::sysinfo::sysinfo().ok().map(|i| i.ram_total());
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let ram = None;
    KdfParams::memory_ceiling_kib(ram)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        Config::for_test(dir)
    }

    #[test]
    fn private_files_are_0600_in_a_state_dir_made_for_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        assert!(!cfg.state_dir.exists());
        write_private(&cfg.agent_key_path(), &[7; 64]).expect("write");
        write_private(&cfg.agent_key_path(), &[8; 64]).expect("rewrite");
        let meta = std::fs::metadata(cfg.agent_key_path()).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(cfg.agent_key_path()).expect("read"), [8; 64]);
        let names: Vec<_> = std::fs::read_dir(&cfg.state_dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["agent.key"], "a temporary file was left");
    }

    /// Log lines written while `f` runs (a subscriber of this thread only).
    fn logs_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if let Ok(mut v) = self.0.lock() {
                    v.extend_from_slice(b);
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = buf.0.lock().map(|v| v.clone()).unwrap_or_default();
        String::from_utf8_lossy(&text).into_owned()
    }

    #[test]
    fn a_passphrase_file_others_can_read_is_warned_about_once() {
        use std::os::unix::fs::PermissionsExt;
        if std::env::var_os("COFFER_PASSPHRASE").is_some_and(|p| !p.is_empty()) {
            eprintln!("skipped: COFFER_PASSPHRASE is set, so no passphrase file is read");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let open = dir.path().join("open-pass");
        std::fs::write(&open, "pw\n").expect("write");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let logs = logs_of(|| {
            for _ in 0..2 {
                let p = passphrase(Some(&open), false).expect("still read");
                assert!(format!("{p:?}").contains("redacted"));
            }
        });
        assert_eq!(logs.matches("WARN").count(), 1, "warned once: {logs}");
        assert!(logs.contains(&open.display().to_string()), "{logs}");
        assert!(logs.contains("chmod 600"), "{logs}");

        let private = dir.path().join("private-pass");
        std::fs::write(&private, "pw\n").expect("write");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let logs = logs_of(|| {
            passphrase(Some(&private), false).expect("read");
        });
        assert!(!logs.contains("WARN"), "{logs}");

        if nix::unistd::geteuid().is_root() {
            let theirs = dir.path().join("their-pass");
            std::fs::write(&theirs, "pw\n").expect("write");
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            std::os::unix::fs::chown(&theirs, Some(65534), None).expect("chown");
            let logs = logs_of(|| {
                passphrase(Some(&theirs), false).expect("read");
            });
            assert!(logs.contains("WARN") && logs.contains("owned by"), "{logs}");
        }
    }

    /// A key file (say, fetched from a hostile receiver) asking Argon2id for 4 GiB is refused
    /// naming the file and its parameters, before any passphrase is asked for.
    #[test]
    fn a_key_file_asking_for_too_much_memory_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        let fast = KdfParams {
            m_kib: KdfParams::MIN_M_KIB,
            t: 2,
            p: 1,
        };
        let pass = Passphrase::new("pw".into()).expect("passphrase");
        let master = keys::MasterSecret::generate().expect("rng");
        let mut bytes = keys::wrap_master(&master, &pass, fast).expect("wrap");
        // The memory cost at bytes 12..16, the checksum of bytes 0..112 after it.
        bytes[12..16].copy_from_slice(&(4u32 << 20).to_le_bytes());
        let sum = blake3::hash(&bytes[..112]);
        bytes[112..].copy_from_slice(sum.as_bytes());
        let origin = Path::new("escrowed key file");
        let e = match unlock_bytes(&cfg, &bytes, origin) {
            Err(e) => e,
            Ok(_) => panic!("unlocked with 4 GiB of Argon2id"),
        };
        let text = coffer_common::error_text(&e);
        assert!(
            matches!(
                e,
                StateError::Key {
                    source: KeyError::ExcessiveParams { .. },
                    ..
                }
            ),
            "{text}"
        );
        assert!(text.starts_with("escrowed key file: "), "{text}");
        assert!(text.contains("m=4194304 KiB, t=2, p=1"), "{text}");
        assert!(matches!(
            unlock_with(&bytes, &pass, origin),
            Err(StateError::Key {
                source: KeyError::ExcessiveParams { .. },
                ..
            })
        ));
    }

    #[test]
    fn a_failed_write_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The state dir's place is taken by a file: the folder cannot be made.
        let blocker = dir.path().join("state");
        std::fs::write(&blocker, b"not a folder").expect("blocker");
        let e = write_private(&blocker.join("keyfile"), b"x").expect_err("no folder");
        assert!(matches!(e, StateError::Io(_)), "{e:?}");
        assert!(e.to_string().contains("state"), "{e}");
    }

    #[test]
    fn an_unreadable_key_file_is_not_a_wrong_passphrase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        std::fs::create_dir_all(&cfg.state_dir).expect("state dir");
        // A folder where the key file should be: reading it fails (also as root).
        std::fs::create_dir(cfg.keyfile_path()).expect("folder");
        let e = match unlock(&cfg) {
            Err(e) => e,
            Ok(_) => panic!("a folder unlocked as a key file"),
        };
        let text = coffer_common::error_text(&e);
        assert!(matches!(e, StateError::Io(_)), "{text}");
        assert!(text.starts_with("reading key file "), "{text}");
        assert!(text.contains("keyfile"), "{text}");
        assert!(!text.contains("passphrase"), "{text}");
    }
}
