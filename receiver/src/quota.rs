//! Quotas: how much each repository may hold, and the free disk the receiver keeps for
//! everyone.
//!
//! - A repository's *use* is the bytes its packs hold (headers included), kept in memory by
//!   [`crate::repo::Repo`]: raised by each append, set back by a rollback, counted at open.
//! - Its *quota* is `[repos.NAME] quota` in `receiver.toml`, else the top-level `quota`
//!   ("0": none). A new chunk that would take the use past the quota is refused
//!   ([`Refusal::Quota`], `Error{QuotaExceeded}`); nothing else is.
//! - `min_free` is a floor of free space on the file system holding `<root>/repos`: below
//!   it every repository is refused new chunks ([`Refusal::DiskFloor`], also
//!   `Error{QuotaExceeded}`), so the indexes and the receiver's own files can still be
//!   written. Free space is taken with `statvfs` at most once per [`DISK_CHECK`] (sooner,
//!   at most once per [`DISK_RECHECK`], while it refuses), less what was admitted since.
//! - `warn_at` is the share of a quota past which `status` and `/metrics` say "warning".
//!
//! The limits live in [`Limits`] (one per repository, set by `serve` when it opens the
//! repository and again on SIGHUP) and one shared [`DiskFloor`]; [`room_for`] checks a
//! `PutFiles` whole before any of its chunks is stored.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use coffer_common::chunk::ChunkId;
use coffer_common::wire::SealedChunk;

use crate::auth::RepoName;
use crate::repo::{Repo, RepoError};
use crate::store::RECORD_HEADER_LEN;

/// How long a `statvfs` of the packs' file system is trusted (less what was admitted since).
pub const DISK_CHECK: Duration = Duration::from_secs(1);
/// While the floor refuses, free space is looked at again at most this often.
pub const DISK_RECHECK: Duration = Duration::from_millis(250);

const UNITS: [(&str, u64); 13] = [
    ("b", 1),
    ("k", 1 << 10),
    ("kib", 1 << 10),
    ("kb", 1000),
    ("m", 1 << 20),
    ("mib", 1 << 20),
    ("mb", 1_000_000),
    ("g", 1 << 30),
    ("gib", 1 << 30),
    ("gb", 1_000_000_000),
    ("t", 1 << 40),
    ("tib", 1 << 40),
    ("tb", 1_000_000_000_000),
];

/// Parses a size: a number of bytes, optionally with a fraction and a unit (`B`, `KiB`,
/// `MiB`, `GiB`, `TiB`, or `K`, `M`, `G`, `T` for the same; `KB`, `MB`, `GB`, `TB` are
/// powers of 1000), e.g. `"500GiB"`, `"1.5 TiB"`, `"0"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a size (a number of bytes with an optional unit: B, KiB, MiB, GiB, \
             TiB, KB, MB, GB, TB; e.g. \"500GiB\"; \"0\" for none)"
        )
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(bad)?
    };
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
        return Err(bad());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if frac.contains('.') || frac.len() > 6 {
        return Err(bad());
    }
    let int: u64 = int.parse().map_err(|_| bad())?;
    let whole = int.checked_mul(mult).ok_or_else(bad)?;
    if frac.is_empty() {
        return Ok(whole);
    }
    let f: u64 = frac.parse().map_err(|_| bad())?;
    let scale = 10u64.pow(frac.len() as u32);
    let part = (u128::from(f) * u128::from(mult) / u128::from(scale)) as u64;
    whole.checked_add(part).ok_or_else(bad)
}

/// Parses a percentage, `"90%"` (a whole number from 1 to 100, `%` optional).
pub fn parse_percent(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let n = t.strip_suffix('%').unwrap_or(t).trim();
    match n.parse::<u32>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!(
            "{text:?} is not a percentage from 1% to 100% (e.g. \"90%\")"
        )),
    }
}

/// A size for people: `500 GiB`, `1.5 MiB`, `12 B`.
pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() < 0.05 {
        format!("{v:.0} {}", U[u])
    } else {
        format!("{v:.1} {}", U[u])
    }
}

/// Where a repository stands against its quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaState {
    /// No quota, or below the warning threshold.
    Ok,
    /// At or past `warn_at` of the quota.
    Warning,
    /// Full: at the quota (a chunk is refused when it would take the use past it).
    Over,
}

impl QuotaState {
    /// The state of `used` bytes against `quota` (0: none) with a threshold of `warn_at`%.
    pub fn of(used: u64, quota: u64, warn_at: u32) -> Self {
        if quota == 0 {
            QuotaState::Ok
        } else if used >= quota {
            QuotaState::Over
        } else if u128::from(used) * 100 >= u128::from(quota) * u128::from(warn_at) {
            QuotaState::Warning
        } else {
            QuotaState::Ok
        }
    }

    /// `ok`, `warning` or `over`, as `status` and `/metrics` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaState::Ok => "ok",
            QuotaState::Warning => "warning",
            QuotaState::Over => "over",
        }
    }
}

/// Why a new chunk was refused (reported to the agent as `Error{QuotaExceeded}`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "repository {repo} is over its quota: {} of {} used; ask the receiver's operator or \
         let retention free space", human(*used), human(*quota)
    )]
    Quota { repo: String, used: u64, quota: u64 },
    #[error(
        "the receiver's disk is nearly full: {} free on {path}, below its min_free of {}; \
         every repository is refused new chunks until its operator frees space",
        human(*free), human(*min_free)
    )]
    DiskFloor {
        path: String,
        free: u64,
        min_free: u64,
    },
}

/// The receiver-wide floor of free disk (`min_free`), shared by every repository.
pub struct DiskFloor {
    /// A folder on the file system that holds the packs.
    path: PathBuf,
    min_free: AtomicU64,
    seen: Mutex<Option<Seen>>,
}

/// The last look at free space.
#[derive(Clone, Copy)]
struct Seen {
    at: Instant,
    free: u64,
    /// Bytes admitted since.
    admitted: u64,
}

impl DiskFloor {
    /// A floor of `min_free` bytes (0: none) on the file system holding `path`.
    pub fn new(path: PathBuf, min_free: u64) -> Self {
        Self {
            path,
            min_free: AtomicU64::new(min_free),
            seen: Mutex::new(None),
        }
    }

    /// Changes the floor (SIGHUP).
    pub fn set_min_free(&self, bytes: u64) {
        self.min_free.store(bytes, Ordering::Relaxed);
        // Look again at the next chunk.
        if let Ok(mut s) = self.seen.lock() {
            *s = None;
        }
    }

    /// The floor, in bytes (0: none).
    pub fn min_free(&self) -> u64 {
        self.min_free.load(Ordering::Relaxed)
    }

    /// Free bytes on the packs' file system (for unprivileged users), from `statvfs`.
    pub fn free_now(&self) -> std::io::Result<u64> {
        let s = nix::sys::statvfs::statvfs(&self.path).map_err(std::io::Error::from)?;
        Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
    }

    /// Admits `more` bytes, or refuses them when they would leave less than `min_free`.
    /// `statvfs` runs at most once per [`DISK_CHECK`] ([`DISK_RECHECK`] while refusing);
    /// between looks, the bytes admitted are taken off what was free. A failing
    /// `statvfs` admits (logged), so a monitoring problem never stops backups.
    pub fn admit(&self, more: u64) -> Result<(), Refusal> {
        self.admit_with(more, || self.free_now())
    }

    /// [`DiskFloor::admit`] with `look` for the free space.
    fn admit_with(
        &self,
        more: u64,
        look: impl FnOnce() -> std::io::Result<u64>,
    ) -> Result<(), Refusal> {
        let floor = self.min_free();
        if floor == 0 {
            return Ok(());
        }
        let mut g = match self.seen.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let fits = |s: &Seen| s.free.saturating_sub(s.admitted) >= floor.saturating_add(more);
        let stale = match &*g {
            None => true,
            Some(s) => s.at.elapsed() >= DISK_CHECK || (!fits(s) && s.at.elapsed() >= DISK_RECHECK),
        };
        if stale {
            match look() {
                Ok(free) => {
                    *g = Some(Seen {
                        at: Instant::now(),
                        free,
                        admitted: 0,
                    })
                }
                Err(e) => {
                    tracing::warn!(
                        path = %self.path.display(),
                        "cannot read the free space of the packs' file system ({e}); min_free \
                         is not enforced until it can"
                    );
                    *g = None;
                    return Ok(());
                }
            }
        }
        let Some(s) = g.as_mut() else {
            return Ok(());
        };
        if fits(s) {
            s.admitted = s.admitted.saturating_add(more);
            Ok(())
        } else {
            Err(Refusal::DiskFloor {
                path: self.path.display().to_string(),
                free: s.free.saturating_sub(s.admitted),
                min_free: floor,
            })
        }
    }
}

/// Size of the file system holding `path`, from `statvfs`.
pub fn fs_size(path: &std::path::Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok((s.blocks() as u64).saturating_mul(s.fragment_size() as u64))
}

/// One repository's limits: its quota, and the receiver's disk floor. Unlimited until
/// `serve` sets them.
#[derive(Default)]
pub struct Limits {
    /// Bytes (0: none).
    quota: AtomicU64,
    floor: OnceLock<Arc<DiskFloor>>,
    /// Set while chunks are refused, so the log says so once, not per chunk.
    refusing: AtomicBool,
}

impl Limits {
    /// Sets the quota (0: none).
    pub fn set_quota(&self, bytes: u64) {
        self.quota.store(bytes, Ordering::Relaxed);
    }

    /// The quota in bytes (0: none).
    pub fn quota(&self) -> u64 {
        self.quota.load(Ordering::Relaxed)
    }

    /// Applies the receiver's disk floor (once; later calls keep the first).
    pub fn set_floor(&self, floor: Arc<DiskFloor>) {
        let _ = self.floor.set(floor);
    }

    /// Whether a repository using `used` bytes may take `more`: within its quota, and
    /// leaving the disk floor free.
    pub fn admit(&self, repo: &RepoName, used: u64, more: u64) -> Result<(), Refusal> {
        let r = self
            .check_quota(repo, used, more)
            .and_then(|()| match self.floor.get() {
                Some(f) => f.admit(more),
                None => Ok(()),
            });
        match &r {
            Ok(()) => {
                if self.refusing.swap(false, Ordering::Relaxed) {
                    tracing::info!(repo = %repo, "new chunks are accepted again");
                }
            }
            Err(e) => {
                if !self.refusing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(repo = %repo, "refusing new chunks: {e}");
                }
            }
        }
        r
    }

    /// The quota part of [`Limits::admit`] alone (no disk accounting).
    pub fn check_quota(&self, repo: &RepoName, used: u64, more: u64) -> Result<(), Refusal> {
        let quota = self.quota();
        if quota > 0 && used.saturating_add(more) > quota {
            return Err(Refusal::Quota {
                repo: repo.to_string(),
                used,
                quota,
            });
        }
        Ok(())
    }
}

/// Refuses a `PutFiles` whose new chunks would take the repository past its quota before
/// any of them is stored (so nothing of the request is). The cheap sum of all its chunks
/// decides unless it is near the quota; then only the chunks the repository lacks count.
pub fn room_for(repo: &Repo, chunks: &[SealedChunk]) -> Result<(), RepoError> {
    let size = |c: &SealedChunk| RECORD_HEADER_LEN + c.sealed.len() as u64;
    let all: u64 = chunks.iter().map(size).sum();
    if repo
        .limits
        .check_quota(repo.name(), repo.used_bytes(), all)
        .is_ok()
    {
        return Ok(());
    }
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    let missing: HashSet<ChunkId> = repo.missing(&ids)?.into_iter().collect();
    let new: u64 = chunks
        .iter()
        .filter(|c| missing.contains(&c.id))
        .map(size)
        .sum();
    repo.limits
        .check_quota(repo.name(), repo.used_bytes(), new)
        .map_err(RepoError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_fractions() {
        for (text, want) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("500GiB", 500 << 30),
            ("500 GiB", 500 << 30),
            ("1TiB", 1 << 40),
            ("5gib", 5 << 30),
            ("5G", 5 << 30),
            ("64MiB", 64 << 20),
            ("1.5KiB", 1536),
            ("2GB", 2_000_000_000),
            ("10B", 10),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "GiB",
            "-1",
            "1.",
            ".5G",
            "5 XB",
            "1.2.3G",
            "1e9",
            "99999999999TiB",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains("not a size"), "{e}");
        }
    }

    #[test]
    fn percentages_parse_within_bounds() {
        assert_eq!(parse_percent("90%"), Ok(90));
        assert_eq!(parse_percent("100%"), Ok(100));
        assert_eq!(parse_percent("1"), Ok(1));
        for bad in ["0%", "101%", "90.5%", "ninety", ""] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn states_and_human_sizes() {
        assert_eq!(QuotaState::of(10, 0, 90), QuotaState::Ok);
        assert_eq!(QuotaState::of(89, 100, 90), QuotaState::Ok);
        assert_eq!(QuotaState::of(90, 100, 90), QuotaState::Warning);
        assert_eq!(QuotaState::of(100, 100, 90), QuotaState::Over);
        assert_eq!(human(500 << 30), "500 GiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(12), "12 B");
    }

    #[test]
    fn the_quota_refuses_only_what_would_pass_it() {
        let l = Limits::default();
        let r = RepoName::new("laptop").expect("name");
        assert!(
            l.admit(&r, u64::MAX - 1, 1 << 30).is_ok(),
            "no quota by default"
        );
        l.set_quota(1000);
        assert!(l.admit(&r, 900, 100).is_ok());
        let e = l.admit(&r, 901, 100).expect_err("over");
        assert_eq!(
            e.to_string(),
            "repository laptop is over its quota: 901 B of 1000 B used; ask the receiver's \
             operator or let retention free space"
        );
    }

    #[test]
    fn the_disk_floor_counts_what_it_admitted_since_it_looked() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = DiskFloor::new(d.path().to_path_buf(), 0);
        assert!(f.admit(u64::MAX).is_ok(), "no floor");
        assert!(f.free_now().expect("statvfs") > 0);
        // 10 MiB free, a floor of 9 MiB: a first 512 KiB fits, then the bytes admitted
        // since the look are counted against it, without looking again.
        f.set_min_free(9 << 20);
        f.admit_with(512 << 10, || Ok(10 << 20)).expect("fits");
        let e = f
            .admit_with(1 << 20, || panic!("looked again within DISK_CHECK"))
            .expect_err("past the floor");
        assert_eq!(
            e.to_string(),
            format!(
                "the receiver's disk is nearly full: 9.5 MiB free on {}, below its min_free \
                 of 9 MiB; every repository is refused new chunks until its operator frees \
                 space",
                d.path().display()
            )
        );
        // Once freed (looked at again after DISK_RECHECK), it admits.
        std::thread::sleep(DISK_RECHECK);
        f.admit_with(1 << 20, || Ok(100 << 20)).expect("room again");
        // A floor above what the disk has: refused from the first byte.
        let g = DiskFloor::new(d.path().to_path_buf(), u64::MAX / 2);
        assert!(matches!(g.admit(1), Err(Refusal::DiskFloor { .. })));
        // A path that cannot be looked at: admitted.
        let h = DiskFloor::new(d.path().join("missing"), 1);
        assert!(h.admit(1).is_ok());
    }

    #[test]
    fn a_repository_counts_its_pack_bytes_and_refuses_past_its_quota() {
        use crate::layout::Layout;
        use crate::store::{LocalPacks, PACK_HEADER_LEN};

        let d = tempfile::tempdir().expect("tempdir");
        let name = RepoName::new("laptop").expect("name");
        let dir = Layout::new(d.path()).repo(&name);
        let open = || {
            let packs = Arc::new(LocalPacks::new(dir.packs()));
            Repo::open(&dir, name.clone(), packs, 64 << 20)
                .expect("open")
                .0
        };
        let chunk = |i: u8| (ChunkId([i; 32]), vec![i; 1000]);
        let rec = RECORD_HEADER_LEN + 1000;
        let r = open();
        assert_eq!(r.used_bytes(), 0);
        r.limits.set_quota(PACK_HEADER_LEN + 2 * rec);
        for i in 0..2 {
            let (id, sealed) = chunk(i);
            assert!(r.put(&id, &sealed).expect("fits"));
        }
        assert_eq!(r.used_bytes(), PACK_HEADER_LEN + 2 * rec);
        // One more would pass the quota: refused, nothing written.
        let (id, sealed) = chunk(2);
        match r.put(&id, &sealed) {
            Err(RepoError::Refused(Refusal::Quota { used, quota, .. })) => {
                assert_eq!((used, quota), (PACK_HEADER_LEN + 2 * rec, used));
            }
            other => panic!("expected a quota refusal, got {other:?}"),
        }
        assert_eq!(r.used_bytes(), PACK_HEADER_LEN + 2 * rec);
        // A chunk already held is not new: no refusal.
        let (id0, sealed0) = chunk(0);
        assert!(!r.put(&id0, &sealed0).expect("present"));
        r.flush(&[]).expect("flush");
        drop(r);
        // Counted again at open; a raised quota lets it grow.
        let r = open();
        assert_eq!(r.used_bytes(), PACK_HEADER_LEN + 2 * rec);
        r.limits.set_quota(0);
        assert!(r.put(&id, &sealed).expect("no quota"));
        assert_eq!(r.used_bytes(), PACK_HEADER_LEN + 3 * rec);
    }
}
