//! What the journal's database holds and how it is spelled, each word once: the migrations,
//! a file's state ([`FileState`], stored through `ToSql`/`FromSql`), and the keys of `meta`
//! ([`MetaKey`]) and `counters` ([`CounterKey`]).
//!
//! SQL text that must name a state (a partial index's condition, which a query must repeat
//! word for word; a state set by a statement) takes it from the constants here ([`DIRTY`],
//! [`DUE`]...) through [`sql!`]; they are built from the names in [`state_name!`], which
//! [`FileState::as_str`] returns too. Only the migrations, which never change once
//! shipped, spell states themselves.

use std::borrow::Cow;

use coffer_common::host::sqlite::Schema;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// The migrations, in order; never edit or reorder a shipped one.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/agent/0001_journal.sql"),
    include_str!("../../../migrations/agent/0002_claimed.sql"),
    include_str!("../../../migrations/agent/0003_drop_state_index.sql"),
    include_str!("../../../migrations/agent/0004_file_stats.sql"),
    include_str!("../../../migrations/agent/0005_counts_in_code.sql"),
    include_str!("../../../migrations/agent/0006_due_index_without_in.sql"),
    include_str!("../../../migrations/agent/0007_drop_pending_and_claimed.sql"),
    include_str!("../../../migrations/agent/0008_keyed_hashes.sql"),
    include_str!("../../../migrations/agent/0009_queue_order.sql"),
    include_str!("../../../migrations/agent/0010_held_deletions.sql"),
];

/// The journal's schema: what errors call it, who reads it, and its migrations.
pub(super) static SCHEMA: Schema = Schema {
    what: "journal",
    program: "coffer-agent",
    migrations: MIGRATIONS,
};

/// The name of each [`FileState`] in `files.state`: the one place each is spelled.
macro_rules! state_name {
    (Dirty) => {
        "dirty"
    };
    (Uploading) => {
        "uploading"
    };
    (BackedUp) => {
        "backed_up"
    };
    (Failed) => {
        "failed"
    };
}

/// A state as a SQL string literal (`'dirty'`), for SQL text that must name one.
macro_rules! sql_state {
    ($s:ident) => {
        concat!("'", state_name!($s), "'")
    };
}

/// `'dirty'`: the states as SQL string literals, for SQL text that must name one.
pub(super) const DIRTY: &str = sql_state!(Dirty);
pub(super) const UPLOADING: &str = sql_state!(Uploading);
pub(super) const BACKED_UP: &str = sql_state!(BackedUp);
pub(super) const FAILED: &str = sql_state!(Failed);

/// The condition of the claim's partial index `files_due` (migration 0007): the files the
/// uploader may take. A query reads through the index only if it repeats the condition
/// word for word (the planner matches it term by term, else it scans every row).
pub(super) const DUE: &str = concat!(
    "(state = ",
    sql_state!(Dirty),
    " OR state = ",
    sql_state!(Uploading),
    " OR state = ",
    sql_state!(Failed),
    ")"
);

/// The size tier of a queued file (`files.tier`, migration 0009), from the size it was
/// seen with (`?5`) else the size it has: small files go first within a class. The
/// thresholds are migration 0009's: 1 MiB, 64 MiB, 1 GiB.
macro_rules! tier_of {
    ($size:literal) => {
        concat!(
            "CASE WHEN COALESCE(",
            $size,
            ", 0) < 1048576 THEN 0 WHEN ",
            $size,
            " < 67108864 THEN 1 WHEN ",
            $size,
            " < 1073741824 THEN 2 ELSE 3 END"
        )
    };
}
/// The tier of a new row, from `?5`.
pub(super) const TIER_NEW: &str = tier_of!("?5");
/// The tier of a row changed, from `?5` else its stored size.
pub(super) const TIER: &str = tier_of!("COALESCE(?5, size)");

/// Which queue a change waits in (`files.class`, migration 0009): the uploader takes
/// fresh work first, and gives the backlog a share (see `daemon::Lanes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Seen by the watcher while the agent runs: someone is working on it now.
    Fresh = 0,
    /// Found by a scan (at start, periodic, after an overflow): catching up.
    Backlog = 1,
}

impl Class {
    /// Both classes, in the order they are served.
    pub const ALL: [Class; 2] = [Class::Fresh, Class::Backlog];

    /// The name `status` shows.
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Fresh => "fresh",
            Class::Backlog => "backlog",
        }
    }

    /// The class stored as `n` (anything but 0 is backlog).
    pub fn from_i64(n: i64) -> Class {
        if n == 0 {
            Class::Fresh
        } else {
            Class::Backlog
        }
    }
}

/// SQL text that names states, built once on first use from a format string whose
/// `{DIRTY}`, `{DUE}`... are the constants above: `sql!("... WHERE state = {FAILED}")` is
/// a `&'static str`.
macro_rules! sql {
    ($text:literal) => {{
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| format!($text));
        SQL.as_str()
    }};
}
pub(super) use sql;

/// The name stored in `files.state` before migration 0007 for work handed to the uploader.
/// No build wrote it; 0007 turns such rows `dirty`, so a journal not yet migrated (read by
/// `status` under an older daemon) reads them as `dirty` too.
const LEGACY_PENDING: &str = "pending";

/// Where a file stands in the journal (`files.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileState {
    /// Seen changed (new, changed or gone), not yet read; due at `due_at`.
    Dirty,
    /// Read: hash and commit id recorded and the commit sent; not yet acknowledged.
    Uploading,
    /// Acknowledged as it was last read (or as a deletion).
    BackedUp,
    /// The file itself failed (unreadable...); retried with back-off.
    Failed,
}

impl FileState {
    /// Every state.
    pub const ALL: [FileState; 4] = [
        FileState::Dirty,
        FileState::Uploading,
        FileState::BackedUp,
        FileState::Failed,
    ];

    /// The name stored in `files.state`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FileState::Dirty => state_name!(Dirty),
            FileState::Uploading => state_name!(Uploading),
            FileState::BackedUp => state_name!(BackedUp),
            FileState::Failed => state_name!(Failed),
        }
    }

    /// The state a stored name stands for (`pending`, of a journal not yet migrated to
    /// schema 7, stands for `dirty`).
    pub fn from_name(name: &str) -> Option<FileState> {
        Some(match name {
            state_name!(Dirty) => FileState::Dirty,
            state_name!(Uploading) => FileState::Uploading,
            state_name!(BackedUp) => FileState::BackedUp,
            state_name!(Failed) => FileState::Failed,
            LEGACY_PENDING => FileState::Dirty,
            _ => return None,
        })
    }

    /// Not backed up: counted in `status`'s pending files and bytes.
    pub fn is_pending(self) -> bool {
        self != FileState::BackedUp
    }
}

impl ToSql for FileState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Text(
            self.as_str().as_bytes(),
        )))
    }
}

impl FromSql for FileState {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let name = v.as_str()?;
        FileState::from_name(name)
            .ok_or_else(|| FromSqlError::Other(format!("unknown file state {name:?}").into()))
    }
}

/// The keys of the journal's `meta` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey<'a> {
    /// When this run of the agent started (unix ms).
    AgentStartedMs,
    /// The last time the daemon was known to run (unix ms): written every
    /// [`crate::daemon::HEARTBEAT`] and when it stops, so a stopped agent's `status` can say
    /// until when its folders were watched.
    AgentSeenMs,
    /// The last time the daemon knew its receiver connection to be up (unix ms): written
    /// when it connects, every heartbeat while connected, and when it stops.
    ReceiverConnectedMs,
    /// When an acknowledgement was last recorded (unix ms, the agent's clock).
    LastAckMs,
    /// The latest commit time acknowledged (unix s, the receiver's clock).
    LastBackedAt,
    /// The receiver connection: `connected` or `unreachable: REASON`.
    ReceiverState,
    /// When `ReceiverState` was last set (unix ms).
    ReceiverStateAt,
    /// The receiver's refusal (`QuotaExceeded`, `Unauthorized`) as JSON `{code, message,
    /// since_ms}`; empty once it takes data again.
    ReceiverRefusal,
    /// The repository's use and quota at the last connect, as JSON `{used, quota,
    /// warn_at_percent, at_ms}`; empty when it has no quota.
    ReceiverQuota,
    /// `1` once the wrapped key file is escrowed on the receiver.
    KeyEscrowed,
    /// The last escrow check: `ok` (the receiver holds this agent's key file),
    /// `reescrowed` (it did not, and it was escrowed again) or `failed: REASON`.
    EscrowState,
    /// When `EscrowState` was last set (unix s).
    EscrowCheckedAt,
    /// Why a watch (by name) is scanned periodically instead of watched; empty if it is not.
    WatchFallback(&'a str),
    /// When a watch (by name) was last scanned in full (unix ms).
    LastScanMs(&'a str),
    /// The queues' recent rates, written by the running daemon every few seconds while
    /// work flows: `AT_MS FRESH_FILES/s FRESH_BYTES/s BACKLOG_FILES/s BACKLOG_BYTES/s`.
    QueueRate,
    /// Where a watch (by name) was when last available: `{"dev": N, "mount": HEX}` (see
    /// `crate::avail::Place`); empty when not recorded (or forgotten by `confirm-deletions`).
    WatchDevice(&'a str),
    /// Since when and why a watch (by name) is unavailable: `{"since_ms", "reason",
    /// "message"}`; empty while it is available.
    WatchUnavailable(&'a str),
}

impl MetaKey<'_> {
    /// The key as stored.
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            MetaKey::AgentStartedMs => "agent_started_ms".into(),
            MetaKey::AgentSeenMs => "agent_seen_ms".into(),
            MetaKey::ReceiverConnectedMs => "receiver_connected_ms".into(),
            MetaKey::LastAckMs => "last_ack_ms".into(),
            MetaKey::LastBackedAt => "last_backed_at".into(),
            MetaKey::ReceiverState => "receiver_state".into(),
            MetaKey::ReceiverStateAt => "receiver_state_at".into(),
            MetaKey::ReceiverRefusal => "receiver_refusal".into(),
            MetaKey::ReceiverQuota => "receiver_quota".into(),
            MetaKey::KeyEscrowed => "key_escrowed".into(),
            MetaKey::EscrowState => "escrow_state".into(),
            MetaKey::EscrowCheckedAt => "escrow_checked_at".into(),
            MetaKey::WatchFallback(w) => format!("watch_fallback:{w}").into(),
            MetaKey::LastScanMs(w) => format!("last_scan_ms:{w}").into(),
            MetaKey::QueueRate => "queue_rate".into(),
            MetaKey::WatchDevice(w) => format!("watch_device:{w}").into(),
            MetaKey::WatchUnavailable(w) => format!("watch_unavailable:{w}").into(),
        }
    }
}

/// The names of the journal's `counters` (shown by `status` under `watcher`, by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterKey<'a> {
    /// Full scans of watched trees.
    Scans,
    /// Rescans after file events were lost (the kernel's queue overflowed).
    RescansOverflow,
    /// Files the uploader found to be neither regular files nor symlinks.
    SkippedSpecial,
    /// Special files (neither regular nor symlinks) the last scan of a watch (by name) found.
    SkippedSpecialIn(&'a str),
}

impl CounterKey<'_> {
    /// The name as stored; every `SkippedSpecial*` name starts with `SkippedSpecial`'s.
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            CounterKey::Scans => "scans".into(),
            CounterKey::RescansOverflow => "rescans_overflow".into(),
            CounterKey::SkippedSpecial => "skipped_special".into(),
            CounterKey::SkippedSpecialIn(w) => format!("skipped_special:{w}").into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_sql_and_their_literals_match() {
        let c = rusqlite::Connection::open_in_memory().expect("db");
        for s in FileState::ALL {
            let back: FileState = c
                .query_row("SELECT ?1", [s], |r| r.get(0))
                .expect("round trip");
            assert_eq!(back, s);
            assert_eq!(FileState::from_name(s.as_str()), Some(s));
        }
        let lits = [
            (FileState::Dirty, DIRTY),
            (FileState::Uploading, UPLOADING),
            (FileState::BackedUp, BACKED_UP),
            (FileState::Failed, FAILED),
        ];
        for (s, lit) in lits {
            assert_eq!(lit, format!("'{}'", s.as_str()));
        }
        assert_eq!(
            DUE,
            "(state = 'dirty' OR state = 'uploading' OR state = 'failed')"
        );
        assert_eq!(
            sql!("state = {FAILED} OR {DUE}"),
            format!("state = 'failed' OR {DUE}")
        );
        let legacy: FileState = c
            .query_row("SELECT 'pending'", [], |r| r.get(0))
            .expect("legacy");
        assert_eq!(legacy, FileState::Dirty);
        let unknown: rusqlite::Result<FileState> = c.query_row("SELECT 'lost'", [], |r| r.get(0));
        assert!(unknown.is_err());
    }
}
