//! Time as the command line and the status outputs show it: unix seconds and milliseconds,
//! RFC 3339 (UTC) for output, and the parser of `--at`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix time now, in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix time now, in seconds (0 if the clock is before 1970).
pub fn now_secs() -> i64 {
    now_ms() / 1000
}

/// Formats unix seconds as RFC 3339 in UTC (`2023-11-14T22:13:20Z`); times before 1970
/// show as 1970.
pub fn rfc3339(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Parses a point in time given on the command line (`--at`): RFC 3339 or unix seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.trim().parse::<i64>() {
        return Ok(n);
    }
    humantime::parse_rfc3339_weak(s.trim())
        .map_err(|e| {
            format!("--at {s:?}: expected RFC 3339 (2026-11-25T21:00:00Z) or unix seconds: {e}")
        })
        .and_then(|t| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .map_err(|_| format!("--at {s:?}: before 1970"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000));
        assert_eq!(parse_time(" 1700000000 "), Ok(1_700_000_000));
        assert!(parse_time("yesterday").is_err());
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
    }
}
