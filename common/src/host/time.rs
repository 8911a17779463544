//! Time as the command line and the status outputs show it: unix seconds and milliseconds,
//! RFC 3339 (UTC) for output, and the parser of `--at` (any offset, local time, a date,
//! unix seconds; the local zone from `TZ` or the system, through `jiff`).

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

/// What `--at` accepts, for help texts and errors.
pub const AT_FORMS: &str = "RFC 3339 with any offset (2026-12-03T09:35:05+01:00, \
    2026-12-03T08:35:05Z), a time without an offset in local time (2026-12-03T09:35:05), \
    a date alone, its start in local time (2026-12-01), or unix seconds (1796286905)";

/// Parses a point in time given on the command line (`--at`) into unix seconds: RFC 3339
/// with any offset, a date and time without an offset in the local time zone (`TZ`, else
/// the system's, as `date` shows it), a date alone (its first second, local time), or unix
/// seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    parse_time_in(s, &jiff::tz::TimeZone::system())
}

/// [`parse_time`] with `local` as the local time zone.
fn parse_time_in(s: &str, local: &jiff::tz::TimeZone) -> Result<i64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i64>() {
        return Ok(n);
    }
    let bad = |e: &dyn std::fmt::Display| format!("--at {s:?}: expected {AT_FORMS}: {e}");
    let ts = if t.len() == 10 {
        let d: jiff::civil::Date = t.parse().map_err(|e| bad(&e))?;
        local.to_timestamp(d.to_datetime(jiff::civil::Time::midnight()))
    } else if has_offset(t) {
        t.parse::<jiff::Timestamp>()
    } else {
        let dt: jiff::civil::DateTime = t.parse().map_err(|e| bad(&e))?;
        local.to_timestamp(dt)
    }
    .map_err(|e| bad(&e))?;
    match ts.as_second() {
        n if n < 0 => Err(format!("--at {s:?}: before 1970")),
        n => Ok(n),
    }
}

/// Whether an RFC 3339 date and time names its offset (`Z`, `+01:00`, `-05:30`): anything
/// of the kind after the date (whose own `-`s do not count).
fn has_offset(t: &str) -> bool {
    t.get(10..)
        .is_some_and(|rest| rest.contains(['Z', 'z', '+', '-']))
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

    /// 2026-12-03T08:35:05Z.
    const T: i64 = 1_796_286_905;

    #[test]
    fn any_offset() {
        let utc = jiff::tz::TimeZone::UTC;
        for s in [
            "2026-12-03T08:35:05Z",
            "2026-12-03t08:35:05z",
            "2026-12-03T08:35:05+00:00",
            "2026-12-03T09:35:05+01:00",
            "2026-12-03T03:05:05-05:30",
            "2026-12-03 09:35:05+01:00",
        ] {
            assert_eq!(parse_time_in(s, &utc), Ok(T), "{s}");
        }
        // The local zone does not change a time that names its offset.
        let paris = jiff::tz::TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").expect("test setup");
        assert_eq!(parse_time_in("2026-12-03T09:35:05+01:00", &paris), Ok(T));
        assert_eq!(parse_time_in("2026-12-03T08:35:05.9Z", &paris), Ok(T));
    }

    #[test]
    fn no_offset_is_local_time() {
        let paris = jiff::tz::TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").expect("test setup");
        let new_york = jiff::tz::TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").expect("test setup");
        let india = jiff::tz::TimeZone::posix("IST-5:30").expect("test setup");
        assert_eq!(parse_time_in("2026-12-03T09:35:05", &paris), Ok(T));
        assert_eq!(parse_time_in("2026-12-03T03:35:05", &new_york), Ok(T));
        assert_eq!(parse_time_in("2026-12-03T14:05:05", &india), Ok(T));
        // Summer time: Paris is UTC+2 in July.
        assert_eq!(
            parse_time_in("2026-07-01T02:00:00", &paris),
            Ok(T - T % 86_400 - 155 * 86_400)
        );
        // A date alone: its first second, local time.
        assert_eq!(
            parse_time_in("2026-12-03", &jiff::tz::TimeZone::UTC),
            Ok(T - 30_905)
        );
        assert_eq!(parse_time_in("2026-12-03", &paris), Ok(T - 30_905 - 3600));
        assert_eq!(
            parse_time_in("2026-12-03", &new_york),
            Ok(T - 30_905 + 5 * 3600)
        );
    }

    #[test]
    fn errors_name_the_accepted_forms() {
        let utc = jiff::tz::TimeZone::UTC;
        for s in [
            "yesterday",
            "2026-13-01",
            "2026-12-03T25:00:00Z",
            "2026-12-03T09:35:05+1",
            "",
        ] {
            let e = parse_time_in(s, &utc).expect_err("refused");
            assert!(
                e.contains("RFC 3339") && e.contains("unix seconds"),
                "{s}: {e}"
            );
        }
        assert!(parse_time_in("1969-12-31", &utc)
            .expect_err("refused")
            .contains("before 1970"));
    }
}
