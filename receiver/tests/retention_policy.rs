//! The retention policy against a small reference implementation on random histories:
//! the same versions are kept; the latest version of every live file is always kept; a time
//! an agent supplies changes nothing; a more generous policy never keeps less.

use std::time::Duration;

use coffer_receiver::retention::{Policy, VersionFacts};
use proptest::prelude::*;

/// One version as an agent and the receiver saw it. Only `commit_time` (the receiver's
/// clock) and `deleted` reach the policy; `agent_mtime` is what an agent claims.
#[derive(Clone, Debug)]
struct Seen {
    commit_time: i64,
    deleted: bool,
    agent_mtime: i64,
}

/// What the receiver hands the policy: never the agent's time.
fn facts(history: &[Seen]) -> Vec<VersionFacts> {
    history
        .iter()
        .enumerate()
        .map(|(i, s)| VersionFacts {
            version: 100 + 3 * i as u64,
            commit_time: s.commit_time,
            deleted: s.deleted,
        })
        .collect()
}

// ---- The reference: per version, the rules as the documentation states them, by brute
// force, with its own (naive) calendar. ----

const DAY: i64 = 86_400;

fn leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// (year, month 1..=12) of unix time `t` >= 0, by counting days from 1970.
fn year_month(t: i64) -> (i64, i64) {
    let mut days = t / DAY;
    let mut y = 1970;
    loop {
        let len = if leap(y) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        y += 1;
    }
    let feb = if leap(y) { 29 } else { 28 };
    let mut m = 1;
    for len in [31, feb, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31] {
        if days < len {
            break;
        }
        days -= len;
        m += 1;
    }
    (y, m)
}

/// The calendar period of `t`: 0 hour, 1 day, 2 ISO week, 3 month, 4 year.
fn period(kind: usize, t: i64) -> i64 {
    match kind {
        0 => t / 3600,
        1 => t / DAY,
        // 1970-01-05 (day 4) was a Monday.
        2 => (t / DAY - 4).div_euclid(7),
        3 => {
            let (y, m) = year_month(t);
            y * 100 + m
        }
        _ => year_month(t).0,
    }
}

fn reference(p: &Policy, v: &[VersionFacts], now: i64) -> Vec<bool> {
    let n = v.len();
    if p.keep_all {
        return vec![true; n];
    }
    let Some(last) = v.last() else {
        return Vec::new();
    };
    if last.deleted {
        if let Some(d) = p.keep_deleted_for {
            if now - last.commit_time >= d.as_secs() as i64 {
                return vec![false; n];
            }
        }
    }
    let counts = [
        p.keep_hourly,
        p.keep_daily,
        p.keep_weekly,
        p.keep_monthly,
        p.keep_yearly,
    ];
    (0..n)
        .map(|i| {
            let t = v[i].commit_time;
            let latest = i == n - 1;
            let within = now - t < p.keep_within.as_secs() as i64;
            let last_n = n - i <= p.keep_last as usize;
            let calendar = (0..5).any(|kind| {
                let b = period(kind, t);
                // The newest version of its period...
                let newest = (i + 1..n).all(|j| period(kind, v[j].commit_time) != b);
                // ...and fewer than N later periods hold a version.
                let mut later: Vec<i64> = v
                    .iter()
                    .map(|x| period(kind, x.commit_time))
                    .filter(|&x| x > b)
                    .collect();
                later.sort();
                later.dedup();
                newest && (later.len() as u64) < u64::from(counts[kind])
            });
            let before_deletion =
                last.deleted && !v[i].deleted && (i + 1..n - 1).all(|j| v[j].deleted);
            latest || within || last_n || calendar || before_deletion
        })
        .collect()
}

// ---- Generators ----

const START: i64 = 1_577_836_800; // 2020-01-01T00:00:00Z

fn step() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => 0i64..120,                      // a burst of saves
        3 => 0i64..7200,                     // within an hour or two
        3 => 0i64..3 * DAY,                  // days
        2 => 0i64..60 * DAY,                 // weeks, months
        1 => 0i64..800 * DAY,                // years
        1 => -7200i64..0,                    // the receiver's clock stepped back
    ]
}

fn history() -> impl Strategy<Value = Vec<Seen>> {
    (
        0i64..200 * DAY,
        prop::collection::vec((step(), prop::bool::weighted(0.25), any::<i64>()), 1..14),
    )
        .prop_map(|(start, steps)| {
            let mut t = START + start;
            steps
                .into_iter()
                .map(|(dt, deleted, agent_mtime)| {
                    t += dt;
                    Seen {
                        commit_time: t,
                        deleted,
                        agent_mtime,
                    }
                })
                .collect()
        })
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(0u64),
        Just(3600),
        Just(86_400),
        Just(7 * 86_400),
        0u64..400 * 86_400,
    ]
    .prop_map(Duration::from_secs)
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        prop::bool::weighted(0.05),
        duration(),
        prop::array::uniform6(prop_oneof![2 => Just(0u32), 3 => 1u32..5]),
        prop::option::weighted(0.7, duration()),
    )
        .prop_map(|(keep_all, keep_within, c, keep_deleted_for)| Policy {
            keep_all,
            keep_within,
            keep_hourly: c[0],
            keep_daily: c[1],
            keep_weekly: c[2],
            keep_monthly: c[3],
            keep_yearly: c[4],
            keep_last: c[5],
            keep_deleted_for,
        })
}

/// `now`: after the last commit mostly, a little before it sometimes (a clock step).
fn now_after(history: &[Seen], offset: i64) -> i64 {
    history.iter().map(|s| s.commit_time).max().unwrap_or(START) + offset
}

fn offset() -> impl Strategy<Value = i64> {
    prop_oneof![
        1 => -3600i64..0,
        4 => 0i64..2 * DAY,
        4 => 0i64..500 * DAY,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_policy_keeps_what_the_reference_keeps(
        h in history(), mut p in policy(), off in offset(),
        edge in prop::option::weighted(0.3, any::<prop::sample::Index>()),
        deletion_edge in prop::bool::weighted(0.2),
    ) {
        let now = now_after(&h, off);
        let v = facts(&h);
        // Sometimes a version exactly keep_within old, or a deletion exactly
        // keep_deleted_for old: the edges.
        let age = |t: i64| Duration::from_secs((now - t).max(0) as u64);
        if let Some(i) = edge {
            p.keep_within = age(v[i.index(v.len())].commit_time);
        }
        if deletion_edge {
            p.keep_deleted_for = Some(age(v[v.len() - 1].commit_time));
        }
        let kept = p.keep(&v, now);
        prop_assert_eq!(kept.len(), v.len());
        prop_assert_eq!(&kept, &reference(&p, &v, now));
        // The latest version of a file that is not deleted is always kept.
        let last = v.len() - 1;
        if !v[last].deleted {
            prop_assert!(kept[last]);
        }
        // A deleted file within keep_deleted_for keeps what it held before the deletion.
        let purged = p.keep_deleted_for.is_some_and(|d| {
            now - v[last].commit_time >= d.as_secs() as i64
        });
        if v[last].deleted && !p.keep_all && !purged {
            if let Some(i) = v.iter().rposition(|x| !x.deleted) {
                prop_assert!(kept[i]);
            }
        }
    }

    #[test]
    fn an_agent_supplied_time_changes_nothing(
        h in history(), p in policy(), off in offset(), shift in any::<i64>(),
        flip in any::<bool>(),
    ) {
        let now = now_after(&h, off);
        let kept = p.keep(&facts(&h), now);
        // An agent claims other times for its files: far in the future, reversed, anything.
        let mut lied = h.clone();
        let n = lied.len() as i64;
        for (i, s) in lied.iter_mut().enumerate() {
            s.agent_mtime = if flip {
                s.agent_mtime.wrapping_add(shift)
            } else {
                i64::MAX - (n - i as i64)
            };
        }
        prop_assert_eq!(kept, p.keep(&facts(&lied), now));
    }

    #[test]
    fn a_more_generous_policy_never_keeps_less(
        h in history(), p in policy(), off in offset(), which in 0usize..9,
    ) {
        let now = now_after(&h, off);
        let v = facts(&h);
        let mut more = p.clone();
        match which {
            0 => more.keep_hourly += 1,
            1 => more.keep_daily += 1,
            2 => more.keep_weekly += 1,
            3 => more.keep_monthly += 1,
            4 => more.keep_yearly += 1,
            5 => more.keep_last += 1,
            6 => more.keep_within += Duration::from_secs(3600),
            7 => more.keep_deleted_for = more.keep_deleted_for.map(|d| d * 2 + Duration::from_secs(1)),
            _ => more.keep_all = true,
        }
        let a = p.keep(&v, now);
        let b = more.keep(&v, now);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            prop_assert!(!x || *y, "version {} kept by {:?} but not by {:?}", i, p, more);
        }
    }
}

/// The reference's calendar agrees with known dates (so that a shared mistake in both
/// calendars cannot hide).
#[test]
fn the_reference_calendar_knows_the_dates() {
    assert_eq!(year_month(START), (2020, 1));
    assert_eq!(year_month(START - 1), (2019, 12));
    // 2020-02-29T23:59:59Z and 2020-03-01T00:00:00Z.
    assert_eq!(year_month(1_583_020_799), (2020, 2));
    assert_eq!(year_month(1_583_020_800), (2020, 3));
    // 2026-11-30 (a Monday) starts a week; 2026-11-29 (a Sunday) ends one.
    assert_eq!(
        period(2, 1_795_996_800),
        period(2, 1_795_996_800 + 6 * DAY + 86_399)
    );
    assert_ne!(period(2, 1_795_996_800), period(2, 1_795_996_799));
}
