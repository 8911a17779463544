//! coffer-agent: watches folders and backs up every change, end-to-end encrypted.
//!
//! - [`config`]: the TOML configuration.
//! - [`state`]: the state dir: agent key, wrapped master key, passphrase.
//! - [`journal`]: SQLite, the only owner of the journal connection; file states.
//! - [`watch`] and [`scan`]: notify events and tree scans become dirty rows.
//! - [`upload`]: workers read, chunk, seal and send; a collector records acks.
//! - [`daemon`]: `run`, tying the threads together.
//! - [`conn`]: the pipelined connection to the receiver.
//! - [`restore`]: `ls`, `versions`, `restore`, `verify`.
//! - [`status`]: `status`, from the journal alone.
//! - [`cli`]: the command line.

pub mod cli;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod journal;
pub mod metrics;
pub mod restore;
pub mod scan;
pub mod service;
pub mod state;
pub mod status;
pub mod upload;
pub mod watch;
