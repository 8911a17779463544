//! What both daemons need from the operating system, written once (cargo feature `host`).
//!
//! The rest of `coffer-common` is pure: types, formats and the secure channel. This module
//! holds the I/O policy the agent and the receiver share:
//!
//! - [`fs`]: I/O errors naming operation and path (`.ctx()`), atomic writes, directories.
//! - [`lock`]: `flock` run and editor locks (retried briefly), and the probe `status` uses.
//! - [`sqlite`]: opening a database, `user_version` migrations, `ToSql`/`FromSql` for ids.
//! - [`time`]: unix time, RFC 3339 formatting and the `--at` parser.
//! - [`service`]: the `service install|uninstall` engine: plan, dry run, checks, execution.
//! - [`log`]: the `-v`/`-q`/`--log-format` options and the `tracing` subscriber behind them.
//! - [`mem`]: the allocator's arena policy (the workspace's one `unsafe` block).
//! - [`net`]: TCP keepalive and user timeout, so that a vanished peer is noticed in 30 s.

pub mod fs;
pub mod lock;
pub mod log;
pub mod mem;
pub mod net;
pub mod service;
pub mod sqlite;
pub mod time;
