//! What both daemons need from the operating system, written once (cargo feature `host`).
//!
//! The rest of `coffer-common` is pure: types, formats and the secure channel. This module
//! holds the I/O policy the agent and the receiver share:
//!
//! - [`fs`]: I/O errors that name the operation and the path (`.ctx()`), atomic small-file
//!   writes (temp + fsync + rename + fsync of the directory), directory creation and fsync.
//! - [`lock`]: `flock` run locks (a daemon's lifetime lock, with a short retry for probes)
//!   and the probe `status` uses to tell whether a daemon holds one.
//! - [`sqlite`]: one way to open a SQLite database and bring its schema up to date by
//!   `PRAGMA user_version` (read inside the write transaction; a newer schema refused, also
//!   on read-only opens), and `ToSql`/`FromSql` for the shared ids.
//! - [`time`]: unix time, RFC 3339 formatting and the `--at` parser.
//! - [`service`]: the engine of `service install|uninstall`: the plan of files and commands,
//!   its dry-run printing, the checks before a change and carrying the plan out.
//! - [`log`]: the `-v`/`-q`/`--log-format` options and the `tracing` subscriber behind them.

pub mod fs;
pub mod lock;
pub mod log;
pub mod service;
pub mod sqlite;
pub mod time;
