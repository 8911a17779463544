//! What the receiver logs about its peers: text a peer chose, escaped ([`peer_text`]), and
//! refusals of connections counted and summarised once per interval ([`Tally`]), so that a
//! peer can neither forge log lines nor flood the log.
//!
//! Every log call that shows a string a peer sent goes through [`peer_text`]; the server
//! counts its refusals in a [`Tally`] and logs its summary.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the refusals counted are summarised in one log line.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Refusals logged one by one (with the agent's key) per interval before they are only
/// counted.
const BURST: u64 = 5;
/// Characters of a peer's text shown at most.
const SHOWN: usize = 256;

/// A string a peer sent, for a log line: control characters (a newline, a carriage return,
/// a terminal escape), backslashes, quotes and other unprintable characters are escaped as
/// Rust writes them (`\n`, `\u{1b}`), and it is cut after [`SHOWN`] characters.
pub fn peer_text(s: &str) -> PeerText<'_> {
    PeerText(s)
}

/// See [`peer_text`].
pub struct PeerText<'a>(&'a str);

impl fmt::Display for PeerText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(SHOWN) {
            write!(f, "{}", c.escape_debug())?;
        }
        if chars.next().is_some() {
            write!(f, "... ({} bytes in all)", self.0.len())?;
        }
        Ok(())
    }
}

/// Why a connection was refused, for the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its address already had `max_handshakes_per_address` connections not yet authorized
    /// (closed at accept).
    AddressCap,
    /// The handshake queue was full (closed at accept).
    QueueFull,
    /// It waited in the queue until the handshake time ran out.
    Waited,
    /// The handshake failed or ran out of time.
    Handshake,
    /// Its key is not authorized.
    Unauthorized,
    /// No session slot came free for it (the key's, the repository's or the receiver's).
    Busy,
}

impl Refusal {
    /// Every kind, in the order of the summary.
    const ALL: [Refusal; 6] = [
        Refusal::AddressCap,
        Refusal::QueueFull,
        Refusal::Waited,
        Refusal::Handshake,
        Refusal::Unauthorized,
        Refusal::Busy,
    ];

    fn describe(self) -> &'static str {
        match self {
            Refusal::AddressCap => {
                "closed at accept (their address had max_handshakes_per_address in progress)"
            }
            Refusal::QueueFull => "closed at accept (the handshake queue was full)",
            Refusal::Waited => "closed after waiting in the handshake queue",
            Refusal::Handshake => "failed or timed out in the handshake",
            Refusal::Unauthorized => "refused with an unauthorized key",
            Refusal::Busy => {
                "refused as busy (no session slot for the key, repository or receiver)"
            }
        }
    }

    /// Whether refusals of this kind are logged one by one (up to a burst per interval).
    fn logged_singly(self) -> bool {
        matches!(self, Refusal::Unauthorized | Refusal::Busy)
    }
}

/// Refusals counted since the last summary.
#[derive(Default)]
pub struct Tally {
    /// Indexed as [`Refusal::ALL`].
    counts: [AtomicU64; Refusal::ALL.len()],
}

impl Tally {
    /// Counts a refusal. For those logged one by one, true while the interval's burst
    /// lasts: the caller then logs it itself.
    pub fn count(&self, why: Refusal) -> bool {
        let n = self.counts[why as usize].fetch_add(1, Ordering::Relaxed);
        why.logged_singly() && n < BURST
    }

    /// The summary line of the refusals counted since the last call (`None` when there
    /// were none), and a fresh count.
    pub fn summary(&self) -> Option<String> {
        let mut parts = Vec::new();
        for (why, c) in Refusal::ALL.into_iter().zip(&self.counts) {
            let n = c.swap(0, Ordering::Relaxed);
            if n > 0 {
                parts.push(format!("{n} {}", why.describe()));
            }
        }
        (!parts.is_empty()).then(|| {
            format!(
                "connections turned away in the last {}s: {} (single refusals past {BURST} \
                 of a kind are not logged one by one)",
                SUMMARY_INTERVAL.as_secs(),
                parts.join("; ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_escapes_what_could_forge_a_line_and_is_cut() {
        let s = peer_text("evil\nFORGED\r\u{1b}[31m\t\\ \u{202e}ok").to_string();
        assert_eq!(s, r"evil\nFORGED\r\u{1b}[31m\t\\ \u{202e}ok");
        assert!(!s.chars().any(char::is_control));
        assert_eq!(
            peer_text("laptop-1.example").to_string(),
            "laptop-1.example"
        );
        let long = "é".repeat(1000);
        let shown = peer_text(&long).to_string();
        assert!(shown.starts_with(&"é".repeat(SHOWN)), "{shown}");
        assert!(shown.ends_with("... (2000 bytes in all)"), "{shown}");
        assert_eq!(peer_text(&"x".repeat(SHOWN)).to_string(), "x".repeat(SHOWN));
    }

    #[test]
    fn every_kind_counts_in_its_own_place() {
        for (i, why) in Refusal::ALL.into_iter().enumerate() {
            assert_eq!(why as usize, i);
        }
    }

    #[test]
    fn refusals_are_summarised_and_single_lines_stop_after_a_burst() {
        let t = Tally::default();
        assert_eq!(t.summary(), None);
        let singly = (0..20).filter(|_| t.count(Refusal::Unauthorized)).count();
        assert_eq!(singly as u64, BURST);
        assert!(!t.count(Refusal::AddressCap));
        t.count(Refusal::AddressCap);
        let s = t.summary().expect("a summary");
        assert!(s.contains("20 refused with an unauthorized key"), "{s}");
        assert!(s.contains("2 closed at accept (their address"), "{s}");
        assert!(!s.contains("busy"), "{s}");
        // A new interval: counted from zero, and the burst starts again.
        assert_eq!(t.summary(), None);
        assert!(t.count(Refusal::Busy));
    }
}
