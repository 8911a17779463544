//! `coffer-agent status`: answers from the journal alone, whether or not `run` is running.
//! The summary (`summary_json`, `print`) and the per-path and `--failed` reports
//! (`print_paths` with its exit [`Verdict`], `print_failed`) are separate parts.

use std::io::Write;

use serde_json::{json, Value};

use crate::config::Config;
use crate::daemon;
use crate::journal::{Class, CounterKey, FileState, Journal, JournalError, MetaKey, Row, Summary};
use crate::paths::{self, Named};
use crate::scan::stat_key;
use coffer_common::host::time::{now_ms, rfc3339};

fn open(cfg: &Config) -> Result<Option<Journal>, JournalError> {
    let p = cfg.journal_path();
    if !p.exists() {
        return Ok(None);
    }
    let j = Journal::open_read_only(&p)?;
    // A daemon that is just starting may not have created the tables yet.
    Ok((j.schema_version()? > 0).then_some(j))
}

fn ms_to_rfc(ms: i64) -> String {
    rfc3339(ms / 1000)
}

/// The work waiting, by class (`status --json`'s `queue`, and `/metrics`): for each of
/// `fresh` and `backlog`, files and bytes waiting, the rate they went at over the last
/// ~20 s (`files_per_second`, `bytes_per_second`; null unless the agent runs), and an
/// estimate of when they will be done at that rate (`eta_seconds`, `done_at`; 0 and now
/// when nothing waits, null when nothing moves).
pub fn queue_json(j: Option<&Journal>, s: &Summary, running: bool) -> Result<Value, JournalError> {
    let counts = match j {
        Some(j) => j.queue_counts(s)?,
        None => [(0, 0); 2],
    };
    // AT_MS FRESH_FILES/s FRESH_BYTES/s BACKLOG_FILES/s BACKLOG_BYTES/s
    let rates: Option<Vec<f64>> = match j {
        Some(j) if running => j
            .meta(MetaKey::QueueRate)?
            .map(|v| {
                v.split(' ')
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .filter(|v: &Vec<f64>| v.len() == 4),
        _ => None,
    };
    let now = now_ms();
    let mut out = serde_json::Map::new();
    for class in Class::ALL {
        let (files, bytes) = counts[class as usize];
        let rate = rates
            .as_ref()
            .map(|r| (r[class as usize * 2], r[class as usize * 2 + 1]));
        let eta = match rate {
            _ if files == 0 => Some(0.0),
            Some((_, b)) if bytes > 0 && b > 0.0 => Some(bytes as f64 / b),
            Some((f, _)) if f > 0.0 => Some(files as f64 / f),
            _ => None,
        };
        out.insert(
            class.as_str().into(),
            json!({
                "files": files,
                "bytes": bytes,
                "files_per_second": rate.map(|r| r.0),
                "bytes_per_second": rate.map(|r| r.1),
                "eta_seconds": eta.map(|e| e.ceil() as i64),
                "done_at": eta.map(|e| ms_to_rfc(now + (e * 1000.0) as i64)),
            }),
        );
    }
    Ok(Value::Object(out))
}

/// A queue's line of `status`, from its object in [`queue_json`].
fn queue_line(name: &str, q: &Value) -> String {
    let files = q["files"].as_i64().unwrap_or(0);
    let mut line = format!(
        "{name}: {} files ({}) waiting",
        thousands(files),
        human_bytes(q["bytes"].as_i64().unwrap_or(0))
    );
    if let (Some(f), Some(b)) = (
        q["files_per_second"].as_f64(),
        q["bytes_per_second"].as_f64(),
    ) {
        line += &format!(", {f:.1} files/s ({}/s)", human_bytes(b as i64));
    }
    match q["eta_seconds"].as_i64() {
        Some(s) => line += &format!(", done in about {}", human_duration(s)),
        // Rates are known only while the agent runs.
        None if files > 0 && q["files_per_second"].is_f64() => line += ", not moving",
        None => {}
    }
    line
}

/// `1234567` as `1,234,567`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// `n` as an English ordinal with thousands separators: `1st`, `22nd`, `1,234th`.
fn ordinal(n: i64) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{}{suffix}", thousands(n))
}

/// Seconds as `45 s`, `12 min`, `3.5 h`, `2.1 days`.
fn human_duration(s: i64) -> String {
    match s {
        ..=99 => format!("{s} s"),
        100..=5999 => format!("{} min", (s + 30) / 60),
        6000..=172_799 => format!("{:.1} h", s as f64 / 3600.0),
        _ => format!("{:.1} days", s as f64 / 86400.0),
    }
}

/// Builds the status object (also used by metrics).
///
/// What it says of the receiver and the watches depends on whether `run` runs: while it
/// does, their current state; while it does not, only what was last true and when
/// (`receiver.last_connected_at`, each watch's `last_watched_at`), never "connected" or
/// "watching".
pub fn summary_json(cfg: &Config) -> Result<Value, JournalError> {
    let j = open(cfg)?;
    let s = match &j {
        Some(j) => j.summary()?,
        None => Summary::default(),
    };
    let meta = |k: MetaKey<'_>| j.as_ref().and_then(|j| j.meta(k).ok().flatten());
    let meta_ms = |k: MetaKey<'_>| meta(k).and_then(|v| v.parse::<i64>().ok());
    let running = daemon::is_running(cfg);
    // The last time the agent ran (a journal from before the heartbeat has only its start).
    let last_seen = meta_ms(MetaKey::AgentSeenMs).max(meta_ms(MetaKey::AgentStartedMs));
    let receiver_state = meta(MetaKey::ReceiverState);
    let last_connected = meta_ms(MetaKey::ReceiverConnectedMs).or_else(|| {
        // Before the heartbeat: the state says when the last connection was made.
        (receiver_state.as_deref() == Some("connected"))
            .then(|| meta_ms(MetaKey::ReceiverStateAt))
            .flatten()
    });
    let counters: serde_json::Map<String, Value> = match &j {
        Some(j) => j
            .counters()?
            .into_iter()
            .map(|(k, v)| (k, Value::from(v)))
            .collect(),
        None => Default::default(),
    };
    let held = match &j {
        Some(j) => j.held_counts()?,
        _ => Default::default(),
    };
    let watches: Vec<Value> = cfg
        .watches
        .iter()
        .map(|w| {
            let fb = meta(MetaKey::WatchFallback(&w.name)).filter(|s| !s.is_empty());
            let (state, unavailable) = availability_json(w, j.as_ref(), running);
            let mode = match (running, &fb) {
                (false, _) => "stopped",
                // Not watched, whatever OS watch it had: nothing under it is seen.
                (true, _) if !unavailable.is_null() => "unavailable",
                (true, Some(_)) => "periodic scan",
                (true, None) => "watching",
            };
            json!({
                "name": w.name,
                "path": w.path.display().to_string(),
                "state": state,
                "unavailable": unavailable,
                "held_deletions": held.get(&w.name).map_or(0, |h| h.0),
                "max_delete_share": format!("{}%", w.max_delete_share * 100.0),
                "mode": mode,
                "fallback_reason": fb,
                "last_scan_at": meta_ms(MetaKey::LastScanMs(&w.name)).map(ms_to_rfc),
                "last_watched_at": if running { None } else { last_seen.map(ms_to_rfc) },
            })
        })
        .collect();
    let failed: Vec<Value> = match &j {
        Some(j) => j
            .failed_rows(1000)?
            .into_iter()
            .map(|r| json!({"path": String::from_utf8_lossy(&r.path), "reason": r.reason, "attempts": r.attempts}))
            .collect(),
        None => vec![],
    };
    let not_acked = s.pending();
    let queue = queue_json(j.as_ref(), &s, running)?;
    let paused = paused_json(cfg, &s);
    let state = match (running, receiver_state) {
        (false, _) => "agent not running".to_string(),
        (true, Some(st)) => st,
        (true, None) => "never connected".to_string(),
    };
    Ok(json!({
        "agent": cfg.name,
        "running": running,
        "agent_running": running,
        "agent_last_seen_at": if running { None } else { last_seen.map(ms_to_rfc) },
        "files": {
            "pending": not_acked,
            "backed_up": s.backed_up,
            "failed": s.failed,
            "deleted": s.deleted,
            "dirty": s.dirty,
            "uploading": s.uploading,
        },
        "pending_bytes": s.pending_bytes,
        "pending_since": s.oldest_pending_ms.map(ms_to_rfc),
        "last_backup_at": s.last_backup_at.map(rfc3339),
        "receiver": {
            "address": cfg.receiver,
            "state": state,
            "last_state": meta(MetaKey::ReceiverState),
            "since": meta_ms(MetaKey::ReceiverStateAt).map(ms_to_rfc),
            "last_connected_at": last_connected.map(ms_to_rfc),
        },
        "receiver_refusal": refusal_json(&meta),
        "receiver_quota": quota_json(&meta),
        "key_escrowed": meta(MetaKey::KeyEscrowed).is_some_and(|v| v == "1"),
        "escrow": escrow_json(&meta),
        "held_deletions": held.values().map(|h| h.0).sum::<i64>(),
        "watches": watches,
        "watcher": counters,
        "failed": failed,
        "queue": queue,
        "paused": paused,
    }))
}

/// The pause (`status --json`'s `paused`): `{since, until, reason, waiting_files,
/// waiting_bytes}` while one holds (`until` null: until `resume`), else null. A damaged
/// pause file holds (the daemon sends nothing while it is there): its error is the reason.
fn paused_json(cfg: &Config, s: &Summary) -> Value {
    let (since, until, reason) = match crate::pause::current(&cfg.state_dir) {
        Ok(None) => return Value::Null,
        Ok(Some(p)) => (
            Some(ms_to_rfc(p.since_ms)),
            p.until_ms.map(|u| ms_to_rfc(u + 999)),
            p.reason,
        ),
        Err(e) => (None, None, e.to_string()),
    };
    json!({
        "since": since,
        "until": until,
        "reason": reason,
        "waiting_files": s.pending(),
        "waiting_bytes": s.pending_bytes,
    })
}

/// The pause's line of `status`, if paused.
fn paused_line(p: &Value) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let until = match p["until"].as_str() {
        Some(t) => format!("until {t}"),
        None => "until `coffer-agent resume`".into(),
    };
    Some(format!(
        "paused {until} ({}): nothing is sent; {} files ({}) wait",
        p["reason"].as_str().unwrap_or(""),
        thousands(p["waiting_files"].as_i64().unwrap_or(0)),
        human_bytes(p["waiting_bytes"].as_i64().unwrap_or(0))
    ))
}

/// The receiver's last refusal (`status --json`'s `receiver_refusal`): `{code, message,
/// since}` while it refuses this agent's data (`QuotaExceeded`) or key (`Unauthorized`),
/// else null.
fn refusal_json(meta: &dyn Fn(MetaKey<'_>) -> Option<String>) -> Value {
    let Some(v) = meta(MetaKey::ReceiverRefusal)
        .filter(|s| !s.is_empty())
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
    else {
        return Value::Null;
    };
    json!({
        "code": v["code"],
        "message": v["message"],
        "since": v["since_ms"].as_i64().map(ms_to_rfc),
    })
}

/// The repository's quota as the receiver told it at the last connect (`status --json`'s
/// `receiver_quota`): `{used, quota, warn_at, state (ok, warning, over), as_of}`, or null
/// when it has none.
fn quota_json(meta: &dyn Fn(MetaKey<'_>) -> Option<String>) -> Value {
    let Some(v) = meta(MetaKey::ReceiverQuota)
        .filter(|s| !s.is_empty())
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
    else {
        return Value::Null;
    };
    let (used, quota) = (
        v["used"].as_u64().unwrap_or(0),
        v["quota"].as_u64().unwrap_or(0),
    );
    let warn = v["warn_at_percent"].as_u64().unwrap_or(90);
    let state = if quota > 0 && used >= quota {
        "over"
    } else if quota > 0 && u128::from(used) * 100 >= u128::from(quota) * u128::from(warn) {
        "warning"
    } else {
        "ok"
    };
    json!({
        "used": used,
        "quota": quota,
        "warn_at": format!("{warn}%"),
        "state": state,
        "as_of": v["at_ms"].as_i64().map(ms_to_rfc),
    })
}

/// The `receiver quota` and `receiver refused` lines of `status`, when there is something
/// to say.
fn refusal_lines(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let q = &v["receiver_quota"];
    if let (Some(used), Some(quota)) = (q["used"].as_i64(), q["quota"].as_i64()) {
        let pct = (used as f64 * 100.0 / quota.max(1) as f64).round();
        let state = match q["state"].as_str() {
            Some("over") => " FULL: new data is refused".to_string(),
            Some("warning") => format!(" WARNING: past {}", q["warn_at"].as_str().unwrap_or("")),
            _ => String::new(),
        };
        out.push(format!(
            "receiver quota: {} of {} used ({pct}%){state} (as of {})",
            human_bytes(used),
            human_bytes(quota),
            q["as_of"].as_str().unwrap_or("?")
        ));
    }
    let r = &v["receiver_refusal"];
    if let Some(message) = r["message"].as_str() {
        let since = r["since"].as_str().unwrap_or("?");
        out.push(match r["code"].as_str() {
            Some("QuotaExceeded") => format!(
                "receiver quota exceeded since {since}: {message} (the backlog is kept and \
                 sent again every 30-60 s)"
            ),
            Some("Unauthorized") => format!(
                "receiver refused this agent since {since}: {message} (retrying every few \
                 minutes)"
            ),
            _ => format!("receiver refused since {since}: {message}"),
        });
    }
    out
}

/// The receiver line of `status`.
fn receiver_line(v: &Value) -> String {
    let r = &v["receiver"];
    let address = r["address"].as_str().unwrap_or("");
    if v["agent_running"].as_bool() == Some(true) {
        return format!("receiver {address}: {}", r["state"].as_str().unwrap_or(""));
    }
    let connected = match r["last_connected_at"].as_str() {
        Some(t) => format!("last connected {t}"),
        None => "never connected".into(),
    };
    // A failed attempt after the last connection is worth knowing.
    let failed = match (r["last_state"].as_str(), r["since"].as_str()) {
        (Some(st), Some(at))
            if st.starts_with("unreachable")
                && r["last_connected_at"].as_str().is_none_or(|c| c < at) =>
        {
            format!("; at {at} it was {st}")
        }
        _ => String::new(),
    };
    format!("receiver {address}: {connected} (agent not running{failed})")
}

/// A watch's line of `status`.
fn watch_line(w: &Value, running: bool) -> String {
    let name = w["name"].as_str().unwrap_or("");
    let path = w["path"].as_str().unwrap_or("");
    let fallback = w["fallback_reason"].as_str();
    if running && w["mode"] == "unavailable" {
        return format!("watch {name} = {path} (unavailable)");
    }
    if running {
        return format!(
            "watching {name} = {path} ({}{})",
            w["mode"].as_str().unwrap_or(""),
            fallback.map(|r| format!(": {r}")).unwrap_or_default()
        );
    }
    let last = match (fallback, w["last_watched_at"].as_str()) {
        (_, None) => "never watched".to_string(),
        (None, Some(t)) => format!("last at {t}"),
        // Without an OS watch it was only scanned: say when last.
        (Some(_), Some(t)) => format!(
            "last scanned at {}, agent last ran {t}",
            w["last_scan_at"].as_str().unwrap_or("never")
        ),
    };
    format!("watching {name} = {path}: {last} (agent not running)")
}

/// The last escrow check (`status --json`'s `escrow`): its state (`ok`, `reescrowed`,
/// `failed: REASON`, or null before the first) and when it was made.
fn escrow_json(meta: &dyn Fn(MetaKey<'_>) -> Option<String>) -> Value {
    json!({
        "state": meta(MetaKey::EscrowState),
        "checked_at": meta(MetaKey::EscrowCheckedAt).and_then(|v| v.parse::<i64>().ok()).map(rfc3339),
    })
}

/// The `key escrow:` line of `status`, from [`escrow_json`]'s object.
fn escrow_line(e: &Value) -> String {
    let at = e["checked_at"].as_str().unwrap_or("?");
    match e["state"].as_str() {
        Some("ok") => format!("key escrow: ok, checked {at}"),
        Some("reescrowed") => {
            format!("key escrow: MISSING/ALTERED on the receiver, re-escrowed {at}")
        }
        Some(other) => format!("key escrow: {other} ({at})"),
        None => "key escrow: not checked yet".into(),
    }
}

fn human_bytes(n: i64) -> String {
    let n = n as f64;
    for (unit, d) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= d as f64 {
            return format!("{:.1} {unit}", n / d as f64);
        }
    }
    format!("{n} B")
}

/// Prints the overall status.
pub fn print(cfg: &Config, json_out: bool) -> Result<(), JournalError> {
    let v = summary_json(cfg)?;
    let mut out = std::io::stdout().lock();
    if json_out {
        let _ = writeln!(out, "{v}");
        return Ok(());
    }
    let failed = v["failed"].as_array().cloned().unwrap_or_default();
    let files = &v["files"];
    let running = v["agent_running"].as_bool() == Some(true);
    let _ = writeln!(
        out,
        "agent {} ({})",
        cfg.name,
        match v["agent_last_seen_at"].as_str() {
            _ if running => "running".to_string(),
            Some(t) => format!("not running; last ran {t}"),
            None => "not running".to_string(),
        }
    );
    let _ = writeln!(out, "{}", receiver_line(&v));
    if let Some(line) = paused_line(&v["paused"]) {
        let _ = writeln!(out, "{line}");
    }
    for line in refusal_lines(&v) {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "{}", escrow_line(&v["escrow"]));
    for w in v["watches"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "{}", watch_line(w, running));
        for line in availability_lines(w) {
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = writeln!(
        out,
        "files: {} backed up, {} pending ({}), {} failed, {} deleted",
        files["backed_up"],
        files["pending"],
        human_bytes(v["pending_bytes"].as_i64().unwrap_or(0)),
        files["failed"],
        files["deleted"]
    );
    if files["pending"].as_i64().unwrap_or(0) > 0 {
        for class in Class::ALL {
            let _ = writeln!(
                out,
                "  {}",
                queue_line(class.as_str(), &v["queue"][class.as_str()])
            );
        }
    }
    let _ = writeln!(
        out,
        "last backup: {}",
        v["last_backup_at"].as_str().unwrap_or("never")
    );
    let w = &v["watcher"];
    let skipped_special = CounterKey::SkippedSpecial.name();
    let _ = writeln!(
        out,
        "watcher: {} scans, {} rescans after event overflow, {} special files skipped",
        w["scans"].as_i64().unwrap_or(0),
        w["rescans_overflow"].as_i64().unwrap_or(0),
        w.as_object()
            .map(|o| o
                .iter()
                .filter(|(k, _)| k.starts_with(&*skipped_special))
                .filter_map(|(_, v)| v.as_i64())
                .sum::<i64>())
            .unwrap_or(0)
    );
    if !failed.is_empty() {
        let _ = writeln!(out, "failed files:");
        for f in failed.iter().take(20) {
            let _ = writeln!(
                out,
                "  {}: {}",
                f["path"].as_str().unwrap_or(""),
                f["reason"].as_str().unwrap_or("")
            );
        }
        if failed.len() > 20 {
            let _ = writeln!(
                out,
                "  ... {} more (status --failed lists all)",
                failed.len() - 20
            );
        }
    }
    Ok(())
}

fn describe(cfg: &Config, row: &Row, line: Option<(Class, i64)>) -> Value {
    let now = now_ms();
    let current = crate::scan::fs_path(&cfg.watches, &row.path)
        .and_then(|(_, p)| std::fs::symlink_metadata(p).ok())
        .map(|m| stat_key(&m));
    let changed_since = match (current, row.stat) {
        (Some(c), Some(s)) => c != s,
        (None, _) => row.backed_kind.as_deref() != Some("deleted"),
        _ => true,
    };
    let path = String::from_utf8_lossy(&row.path).into_owned();
    match row.state {
        FileState::BackedUp => json!({
            "path": path,
            "state": if row.backed_kind.as_deref() == Some("deleted") { "deleted" } else { "backed_up" },
            "version": row.backed_version,
            "backed_up_at": row.backed_at.map(rfc3339),
            "changed_since": changed_since,
        }),
        FileState::Failed => {
            json!({"path": path, "state": "failed", "reason": row.reason, "attempts": row.attempts,
            "version": row.backed_version, "backed_up_at": row.backed_at.map(rfc3339)})
        }
        st @ (FileState::Dirty | FileState::Uploading) => {
            let why = match (st, &row.reason) {
                (_, Some(r)) => r.clone(),
                (FileState::Dirty, None) if row.due_at > now => {
                    "settling (waiting for the file to stay unchanged)".into()
                }
                (FileState::Dirty, None) => "queued for upload".into(),
                _ => "uploading".into(),
            };
            let mut v = json!({"path": path, "state": "pending", "since": row.dirty_since.map(ms_to_rfc), "why": why,
                "version": row.backed_version, "backed_up_at": row.backed_at.map(rfc3339)});
            // Where it is in line: its class, and 1 for the next file to be taken (files
            // being uploaded count among those ahead).
            if let Some((class, ahead)) = line {
                v["class"] = json!(class.as_str());
                v["place"] = json!(ahead + 1);
            }
            v
        }
    }
}

/// What `status PATH...` found, worst of all paths; its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Every path is backed up and unchanged since (exit 0).
    Safe = 0,
    /// Some path is pending or failed, or changed since its backup (exit 1).
    Pending = 1,
    /// Some path is not known to the agent (exit 2).
    Unknown = 2,
}

impl Verdict {
    fn of(v: &Value) -> Verdict {
        match v["state"].as_str() {
            Some("backed_up" | "deleted") if v["changed_since"].as_bool() != Some(true) => {
                Verdict::Safe
            }
            Some("unknown") => Verdict::Unknown,
            _ => Verdict::Pending,
        }
    }
}

/// Why a path has no row: outside every watch, excluded (by which pattern), not on disk,
/// not a kind of file that is backed up, or not scanned yet.
fn unknown(cfg: &Config, named: &Named<'_>) -> Value {
    let path = String::from_utf8_lossy(named.key()).into_owned();
    let (watch, rel) = match named {
        Named::Watched { watch, rel, .. } => (watch, rel),
        Named::Elsewhere { .. } => {
            return json!({"path": path, "state": "unknown", "cause": "outside_watches",
                "why": format!("outside every watched folder ({})", paths::watched_list(cfg))});
        }
    };
    if let Some(pat) = paths::excluded_by(watch, rel) {
        return json!({"path": path, "state": "unknown", "cause": "excluded", "pattern": pat,
            "why": format!("excluded by pattern {pat:?} of watch {}", watch.name)});
    }
    let (cause, why) = match std::fs::symlink_metadata(watch.path.join(rel)) {
        Err(_) => (
            "missing",
            "no such file, and none was ever backed up".to_string(),
        ),
        Ok(m) if !(m.is_file() || m.is_dir() || m.file_type().is_symlink()) => (
            "special",
            "not a file, folder or symlink (sockets, FIFOs and devices are not backed up)".into(),
        ),
        Ok(_) => (
            "not_scanned",
            "not scanned yet (the agent has not seen it; is `run` running?)".into(),
        ),
    };
    json!({"path": path, "state": "unknown", "cause": cause, "why": why})
}

/// `status PATH...`: is each file safe? Returns the worst [`Verdict`], the exit code.
pub fn print_paths(cfg: &Config, args: &[String], json_out: bool) -> Result<Verdict, JournalError> {
    let j = open(cfg)?;
    let mut all = Vec::new();
    for a in args {
        let named = paths::resolve(cfg, a);
        let jp = named.key().to_vec();
        let row = match &j {
            Some(j) => j.row(&jp)?,
            None => None,
        };
        let v = match row {
            Some(r) => {
                let line = match (&j, r.state) {
                    (Some(j), FileState::Dirty | FileState::Uploading | FileState::Failed) => {
                        j.place_in_line(&r.path)?
                    }
                    _ => None,
                };
                describe(cfg, &r, line)
            }
            None => {
                let under = match &j {
                    Some(j) => j.rows_under(&[&jp[..], b"/"].concat(), 100_000)?,
                    None => vec![],
                };
                if under.is_empty() {
                    unknown(cfg, &named)
                } else {
                    let safe = under
                        .iter()
                        .filter(|r| r.state == FileState::BackedUp)
                        .count();
                    json!({"path": String::from_utf8_lossy(&jp), "state": if safe == under.len() { "backed_up" } else { "pending" },
                        "files": under.len(), "backed_up_files": safe})
                }
            }
        };
        all.push(v);
    }
    let verdict = all.iter().map(Verdict::of).max().unwrap_or(Verdict::Safe);
    let mut out = std::io::stdout().lock();
    if json_out {
        let _ = writeln!(out, "{}", Value::Array(all));
        return Ok(verdict);
    }
    let running = daemon::is_running(cfg);
    for v in all {
        let path = v["path"].as_str().unwrap_or("");
        let line = match v["state"].as_str().unwrap_or("") {
            "backed_up" if v.get("files").is_some() => {
                format!("all {} files backed up", v["files"])
            }
            "backed_up" => format!(
                "backed up: version {} at {}{}",
                v["version"],
                v["backed_up_at"].as_str().unwrap_or("?"),
                if v["changed_since"].as_bool() != Some(true) {
                    ""
                } else if running {
                    " (changed since; a new backup is on its way)"
                } else {
                    " (changed since; backed up again once the agent runs)"
                }
            ),
            "deleted" => format!(
                "deleted; the deletion is backed up (version {})",
                v["version"]
            ),
            "failed" => format!("FAILED: {}", v["reason"].as_str().unwrap_or("")),
            "pending" if v.get("files").is_some() => {
                format!("{} of {} files backed up", v["backed_up_files"], v["files"])
            }
            "pending" => format!(
                "pending since {}: {}{}",
                v["since"].as_str().unwrap_or("?"),
                v["why"].as_str().unwrap_or(""),
                match (v["place"].as_i64(), v["class"].as_str()) {
                    (Some(n), Some(class)) => format!("; waiting: {} in line, {class}", ordinal(n)),
                    _ => String::new(),
                }
            ),
            _ => format!(
                "not known to the agent: {}",
                v["why"].as_str().unwrap_or("not scanned yet")
            ),
        };
        let _ = writeln!(out, "{path}: {line}");
    }
    Ok(verdict)
}

/// `status --failed`: every failing file with its reason; with `json_out`, one JSON array
/// of `{"path", "reason", "attempts"}`. None failing is said on stderr.
pub fn print_failed(cfg: &Config, json_out: bool) -> Result<(), JournalError> {
    let rows = match open(cfg)? {
        Some(j) => j.failed_rows(i64::MAX as usize)?,
        None => vec![],
    };
    let mut out = std::io::stdout().lock();
    if json_out {
        let list: Vec<Value> = rows
            .iter()
            .map(|r| json!({"path": String::from_utf8_lossy(&r.path), "reason": r.reason, "attempts": r.attempts}))
            .collect();
        let _ = writeln!(out, "{}", Value::Array(list));
    } else {
        for r in &rows {
            let _ = writeln!(
                out,
                "{}: {}",
                String::from_utf8_lossy(&r.path),
                r.reason.as_deref().unwrap_or("")
            );
        }
    }
    if rows.is_empty() {
        eprintln!("no failed files");
    }
    Ok(())
}

/// A watch's availability for `status --json`: `"available"` or `"unavailable"`, and for
/// the latter `{reason, message, since}` (`since`: when the daemon found it so, null when
/// no daemon has yet). Looked at now (a few `stat`s), against the place the daemon last
/// recorded, so a stopped agent's status says it too.
fn availability_json(
    w: &crate::config::Watch,
    j: Option<&Journal>,
    running: bool,
) -> (&'static str, Value) {
    let place = j.and_then(|j| crate::avail::recorded_place(j, &w.name));
    match crate::avail::check(&w.path, place.as_ref()) {
        crate::avail::Availability::Available(_) => ("available", Value::Null),
        crate::avail::Availability::Unavailable(why) => {
            let since = if running {
                j.and_then(|j| crate::avail::unavailable_since(j, &w.name))
                    .map(ms_to_rfc)
            } else {
                None
            };
            (
                "unavailable",
                json!({"reason": why.code(), "message": why.describe(&w.path), "since": since}),
            )
        }
    }
}

/// The loud lines of `status` about a watch: unavailable, deletions held.
fn availability_lines(w: &Value) -> Vec<String> {
    let name = w["name"].as_str().unwrap_or("");
    let mut out = Vec::new();
    let u = &w["unavailable"];
    if let Some(message) = u["message"].as_str() {
        let since = match u["since"].as_str() {
            Some(t) => format!(" since {t}"),
            None => String::new(),
        };
        out.push(format!(
            "watch {name}: UNAVAILABLE{since} ({message}): nothing under it is backed up and \
             no deletions are recorded"
        ));
    }
    let held = w["held_deletions"].as_i64().unwrap_or(0);
    if held > 0 {
        out.push(format!(
            "{held} deletions held for watch {name}: more than {} of its files; run \
             `coffer-agent confirm-deletions {name}` if they are real (`status --held` lists them)",
            w["max_delete_share"].as_str().unwrap_or("")
        ));
    }
    out
}

/// `status --held`: the deletions held for confirmation, one `watch<TAB>path<TAB>held
/// since` line each (`--json`: an array of `{"watch", "path", "held_at"}`).
pub fn print_held(cfg: &Config, json_out: bool) -> Result<(), JournalError> {
    let held = match open(cfg)? {
        Some(j) => j.held(None)?,
        _ => Vec::new(),
    };
    let mut out = std::io::stdout().lock();
    if json_out {
        let v: Vec<Value> = held
            .iter()
            .map(|h| {
                json!({"watch": h.watch, "path": String::from_utf8_lossy(&h.path),
                    "held_at": ms_to_rfc(h.held_at)})
            })
            .collect();
        let _ = writeln!(out, "{}", Value::from(v));
        return Ok(());
    }
    if held.is_empty() {
        eprintln!("no deletions are held");
    }
    for h in &held {
        let _ = writeln!(
            out,
            "{}\t{}\theld since {}",
            h.watch,
            String::from_utf8_lossy(&h.path),
            ms_to_rfc(h.held_at)
        );
    }
    Ok(())
}
