//! `status` and `scrub`: what the backup tree holds, and whether every record is intact.
//! Both only read; they can run while `serve` does.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::auth::{Authorizations, RepoName};
use crate::index::{Index, Mode, Stats};
use crate::layout::{Layout, RepoDir};
use crate::quota::{fs_size, human, DiskFloor, QuotaState};
use crate::store::{read_record, Check, PackStore, PackStores, RecordError};
use crate::Error;
use coffer_common::host::fs::Context;
use coffer_common::host::lock;
use coffer_common::host::time::rfc3339;

/// One repository in `status`.
#[derive(Clone, Debug, Serialize)]
pub struct RepoStatus {
    pub name: String,
    /// Agent keys authorized to write it.
    pub keys: Vec<String>,
    /// Distinct file ids with at least one version.
    pub files: u64,
    pub versions: u64,
    pub chunks: u64,
    /// Sum of the sealed chunks' lengths.
    pub chunk_bytes: u64,
    /// Bytes of pack files on disk.
    pub stored_bytes: u64,
    pub packs: u64,
    /// RFC 3339, UTC.
    pub last_commit_at: Option<String>,
    /// Its quota in bytes (0: none), from `receiver.toml` as it is now.
    pub quota: u64,
    /// Bytes its packs hold: what the quota counts.
    pub used: u64,
    /// `ok`, `warning` (past `warn_at` of the quota) or `over` (new chunks refused).
    pub quota_state: &'static str,
}

/// The whole `status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub root: String,
    pub receiver_key: String,
    /// Whether a `serve` holds this root's lock.
    pub serve_running: bool,
    /// The address the running `serve` listens on (from `serve.addr`).
    pub serve_addr: Option<String>,
    /// The configured listen address.
    pub listen: String,
    /// `warn_at`, in percent of a quota.
    pub warn_at: u32,
    /// The free-space floor in bytes (0: none) and the free space of the packs' file
    /// system; below the floor every repository is refused new chunks.
    pub min_free: u64,
    pub disk_free: Option<u64>,
    /// `ok`, or `below min_free`.
    pub disk_state: &'static str,
    pub repositories: Vec<RepoStatus>,
}

/// True when a `serve` holds the root's lock.
pub fn serve_running(layout: &Layout) -> Result<bool, Error> {
    Ok(lock::is_held(&layout.serve_lock())?)
}

/// Repository names: every directory under `repos/` plus every authorized one.
fn repo_names(layout: &Layout, auth: &Authorizations) -> Result<Vec<RepoName>, Error> {
    let mut names: Vec<RepoName> = auth.iter().map(|(_, r)| r.clone()).collect();
    let dir = layout.repos();
    if dir.exists() {
        for e in std::fs::read_dir(&dir).ctx("listing", &dir)? {
            let e = e.ctx("listing", &dir)?;
            if let Some(n) = e.file_name().to_str().and_then(|n| RepoName::new(n).ok()) {
                if e.path().is_dir() {
                    names.push(n);
                }
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Gathers `status`; each repository's packs are in the store `stores` gives.
pub fn status(layout: &Layout, stores: &dyn PackStores) -> Result<Status, Error> {
    let config = layout.load_config()?;
    let key = layout.load_keypair()?.public();
    let auth = Authorizations::load(&layout.authorized())?;
    let running = serve_running(layout)?;
    let serve_addr = if running {
        std::fs::read_to_string(layout.serve_addr())
            .ok()
            .map(|s| s.trim().to_string())
    } else {
        None
    };
    let mut keys: BTreeMap<RepoName, Vec<String>> = BTreeMap::new();
    for (k, r) in auth.iter() {
        keys.entry(r.clone()).or_default().push(k.to_string());
    }
    let mut repositories = Vec::new();
    for name in repo_names(layout, &auth)? {
        let dir = layout.repo(&name);
        let index = dir.index();
        let stats = if index.exists() {
            Index::open(&index, Mode::Read)?.stats()?
        } else {
            Stats::default()
        };
        let (mut packs, mut stored) = (0u64, 0u64);
        let store = stores.open(&dir);
        for p in store.list()? {
            packs += 1;
            stored += store.len(p)?;
        }
        let quota = config.quota_of(&name);
        repositories.push(RepoStatus {
            quota,
            used: stored,
            quota_state: QuotaState::of(stored, quota, config.warn_at.0).as_str(),
            keys: keys.remove(&name).unwrap_or_default(),
            name: name.to_string(),
            files: stats.files,
            versions: stats.versions,
            chunks: stats.chunks,
            chunk_bytes: stats.chunk_bytes,
            stored_bytes: stored,
            packs,
            last_commit_at: stats.last_commit.map(rfc3339),
        });
    }
    let disk = if layout.repos().is_dir() {
        layout.repos()
    } else {
        layout.root().to_path_buf()
    };
    let min_free = config.min_free_for(fs_size(&disk).unwrap_or(0));
    let floor = DiskFloor::new(disk, min_free);
    let disk_free = floor.free_now().ok();
    Ok(Status {
        warn_at: config.warn_at.0,
        min_free,
        disk_free,
        disk_state: match disk_free {
            Some(f) if min_free > 0 && f < min_free => "below min_free",
            _ => "ok",
        },
        root: layout.root().display().to_string(),
        receiver_key: key.to_string(),
        serve_running: running,
        serve_addr,
        listen: config.listen.to_string(),
        repositories,
    })
}

fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[u])
    }
}

impl Status {
    /// The human-readable form.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("root:          {}\n", self.root));
        s.push_str(&format!("receiver key:  {}\n", self.receiver_key));
        match (&self.serve_running, &self.serve_addr) {
            (true, Some(a)) => s.push_str(&format!("serve:         running, listening on {a}\n")),
            (true, None) => s.push_str("serve:         running\n"),
            (false, _) => s.push_str(&format!(
                "serve:         not running (configured to listen on {})\n",
                self.listen
            )),
        }
        if let Some(free) = self.disk_free {
            let floor = match self.min_free {
                0 => "no min_free".to_string(),
                m => format!("min_free {}", human(m)),
            };
            let below = if self.disk_state == "ok" {
                ""
            } else {
                ": BELOW min_free, new chunks are refused for every repository"
            };
            s.push_str(&format!(
                "disk:          {} free ({floor}){below}\n",
                human(free)
            ));
        }
        s.push_str(&format!("repositories:  {}\n", self.repositories.len()));
        for r in &self.repositories {
            s.push_str(&format!("\n{}\n", r.name));
            if r.keys.is_empty() {
                s.push_str("  keys:        none authorized\n");
            }
            for k in &r.keys {
                s.push_str(&format!("  key:         {k}\n"));
            }
            s.push_str(&format!("  files:       {}\n", r.files));
            s.push_str(&format!("  versions:    {}\n", r.versions));
            s.push_str(&format!(
                "  chunks:      {} ({})\n",
                r.chunks,
                bytes(r.chunk_bytes)
            ));
            s.push_str(&format!(
                "  stored:      {} in {} pack{}\n",
                bytes(r.stored_bytes),
                r.packs,
                if r.packs == 1 { "" } else { "s" }
            ));
            s.push_str(&format!(
                "  last commit: {}\n",
                r.last_commit_at.as_deref().unwrap_or("never")
            ));
            if r.quota > 0 {
                let pct = (r.used as f64 * 100.0 / r.quota as f64).round();
                let state = match r.quota_state {
                    "over" => " OVER QUOTA: new chunks are refused".to_string(),
                    "warning" => format!(" WARNING: past {}%", self.warn_at),
                    _ => String::new(),
                };
                s.push_str(&format!(
                    "  quota:       {} of {} used ({pct}%){state}\n",
                    human(r.used),
                    human(r.quota)
                ));
            }
        }
        s
    }
}

/// A record `scrub` found damaged.
#[derive(Clone, Debug, Serialize)]
pub struct Damage {
    pub repo: String,
    pub pack: String,
    pub offset: u64,
    pub chunk: String,
    pub why: String,
}

/// What `scrub` checked.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScrubReport {
    pub repositories: usize,
    pub records: u64,
    pub bytes: u64,
    pub damaged: Vec<Damage>,
}

/// Reads back every indexed record of every repository (from the store `stores` gives)
/// and checks it against its header and hash; `on_damage` is called for each damaged one
/// as it is found.
pub fn scrub(
    layout: &Layout,
    stores: &dyn PackStores,
    mut on_damage: impl FnMut(&Damage),
) -> Result<ScrubReport, Error> {
    layout.load_config()?;
    let auth = Authorizations::load(&layout.authorized())?;
    let mut report = ScrubReport::default();
    for name in repo_names(layout, &auth)? {
        let dir = layout.repo(&name);
        if !dir.index().exists() {
            continue;
        }
        report.repositories += 1;
        let store = stores.open(&dir);
        scrub_repo(&name, &dir, &*store, &mut report, &mut on_damage)?;
    }
    Ok(report)
}

fn scrub_repo(
    name: &RepoName,
    dir: &RepoDir,
    store: &dyn PackStore,
    report: &mut ScrubReport,
    on_damage: &mut impl FnMut(&Damage),
) -> Result<(), Error> {
    let ix = Index::open(&dir.index(), Mode::Read)?;
    let mut fatal = None;
    ix.for_each_chunk(|row| {
        report.records += 1;
        report.bytes += row.loc.len as u64;
        let why = match read_record(store, &row.id, &row.loc, Check::Full) {
            Ok(_) => return true,
            Err(RecordError::Damaged { why, .. }) => why,
            Err(RecordError::Io(e)) if e.source.kind() == std::io::ErrorKind::NotFound => {
                "the pack file is missing".to_string()
            }
            Err(RecordError::Io(e)) => {
                if e.source.raw_os_error() == Some(libc::EIO) {
                    e.to_string()
                } else {
                    fatal = Some(e);
                    return false;
                }
            }
        };
        let d = Damage {
            repo: name.to_string(),
            pack: store.describe(row.loc.pack),
            offset: row.loc.offset,
            chunk: row.id.to_hex(),
            why,
        };
        on_damage(&d);
        report.damaged.push(d);
        true
    })?;
    if let Some(e) = fatal {
        return Err(e.into());
    }
    for (p, len) in ix.pack_lengths()? {
        if let Ok(actual) = store.len(p) {
            if actual > len {
                tracing::info!(
                    repo = %name,
                    "{} has {} bytes past its indexed end (an unclean stop, or a batch in \
                     progress); the next serve re-indexes or cuts them",
                    store.describe(p),
                    actual - len
                );
            }
        }
    }
    Ok(())
}
