//! `coffer-agent status`: answers from the journal alone, whether or not `run` is running.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use crate::config::Config;
use crate::daemon;
use crate::journal::{CounterKey, FileState, Journal, JournalError, MetaKey, Row, Summary};
use crate::scan::{journal_key, stat_key};
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

/// Builds the status object (also used by metrics).
pub fn summary_json(cfg: &Config) -> Result<Value, JournalError> {
    let j = open(cfg)?;
    let s = match &j {
        Some(j) => j.summary()?,
        None => Summary::default(),
    };
    let meta = |k: MetaKey<'_>| j.as_ref().and_then(|j| j.meta(k).ok().flatten());
    let counters: serde_json::Map<String, Value> = match &j {
        Some(j) => j
            .counters()?
            .into_iter()
            .map(|(k, v)| (k, Value::from(v)))
            .collect(),
        None => Default::default(),
    };
    let watches: Vec<Value> = cfg
        .watches
        .iter()
        .map(|w| {
            let fb = meta(MetaKey::WatchFallback(&w.name)).filter(|s| !s.is_empty());
            json!({
                "name": w.name,
                "path": w.path.display().to_string(),
                "mode": if fb.is_some() { "periodic scan" } else { "watching" },
                "fallback_reason": fb,
                "last_scan_at": meta(MetaKey::LastScanMs(&w.name)).and_then(|v| v.parse::<i64>().ok()).map(ms_to_rfc),
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
    Ok(json!({
        "agent": cfg.name,
        "running": daemon::is_running(cfg),
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
            "state": meta(MetaKey::ReceiverState).unwrap_or_else(|| "never connected".into()),
            "since": meta(MetaKey::ReceiverStateAt).and_then(|v| v.parse::<i64>().ok()).map(ms_to_rfc),
        },
        "key_escrowed": meta(MetaKey::KeyEscrowed).is_some_and(|v| v == "1"),
        "escrow": escrow_json(&meta),
        "watches": watches,
        "watcher": counters,
        "failed": failed,
    }))
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
pub fn print(cfg: &Config, json_out: bool, failed_only: bool) -> Result<(), JournalError> {
    let v = summary_json(cfg)?;
    let mut out = std::io::stdout().lock();
    if json_out {
        let _ = writeln!(out, "{v}");
        return Ok(());
    }
    let failed = v["failed"].as_array().cloned().unwrap_or_default();
    if failed_only {
        for f in &failed {
            let _ = writeln!(
                out,
                "{}: {}",
                f["path"].as_str().unwrap_or(""),
                f["reason"].as_str().unwrap_or("")
            );
        }
        return Ok(());
    }
    let files = &v["files"];
    let _ = writeln!(
        out,
        "agent {} ({})",
        cfg.name,
        if v["running"].as_bool() == Some(true) {
            "running"
        } else {
            "not running"
        }
    );
    let _ = writeln!(
        out,
        "receiver {}: {}",
        cfg.receiver,
        v["receiver"]["state"].as_str().unwrap_or("")
    );
    let _ = writeln!(out, "{}", escrow_line(&v["escrow"]));
    for w in v["watches"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "watching {} = {} ({}{})",
            w["name"].as_str().unwrap_or(""),
            w["path"].as_str().unwrap_or(""),
            w["mode"].as_str().unwrap_or(""),
            w["fallback_reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
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

/// Maps a user-given path (file-system path or `watch/relative`) to a journal key.
fn resolve(cfg: &Config, arg: &str) -> Vec<u8> {
    let p = Path::new(arg);
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    for w in &cfg.watches {
        if let Ok(rel) = abs.strip_prefix(&w.path) {
            return journal_key(w, rel);
        }
    }
    arg.trim_end_matches('/').as_bytes().to_vec()
}

fn describe(cfg: &Config, row: &Row) -> Value {
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
            json!({"path": path, "state": "pending", "since": row.dirty_since.map(ms_to_rfc), "why": why,
                "version": row.backed_version, "backed_up_at": row.backed_at.map(rfc3339)})
        }
    }
}

/// `status PATH...`: is each file safe?
pub fn print_paths(cfg: &Config, paths: &[String], json_out: bool) -> Result<(), JournalError> {
    let j = open(cfg)?;
    let mut all = Vec::new();
    for a in paths {
        let jp = resolve(cfg, a);
        let row = match &j {
            Some(j) => j.row(&jp)?,
            None => None,
        };
        let v = match row {
            Some(r) => describe(cfg, &r),
            None => {
                let under = match &j {
                    Some(j) => j.rows_under(&[&jp[..], b"/"].concat(), 100_000)?,
                    None => vec![],
                };
                if under.is_empty() {
                    json!({"path": String::from_utf8_lossy(&jp), "state": "unknown"})
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
    let mut out = std::io::stdout().lock();
    if json_out {
        let _ = writeln!(out, "{}", Value::Array(all));
        return Ok(());
    }
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
                if v["changed_since"].as_bool() == Some(true) {
                    " (changed since; a new backup is on its way)"
                } else {
                    ""
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
                "pending since {}: {}",
                v["since"].as_str().unwrap_or("?"),
                v["why"].as_str().unwrap_or("")
            ),
            _ => {
                "not known to the agent (not under a watched folder, excluded, or not scanned yet)"
                    .into()
            }
        };
        let _ = writeln!(out, "{path}: {line}");
    }
    Ok(())
}
