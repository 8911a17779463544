//! coffer-agent: watches folders and backs up every change, end-to-end encrypted.
//!
//! - [`config`]: the TOML configuration and the state dir's paths.
//! - [`state`]: the state dir: agent key, wrapped master key, passphrase.
//! - [`journal`]: the journal (SQLite), sole owner of its connection: states, claims, counts.
//! - [`watch`]: notify events become dirty paths; the OS watches and their fallbacks.
//! - [`scan`]: tree scans compared with the journal become dirty rows.
//! - [`avail`]: whether a watch's folder is there (unavailable watches record no
//!   deletions), and the share of its files a scan may delete at once.
//! - [`daemon`]: `run`: its threads, their shared state and the one shutdown signal.
//! - [`upload`]: workers read, chunk, seal and send; a collector records acks.
//! - [`conn`]: the pipelined connection to the receiver; reconnects, query lane, escrow.
//! - [`link`]: under each connection: the address resolved at every connect, TCP
//!   keepalive, and the watchdog that replaces a link gone quiet.
//! - [`rate`]: `upload_limit`/`download_limit`: token buckets shared by all connections.
//! - [`pause`]: `pause`/`resume`: a pause is a file in the state dir the daemon polls.
//! - [`restore`]: `ls`, `versions`, `restore`, `verify`; the target walked by folder
//!   handles (`restore/tree.rs`).
//! - [`paths`]: a file named on the command line (a local path or `watch/relative`).
//! - [`status`]: `status`, from the journal alone.
//! - [`metrics`]: `run --metrics`: Prometheus series at `/metrics`.
//! - [`service`]: `service install|uninstall` (systemd units, launchd plist).
//! - [`cli`]: the command line and its typed errors (`main.rs` only parses and prints).

pub mod avail;
pub mod cli;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod fidelity;
pub mod journal;
pub mod link;
pub mod metrics;
pub mod paths;
pub mod pause;
pub mod rate;
pub mod restore;
pub mod scan;
pub mod service;
pub mod state;
pub mod status;
pub mod upload;
pub mod watch;
