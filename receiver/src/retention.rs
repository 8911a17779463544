//! The retention policy: which versions of one file the receiver keeps.
//!
//! The receiver applies it alone, per file, from what its index holds: each version's number,
//! the receiver's own commit time (`versions.commit_time`, unix seconds) and whether the
//! version records a deletion. No time an agent supplies takes part, so an agent cannot make
//! old versions look new and push real history out of the window.
//!
//! [`Policy::keep`] decides, for one file's versions (ascending by version):
//!
//! - `keep_all` keeps every version, and turns the rest off (deletions included).
//! - Otherwise a version is kept when any rule keeps it:
//!   - `keep_within`: its commit time is less than `keep_within` before `now` (a version
//!     exactly `keep_within` old is not kept by this rule);
//!   - `keep_last = N`: it is one of the N newest versions (by version number);
//!   - `keep_hourly`, `keep_daily`, `keep_weekly`, `keep_monthly`, `keep_yearly` = N: it is the
//!     newest version (by version number) of its calendar period, and that period is one of
//!     the N latest periods that hold a version of the file (restic's semantics). Periods are
//!     UTC: hours, days, ISO weeks (Monday to Sunday), months, years.
//!   - the latest version of the file is always kept.
//! - A file whose latest version is a deletion: while the deletion is younger than
//!   `keep_deleted_for`, the rules above apply and the last version before the deletion that
//!   is not itself one is kept too, so that the file can be restored as it was. Once the
//!   deletion is `keep_deleted_for` old, every version of the file goes. Unset
//!   (`keep_deleted_for = "0"`), a deletion never purges anything.
//!
//! Versions of an older index whose deletion flag is unknown count as not deleted (the
//! caller maps NULL to `false`): that keeps more, never less.
//!
//! This module also parses the durations (`"90d"`, `"24h"`, `"0"`) and shares (`"10%"`) of
//! the `[retention]` table; [`crate::config`] reads the table itself.

use std::collections::BTreeMap;
use std::time::Duration;

/// One repository's retention settings, defaults as in DESIGN.md.
#[derive(Clone, Debug, PartialEq)]
pub struct Retention {
    /// Which versions are kept.
    pub policy: Policy,
    /// How often `serve` prunes; `None` (`"0"`) is never.
    pub prune_interval: Option<Duration>,
    /// Share of a pack's bytes no longer referenced past which compaction rewrites it,
    /// 0.0..=1.0 (`"10%"` is 0.10).
    pub max_unused: f64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            prune_interval: Some(Duration::from_secs(24 * HOUR as u64)),
            max_unused: 0.10,
        }
    }
}

/// Which versions of each file are kept (see the module doc for the semantics).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Keep every version (retention off).
    pub keep_all: bool,
    /// Keep every version younger than this.
    pub keep_within: Duration,
    /// Keep the newest version of each of the last N hours that have one.
    pub keep_hourly: u32,
    /// ... of each of the last N days.
    pub keep_daily: u32,
    /// ... of each of the last N ISO weeks.
    pub keep_weekly: u32,
    /// ... of each of the last N months.
    pub keep_monthly: u32,
    /// ... of each of the last N years.
    pub keep_yearly: u32,
    /// Keep the newest N versions, whatever their age.
    pub keep_last: u32,
    /// A deleted file's versions all go once its deletion is this old; `None`: never.
    pub keep_deleted_for: Option<Duration>,
}

impl Default for Policy {
    /// DESIGN.md's defaults: every version for a day, then hourly, daily, weekly, monthly.
    fn default() -> Self {
        Self {
            keep_all: false,
            keep_within: Duration::from_secs(24 * HOUR as u64),
            keep_hourly: 48,
            keep_daily: 90,
            keep_weekly: 104,
            keep_monthly: 120,
            keep_yearly: 0,
            keep_last: 0,
            keep_deleted_for: Some(Duration::from_secs(90 * DAY as u64)),
        }
    }
}

/// One version of one file as the receiver knows it. `commit_time` is the receiver's own
/// unix seconds (versions.commit_time), never an agent's.
#[derive(Clone, Copy, Debug)]
pub struct VersionFacts {
    /// The receiver's version number (monotonic per repository).
    pub version: u64,
    /// When the receiver committed it, unix seconds.
    pub commit_time: i64,
    /// Whether it records the file's deletion (unknown: `false`).
    pub deleted: bool,
}

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

/// A calendar period kind of the bucket rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    /// The UTC period holding unix time `t`, as a number that grows with time.
    fn bucket(self, t: i64) -> i64 {
        let days = t.div_euclid(DAY);
        match self {
            Period::Hour => t.div_euclid(HOUR),
            Period::Day => days,
            // 1970-01-01 was a Thursday: day -3 (1969-12-29) is the Monday of week 0.
            Period::Week => (days + 3).div_euclid(7),
            Period::Month => {
                let (y, m, _) = civil_from_days(days);
                y * 12 + (m as i64 - 1)
            }
            Period::Year => civil_from_days(days).0,
        }
    }
}

/// The proleptic Gregorian (year, month 1..=12, day 1..=31) of `days` since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Policy {
    /// Which of one file's versions (ascending by version) are kept at `now` (unix seconds).
    /// Result is parallel to `versions`. Never drops the latest version of a file whose
    /// latest version is not a deletion.
    pub fn keep(&self, versions: &[VersionFacts], now: i64) -> Vec<bool> {
        let n = versions.len();
        if self.keep_all || n == 0 {
            return vec![true; n];
        }
        let last = &versions[n - 1];
        if last.deleted {
            if let Some(d) = self.keep_deleted_for {
                if now.saturating_sub(last.commit_time) >= secs(d) {
                    return vec![false; n];
                }
            }
        }
        let mut keep = vec![false; n];
        // The latest version, deletion or not.
        keep[n - 1] = true;
        // keep_within: younger than the window.
        let within = secs(self.keep_within);
        for (k, v) in keep.iter_mut().zip(versions) {
            if now.saturating_sub(v.commit_time) < within {
                *k = true;
            }
        }
        // keep_last: the newest N.
        let newest = (self.keep_last as usize).min(n);
        for k in &mut keep[n - newest..] {
            *k = true;
        }
        // The calendar rules: the newest version of each of the N latest periods.
        for (period, count) in [
            (Period::Hour, self.keep_hourly),
            (Period::Day, self.keep_daily),
            (Period::Week, self.keep_weekly),
            (Period::Month, self.keep_monthly),
            (Period::Year, self.keep_yearly),
        ] {
            if count == 0 {
                continue;
            }
            // Period -> index of its newest version (the highest index: ascending input).
            let mut newest_of: BTreeMap<i64, usize> = BTreeMap::new();
            for (i, v) in versions.iter().enumerate() {
                newest_of.insert(period.bucket(v.commit_time), i);
            }
            for &i in newest_of.values().rev().take(count as usize) {
                keep[i] = true;
            }
        }
        // A deleted file (still within keep_deleted_for): its content before the deletion.
        if last.deleted {
            if let Some(i) = versions[..n - 1].iter().rposition(|v| !v.deleted) {
                keep[i] = true;
            }
        }
        keep
    }
}

/// Whole seconds of `d`, saturating at `i64::MAX`.
fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Parses a duration as `receiver.toml` writes it: a whole number and a unit, `s`, `m`, `h`,
/// `d` or `w` (`"90d"`, `"24h"`, `"30m"`, `"45s"`, `"2w"`), or `"0"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration: a whole number and a unit s, m, h, d or w \
             (e.g. \"90d\", \"24h\"), or \"0\""
        )
    };
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit: u64 = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => HOUR as u64,
        "d" => DAY as u64,
        "w" => 7 * DAY as u64,
        _ => return Err(bad()),
    };
    number
        .checked_mul(unit)
        .filter(|s| *s <= i64::MAX as u64)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long a duration"))
}

/// `d` as [`parse_duration`] reads it, in the largest unit that divides it.
pub fn duration_text(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return "0".into();
    }
    for (unit, m) in [("w", 7 * DAY), ("d", DAY), ("h", HOUR), ("m", 60)] {
        let m = m as u64;
        if s.is_multiple_of(m) {
            return format!("{}{unit}", s / m);
        }
    }
    format!("{s}s")
}

/// Parses a share written `"10%"` (0% to 100%, decimals allowed: `"2.5%"`), in basis
/// points (hundredths of a percent, 0..=10000).
pub fn parse_share(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a share from 0% to 100% (e.g. \"10%\")");
    let t = text.trim();
    let n = t.strip_suffix('%').ok_or_else(bad)?.trim();
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let p: f64 = n.parse().map_err(|_| bad())?;
    if !(0.0..=100.0).contains(&p) {
        return Err(bad());
    }
    Ok((p * 100.0).round() as u32)
}

/// Basis points as [`parse_share`] reads them (`1000` is `"10%"`).
pub fn share_text(basis_points: u32) -> String {
    if basis_points.is_multiple_of(100) {
        format!("{}%", basis_points / 100)
    } else {
        format!("{}%", f64::from(basis_points) / 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn at(y: i64, mo: u32, d: u32, h: i64, mi: i64, s: i64) -> i64 {
        // Days from civil (Hinnant), the inverse of civil_from_days.
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (i64::from(mo) + 9) % 12;
        let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * DAY + h * HOUR + mi * 60 + s
    }

    fn none() -> Policy {
        Policy {
            keep_all: false,
            keep_within: Duration::ZERO,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            keep_yearly: 0,
            keep_last: 0,
            keep_deleted_for: None,
        }
    }

    fn live(times: &[i64]) -> Vec<VersionFacts> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| VersionFacts {
                version: i as u64 + 1,
                commit_time: t,
                deleted: false,
            })
            .collect()
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(
            civil_from_days(at(2000, 2, 29, 0, 0, 0) / DAY),
            (2000, 2, 29)
        );
        assert_eq!(
            civil_from_days(at(2026, 12, 3, 0, 0, 0) / DAY),
            (2026, 12, 3)
        );
        for days in -800_000..800_000i64 {
            if days % 997 == 0 {
                let (y, m, d) = civil_from_days(days);
                assert_eq!(at(y, m, d, 0, 0, 0), days * DAY);
            }
        }
    }

    #[test]
    fn nothing_but_the_latest_is_kept_by_an_empty_policy() {
        let v = live(&[10, 20, 30]);
        assert_eq!(none().keep(&v, 1000), [false, false, true]);
        assert!(none().keep(&[], 0).is_empty());
        let all = Policy {
            keep_all: true,
            ..none()
        };
        assert_eq!(all.keep(&v, 1000), [true, true, true]);
    }

    #[test]
    fn keep_within_keeps_what_is_younger_than_the_window() {
        let p = Policy {
            keep_within: Duration::from_secs(100),
            ..none()
        };
        let now = 1000;
        // 899 is 101 s old, 900 exactly 100 s (not kept), 901 99 s.
        let v = live(&[899, 900, 901, 2000]);
        assert_eq!(p.keep(&v, now), [false, false, true, true]);
    }

    #[test]
    fn keep_last_keeps_the_newest_n_whatever_their_age() {
        let p = Policy {
            keep_last: 2,
            ..none()
        };
        let v = live(&[1, 2, 3, 4]);
        assert_eq!(p.keep(&v, i64::MAX), [false, false, true, true]);
        let p = Policy {
            keep_last: 9,
            ..none()
        };
        assert_eq!(p.keep(&v, 0), [true; 4]);
    }

    #[test]
    fn hourly_buckets_split_at_the_hour() {
        let p = Policy {
            keep_hourly: 2,
            ..none()
        };
        let h = at(2026, 12, 3, 17, 0, 0);
        // 16:59:59 and 17:00:00 are in different hours; 17:30 is the newest of 17h.
        let v = live(&[h - 3601, h - 1, h, h + 1800, h + 3599]);
        assert_eq!(p.keep(&v, h + 3600), [false, true, false, false, true]);
        // Three hours: the two latest hours' newest versions.
        let p = Policy {
            keep_hourly: 3,
            ..none()
        };
        assert_eq!(p.keep(&v, h + 3600), [true, true, false, false, true]);
    }

    #[test]
    fn daily_buckets_split_at_utc_midnight_and_skip_empty_days() {
        let p = Policy {
            keep_daily: 2,
            ..none()
        };
        let d = at(2026, 12, 3, 0, 0, 0);
        // Dec 1 23:59:59, Dec 2 00:00:00 and 12:00, (no Dec 3..9), Dec 10 08:00.
        let v = live(&[
            d - DAY - 1,
            d - DAY,
            d - DAY + 12 * HOUR,
            d + 7 * DAY + 8 * HOUR,
        ]);
        // The last 2 days that hold a version are Dec 10 and Dec 2 (empty days do not count).
        assert_eq!(p.keep(&v, d + 30 * DAY), [false, false, true, true]);
    }

    #[test]
    fn weekly_buckets_are_iso_weeks_from_monday() {
        let p = Policy {
            keep_weekly: 4,
            ..none()
        };
        // 2026-11-29 is a Sunday, 2026-11-30 a Monday; 2027-01-03 a Sunday, 01-04 a Monday.
        let sun = at(2026, 11, 29, 23, 59, 59);
        let mon = at(2026, 11, 30, 0, 0, 0);
        let v = live(&[
            sun - 60,
            sun,
            mon,
            at(2027, 1, 3, 12, 0, 0),
            at(2027, 1, 4, 0, 0, 0),
        ]);
        assert_eq!(p.keep(&v, mon + 100 * DAY), [false, true, true, true, true]);
        let p = Policy {
            keep_weekly: 2,
            ..none()
        };
        assert_eq!(
            p.keep(&v, mon + 100 * DAY),
            [false, false, false, true, true]
        );
        // The Thursday epoch: 1970-01-01 is in the week of Monday 1969-12-29.
        assert_eq!(
            Period::Week.bucket(0),
            Period::Week.bucket(at(1969, 12, 29, 0, 0, 0))
        );
        assert_ne!(
            Period::Week.bucket(0),
            Period::Week.bucket(at(1969, 12, 28, 23, 59, 59))
        );
        assert_ne!(
            Period::Week.bucket(0),
            Period::Week.bucket(at(1970, 1, 5, 0, 0, 0))
        );
    }

    #[test]
    fn monthly_and_yearly_buckets_follow_the_calendar() {
        let p = Policy {
            keep_monthly: 2,
            ..none()
        };
        // Feb 29 of a leap year ends February; Mar 1 starts March.
        let v = live(&[
            at(2028, 2, 1, 0, 0, 0),
            at(2028, 2, 29, 23, 59, 59),
            at(2028, 3, 1, 0, 0, 0),
            at(2028, 3, 31, 23, 59, 59),
        ]);
        assert_eq!(
            p.keep(&v, at(2029, 1, 1, 0, 0, 0)),
            [false, true, false, true]
        );
        let p = Policy {
            keep_yearly: 2,
            ..none()
        };
        let v = live(&[
            at(2025, 6, 1, 0, 0, 0),
            at(2026, 12, 31, 23, 59, 59),
            at(2027, 1, 1, 0, 0, 0),
        ]);
        assert_eq!(p.keep(&v, at(2030, 1, 1, 0, 0, 0)), [false, true, true]);
        let p = Policy {
            keep_yearly: 3,
            ..none()
        };
        assert_eq!(p.keep(&v, at(2030, 1, 1, 0, 0, 0)), [true, true, true]);
    }

    #[test]
    fn a_deleted_file_keeps_its_last_content_then_goes_after_keep_deleted_for() {
        let p = Policy {
            keep_deleted_for: Some(Duration::from_secs(100)),
            ..none()
        };
        let mut v = live(&[10, 20, 30, 40]);
        v[1].deleted = true; // deleted and made again
        v[3].deleted = true; // deleted at 40
                             // Younger than keep_deleted_for: the deletion and the content before it.
        assert_eq!(p.keep(&v, 139), [false, false, true, true]);
        // Exactly keep_deleted_for old: every version goes.
        assert_eq!(p.keep(&v, 140), [false; 4]);
        // Unset: a deletion never purges.
        let p = Policy {
            keep_deleted_for: None,
            ..none()
        };
        assert_eq!(p.keep(&v, i64::MAX), [false, false, true, true]);
        // keep_all overrides keep_deleted_for.
        let p = Policy {
            keep_all: true,
            keep_deleted_for: Some(Duration::ZERO),
            ..none()
        };
        assert_eq!(p.keep(&v, i64::MAX), [true; 4]);
    }

    #[test]
    fn the_defaults_are_designs() {
        let r = Retention::default();
        assert_eq!(r.prune_interval, Some(Duration::from_secs(86_400)));
        assert_eq!(r.max_unused, 0.10);
        let p = r.policy;
        assert_eq!(p.keep_within, Duration::from_secs(86_400));
        assert_eq!(
            (p.keep_hourly, p.keep_daily, p.keep_weekly, p.keep_monthly),
            (48, 90, 104, 120)
        );
        assert_eq!((p.keep_yearly, p.keep_last, p.keep_all), (0, 0, false));
        assert_eq!(p.keep_deleted_for, Some(Duration::from_secs(90 * 86_400)));
    }

    #[test]
    fn durations_and_shares_parse_and_print() {
        for (text, s) in [
            ("0", 0),
            ("45s", 45),
            ("30m", 1800),
            ("24h", 86_400),
            ("90d", 90 * 86_400),
            ("2w", 14 * 86_400),
            (" 5s ", 5),
        ] {
            assert_eq!(parse_duration(text), Ok(Duration::from_secs(s)), "{text}");
        }
        for bad in [
            "",
            "d",
            "5",
            "5x",
            "-5d",
            "1.5h",
            "5 days",
            "1h30m",
            "99999999999999999999w",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        for s in [0, 1, 59, 60, 3600, 86_400, 7 * 86_400, 90 * 86_400, 3601] {
            let d = Duration::from_secs(s);
            assert_eq!(parse_duration(&duration_text(d)), Ok(d));
        }
        assert_eq!(duration_text(Duration::from_secs(90 * 86_400)), "90d");
        assert_eq!(parse_share("10%"), Ok(1000));
        assert_eq!(parse_share("0%"), Ok(0));
        assert_eq!(parse_share("100%"), Ok(10_000));
        assert_eq!(parse_share("2.5%"), Ok(250));
        for bad in ["10", "101%", "-1%", "%", "ten%", "1e1%"] {
            assert!(parse_share(bad).is_err(), "{bad}");
        }
        for bp in [0, 250, 1000, 10_000] {
            assert_eq!(parse_share(&share_text(bp)), Ok(bp));
        }
    }
}
