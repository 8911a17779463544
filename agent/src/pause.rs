//! Pause and resume: `coffer-agent pause [--for DURATION]` and `coffer-agent resume`.
//!
//! A pause is state, not a message: the file `pause.json` in the state dir (written
//! atomically, 0600) says since when, until when (none: until `resume`) and how it was
//! asked for. `resume` removes it; a pause past its end is no pause. So a pause holds
//! whether or not the daemon runs, and across restarts, until it ends.
//!
//! The running daemon reads the file every [`POLL`] ([`Watcher::poll`]). While paused it
//! keeps watching, scanning and journaling changes, and sends nothing: the scheduler
//! claims no file, and each upload worker hands back what it holds and parks; a large
//! file being read stops at its next window. Once every worker is parked and no reply is
//! awaited any more, the daemon writes `pause.applied` (the pause's `since_ms`): from then
//! on the receiver gets no byte from this agent, and `pause` (which waits for it) returns.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use coffer_common::host::fs::{write_atomic, IoError};
use coffer_common::host::time::{now_ms, rfc3339};
use serde::{Deserialize, Serialize};

/// The pause file's name in the state dir.
pub const FILE: &str = "pause.json";
/// Written by the daemon once it has stopped sending for the pause of this `since_ms`.
pub const APPLIED_FILE: &str = "pause.applied";
/// How often the daemon looks at the pause file.
pub const POLL: Duration = Duration::from_millis(200);

/// Errors reading or writing the pause file.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("pause file {path} is damaged ({message}); `coffer-agent resume` removes it")]
    Damaged { path: PathBuf, message: String },
    #[error("--for {value:?}: {message}")]
    Duration { value: String, message: String },
}

/// A pause, as written in `pause.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// When it was asked for (ms since the Unix epoch).
    pub since_ms: i64,
    /// When it ends by itself; `None`: at `resume`.
    pub until_ms: Option<i64>,
    /// How it was asked for, for `status`.
    pub reason: String,
}

impl Pause {
    /// A pause from now, for `length` (`None`: until resumed).
    pub fn new(length: Option<Duration>, reason: String) -> Pause {
        let since_ms = now_ms();
        Pause {
            since_ms,
            until_ms: length.map(|d| since_ms.saturating_add(d.as_millis() as i64)),
            reason,
        }
    }

    /// True while it holds at `now` (ms).
    pub fn holds_at(&self, now: i64) -> bool {
        self.until_ms.is_none_or(|u| now < u)
    }

    /// "until 2026-12-03T20:00:00Z" or "until `coffer-agent resume`".
    pub fn until_text(&self) -> String {
        match self.until_ms {
            Some(u) => format!("until {}", rfc3339((u + 999) / 1000)),
            None => "until `coffer-agent resume`".into(),
        }
    }
}

/// Parses `--for`: `"30m"`, `"2h"`, `"1d"`, `"90s"`, `"1h 30m"`.
pub fn parse_for(v: &str) -> Result<Duration, PauseError> {
    let bad = |message: String| PauseError::Duration {
        value: v.to_string(),
        message,
    };
    let d = humantime::parse_duration(v.trim()).map_err(|e| {
        bad(format!(
            "not a duration like \"30m\", \"2h\" or \"1d\" ({e})"
        ))
    })?;
    if d.is_zero() {
        return Err(bad("a pause must last longer than 0".into()));
    }
    if d > Duration::from_secs(10 * 365 * 86400) {
        return Err(bad(
            "longer than 10 years; leave --for out to pause until `resume`".into(),
        ));
    }
    Ok(d)
}

/// The pause file of a state dir.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

fn applied_path(state_dir: &Path) -> PathBuf {
    state_dir.join(APPLIED_FILE)
}

/// Writes the pause (replacing any other).
pub fn set(state_dir: &Path, p: &Pause) -> Result<(), PauseError> {
    crate::state::create_state_dir(state_dir)?;
    let text = serde_json::to_string(p).map_err(|e| PauseError::Damaged {
        path: path(state_dir),
        message: e.to_string(),
    })?;
    write_atomic(&path(state_dir), text.as_bytes(), 0o600)?;
    Ok(())
}

/// Removes the pause; the one removed, if one was there (ended or not).
pub fn clear(state_dir: &Path) -> Result<Option<Pause>, PauseError> {
    let old = read_any(state_dir).unwrap_or(None);
    let p = path(state_dir);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(old),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IoError::new("removing", &p, e).into()),
    }
}

/// The pause file's content, ended or not; `None` when there is none.
fn read_any(state_dir: &Path) -> Result<Option<Pause>, PauseError> {
    let p = path(state_dir);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IoError::new("reading", &p, e).into()),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| PauseError::Damaged {
            path: p,
            message: e.to_string(),
        })
}

/// The pause that holds now, if any (an ended one is none).
pub fn current(state_dir: &Path) -> Result<Option<Pause>, PauseError> {
    Ok(read_any(state_dir)?.filter(|p| p.holds_at(now_ms())))
}

/// True once the running daemon has stopped sending for `p`.
pub fn applied(state_dir: &Path, p: &Pause) -> bool {
    std::fs::read_to_string(applied_path(state_dir))
        .ok()
        .and_then(|t| t.trim().parse::<i64>().ok())
        == Some(p.since_ms)
}

/// The daemon's view of the pause (see the module comment).
pub struct Watcher {
    state_dir: PathBuf,
    paused: AtomicBool,
    current: Mutex<Option<Pause>>,
    /// Workers parked by the pause.
    parked: AtomicUsize,
    /// The pause whose `pause.applied` was written (its `since_ms`).
    applied: Mutex<Option<i64>>,
}

impl Watcher {
    /// Reads the pause now (a pause set while the daemon was stopped holds from the start).
    pub fn new(state_dir: &Path) -> Watcher {
        let w = Watcher {
            state_dir: state_dir.to_path_buf(),
            paused: AtomicBool::new(false),
            current: Mutex::new(None),
            parked: AtomicUsize::new(0),
            applied: Mutex::new(None),
        };
        w.poll();
        w
    }

    /// True while paused (one atomic load).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Reads the pause file again; true when the pause began or ended. A damaged file is
    /// taken as a pause until `resume` (sending nothing is the safe reading of it).
    pub fn poll(&self) -> bool {
        let now = now_ms();
        let p = match read_any(&self.state_dir) {
            Ok(p) => p.filter(|p| p.holds_at(now)),
            Err(e) => {
                let mut c = self.current.lock().unwrap_or_else(|p| p.into_inner());
                if !self.is_paused() {
                    tracing::warn!("{e}; pausing until it is resumed");
                }
                *c = Some(Pause {
                    since_ms: 0,
                    until_ms: None,
                    reason: e.to_string(),
                });
                return !self.paused.swap(true, Ordering::SeqCst);
            }
        };
        let mut c = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *c == p {
            return false;
        }
        match &p {
            Some(p) => tracing::info!(
                reason = %p.reason,
                "paused {}: changes are journaled, nothing is sent",
                p.until_text()
            ),
            None => tracing::info!("resumed: sending again"),
        }
        let was = c.is_some();
        *c = p;
        self.paused.store(c.is_some(), Ordering::SeqCst);
        was != c.is_some()
    }

    /// A worker waits here while paused (or until `stop` says the daemon stops).
    pub fn park(&self, stop: &crate::daemon::Shutdown) {
        self.parked.fetch_add(1, Ordering::SeqCst);
        while self.is_paused() && !stop.sleep(Duration::from_millis(50)) {}
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    /// Writes `pause.applied` once `workers` are parked and `awaiting` is false: nothing
    /// more goes to the receiver until the pause ends.
    pub fn note_applied(&self, workers: usize, awaiting: bool) {
        let Some(since) = self
            .current
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|p| p.since_ms))
        else {
            return;
        };
        if self.parked.load(Ordering::SeqCst) < workers || awaiting {
            return;
        }
        let mut a = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if *a == Some(since) {
            return;
        }
        let p = applied_path(&self.state_dir);
        match write_atomic(&p, format!("{since}\n").as_bytes(), 0o600) {
            Ok(()) => {
                tracing::info!("paused: every upload worker stopped; nothing is being sent");
                *a = Some(since);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Removes a stale `pause.applied` (the pause ended); errors are only logged.
pub fn forget_applied(state_dir: &Path) {
    let p = applied_path(state_dir);
    if let Err(e) = std::fs::remove_file(&p) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::debug!("{}", IoError::new("removing", &p, e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_takes_minutes_hours_and_days_and_refuses_nonsense() {
        assert_eq!(parse_for("30m").expect("30m"), Duration::from_secs(1800));
        assert_eq!(parse_for("2h").expect("2h"), Duration::from_secs(7200));
        assert_eq!(parse_for("1d").expect("1d"), Duration::from_secs(86400));
        assert_eq!(parse_for("2s").expect("2s"), Duration::from_secs(2));
        for bad in ["", "soon", "0s", "-5m", "20y"] {
            let e = parse_for(bad).expect_err(bad).to_string();
            assert!(e.starts_with(&format!("--for {bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_pause_is_state_that_ends_by_itself_or_at_resume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = dir.path().join("state");
        assert_eq!(current(&sd).expect("none"), None);
        let p = Pause::new(None, "coffer-agent pause".into());
        set(&sd, &p).expect("set");
        assert_eq!(current(&sd).expect("read"), Some(p.clone()));
        assert!(p.until_text().contains("resume"));
        // A new watcher (a restart) starts paused.
        let w = Watcher::new(&sd);
        assert!(w.is_paused());
        assert_eq!(clear(&sd).expect("clear"), Some(p));
        assert!(w.poll(), "resume is seen");
        assert!(!w.is_paused());
        assert_eq!(clear(&sd).expect("clear again"), None);

        // One that ended is no pause, for status and for the daemon.
        let ended = Pause {
            since_ms: now_ms() - 10_000,
            until_ms: Some(now_ms() - 1),
            reason: "coffer-agent pause --for 9s".into(),
        };
        set(&sd, &ended).expect("set");
        assert_eq!(current(&sd).expect("read"), None);
        assert!(!w.poll());
        assert!(!w.is_paused());
        let soon = Pause::new(Some(Duration::from_millis(300)), "--for".into());
        set(&sd, &soon).expect("set");
        assert!(w.poll());
        assert!(w.is_paused());
        std::thread::sleep(Duration::from_millis(400));
        assert!(w.poll(), "the end is seen");
        assert!(!w.is_paused());
    }

    #[test]
    fn a_damaged_pause_file_pauses_and_names_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE), "{not json").expect("write");
        let e = current(dir.path()).expect_err("damaged").to_string();
        assert!(e.contains("pause.json") && e.contains("resume"), "{e}");
        let w = Watcher::new(dir.path());
        assert!(w.is_paused());
        clear(dir.path()).expect("resume removes it");
        w.poll();
        assert!(!w.is_paused());
    }

    #[test]
    fn applied_is_written_once_workers_are_parked_and_nothing_is_awaited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Pause::new(None, "test".into());
        set(dir.path(), &p).expect("set");
        let w = std::sync::Arc::new(Watcher::new(dir.path()));
        w.note_applied(1, false);
        assert!(!applied(dir.path(), &p), "no worker parked yet");
        let stop = std::sync::Arc::new(crate::daemon::Shutdown::default());
        let (w2, s2) = (w.clone(), stop.clone());
        let parked = std::thread::spawn(move || w2.park(&s2));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while w.parked.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "never parked");
            std::thread::sleep(Duration::from_millis(5));
        }
        w.note_applied(1, true);
        assert!(!applied(dir.path(), &p), "a reply is still awaited");
        w.note_applied(1, false);
        assert!(applied(dir.path(), &p));
        clear(dir.path()).expect("resume");
        w.poll();
        parked
            .join()
            .expect("the worker goes back to work at resume");
    }
}
