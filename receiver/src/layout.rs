//! The backup tree under `--root`, and `init`, which creates it.
//!
//! ```text
//! <root>/receiver.toml                  configuration (written last by init: marks the root)
//! <root>/keys/receiver.key              static key pair, mode 0600 (private || public)
//! <root>/authorized.toml                agent key -> repository
//! <root>/authorized.lock                taken while authorize/revoke edit the list
//! <root>/serve.lock                     held (flock) by a running serve
//! <root>/serve.addr                     the address serve is listening on
//! <root>/repos/<name>/keyfile           escrowed key file of an older receiver (entry 0)
//! <root>/repos/<name>/keyfiles/NNNNNNNN.key  escrowed key files, numbered from 1, never replaced
//! <root>/repos/<name>/packs/NNNNNNNN.pack   eight decimal digits
//! <root>/repos/<name>/index.sqlite      (+ -wal, -shm, SQLite's own)
//! <root>/repos/<name>/index.sqlite.repair  the index `repair` is building; renamed over
//!                                       index.sqlite once whole (present: a repair was cut off)
//! ```
//!
//! Files written whole (the key, `receiver.toml`, `authorized.toml`, `serve.addr`, a
//! key file) go through a temporary `.<name>.tmp` beside them
//! ([`coffer_common::host::fs::write_atomic`]).
//!
//! Every path the receiver writes is built here from the root, validated repository names
//! ([`RepoDir`]) and pack numbers ([`PacksDir`]).

use std::path::{Path, PathBuf};

use coffer_common::channel::{PublicKey, StaticKeypair};

use crate::auth::RepoName;
use crate::config::Config;
use crate::store::PackNo;
use coffer_common::host::fs::{create_dir_all, write_atomic, Context, IoError};

/// Paths of one backup tree.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

/// Errors setting up or opening the tree.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(
        "{} is already initialized (found {}); refusing to replace its key",
        root.display(),
        found.display()
    )]
    AlreadyInitialized { root: PathBuf, found: PathBuf },
    #[error(
        "{} is not an initialized receiver root (no {}); run `coffer-receiver init --root {}` first",
        root.display(),
        missing.display(),
        root.display()
    )]
    NotInitialized { root: PathBuf, missing: PathBuf },
    #[error("{}: not a receiver key file (expected 64 bytes)", .0.display())]
    BadKey(PathBuf),
    #[error("generating the receiver key: {0}")]
    KeyGen(String),
}

impl Layout {
    /// The tree at `root` (nothing is checked or created).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("receiver.toml")
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }
    pub fn key(&self) -> PathBuf {
        self.keys_dir().join("receiver.key")
    }
    pub fn authorized(&self) -> PathBuf {
        self.root.join("authorized.toml")
    }
    pub fn authorized_lock(&self) -> PathBuf {
        self.root.join("authorized.lock")
    }
    pub fn serve_lock(&self) -> PathBuf {
        self.root.join("serve.lock")
    }
    pub fn serve_addr(&self) -> PathBuf {
        self.root.join("serve.addr")
    }
    pub fn repos(&self) -> PathBuf {
        self.root.join("repos")
    }
    pub fn repo(&self, name: &RepoName) -> RepoDir {
        RepoDir {
            dir: self.repos().join(name.as_str()),
        }
    }

    /// Creates the tree and the receiver key; returns the public key. Refuses a root that
    /// is already initialized.
    pub fn init(&self, config: &Config) -> Result<PublicKey, LayoutError> {
        for found in [self.config(), self.key()] {
            if found.exists() {
                return Err(LayoutError::AlreadyInitialized {
                    root: self.root.clone(),
                    found,
                });
            }
        }
        create_dir_all(&self.root, 0o700)?;
        create_dir_all(&self.keys_dir(), 0o700)?;
        create_dir_all(&self.repos(), 0o700)?;
        let kp = StaticKeypair::generate().map_err(|e| LayoutError::KeyGen(e.to_string()))?;
        write_atomic(&self.key(), &kp.to_bytes(), 0o600)?;
        // Written last: its presence marks an initialized root.
        write_atomic(&self.config(), config.render().as_bytes(), 0o644)?;
        Ok(kp.public())
    }

    /// Checks that the tree is initialized and reads its configuration.
    pub fn load_config(&self) -> Result<Config, crate::Error> {
        let p = self.config();
        if !p.exists() {
            return Err(LayoutError::NotInitialized {
                root: self.root.clone(),
                missing: p,
            }
            .into());
        }
        Ok(Config::load(&p)?)
    }

    /// Reads the receiver's static key pair.
    pub fn load_keypair(&self) -> Result<StaticKeypair, LayoutError> {
        let p = self.key();
        let bytes = zeroize::Zeroizing::new(std::fs::read(&p).ctx("reading", &p)?);
        StaticKeypair::from_bytes(&bytes).ok_or(LayoutError::BadKey(p))
    }
}

/// One repository's directory, `<root>/repos/<name>/`.
#[derive(Clone, Debug)]
pub struct RepoDir {
    dir: PathBuf,
}

impl RepoDir {
    pub fn path(&self) -> &Path {
        &self.dir
    }
    /// The single escrowed key file an older receiver kept (read only: the history's
    /// entry 0).
    pub fn keyfile(&self) -> PathBuf {
        self.dir.join("keyfile")
    }
    /// The folder of the escrowed key files' history.
    pub fn keyfiles(&self) -> PathBuf {
        self.dir.join("keyfiles")
    }
    /// Entry `number` (1 and up) of the key files' history: `NNNNNNNN.key`.
    pub fn keyfile_entry(&self, number: u32) -> PathBuf {
        self.keyfiles().join(format!("{number:08}.key"))
    }
    /// The entry whose file in [`RepoDir::keyfiles`] is called `name`, if that is an
    /// entry's name (entry 0 is [`RepoDir::keyfile`], never in that folder).
    pub fn keyfile_named(name: &str) -> Option<u32> {
        let digits = name.strip_suffix(".key")?;
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().filter(|&n| n > 0)
    }
    /// The repository's index.
    pub fn index(&self) -> PathBuf {
        self.dir.join("index.sqlite")
    }
    /// SQLite's write-ahead log and shared-memory files beside the index.
    pub fn index_wal(&self) -> PathBuf {
        self.dir.join("index.sqlite-wal")
    }
    pub fn index_shm(&self) -> PathBuf {
        self.dir.join("index.sqlite-shm")
    }
    /// The index `repair` builds from the packs, renamed over [`RepoDir::index`] once whole.
    pub fn index_repair(&self) -> PathBuf {
        self.dir.join("index.sqlite.repair")
    }
    /// The backup tree's root (`<root>` of `<root>/repos/<name>`), for messages that name
    /// a command to run.
    pub fn root(&self) -> &Path {
        self.dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&self.dir)
    }
    /// The repository's name (its folder's name), for messages.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
    /// Where its packs are.
    pub fn packs(&self) -> PacksDir {
        PacksDir {
            dir: self.dir.join("packs"),
        }
    }

    /// Creates the repository's directory and its pack directory (mode 0700) if missing.
    pub fn create(&self) -> Result<(), IoError> {
        create_dir_all(self.packs().path(), 0o700)
    }
}

/// A repository's pack directory, `<root>/repos/<name>/packs/`: pack `n` is the file
/// `NNNNNNNN.pack` (`n` in eight decimal digits).
#[derive(Clone, Debug)]
pub struct PacksDir {
    dir: PathBuf,
}

impl PacksDir {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The file of pack `pack`.
    pub fn pack(&self, pack: PackNo) -> PathBuf {
        self.dir.join(format!("{:08}.pack", pack.0))
    }

    /// The pack whose file is called `name`, if that is a pack file's name.
    pub fn pack_named(name: &str) -> Option<PackNo> {
        let digits = name.strip_suffix(".pack")?;
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().map(PackNo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_creates_the_tree_once() {
        let d = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(&d.path().join("root"));
        let pk = l.init(&Config::default()).expect("init");
        assert_eq!(l.load_keypair().expect("key").public(), pk);
        let mode = std::fs::metadata(l.key())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(l.repos().is_dir());
        assert_eq!(l.load_config().expect("config"), Config::default());
        let e = l.init(&Config::default()).expect_err("second init");
        assert!(e.to_string().contains("already initialized"), "{e}");
        assert_eq!(l.load_keypair().expect("key").public(), pk);
    }

    #[test]
    fn repository_paths_and_pack_names_round_trip() {
        let l = Layout::new(Path::new("/r"));
        let repo = l.repo(&RepoName::new("laptop").expect("name"));
        assert_eq!(repo.path(), Path::new("/r/repos/laptop"));
        assert_eq!(repo.index(), Path::new("/r/repos/laptop/index.sqlite"));
        assert_eq!(
            repo.index_repair(),
            Path::new("/r/repos/laptop/index.sqlite.repair")
        );
        assert_eq!(
            repo.index_wal(),
            Path::new("/r/repos/laptop/index.sqlite-wal")
        );
        assert_eq!(
            (repo.root(), repo.name().as_str()),
            (Path::new("/r"), "laptop")
        );
        assert_eq!(repo.keyfile(), Path::new("/r/repos/laptop/keyfile"));
        assert_eq!(
            repo.keyfile_entry(12),
            Path::new("/r/repos/laptop/keyfiles/00000012.key")
        );
        assert_eq!(RepoDir::keyfile_named("00000012.key"), Some(12));
        for bad in [
            "00000000.key",
            "12.key",
            ".00000012.key.tmp",
            "0000001x.key",
        ] {
            assert_eq!(RepoDir::keyfile_named(bad), None, "{bad}");
        }
        let packs = repo.packs();
        assert_eq!(
            packs.pack(PackNo(7)),
            Path::new("/r/repos/laptop/packs/00000007.pack")
        );
        assert_eq!(PacksDir::pack_named("00000007.pack"), Some(PackNo(7)));
        for bad in [
            "7.pack",
            "0000000x.pack",
            "00000007.pack.tmp",
            "000000007.pack",
        ] {
            assert_eq!(PacksDir::pack_named(bad), None, "{bad}");
        }
    }
}
