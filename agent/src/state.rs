//! The agent's state directory: its static key, the wrapped master key, the passphrase.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use coffer_common::channel::StaticKeypair;
use coffer_common::chunk::Crypto;
use coffer_common::keys::{self, KeyError, Passphrase};

use crate::config::Config;

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Key { path: PathBuf, source: KeyError },
    #[error("agent key {0} is damaged (expected 64 bytes)")]
    BadAgentKey(PathBuf),
    #[error("passphrase: {0}")]
    Passphrase(String),
    #[error("no passphrase: set COFFER_PASSPHRASE, set `passphrase_file` in the config, or run on a terminal to be asked")]
    NoPassphrase,
}

/// Writes a private file atomically: temp (mode 0600) + fsync + rename + fsync(dir).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let io = |what, source| StateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io("creating the folder of", e))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("writing", e))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("setting mode 0600 on", e))?;
    f.write_all(bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the agent's static Noise key.
pub fn load_agent_key(cfg: &Config) -> Result<StaticKeypair, StateError> {
    let p = cfg.agent_key_path();
    let b = std::fs::read(&p).map_err(|source| StateError::Io {
        what: "reading agent key",
        path: p.clone(),
        source,
    })?;
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
        let s = std::fs::read_to_string(f).map_err(|source| StateError::Io {
            what: "reading passphrase file",
            path: f.to_path_buf(),
            source,
        })?;
        return wrap(s);
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(StateError::NoPassphrase);
    }
    let first = rpassword::prompt_password("Coffer passphrase: ")
        .map_err(|e| StateError::Passphrase(e.to_string()))?;
    if confirm {
        let second = rpassword::prompt_password("Repeat passphrase: ")
            .map_err(|e| StateError::Passphrase(e.to_string()))?;
        if first != second {
            return Err(StateError::Passphrase("the two entries differ".into()));
        }
    }
    wrap(first)
}

/// Opens the wrapped master key with the passphrase and builds the sealing context.
pub fn unlock(cfg: &Config) -> Result<Crypto, StateError> {
    let p = cfg.keyfile_path();
    let bytes = std::fs::read(&p).map_err(|source| StateError::Io {
        what: "reading key file",
        path: p.clone(),
        source,
    })?;
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
    keys::key_file_params(bytes).map_err(|source| StateError::Key {
        path: origin.to_path_buf(),
        source,
    })?;
    passphrase(cfg.passphrase_file.as_deref(), false)
}

/// Unwraps the master secret (Argon2id: the expensive half of [`unlock_bytes`]).
pub fn unlock_with(bytes: &[u8], pass: &Passphrase, origin: &Path) -> Result<Crypto, StateError> {
    let master = keys::unwrap_master(bytes, pass).map_err(|source| StateError::Key {
        path: origin.to_path_buf(),
        source,
    })?;
    Ok(Crypto::new(&master.sub_keys()))
}
