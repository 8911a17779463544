//! What the receiver logs about its peers: text a peer chose, escaped ([`peer_text`]), so
//! that a peer cannot forge log lines or send terminal escapes. Every log call that shows
//! a string a peer sent goes through [`peer_text`].

use std::fmt;

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
}
