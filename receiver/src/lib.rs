//! coffer-receiver: stores agents' sealed chunks durably and acknowledges each file once it
//! is safe; it never sees a key, a file name or a byte of plaintext.
//!
//! - [`layout`]: the backup tree under `--root` (every path the receiver writes), `init`.
//! - [`config`]: the configuration file, `receiver.toml`.
//! - [`admission`]: connections per address and sessions per key and repository, counted.
//! - [`auth`]: agent key -> repository (`authorized.toml`), repository names.
//! - [`server`]: `serve`: listener, handshake, authorization, session slots, shutdown.
//! - [`control`]: the control socket, by which `prune` reaches a running `serve`.
//! - [`session`]: one agent's session: requests in order, group commit, chunk reads.
//! - [`repo`]: one repository: write path (append, flush, rollback), reads, crash recovery.
//! - [`retention`]: the retention policy (which versions of a file are kept), its durations.
//! - [`quota`]: repository quotas and the free-disk floor (`min_free`), checked per chunk.
//! - [`store`]: pack formats, the [`store::PackStore`] trait, where packs live (`PackStores`).
//! - [`index`]: the repository's SQLite index, sole owner of its connection.
//! - [`status`]: `status` and `scrub` (and whether a `serve` holds the root).
//! - [`prune`]: `prune`: retention applied (removal records), unreferenced chunks deleted,
//!   packs compacted, while sessions keep writing.
//! - [`repair`]: `repair` (the index rebuilt from the packs), and a missing or damaged
//!   index met when a repository is opened; [`salvage`]: the scan that reads past damage.
//! - [`logs`]: what is logged of peers: their text escaped, refusals summarised.
//! - [`metrics`]: the session counters and `serve --metrics`'s `/metrics` endpoint.
//! - [`notify`]: systemd readiness and watchdog notifications.
//! - [`service`]: `service install|uninstall` (the systemd unit).
//! - [`cli`]: the command line (clap definitions) and what each command does.
//! - [`clidoc`]: shell completions and the man page from the command line's definition.
//!
//! This file holds the commands' [`Error`] and [`init`], [`authorize`], [`revoke`].
//! `docs/design.md` ("Receiver store") describes the formats and the write ordering.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use coffer_common::channel::PublicKey;
use coffer_common::host::fs;

pub mod admission;
pub mod auth;
pub mod cli;
pub mod clidoc;
pub mod config;
pub mod control;
pub mod index;
pub mod layout;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod prune;
pub mod quota;
pub mod records;
pub mod repair;
pub mod repo;
pub mod retention;
pub mod salvage;
pub mod server;
pub mod service;
pub mod session;
pub mod status;
pub mod store;

pub use auth::{Authorized, RepoName};
pub use layout::Layout;

/// Errors of the receiver's commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Io(#[from] fs::IoError),
    #[error(transparent)]
    Index(#[from] index::IndexError),
    #[error(transparent)]
    Repo(#[from] repo::RepoError),
    #[error(transparent)]
    Repair(#[from] repair::RepairError),
    #[error(transparent)]
    Prune(#[from] prune::PruneError),
    #[error(
        "another coffer-receiver serve is already running on {} (it holds {}/serve.lock)",
        .0.display(),
        .0.display()
    )]
    AlreadyServing(PathBuf),
    #[error("listening on {addr}: {msg}")]
    Bind { addr: SocketAddr, msg: String },
    #[error("serving metrics on {addr} (--metrics): {msg}")]
    MetricsBind { addr: SocketAddr, msg: String },
    #[error("starting the runtime: {0}")]
    Runtime(String),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Service(#[from] service::ServiceError),
}

/// `init`: creates the tree at `root`; returns the receiver's public key.
pub fn init(root: &Path, listen: Option<SocketAddr>) -> Result<PublicKey, Error> {
    let mut c = config::Config::default();
    if let Some(l) = listen {
        c.listen = l;
    }
    Ok(Layout::new(root).init(&c)?)
}

/// `authorize`: lets agent `key` write repository `name`.
pub fn authorize(root: &Path, name: &str, key: &str) -> Result<Authorized, Error> {
    let layout = Layout::new(root);
    layout.load_config()?;
    let name = RepoName::new(name).map_err(auth::AuthError::from)?;
    let key: PublicKey = key.parse().map_err(auth::AuthError::from)?;
    let _lock = auth::EditLock::acquire(&layout.authorized_lock())?;
    let mut list = auth::Authorizations::load(&layout.authorized())?;
    let r = list.authorize(key, name.clone())?;
    layout.repo(&name).create()?;
    if r == Authorized::Added {
        list.save(&layout.authorized())?;
    }
    Ok(r)
}

/// `revoke`: removes agent `key`; returns the repository it wrote to.
pub fn revoke(root: &Path, key: &str) -> Result<RepoName, Error> {
    let layout = Layout::new(root);
    layout.load_config()?;
    let key: PublicKey = key.parse().map_err(auth::AuthError::from)?;
    let _lock = auth::EditLock::acquire(&layout.authorized_lock())?;
    let mut list = auth::Authorizations::load(&layout.authorized())?;
    let repo = list.revoke(&key)?;
    list.save(&layout.authorized())?;
    Ok(repo)
}
