//! `status` and `scrub`: what the backup tree holds, and whether every record is intact
//! and the index agrees with the packs (both ways). Both only read; they can run while
//! `serve` does.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::auth::{Authorizations, RepoName};
use crate::index::{Index, IndexError, Mode, Stats};
use crate::layout::{Layout, RepoDir};
use crate::quota::{fs_size, human, DiskFloor, QuotaState};
use crate::records::{CommitRecord, Header};
use crate::repair::Problem;
use crate::store::{
    read_record, Check, PackNo, PackStore, PackStores, RecordError, PACK_HEADER_LEN,
    RECORD_HEADER_LEN,
};
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

/// Most problems `scrub --json` lists per repository (all are counted and printed).
pub const MAX_LISTED: usize = 10_000;

/// What `scrub` found in one repository.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepoScrub {
    pub name: String,
    /// Chunk rows read back and checked against their hash.
    pub chunks: u64,
    pub chunk_bytes: u64,
    /// Versions checked against their commit records.
    pub versions: u64,
    /// Commit records found in the packs' indexed parts.
    pub commit_records: u64,
    /// Versions without a commit record yet (the upgrade writes them): not damage.
    pub upgrade_pending: u64,
    /// Every problem found; the first [`MAX_LISTED`] are in `problems`.
    pub problems_total: u64,
    pub problems: Vec<Problem>,
}

/// What `scrub` checked.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScrubReport {
    pub repositories: usize,
    pub records: u64,
    pub bytes: u64,
    pub damaged: Vec<Damage>,
    pub repos: Vec<RepoScrub>,
}

impl ScrubReport {
    /// Problems of every kind, in every repository.
    pub fn problems(&self) -> u64 {
        self.repos.iter().map(|r| r.problems_total).sum()
    }
}

/// Checks every repository (or the one named `only`), packs from the store `stores`
/// gives: each indexed chunk record is read back and checked against its hash; each
/// version against its commit record; each commit record in the packs' indexed parts
/// against the index; each reference against the chunks indexed. `on_problem` is called
/// for each problem as it is found (damaged chunk records also as a [`Damage`]).
pub fn scrub(
    layout: &Layout,
    stores: &dyn PackStores,
    only: Option<&str>,
    mut on_problem: impl FnMut(&str, &Problem, Option<&Damage>),
) -> Result<ScrubReport, Error> {
    layout.load_config()?;
    let auth = Authorizations::load(&layout.authorized())?;
    let names = match only {
        Some(n) => {
            let name = RepoName::new(n).map_err(crate::auth::AuthError::from)?;
            if !layout.repo(&name).path().is_dir() {
                return Err(crate::repair::RepairError::NoSuchRepo {
                    name: n.to_string(),
                    dir: layout.repos(),
                }
                .into());
            }
            vec![name]
        }
        None => repo_names(layout, &auth)?,
    };
    let mut report = ScrubReport::default();
    for name in names {
        let dir = layout.repo(&name);
        let store = stores.open(&dir);
        let mut rs = RepoScrub {
            name: name.to_string(),
            ..RepoScrub::default()
        };
        let mut problem = |rs: &mut RepoScrub, p: Problem, d: Option<&Damage>| {
            on_problem(name.as_str(), &p, d);
            rs.problems_total += 1;
            if rs.problems.len() < MAX_LISTED {
                rs.problems.push(p);
            }
        };
        if !dir.index().exists() {
            let has_records = store
                .list()?
                .iter()
                .any(|&p| store.len(p).is_ok_and(|l| l > PACK_HEADER_LEN));
            if has_records {
                report.repositories += 1;
                problem(
                    &mut rs,
                    Problem {
                        kind: "missing_index",
                        detail: format!(
                            "{} is missing; serve rebuilds it from the packs when it opens the \
                             repository, or run `coffer-receiver repair`",
                            dir.index().display()
                        ),
                        ..Problem::default()
                    },
                    None,
                );
                report.repos.push(rs);
            }
            continue;
        }
        report.repositories += 1;
        let r = scrub_repo(&dir, &*store, &mut report, &mut rs, &mut problem);
        match r {
            Ok(()) => {}
            Err(Error::Index(e)) if matches!(&e, IndexError::Db(d) if d.is_corrupt()) => {
                problem(
                    &mut rs,
                    Problem {
                        kind: "damaged_index",
                        detail: format!("{e}; run `coffer-receiver repair`"),
                        ..Problem::default()
                    },
                    None,
                );
            }
            Err(e) => return Err(e),
        }
        report.repos.push(rs);
    }
    Ok(report)
}

type OnProblem<'a> = dyn FnMut(&mut RepoScrub, Problem, Option<&Damage>) + 'a;

fn scrub_repo(
    dir: &RepoDir,
    store: &dyn PackStore,
    report: &mut ScrubReport,
    rs: &mut RepoScrub,
    problem: &mut OnProblem<'_>,
) -> Result<(), Error> {
    let name = dir.name();
    let ix = Index::open(&dir.index(), Mode::Read)?;
    // 1. Every indexed chunk record, read back in pack order.
    let mut fatal = None;
    ix.for_each_chunk(|row| {
        report.records += 1;
        report.bytes += row.loc.len as u64;
        rs.chunks += 1;
        rs.chunk_bytes += row.loc.len as u64;
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
            repo: name.clone(),
            pack: store.describe(row.loc.pack),
            offset: row.loc.offset,
            chunk: row.id.to_hex(),
            why,
        };
        problem(
            rs,
            Problem {
                kind: "damaged_chunk",
                pack: Some(d.pack.clone()),
                offset: Some(d.offset),
                chunk: Some(d.chunk.clone()),
                detail: d.why.clone(),
                ..Problem::default()
            },
            Some(&d),
        );
        report.damaged.push(d);
        true
    })?;
    if let Some(e) = fatal {
        return Err(e.into());
    }
    // 2. Every version against its commit record.
    ix.for_each_version(|v| {
        rs.versions += 1;
        if v.record.is_none() {
            rs.upgrade_pending += 1;
            return true;
        }
        if let Some((kind, why)) = crate::repair::record_disagrees(store, v) {
            let (pack, offset) = v
                .record
                .map_or((None, None), |(p, o)| (Some(store.describe(p)), Some(o)));
            problem(
                rs,
                Problem {
                    kind,
                    version: Some(v.version),
                    pack,
                    offset,
                    detail: format!("version {}: {why}", v.version),
                    ..Problem::default()
                },
                None,
            );
        }
        true
    })?;
    // 3. Every commit record in the packs' indexed parts is indexed, at its location.
    for (p, len) in ix.pack_lengths()? {
        commit_records_of(&ix, store, p, len, rs, problem)?;
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
    // 4. Every reference resolves to an indexed chunk.
    let mut found = Vec::new();
    ix.unresolved_references(|version, file, chunk| {
        if found.len() < MAX_LISTED {
            found.push((version, file, chunk));
        }
    })?;
    for (version, file, chunk) in found {
        let file: String = file.0.iter().map(|b| format!("{b:02x}")).collect();
        problem(
            rs,
            Problem {
                kind: "unresolved_reference",
                version: Some(version),
                chunk: Some(chunk.to_hex()),
                detail: format!(
                    "version {version} of file {file} references chunk {} that is not indexed",
                    chunk.to_hex()
                ),
                ..Problem::default()
            },
            None,
        );
    }
    Ok(())
}

/// Walks the records of `pack` up to its indexed length `len` by their headers, and
/// checks that each commit record is indexed at its location (or is a repeat of a commit
/// indexed elsewhere). Only commit records' bodies are read; chunk records are checked
/// by step 1.
fn commit_records_of(
    ix: &Index,
    store: &dyn PackStore,
    pack: PackNo,
    len: u64,
    rs: &mut RepoScrub,
    problem: &mut OnProblem<'_>,
) -> Result<(), Error> {
    let describe = store.describe(pack);
    let mut at = PACK_HEADER_LEN;
    let mut head = [0u8; RECORD_HEADER_LEN as usize];
    let mut body = Vec::new();
    while at + RECORD_HEADER_LEN <= len {
        match store.read_at(pack, at, &mut head) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                // A missing or short pack: its chunk rows are reported by step 1.
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let Some(h) = Header::decode(&head) else {
            problem(
                rs,
                Problem {
                    kind: "unreadable",
                    pack: Some(describe.clone()),
                    offset: Some(at),
                    detail: format!(
                        "no record header where one should start; the {} bytes after it up to \
                         the indexed end could not be walked (run `coffer-receiver repair`)",
                        len - at
                    ),
                    ..Problem::default()
                },
                None,
            );
            return Ok(());
        };
        if at + h.record_len() > len {
            break;
        }
        if let Header::Commit(c) = h {
            rs.commit_records += 1;
            body.resize(c.len as usize, 0);
            store.read_at(pack, at + RECORD_HEADER_LEN, &mut body)?;
            let intact = blake3::hash(&body).as_bytes() == &c.hash;
            let rec = if intact {
                CommitRecord::decode(&c, &body).ok()
            } else {
                None
            };
            match rec {
                Some(rec) => {
                    let indexed_here = ix
                        .version_at(rec.version)?
                        .is_some_and(|v| v.record == Some((pack, at)));
                    if !indexed_here
                        && ix
                            .version_of_commit(&rec.file_id, &rec.commit_id)?
                            .is_none()
                        && !ix.is_removed(&rec.file_id, &rec.commit_id, rec.version)?
                    {
                        problem(
                            rs,
                            Problem {
                                kind: "unindexed_record",
                                version: Some(rec.version),
                                pack: Some(describe.clone()),
                                offset: Some(at),
                                detail: format!(
                                    "the commit record of version {} is not in the index",
                                    rec.version
                                ),
                                ..Problem::default()
                            },
                            None,
                        );
                    }
                }
                None => {
                    // Step 2 names it when its version is indexed here; else here.
                    let claimed = body
                        .get(16..24)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map(u64::from_le_bytes);
                    let named = match claimed {
                        Some(v) => ix
                            .version_at(v)?
                            .is_some_and(|iv| iv.record == Some((pack, at))),
                        None => false,
                    };
                    if !named {
                        problem(
                            rs,
                            Problem {
                                kind: "damaged_commit",
                                version: claimed,
                                pack: Some(describe.clone()),
                                offset: Some(at),
                                detail: format!(
                                    "a commit record {}{}",
                                    if intact {
                                        "that does not decode"
                                    } else {
                                        "whose bytes do not match their hash"
                                    },
                                    claimed
                                        .map(|v| format!(" (it reads as version {v})"))
                                        .unwrap_or_default()
                                ),
                                ..Problem::default()
                            },
                            None,
                        );
                    }
                }
            }
        }
        if let Header::Removal(r) = h {
            // Removals `prune` made: intact, or versions they removed may come back.
            body.resize(r.len as usize, 0);
            store.read_at(pack, at + RECORD_HEADER_LEN, &mut body)?;
            let why = if blake3::hash(&body).as_bytes() != &r.hash {
                Some("its bytes do not match their hash".to_string())
            } else {
                crate::records::RemovalRecord::decode(&body)
                    .err()
                    .map(|e| format!("it does not decode: {e}"))
            };
            if let Some(why) = why {
                problem(
                    rs,
                    Problem {
                        kind: "damaged_removal",
                        pack: Some(describe.clone()),
                        offset: Some(at),
                        detail: format!(
                            "a removal record that {why}; versions it removed may be listed \
                             again by a repair"
                        ),
                        ..Problem::default()
                    },
                    None,
                );
            }
        }
        at += h.record_len();
    }
    Ok(())
}
