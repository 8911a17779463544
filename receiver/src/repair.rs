//! `coffer-receiver repair`, and what opening a repository does when its index is missing
//! or damaged: the packs are the repository, and `index.sqlite` is rebuilt from them.
//!
//! A rebuild reads every pack in order with the salvaging scan ([`crate::salvage`]): each
//! intact chunk record becomes a chunk row, each intact commit record a version with its
//! own number, time, deletion flag, manifest and references (a commit recorded twice keeps
//! its highest version); damaged records and unreadable stretches are reported and skipped;
//! a torn tail is cut (truncate + fsync) as recovery does, and each pack's row holds the
//! length of its valid part. Then every reference to a chunk no pack holds intact is
//! reported ("version V of file F lost chunk C"); the version is kept, it is history.
//!
//! The new index is built in `index.sqlite.repair` (no journal, no fsync until it is
//! whole), closed without a `-wal`, fsynced; the old index's `-wal` and `-shm` are removed
//! and the new file renamed over `index.sqlite`, then the folder is fsynced. A kill at any
//! point leaves the old index or the new one, and the packs lose nothing but torn tails;
//! while `index.sqlite.repair` exists `serve` refuses the repository, and the next
//! `repair` starts over.
//!
//! Opening a repository ([`open_index`]) rebuilds a missing index with the same code when
//! the packs hold commit records, and refuses a damaged one ([`NeedsRepair`]), naming the
//! command to run.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use coffer_common::chunk::ChunkId;
use coffer_common::host::fs::{sync_dir, Context, IoError};
use coffer_common::host::lock::{Lock, LockError, Wait};
use serde::Serialize;

use crate::auth::RepoName;
use crate::index::{Added, Index, IndexError, IndexedVersion, Mode, RecordedRemoval};
use crate::layout::{Layout, RepoDir};
use crate::records::{CommitRecord, Header, RemovalRecord};
use crate::salvage::{salvage, Salvaged};
use crate::store::{
    header_ok, pack_header, read_record, Check, PackStore, PackStores, RecordError,
    PACK_HEADER_LEN, RECORD_HEADER_LEN,
};

/// Records added to the new index per transaction.
const BATCH: u64 = 50_000;
/// An index up to this size (about a million chunks) is checked page by page (`PRAGMA
/// quick_check`, measured at 0.15 s for an 80 MB index with a warm cache) when its
/// repository is opened; a larger one by samples only.
const QUICK_CHECK_MAX: u64 = 256 << 20;
/// Largest version number a damaged commit record may reserve (beyond it, the number is
/// taken for damage, not a version).
const MAX_RESERVED: u64 = 1 << 48;
/// Chunk rows (at each end) and newest versions read back when a repository is opened.
const SAMPLE: usize = 4;

/// A repository whose index cannot be used: `serve` refuses it (only it) until `repair`.
#[derive(Debug, thiserror::Error)]
#[error(
    "repository {repo} needs repair: {why}; stop `coffer-receiver serve` and run \
     `coffer-receiver repair --root {} --repo {repo}`",
    root.display()
)]
pub struct NeedsRepair {
    pub repo: String,
    pub root: PathBuf,
    pub why: String,
}

impl NeedsRepair {
    fn new(dir: &RepoDir, why: impl Into<String>) -> Self {
        Self {
            repo: dir.name(),
            root: dir.root().to_path_buf(),
            why: why.into(),
        }
    }
}

/// Errors of `repair`.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(
        "coffer-receiver serve is running on {} (it holds {}); stop it first: repair \
         replaces the indexes serve has open",
        .0.display(),
        .0.join("serve.lock").display()
    )]
    Serving(PathBuf),
    #[error("no repository {name} under {}", dir.display())]
    NoSuchRepo { name: String, dir: PathBuf },
    #[error(
        "repository {repo}: its index lists {count} versions that have no commit record in \
         the packs yet (an older receiver wrote them; `serve` writes their records when it \
         opens the repository), so a rebuild from the packs would lose them. Start serve \
         once to write them, then repair; if the index is beyond use, remove {}* and \
         repair (those versions are then lost)",
        index.display()
    )]
    Unrecorded {
        repo: String,
        count: u64,
        index: PathBuf,
    },
}

/// One thing a rebuild or `scrub` found wrong, as `scrub --json` prints it.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// `damaged_chunk`, `damaged_commit`, `damaged_removal`, `unreadable`, `damaged_pack_header`,
    /// `version_conflict`, `lost_chunk`, `missing_record`, `record_mismatch`,
    /// `unindexed_record`, `no_commit_records`.
    pub kind: &'static str,
    pub version: Option<u64>,
    /// The pack file (its path).
    pub pack: Option<String>,
    pub offset: Option<u64>,
    /// A chunk id, hex.
    pub chunk: Option<String>,
    pub detail: String,
}

impl Problem {
    /// One line for a terminal: `repository R: ... : detail`.
    pub fn line(&self, repo: &str) -> String {
        let mut s = format!("repository {repo}");
        if let Some(v) = self.version {
            s.push_str(&format!(" version {v}"));
        }
        if let Some(p) = &self.pack {
            s.push_str(&format!(" pack {p}"));
        }
        if let Some(o) = self.offset {
            s.push_str(&format!(" offset {o}"));
        }
        if let Some(c) = &self.chunk {
            s.push_str(&format!(" chunk {c}"));
        }
        format!("{}: {s}: {}", self.kind, self.detail)
    }
}

/// What rebuilding one repository's index found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rebuilt {
    pub packs: u64,
    pub chunks: u64,
    /// Versions indexed from commit records.
    pub versions: u64,
    /// Commit records read (duplicates included).
    pub commit_records: u64,
    /// Commit records of a commit already indexed (the highest version kept).
    pub duplicates: u64,
    /// Damaged records, unreadable stretches, undecodable commit records, conflicts.
    pub damaged: u64,
    /// Versions with at least one chunk no pack holds intact.
    pub versions_lost_chunks: u64,
    /// Torn tails cut, in bytes.
    pub cut_bytes: u64,
    /// Removal records read (copies included).
    pub removal_records: u64,
    /// Versions whose commit records the packs still hold but a removal record names
    /// (removed by `prune`): left out.
    pub removed: u64,
}

impl Rebuilt {
    /// True when the packs hold chunks but not one commit record: written before commit
    /// records existed, so versions cannot be rebuilt from them.
    pub fn no_commit_records(&self) -> bool {
        self.commit_records == 0 && self.chunks > 0
    }

    /// True when something was lost or damaged (`repair` then exits 1).
    pub fn lost_anything(&self) -> bool {
        self.damaged > 0 || self.versions_lost_chunks > 0 || self.no_commit_records()
    }
}

/// Shows a rebuild's progress: a bar on a terminal, nothing otherwise.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A bar on stderr when it is a terminal.
    pub fn on_terminal() -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let b = indicatif::ProgressBar::new(0);
        if let Ok(st) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})",
        ) {
            b.set_style(st.progress_chars("=> "));
        }
        Self(Some(b))
    }

    /// No progress shown (opening a repository in `serve`).
    pub fn none() -> Self {
        Self(None)
    }

    fn start(&self, what: String, total: u64) {
        if let Some(b) = &self.0 {
            b.set_message(what);
            b.set_length(total);
            b.set_position(0);
        }
    }

    fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    fn println(&self, line: &str) {
        match &self.0 {
            Some(b) => b.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

fn remove_if_present(p: &Path) -> Result<(), IoError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(IoError::new("removing", p, e)),
    }
}

/// The version number a commit record's body claims, when its fixed part is there
/// (the body may be damaged: a claim, for the report).
fn claimed_version(body: &[u8]) -> Option<u64> {
    let b: [u8; 8] = body.get(16..24)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

/// Rebuilds the index of the repository in `dir` (packs in `store`) into
/// `index.sqlite.repair`, made durable; `on_problem` gets each problem as it is found.
/// Torn tails are cut. Nothing is swapped in: see [`swap_in`].
pub fn build(
    dir: &RepoDir,
    store: &dyn PackStore,
    progress: &Progress,
    on_problem: &mut dyn FnMut(&Problem),
) -> Result<Rebuilt, RepairError> {
    let path = dir.index_repair();
    remove_if_present(&path)?;
    let mut journal = path.clone().into_os_string();
    journal.push("-journal");
    remove_if_present(Path::new(&journal))?;
    let mut ix = Index::create_rebuild(&path)?;
    let packs = store.list()?;
    let mut lens = Vec::with_capacity(packs.len());
    for &p in &packs {
        lens.push(store.len(p)?);
    }
    progress.start(format!("repairing {}", dir.name()), lens.iter().sum());
    let mut r = Rebuilt::default();
    let mut in_tx = 0u64;
    // The highest number a damaged commit record reads as: not assigned again.
    let mut reserve = 0u64;
    for (&p, &len) in packs.iter().zip(&lens) {
        let describe = store.describe(p);
        if len <= PACK_HEADER_LEN {
            // Created, never written to: recovery gives it a fresh header when opened.
            progress.inc(len);
            continue;
        }
        if !header_ok(store, p)? {
            let pr = Problem {
                kind: "damaged_pack_header",
                pack: Some(describe.clone()),
                offset: Some(0),
                detail: "the pack header is damaged; written anew (it holds no data)".into(),
                ..Problem::default()
            };
            on_problem(&pr);
            r.damaged += 1;
            store.write_at(p, 0, &pack_header())?;
            store.sync(p)?;
        }
        let end = salvage::<RepairError>(store, p, len, |s| {
            let mut found = None;
            let mut problem = |pr: Problem| found = Some(pr);
            let step = match s {
                Salvaged::Chunk { id, loc } => {
                    ix.rebuild_chunk(&id, &loc)?;
                    r.chunks += 1;
                    RECORD_HEADER_LEN + loc.len as u64
                }
                Salvaged::Commit {
                    header,
                    offset,
                    body,
                } => {
                    r.commit_records += 1;
                    match CommitRecord::decode(&header, body) {
                        Ok(rec) => match ix.rebuild_version(&rec, (p, offset))? {
                            Added::New => r.versions += 1,
                            Added::Duplicate { .. } | Added::Replaced { .. } => r.duplicates += 1,
                            Added::Conflict => problem(Problem {
                                kind: "version_conflict",
                                version: Some(rec.version),
                                pack: Some(describe.clone()),
                                offset: Some(offset),
                                detail: format!(
                                    "another commit record already holds version {}; this one \
                                     (commit {}) was not indexed",
                                    rec.version,
                                    hex(&rec.commit_id.0)
                                ),
                                ..Problem::default()
                            }),
                        },
                        Err(why) => problem(Problem {
                            kind: "damaged_commit",
                            version: {
                                let v = claimed_version(body);
                                reserve =
                                    reserve.max(v.filter(|&v| v <= MAX_RESERVED).unwrap_or(0));
                                v
                            },
                            pack: Some(describe.clone()),
                            offset: Some(offset),
                            detail: format!("the commit record does not decode: {why}"),
                            ..Problem::default()
                        }),
                    }
                    RECORD_HEADER_LEN + body.len() as u64
                }
                Salvaged::Removal {
                    header,
                    offset,
                    body,
                } => {
                    r.removal_records += 1;
                    match RemovalRecord::decode(body) {
                        Ok(record) => ix.rebuild_removal(&RecordedRemoval {
                            record,
                            hash: header.hash,
                            at: (p, offset),
                        })?,
                        Err(why) => problem(Problem {
                            kind: "damaged_removal",
                            pack: Some(describe.clone()),
                            offset: Some(offset),
                            detail: format!(
                                "the removal record does not decode: {why}; versions it \
                                 removed may be listed again"
                            ),
                            ..Problem::default()
                        }),
                    }
                    RECORD_HEADER_LEN + body.len() as u64
                }
                Salvaged::Damaged {
                    header,
                    offset,
                    body,
                } => {
                    match header {
                        Header::Removal(_) => problem(Problem {
                            kind: "damaged_removal",
                            pack: Some(describe.clone()),
                            offset: Some(offset),
                            detail: "the removal record's bytes do not match their hash; \
                                     versions it removed may be listed again"
                                .into(),
                            ..Problem::default()
                        }),
                        Header::Chunk(c) => problem(Problem {
                            kind: "damaged_chunk",
                            pack: Some(describe.clone()),
                            offset: Some(offset),
                            chunk: Some(c.id.to_hex()),
                            detail: "the chunk record's bytes do not match their hash".into(),
                            ..Problem::default()
                        }),
                        Header::Commit(_) => {
                            r.commit_records += 1;
                            let v = claimed_version(body);
                            reserve = reserve.max(v.filter(|&v| v <= MAX_RESERVED).unwrap_or(0));
                            problem(Problem {
                                kind: "damaged_commit",
                                version: v,
                                pack: Some(describe.clone()),
                                offset: Some(offset),
                                detail: format!(
                                    "the commit record's bytes do not match their hash{}",
                                    match v {
                                        Some(v) => format!(
                                            " (it reads as version {v}, which is lost unless \
                                             recorded again)"
                                        ),
                                        None => String::new(),
                                    }
                                ),
                                ..Problem::default()
                            })
                        }
                    }
                    header.record_len()
                }
                Salvaged::Unreadable { offset, len } => {
                    problem(Problem {
                        kind: "unreadable",
                        pack: Some(describe.clone()),
                        offset: Some(offset),
                        detail: format!("{len} bytes hold no readable record; skipped"),
                        ..Problem::default()
                    });
                    len
                }
            };
            if let Some(pr) = found {
                on_problem(&pr);
                r.damaged += 1;
            }
            progress.inc(step);
            in_tx += 1;
            if in_tx >= BATCH {
                ix.rebuild_checkpoint()?;
                in_tx = 0;
            }
            Ok(())
        })?;
        if end < len {
            tracing::warn!(
                repo = %dir.name(),
                "cutting a torn tail of {} bytes at offset {end} of {describe}",
                len - end
            );
            store.truncate(p, end)?;
            r.cut_bytes += len - end;
        }
        progress.inc(len.saturating_sub(end));
        ix.rebuild_pack(p, end)?;
        r.packs += 1;
    }
    if reserve > 0 {
        ix.rebuild_reserve(reserve)?;
    }
    r.removed = ix.rebuild_apply_removals()?;
    r.versions = r.versions.saturating_sub(r.removed);
    let mut last = None;
    ix.unresolved_references(|version, file, chunk| {
        if last != Some(version) {
            r.versions_lost_chunks += 1;
            last = Some(version);
        }
        on_problem(&Problem {
            kind: "lost_chunk",
            version: Some(version),
            chunk: Some(chunk.to_hex()),
            detail: format!(
                "version {version} of file {} lost chunk {}: no pack holds it intact",
                hex(&file.0),
                chunk.to_hex()
            ),
            ..Problem::default()
        });
    })?;
    if r.no_commit_records() {
        on_problem(&Problem {
            kind: "no_commit_records",
            detail: "the packs hold chunks but no commit record (written before commit \
                     records existed): no version could be recovered, only the chunks"
                .into(),
            ..Problem::default()
        });
    }
    ix.finish_rebuild()?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .ctx("syncing", &path)?;
    Ok(r)
}

/// Puts the index [`build`] made in place of the old one: the old `-wal`, `-shm` (and any
/// `-journal`) are removed first, so SQLite never applies them to the new file; then the
/// rename, and an fsync of the folder.
pub fn swap_in(dir: &RepoDir) -> Result<(), RepairError> {
    let mut journal = dir.index().into_os_string();
    journal.push("-journal");
    for p in [dir.index_wal(), dir.index_shm(), PathBuf::from(journal)] {
        remove_if_present(&p)?;
    }
    let (from, to) = (dir.index_repair(), dir.index());
    std::fs::rename(&from, &to).ctx("renaming", &from)?;
    sync_dir(dir.path())?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What `repair` did, over every repository it rebuilt.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    pub repositories: Vec<(String, Rebuilt)>,
    /// Repositories left as they were, and why.
    pub refused: Vec<(String, String)>,
}

impl RepairReport {
    pub fn lost_anything(&self) -> bool {
        !self.refused.is_empty() || self.repositories.iter().any(|(_, r)| r.lost_anything())
    }
}

/// The repositories under `repos/` (folders with a valid name), or the one named.
pub(crate) fn repositories(
    layout: &Layout,
    only: Option<&str>,
) -> Result<Vec<RepoName>, crate::Error> {
    if let Some(n) = only {
        let name = RepoName::new(n).map_err(crate::auth::AuthError::from)?;
        let dir = layout.repo(&name);
        if !dir.path().is_dir() {
            return Err(RepairError::NoSuchRepo {
                name: n.to_string(),
                dir: layout.repos(),
            }
            .into());
        }
        return Ok(vec![name]);
    }
    let dir = layout.repos();
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir).ctx("listing", &dir)? {
        let e = e.ctx("listing", &dir)?;
        if let Some(n) = e.file_name().to_str().and_then(|n| RepoName::new(n).ok()) {
            if e.path().is_dir() {
                names.push(n);
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The versions an existing, readable index lists without a commit record (none when it
/// cannot be read: then it is what is being repaired).
fn unrecorded_in_old_index(dir: &RepoDir) -> u64 {
    if !dir.index().exists() {
        return 0;
    }
    Index::open(&dir.index(), Mode::Read)
        .and_then(|ix| ix.unrecorded_versions())
        .unwrap_or(0)
}

/// `repair`: with the root's serve lock held (refused while `serve` runs), rebuilds the
/// index of every repository (or the one named) from its packs and swaps it in. Each
/// problem is printed on stdout as it is found, then a line per repository.
pub fn repair(
    layout: &Layout,
    stores: &dyn PackStores,
    only: Option<&str>,
    progress: &Progress,
) -> Result<RepairReport, crate::Error> {
    layout.load_config()?;
    let _lock = match Lock::exclusive(
        &layout.serve_lock(),
        Wait::For(std::time::Duration::from_secs(2)),
    ) {
        Ok(l) => l,
        Err(LockError::Held { .. }) => {
            return Err(RepairError::Serving(layout.root().to_path_buf()).into())
        }
        Err(LockError::Io(e)) => return Err(e.into()),
    };
    let mut report = RepairReport::default();
    for name in repositories(layout, only)? {
        let dir = layout.repo(&name);
        let count = unrecorded_in_old_index(&dir);
        if count > 0 {
            let e = RepairError::Unrecorded {
                repo: name.to_string(),
                count,
                index: dir.index(),
            };
            progress.println(&format!("repository {name}: NOT repaired: {e}"));
            report.refused.push((name.to_string(), e.to_string()));
            continue;
        }
        let store = stores.open(&dir);
        let repo = name.to_string();
        let r = build(&dir, &*store, progress, &mut |p| {
            progress.println(&p.line(&repo));
        })
        .map_err(crate::Error::from)?;
        swap_in(&dir)?;
        progress.println(&format!(
            "repository {repo}: {} packs, {} chunks, {} versions rebuilt ({} duplicate commit \
             records, {} removed by prune); {} damaged, {} versions with lost chunks, {} bytes \
             of torn tails cut{}",
            r.packs,
            r.chunks,
            r.versions,
            r.duplicates,
            r.removed,
            r.damaged,
            r.versions_lost_chunks,
            r.cut_bytes,
            if r.no_commit_records() {
                "; VERSIONS NOT RECOVERED: the packs hold no commit records (written before \
                 commit records existed); only the chunks were indexed"
            } else {
                ""
            }
        ));
        report.repositories.push((repo, r));
    }
    progress.finish();
    Ok(report)
}

/// Opens the index of the repository in `dir` for `serve` (packs in `store`):
/// - a `repair` cut off before it finished: refused;
/// - missing, with packs present: rebuilt from them (a warning in the log) when they hold
///   commit records; refused when they hold chunks but none (versions would be lost:
///   `repair` does that, loudly);
/// - SQLite reporting damage when it is opened or checked (`quick_check` up to
///   [`QUICK_CHECK_MAX`]), or sampled rows that do not match their records: refused.
pub fn open_index(dir: &RepoDir, store: &dyn PackStore) -> Result<Index, crate::repo::RepoError> {
    let name = dir.name();
    if dir.index_repair().exists() {
        return Err(NeedsRepair::new(
            dir,
            format!(
                "a repair of it was cut off before it finished ({} is there)",
                dir.index_repair().display()
            ),
        )
        .into());
    }
    let index = dir.index();
    if !index.exists()
        && store
            .list()?
            .iter()
            .any(|&p| store.len(p).is_ok_and(|l| l > PACK_HEADER_LEN))
    {
        tracing::warn!(repo = %name, "{} is missing; rebuilding it from the packs", index.display());
        let mut problems = 0u64;
        let r = build(dir, store, &Progress::none(), &mut |p| {
            problems += 1;
            tracing::warn!(repo = %name, "{}", p.line(&name));
        })
        .map_err(|e| {
            // Not a repair cut off: the next open tries again.
            let _ = std::fs::remove_file(dir.index_repair());
            match e {
                RepairError::Io(e) => crate::repo::RepoError::Io(e),
                RepairError::Index(e) => crate::repo::RepoError::Index(e),
                e => crate::repo::RepoError::NeedsRepair(NeedsRepair::new(dir, e.to_string())),
            }
        })?;
        if r.no_commit_records() {
            remove_if_present(&dir.index_repair())?;
            return Err(NeedsRepair::new(
                dir,
                "index.sqlite is missing and the packs hold no commit records (written before \
                 them), so its versions cannot be rebuilt; `repair` indexes the chunks and \
                 says what was lost",
            )
            .into());
        }
        swap_in(dir).map_err(|e| match e {
            RepairError::Io(e) => crate::repo::RepoError::Io(e),
            e => crate::repo::RepoError::NeedsRepair(NeedsRepair::new(dir, e.to_string())),
        })?;
        tracing::warn!(
            repo = %name,
            packs = r.packs,
            chunks = r.chunks,
            versions = r.versions,
            problems,
            cut_bytes = r.cut_bytes,
            "rebuilt {} from the packs",
            index.display()
        );
    }
    let damaged = |e: IndexError| -> crate::repo::RepoError {
        if matches!(&e, IndexError::Db(d) if d.is_corrupt()) {
            NeedsRepair::new(dir, format!("its index is damaged ({e})")).into()
        } else {
            e.into()
        }
    };
    let ix = Index::open(&index, Mode::Write).map_err(damaged)?;
    if let Some(why) = check(&ix, &index, store).map_err(damaged)? {
        return Err(NeedsRepair::new(dir, format!("its index is damaged ({why})")).into());
    }
    Ok(ix)
}

/// The cheap consistency check of an index opened for `serve`: `Some(why)` when it is
/// damaged.
fn check(ix: &Index, path: &Path, store: &dyn PackStore) -> Result<Option<String>, IndexError> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size <= QUICK_CHECK_MAX {
        if let Some(why) = ix.quick_check()? {
            return Ok(Some(format!("SQLite's check: {why}")));
        }
    }
    for row in ix.edge_chunks(SAMPLE)? {
        if ix.chunk(&row.id)? != Some(row.loc) {
            return Ok(Some(format!(
                "chunk {} is listed by location but not found by its id",
                row.id
            )));
        }
        match read_record(store, &row.id, &row.loc, Check::Header) {
            Ok(_) => {}
            // A pack shorter than recorded, or gone, is reported by recovery: data lost
            // outside the receiver, which a rebuild of the index cannot bring back.
            Err(RecordError::Io(_)) => {}
            Err(RecordError::Damaged { why, .. }) if why.contains("ends before") => {}
            Err(e) => return Ok(Some(format!("the record of an indexed chunk: {e}"))),
        }
    }
    for v in ix.newest_versions(SAMPLE)? {
        if let Some((_, why)) = record_disagrees(store, &v) {
            if !why.contains("ends before") {
                return Ok(Some(format!("version {}: {why}", v.version)));
            }
        }
    }
    Ok(None)
}

/// How version `v`'s commit record in the packs disagrees with the index, if it does:
/// a problem kind and what is wrong (`None` too when it has no record yet: the upgrade
/// writes it).
pub fn record_disagrees(
    store: &dyn PackStore,
    v: &IndexedVersion,
) -> Option<(&'static str, String)> {
    let (pack, offset) = v.record?;
    let mut head = [0u8; RECORD_HEADER_LEN as usize];
    let read = |at: u64, buf: &mut [u8]| match store.read_at(pack, at, buf) {
        Ok(()) => Ok(()),
        Err(e) if e.source.kind() == std::io::ErrorKind::UnexpectedEof => Err((
            "missing_record",
            "the pack ends before its commit record does".to_string(),
        )),
        Err(e) => Err(("missing_record", e.to_string())),
    };
    if let Err(e) = read(offset, &mut head) {
        return Some(e);
    }
    let Some(Header::Commit(h)) = Header::decode(&head) else {
        return Some((
            "missing_record",
            "no commit record header at its recorded location".into(),
        ));
    };
    let mut body = vec![0u8; h.len as usize];
    if let Err(e) = read(offset + RECORD_HEADER_LEN, &mut body) {
        return Some(e);
    }
    if blake3::hash(&body).as_bytes() != &h.hash {
        return Some((
            "damaged_commit",
            "its commit record's bytes do not match their hash".into(),
        ));
    }
    let rec = match CommitRecord::decode(&h, &body) {
        Ok(r) => r,
        Err(e) => {
            return Some((
                "damaged_commit",
                format!("its commit record does not decode: {e}"),
            ))
        }
    };
    let mut chunks: Vec<ChunkId> = rec.chunks.clone();
    chunks.sort_unstable_by_key(|c| c.0);
    chunks.dedup_by_key(|c| c.0);
    let differs = [
        (rec.version != v.version, "version number"),
        (rec.file_id != v.file_id, "file id"),
        (rec.commit_id != v.commit_id, "commit id"),
        (rec.commit_time != v.commit_time, "commit time"),
        (rec.deletion != v.deletion, "deletion flag"),
        (rec.manifest != v.manifest, "manifest"),
        (chunks != v.chunks, "chunk references"),
    ];
    let names: Vec<&str> = differs.iter().filter(|d| d.0).map(|d| d.1).collect();
    (!names.is_empty()).then(|| {
        (
            "record_mismatch",
            format!(
                "its commit record disagrees with the index on: {}",
                names.join(", ")
            ),
        )
    })
}
