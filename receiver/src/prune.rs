//! `prune`: applies the retention policy to one repository, then compacts its packs,
//! without a key and while sessions keep writing it (`docs/design.md`, "`prune` and
//! compaction").
//!
//! Three phases, each in batches, each batch taking the repository's locks only for its
//! own step ([`crate::repo`]'s lock order: writer, then state; its `maintenance` module
//! says what each step holds):
//!
//! 1. **Removal.** Every file's versions are read through prune's own connection (a page
//!    of 10,000 at a time, in file order: one file's versions in memory at a time) and
//!    [`Policy::keep`] decides, with the receiver's commit times. The versions to go are
//!    removed in batches of at most [`MAX_REMOVED`]: a removal record naming them is
//!    appended to the open pack and fsynced, then one index transaction forgets them (with
//!    whatever the sessions had pending, as any flush does). A file that gained a version
//!    since the policy saw it keeps its versions until the next prune.
//! 2. **Chunks.** A TEMP table of every chunk a remaining version references is built by
//!    one sequential scan of `version_chunks` (no index by chunk is kept for backups to
//!    pay for); the chunk rows not in it, indexed before it was built, are deleted in
//!    batches of 4,096 under the writer and state locks, sparing chunks that versions
//!    indexed meanwhile or pending commit records reference. A commit settled meanwhile
//!    against a deleted row gets `MissingChunks` (its flush asks the index again), and
//!    the agent sends the chunk again.
//! 3. **Compaction.** Each pack's live bytes (its chunk rows, its versions' commit
//!    records, its removal records) against its length: a pack with none is deleted; one
//!    whose unused share passes `max_unused` is rewritten. The open pack, if chosen, is
//!    closed first and everything pending indexed. Live records are read back, checked
//!    against their hash, and copied into new packs of their own; each batch is fsynced,
//!    then one index transaction points the rows at the copies (and, after a pack's last
//!    batch, forgets that pack); only then is the old pack deleted. A pack with a record
//!    that fails its check is left as it is (for `scrub` and `repair` to name).
//!
//! A kill at any point leaves a repository that opens: a removal record past the indexed
//! end is applied by recovery; a copy past it is re-indexed as a duplicate (garbage the
//! next compaction deletes); a rewritten pack the index has forgotten but that is still on
//! disk is read as an unindexed pack, whose removed versions stay removed. A storage error
//! (a full disk) stops the prune: the copies not yet indexed are cut off or deleted,
//! nothing indexed is touched, and the next prune starts over.
//!
//! Removal records are always carried forward by compaction: a commit record they remove
//! may still lie in a pack no compaction rewrote (or, never acknowledged, in no index at
//! all), and `repair` must not bring it back.
//!
//! Readers (`GetChunk`, restores) that looked a chunk up before its pack was rewritten may
//! find the old pack gone: the serving path looks it up again.
//!
//! Memory: one file's versions, one batch of removals or chunk ids (4,096), and one pack's
//! list of live records (its chunk ids and offsets) at a time; every set of chunks lives
//! in SQLite.
//!
//! For a serving process: call [`prune`] on a blocking thread with the `Repo` the sessions
//! use, holding none of its locks; it takes them itself, one step at a time (never the
//! state lock across an fsync of a pack, never across more than one index transaction of
//! at most 4,096 rows or 16,384 moved records), and reads through a connection of its own
//! (no reader lock). Two prunes of one repository in one process are refused (`Busy`).
//! What a session may see meanwhile: `MissingChunks` for a chunk deleted since it asked,
//! and a chunk read whose pack was deleted since its lookup (look it up again).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use coffer_common::chunk::FileId;
use coffer_common::host::fs::IoError;
use coffer_common::host::time::{now_secs, rfc3339};
use serde::{Deserialize, Serialize};

use crate::index::{FileVersion, Held, Index, IndexError, Moved, PackUse};
use crate::records::{Header, Removed, MAX_REMOVED};
use crate::repo::{Repo, RepoError};
use crate::retention::{Policy, Retention, VersionFacts};
use crate::store::{PackNo, PackStore, PACK_HEADER_LEN, RECORD_HEADER_LEN};

/// Versions read per page while deciding.
const PAGE: usize = 10_000;
/// Chunk rows deleted per batch.
const CHUNK_BATCH: usize = 4096;
/// Records copied per index transaction while compacting.
const MOVE_BATCH: usize = 16_384;
/// Bytes of copies gathered before they are written.
const COPY_BUFFER: usize = 1 << 20;

/// What `prune` is asked to do.
#[derive(Clone, Copy, Debug, Default)]
pub struct PruneOptions {
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// Show progress on stderr.
    pub progress: bool,
}

/// What one repository's prune did (or, in a dry run, would do).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PruneReport {
    pub repo: String,
    /// Files (distinct file ids) the policy looked at.
    pub files: u64,
    pub versions_kept: u64,
    pub versions_removed: u64,
    /// Pack bytes freed: the packs deleted, less the copies and removal records written.
    pub bytes_freed: u64,
    pub packs_rewritten: u64,
    pub packs_deleted: u64,
    pub dry_run: bool,
    /// Chunk rows no remaining version references, deleted.
    pub chunks_removed: u64,
    /// Bytes of records the index referenced before and no longer does (chunk records and
    /// commit records of removed versions): what compaction may free.
    pub bytes_unreferenced: u64,
    /// New packs compaction wrote its copies to.
    pub packs_written: u64,
    /// Bytes of the removal records written (counted against `bytes_freed`).
    pub removal_bytes: u64,
    /// Pack bytes (recorded lengths) before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub seconds: f64,
}

/// The index meta row `last_prune` (read by `status`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LastPrune {
    /// RFC 3339.
    pub at: String,
    pub ok: bool,
    pub error: Option<String>,
    pub versions_removed: u64,
    pub bytes_freed: u64,
    pub packs_rewritten: u64,
}

/// The meta key of [`LastPrune`].
pub const LAST_PRUNE: &str = "last_prune";

/// Why a prune stopped.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(
        "repository {repo}: compaction stopped: {source}; nothing was lost (its copies not yet \
         indexed were removed, every record the index holds is where it was) and the next \
         prune carries on once there is room"
    )]
    Compaction {
        repo: String,
        #[source]
        source: Box<RepoError>,
    },
    #[error("repository {0} is already being pruned")]
    Busy(String),
    #[error(
        "coffer-receiver serve started on {} while this prune was starting (it holds {}); \
         run prune again: with serve running, it is handed to serve",
        .0.display(),
        .0.join("serve.lock").display()
    )]
    Serving(PathBuf),
}

impl From<IoError> for PruneError {
    fn from(e: IoError) -> Self {
        PruneError::Repo(RepoError::Io(e))
    }
}

/// Repositories (by index path) being pruned in this process.
static RUNNING: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// Marks a repository as being pruned while it lives.
struct Running(PathBuf);

impl Running {
    fn start(path: PathBuf, repo: &str) -> Result<Self, PruneError> {
        let mut g = match RUNNING.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !g.get_or_insert_with(HashSet::new).insert(path.clone()) {
            return Err(PruneError::Busy(repo.to_string()));
        }
        Ok(Self(path))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut g = match RUNNING.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(s) = g.as_mut() {
            s.remove(&self.0);
        }
    }
}

/// Applies `retention` to `repo` at `now` (Unix seconds), then compacts (see the module
/// doc). Works on an open repository (the one `serve` holds, or one the command opened),
/// in batches that take its locks briefly, so sessions keep committing meanwhile. Writes
/// the `last_prune` meta row, on failure too (not in a dry run).
pub fn prune(
    repo: &Repo,
    retention: &Retention,
    now: i64,
    opts: &PruneOptions,
) -> Result<PruneReport, PruneError> {
    let name = repo.name().to_string();
    let _running = Running::start(repo.repo_dir().index(), &name)?;
    let started = Instant::now();
    let mut report = PruneReport {
        repo: name.clone(),
        dry_run: opts.dry_run,
        ..PruneReport::default()
    };
    let progress = Bar::new(opts.progress);
    let r = run(repo, retention, now, opts, &progress, &mut report);
    progress.finish();
    report.seconds = started.elapsed().as_secs_f64();
    if !opts.dry_run {
        let last = LastPrune {
            at: rfc3339(now_secs()),
            ok: r.is_ok(),
            error: r.as_ref().err().map(|e| e.to_string()),
            versions_removed: report.versions_removed,
            bytes_freed: report.bytes_freed,
            packs_rewritten: report.packs_rewritten,
        };
        match serde_json::to_string(&last) {
            Ok(json) => {
                if let Err(e) = repo.set_meta(LAST_PRUNE, &json) {
                    tracing::warn!(repo = %name, "recording the last prune: {e}");
                }
            }
            Err(e) => tracing::warn!(repo = %name, "encoding the last prune: {e}"),
        }
    }
    r.map(|()| report)
}

/// `coffer-receiver prune` with `serve` not running: with the root's serve lock held
/// (refused while `serve` runs), opens each repository (or the one named) as `serve` would
/// and prunes it with its retention settings from `receiver.toml`. `each` gets every
/// repository's outcome as it is done; one that fails does not stop the others.
pub fn prune_root(
    layout: &crate::Layout,
    stores: &dyn crate::store::PackStores,
    only: Option<&str>,
    opts: &PruneOptions,
    mut each: impl FnMut(&str, Result<PruneReport, PruneError>),
) -> Result<(), crate::Error> {
    use coffer_common::host::lock::{Lock, LockError, Wait};
    let config = layout.load_config()?;
    let _lock = match Lock::exclusive(
        &layout.serve_lock(),
        Wait::For(std::time::Duration::from_secs(2)),
    ) {
        Ok(l) => l,
        Err(LockError::Held { .. }) => {
            return Err(PruneError::Serving(layout.root().to_path_buf()).into())
        }
        Err(LockError::Io(e)) => return Err(e.into()),
    };
    for name in crate::repair::repositories(layout, only)? {
        let dir = layout.repo(&name);
        let r = Repo::open(&dir, name.clone(), stores.open(&dir), config.pack_max_bytes)
            .map_err(PruneError::from)
            .and_then(|(repo, _)| prune(&repo, &config.retention(&name), now_secs(), opts));
        each(name.as_str(), r);
    }
    Ok(())
}

impl PruneReport {
    /// One line for a terminal.
    pub fn line(&self) -> String {
        format!(
            "repository {}: {} files, {} versions kept, {} {}, {} chunks no longer referenced; \
             {} bytes {} ({} packs rewritten, {} deleted, {} written){}",
            self.repo,
            self.files,
            self.versions_kept,
            self.versions_removed,
            if self.dry_run { "to remove" } else { "removed" },
            self.chunks_removed,
            self.bytes_freed,
            if self.dry_run { "to free" } else { "freed" },
            self.packs_rewritten,
            self.packs_deleted,
            self.packs_written,
            if self.dry_run {
                "; dry run: nothing was changed"
            } else {
                ""
            }
        )
    }
}

fn run(
    repo: &Repo,
    retention: &Retention,
    now: i64,
    opts: &PruneOptions,
    progress: &Bar,
    report: &mut PruneReport,
) -> Result<(), PruneError> {
    let mut scan = Index::open_scan(&repo.repo_dir().index())?;
    let before = scan.pack_use(false)?;
    report.bytes_before = before.iter().map(|u| u.length).sum();
    let live_before: u64 = before.iter().map(|u| u.live).sum();
    drop(before);
    remove(
        repo,
        &retention.policy,
        now,
        opts,
        progress,
        &mut scan,
        report,
    )?;
    collect(repo, opts, progress, &mut scan, report)?;
    let uses = scan.pack_use(opts.dry_run)?;
    let live_after: u64 = uses.iter().map(|u| u.live).sum();
    report.bytes_unreferenced = live_before.saturating_sub(live_after);
    compact(
        repo,
        retention.max_unused,
        opts,
        progress,
        &mut scan,
        uses,
        report,
    )
}

/// Phase 1: decides per file, removes (or in a dry run notes) what goes.
fn remove(
    repo: &Repo,
    policy: &Policy,
    now: i64,
    opts: &PruneOptions,
    progress: &Bar,
    scan: &mut Index,
    report: &mut PruneReport,
) -> Result<(), PruneError> {
    progress.start("deciding (versions)", 0, false);
    let mut batch = Batch::default();
    let mut file: Vec<FileVersion> = Vec::new();
    let mut cursor: Option<(FileId, u64)> = None;
    loop {
        let page = scan.versions_by_file_after(cursor, PAGE)?;
        let Some(last) = page.last() else {
            break;
        };
        cursor = Some((last.file_id, last.version));
        progress.inc(page.len() as u64);
        for v in page {
            if file.first().is_some_and(|f| f.file_id != v.file_id) {
                decide(policy, now, &file, &mut batch, report);
                file.clear();
                if batch.removed.len() >= MAX_REMOVED {
                    batch.commit(repo, opts, scan, report)?;
                }
            }
            file.push(v);
        }
    }
    if !file.is_empty() {
        decide(policy, now, &file, &mut batch, report);
    }
    batch.commit(repo, opts, scan, report)
}

/// Removals gathered, not yet written.
#[derive(Default)]
struct Batch {
    removed: Vec<Removed>,
    /// The newest version the policy saw of each file in `removed`.
    latest: HashMap<FileId, u64>,
}

impl Batch {
    fn commit(
        &mut self,
        repo: &Repo,
        opts: &PruneOptions,
        scan: &mut Index,
        report: &mut PruneReport,
    ) -> Result<(), PruneError> {
        let latest = std::mem::take(&mut self.latest);
        let mut all = std::mem::take(&mut self.removed);
        while !all.is_empty() {
            let rest = all.split_off(all.len().min(MAX_REMOVED));
            let wanted = all.len() as u64;
            let done = if opts.dry_run {
                all
            } else {
                repo.remove_versions(all, &latest, now_secs())?.0
            };
            let versions: Vec<u64> = done.iter().map(|r| r.version).collect();
            if !versions.is_empty() {
                report.removal_bytes += RECORD_HEADER_LEN
                    + (crate::records::REMOVAL_FIXED
                        + crate::records::REMOVAL_ENTRY * versions.len())
                        as u64;
            }
            scan.mark_gone(&versions)?;
            report.versions_removed += versions.len() as u64;
            // A file that gained a version meanwhile keeps them until the next prune.
            report.versions_kept += wanted - versions.len() as u64;
            all = rest;
        }
        Ok(())
    }
}

/// Applies the policy to one file's versions (ascending).
fn decide(
    policy: &Policy,
    now: i64,
    file: &[FileVersion],
    batch: &mut Batch,
    report: &mut PruneReport,
) {
    let facts: Vec<VersionFacts> = file
        .iter()
        .map(|v| VersionFacts {
            version: v.version,
            commit_time: v.commit_time,
            // Unknown (an older receiver's version) counts as not deleted: keeps more.
            deleted: v.deleted == Some(true),
        })
        .collect();
    let keep = policy.keep(&facts, now);
    report.files += 1;
    let mut any = false;
    for (v, k) in file.iter().zip(keep) {
        if k {
            report.versions_kept += 1;
        } else {
            any = true;
            batch.removed.push(Removed {
                version: v.version,
                file_id: v.file_id,
                commit_id: v.commit_id,
            });
        }
    }
    if let (true, Some(last)) = (any, file.last()) {
        batch.latest.insert(last.file_id, last.version);
    }
}

/// Phase 2: deletes (or counts) the chunk rows no remaining version references.
fn collect(
    repo: &Repo,
    opts: &PruneOptions,
    progress: &Bar,
    scan: &mut Index,
    report: &mut PruneReport,
) -> Result<(), PruneError> {
    progress.start("collecting (unreferenced chunks)", 0, false);
    let mut hi = scan.build_live()?;
    let mut after = None;
    loop {
        if !opts.dry_run {
            // Versions indexed since: their chunks are live too.
            hi = scan.extend_live(hi)?;
        }
        let dead = scan.dead_chunks(after.as_ref(), CHUNK_BATCH)?;
        let Some(last) = dead.last() else {
            break;
        };
        after = Some(last.0);
        progress.inc(dead.len() as u64);
        if opts.dry_run {
            report.chunks_removed += dead.len() as u64;
        } else {
            let ids: Vec<_> = dead.iter().map(|(id, _)| *id).collect();
            let (n, _) = repo.drop_chunks(&ids, hi)?;
            report.chunks_removed += n;
        }
    }
    Ok(())
}

/// The packs compaction rewrites (some live records) or deletes (none): every pack with
/// records whose unused share passes `max_unused` or that holds nothing live.
fn choose(uses: &[PackUse], max_unused: f64) -> Vec<PackUse> {
    uses.iter()
        .filter(|u| u.length > PACK_HEADER_LEN && (u.live == 0 || u.unused_share() > max_unused))
        .copied()
        .collect()
}

/// Phase 3: rewrites the packs whose unused share passes `max_unused`, deletes the unused.
fn compact(
    repo: &Repo,
    max_unused: f64,
    opts: &PruneOptions,
    progress: &Bar,
    scan: &mut Index,
    uses: Vec<PackUse>,
    report: &mut PruneReport,
) -> Result<(), PruneError> {
    let chosen = choose(&uses, max_unused);
    let total: u64 = uses.iter().map(|u| u.length).sum();
    if opts.dry_run {
        let live: u64 = chosen.iter().map(|u| u.live).sum();
        let freed: u64 = chosen.iter().map(|u| u.length).sum();
        let new_packs = live.div_ceil(repo.pack_max_bytes().max(1));
        report.packs_deleted = chosen.iter().filter(|u| u.live == 0).count() as u64;
        report.packs_rewritten = chosen.len() as u64 - report.packs_deleted;
        report.packs_written = new_packs;
        report.bytes_freed = freed
            .saturating_sub(live + new_packs * PACK_HEADER_LEN)
            .saturating_sub(report.removal_bytes);
        report.bytes_after = total.saturating_sub(report.bytes_freed);
        return Ok(());
    }
    if chosen.is_empty() {
        report.bytes_after = total;
        return Ok(());
    }
    let packs: Vec<PackNo> = chosen.iter().map(|u| u.pack).collect();
    repo.seal_open_pack(&packs)?;
    scan.plan_moves(&packs)?;
    progress.start(
        "compacting (bytes copied)",
        chosen.iter().map(|u| u.live).sum::<u64>(),
        true,
    );
    let mut out = Copies::new(repo);
    let r = (|| -> Result<(), RepoError> {
        for u in &chosen {
            let records = scan.live_records(u.pack)?;
            if out.rewrite(u.pack, records, progress, &report.repo)? {
                if u.live == 0 {
                    report.packs_deleted += 1;
                } else {
                    report.packs_rewritten += 1;
                }
            }
        }
        out.finish()
    })();
    if let Err(e) = r {
        out.abandon();
        report.packs_written = out.started;
        report.bytes_freed = out.freed.saturating_sub(out.written + report.removal_bytes);
        return Err(PruneError::Compaction {
            repo: report.repo.clone(),
            source: Box::new(e),
        });
    }
    report.packs_written = out.started;
    report.bytes_freed = out.freed.saturating_sub(out.written + report.removal_bytes);
    report.bytes_after = scan.pack_use(false)?.iter().map(|u| u.length).sum();
    Ok(())
}

/// Compaction's output: the pack being filled with copies, and what was done.
struct Copies<'r> {
    repo: &'r Repo,
    store: &'r dyn PackStore,
    /// The pack being filled: its number, its length (written or buffered), and the
    /// length the index has recorded for it (`None` until a batch of it is indexed).
    cur: Option<(PackNo, u64, Option<u64>)>,
    buf: Vec<u8>,
    /// Where `buf` goes in the pack being filled (what is written before it).
    buf_at: u64,
    /// Copies written, not yet indexed.
    moved: Vec<Moved>,
    /// Packs started, bytes written to them, bytes of the packs deleted.
    started: u64,
    written: u64,
    freed: u64,
}

impl<'r> Copies<'r> {
    fn new(repo: &'r Repo) -> Self {
        Self {
            repo,
            store: &**repo.pack_store(),
            cur: None,
            buf: Vec::with_capacity(COPY_BUFFER),
            buf_at: 0,
            moved: Vec::new(),
            started: 0,
            written: 0,
            freed: 0,
        }
    }

    /// Copies `records` (the live records of `pack`, in pack order) and, once they are
    /// indexed at their copies, deletes `pack`. Returns false when `pack` was left as it is
    /// (a record failed its check).
    fn rewrite(
        &mut self,
        pack: PackNo,
        records: Vec<Moved>,
        progress: &Bar,
        repo_name: &str,
    ) -> Result<bool, RepoError> {
        let mut rec = Vec::new();
        for mut m in records {
            if let Err(why) = self.read_checked(&m, &mut rec) {
                tracing::error!(
                    repo = %repo_name,
                    "compaction leaves {} as it is: the record at offset {} {why} (see \
                     `coffer-receiver scrub`)",
                    self.store.describe(pack),
                    m.from.1
                );
                self.index(&[])?;
                return Ok(false);
            }
            m.to = self.append(&rec)?;
            self.moved.push(m);
            progress.inc(m.len);
            if self.moved.len() >= MOVE_BATCH {
                self.index(&[])?;
            }
        }
        let len = self.store.len(pack).unwrap_or(0);
        let gone = self.index(&[pack])?;
        if gone.contains(&pack) {
            self.freed += len;
        }
        Ok(gone.contains(&pack))
    }

    /// Reads the record `m` describes into `rec` and checks it is that record, intact.
    fn read_checked(&self, m: &Moved, rec: &mut Vec<u8>) -> Result<(), String> {
        if m.len < RECORD_HEADER_LEN {
            return Err("is shorter than a record header".into());
        }
        rec.resize(m.len as usize, 0);
        self.store
            .read_at(m.from.0, m.from.1, rec)
            .map_err(|e| format!("cannot be read ({e})"))?;
        let h = Header::decode(&rec[..RECORD_HEADER_LEN as usize])
            .ok_or_else(|| "has no record header".to_string())?;
        let right = match (&m.what, &h) {
            (Held::Chunk(id), Header::Chunk(c)) => c.id == *id,
            (Held::Version(_), Header::Commit(_)) => true,
            (Held::Removal(hash), Header::Removal(r)) => r.hash == *hash,
            _ => false,
        };
        if !right || h.record_len() != m.len {
            return Err("is not the record the index names".into());
        }
        if blake3::hash(&rec[RECORD_HEADER_LEN as usize..]).as_bytes() != h.hash() {
            return Err("does not match its hash".into());
        }
        Ok(())
    }

    /// Appends a whole record to the copies; returns where it will be.
    fn append(&mut self, rec: &[u8]) -> Result<(PackNo, u64), RepoError> {
        let n = rec.len() as u64;
        let max = self.repo.pack_max_bytes();
        let full = self
            .cur
            .is_some_and(|(_, len, _)| len + n > max && len > PACK_HEADER_LEN);
        if full {
            // The full pack's copies are indexed before the next pack is started.
            self.index(&[])?;
        }
        let (p, len) = match self.cur {
            Some((p, len, _)) if !full => (p, len),
            _ => {
                let p = self.repo.start_pack()?;
                self.started += 1;
                self.written += PACK_HEADER_LEN;
                self.cur = Some((p, PACK_HEADER_LEN, None));
                self.buf_at = PACK_HEADER_LEN;
                (p, PACK_HEADER_LEN)
            }
        };
        if self.buf.len() + rec.len() > COPY_BUFFER {
            self.write_out()?;
        }
        self.buf.extend_from_slice(rec);
        if let Some((_, l, _)) = self.cur.as_mut() {
            *l = len + n;
        }
        Ok((p, len))
    }

    fn write_out(&mut self) -> Result<(), RepoError> {
        let Some((p, _, _)) = self.cur else {
            return Ok(());
        };
        if self.buf.is_empty() {
            return Ok(());
        }
        self.store.write_at(p, self.buf_at, &self.buf)?;
        let n = self.buf.len() as u64;
        self.repo.add_held(n);
        self.written += n;
        self.buf_at += n;
        self.buf.clear();
        Ok(())
    }

    /// Writes out and fsyncs the copies, then, in one index transaction, points the rows
    /// at them and forgets `done`; deletes `done`'s files. Returns the packs deleted.
    fn index(&mut self, done: &[PackNo]) -> Result<Vec<PackNo>, RepoError> {
        self.write_out()?;
        let mut lens = Vec::new();
        if let Some((p, len, _)) = self.cur {
            if !self.moved.is_empty() {
                self.store.sync(p)?;
                lens.push((p, len));
            }
        }
        if self.moved.is_empty() && done.is_empty() {
            return Ok(Vec::new());
        }
        let r = self.repo.relocate(&self.moved, &lens, done)?;
        if let (Some((_, _, indexed)), Some((_, len))) = (self.cur.as_mut(), lens.first()) {
            *indexed = Some(*len);
        }
        self.moved.clear();
        Ok(r)
    }

    /// Indexes what is left.
    fn finish(&mut self) -> Result<(), RepoError> {
        self.index(&[]).map(|_| ())
    }

    /// After a failure: the copies not yet indexed are cut off (or their pack deleted when
    /// the index never learned of it), so they take no room.
    fn abandon(&mut self) {
        self.buf.clear();
        self.moved.clear();
        let Some((p, _, indexed)) = self.cur.take() else {
            return;
        };
        let on_disk = self.buf_at;
        let r = match indexed {
            Some(l) => self.store.truncate(p, l),
            None => self.store.remove(p),
        };
        match r {
            Ok(()) => {
                let cut = on_disk.saturating_sub(indexed.unwrap_or(0));
                self.written = self.written.saturating_sub(cut);
                self.repo.forget_copies(p, indexed, on_disk);
            }
            Err(e) => tracing::warn!(
                repo = %self.repo.name(),
                "removing compaction's copies that were not indexed: {e}; the next open \
                 re-indexes them as duplicates"
            ),
        }
    }
}

/// A progress bar on stderr (when asked for), in repair's style.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(on: bool) -> Self {
        Self(on.then(|| indicatif::ProgressBar::new(0)))
    }

    fn start(&self, what: &str, total: u64, bytes: bool) {
        let Some(b) = &self.0 else {
            return;
        };
        let template = match (total, bytes) {
            (0, _) => "{msg} {pos} {spinner}",
            (_, true) => "{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})",
            (_, false) => "{msg} [{bar:30}] {pos}/{len} ({eta})",
        };
        if let Ok(st) = indicatif::ProgressStyle::with_template(template) {
            b.set_style(st.progress_chars("=> "));
        }
        b.set_message(what.to_string());
        b.set_length(total);
        b.set_position(0);
    }

    fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{CommitOutcome, NewCommit};
    use crate::layout::Layout;
    use crate::store::LocalPacks;
    use crate::RepoName;
    use coffer_common::chunk::ChunkId;
    use coffer_common::wire::CommitId;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn name() -> RepoName {
        RepoName::new("r").expect("name")
    }

    fn open(root: &Path) -> Repo {
        let dir = Layout::new(root).repo(&name());
        Repo::open(&dir, name(), Arc::new(LocalPacks::new(dir.packs())), MIB)
            .expect("open")
            .0
    }

    fn sealed(i: u32, len: usize) -> (ChunkId, Vec<u8>) {
        let mut v = vec![0u8; len];
        blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut v);
        (ChunkId(*blake3::hash(&v).as_bytes()), v)
    }

    fn keep_last(n: u32, max_unused: f64) -> Retention {
        Retention {
            policy: Policy {
                keep_all: false,
                keep_within: Duration::ZERO,
                keep_hourly: 0,
                keep_daily: 0,
                keep_weekly: 0,
                keep_monthly: 0,
                keep_yearly: 0,
                keep_last: n,
                keep_deleted_for: None,
            },
            prune_interval: None,
            max_unused,
        }
    }

    /// `files` files of `versions` versions each: every version holds a chunk of its own
    /// (200 KiB) and one chunk all share. Returns each version's number and own chunk.
    fn history(r: &Repo, files: u8, versions: u32) -> Vec<(u8, u64, ChunkId)> {
        let (shared, bytes) = sealed(0, 1000);
        r.put(&shared, &bytes).expect("put");
        let mut out = Vec::new();
        for v in 0..versions {
            for f in 0..files {
                let (id, bytes) = sealed(1 + v * 100 + f as u32, 200 << 10);
                r.put(&id, &bytes).expect("put");
                let c = NewCommit {
                    commit_id: CommitId([v as u8 * 16 + f; 16]),
                    file_id: FileId([f; 32]),
                    manifest: vec![f; 30],
                    chunks: vec![shared, id],
                    deleted: false,
                };
                match r.flush(&[c]).expect("flush")[0] {
                    CommitOutcome::Acked { version, .. } => out.push((f, version, id)),
                    ref o => panic!("{o:?}"),
                }
            }
        }
        out
    }

    fn listed(r: &Repo) -> Vec<u64> {
        let (v, _) = r.list_versions(0, 0).expect("list");
        v.iter().map(|e| e.version).collect()
    }

    fn pack_bytes(root: &Path) -> u64 {
        let dir = Layout::new(root).repo(&name()).packs();
        std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").metadata().expect("stat").len())
            .sum()
    }

    fn scrub_clean(root: &Path) {
        let mut problems = Vec::new();
        crate::status::scrub(
            &Layout::new(root),
            &crate::store::LocalDisk,
            Some("r"),
            |_, p, _| problems.push(p.line("r")),
        )
        .expect("scrub");
        assert!(problems.is_empty(), "{problems:#?}");
    }

    fn rebuild(root: &Path) -> crate::repair::Rebuilt {
        let dir = Layout::new(root).repo(&name());
        let store = LocalPacks::new(dir.packs());
        let r = crate::repair::build(&dir, &store, &crate::repair::Progress::none(), &mut |p| {
            panic!("{}", p.line("r"))
        })
        .expect("build");
        crate::repair::swap_in(&dir).expect("swap");
        r
    }

    #[test]
    fn removed_versions_stay_removed_through_repair_and_compaction_frees_their_bytes() {
        let d = tempfile::tempdir().expect("tempdir");
        crate::init(d.path(), None).expect("init");
        let r = open(d.path());
        let h = history(&r, 3, 5);
        let kept: Vec<u64> = h.iter().skip(9).map(|x| x.1).collect();
        let now = now_secs();
        // A dry run changes nothing and says what a prune would do.
        let before = pack_bytes(d.path());
        let opts = PruneOptions {
            dry_run: true,
            progress: false,
        };
        let plan = prune(&r, &keep_last(2, 1.0), now, &opts).expect("dry run");
        assert_eq!((plan.versions_removed, plan.versions_kept), (9, 6));
        assert_eq!(plan.chunks_removed, 9);
        assert_eq!(listed(&r).len(), 15);
        assert_eq!(pack_bytes(d.path()), before);
        // Without compaction (nothing passes 100% unused): the versions go, their commit
        // records stay in the packs, and neither repair nor a reopen brings them back.
        let rep = prune(&r, &keep_last(2, 1.0), now, &PruneOptions::default()).expect("prune");
        assert_eq!(
            (rep.versions_removed, rep.versions_kept, rep.files),
            (9, 6, 3)
        );
        assert_eq!(rep.chunks_removed, 9);
        assert_eq!(listed(&r), kept);
        for (_, v, id) in &h {
            assert_eq!(r.get(id).expect("get").is_some(), kept.contains(v), "{v}");
        }
        drop(r);
        scrub_clean(d.path());
        let mid = pack_bytes(d.path());
        let rb = rebuild(d.path());
        assert_eq!((rb.versions, rb.removed, rb.removal_records), (6, 9, 1));
        let r = open(d.path());
        assert_eq!(listed(&r), kept);
        // The rebuilt index knows the removed chunks again (their records are still in the
        // packs): a prune collects them, and compaction (10%) frees their bytes.
        let rep = prune(&r, &keep_last(2, 0.1), now, &PruneOptions::default()).expect("prune");
        assert_eq!(rep.versions_removed, 0);
        assert_eq!(rep.chunks_removed, 9);
        assert!(rep.packs_rewritten + rep.packs_deleted > 0, "{rep:?}");
        let after = pack_bytes(d.path());
        let own = 9 * (200 << 10) as u64;
        assert!(
            before - after >= own - MIB && before - after <= own + MIB,
            "freed {} of {own}",
            before - after
        );
        assert_eq!(rep.bytes_freed, mid - after);
        assert_eq!(listed(&r), kept);
        for (_, v, id) in &h {
            if kept.contains(v) {
                assert_eq!(r.get(id).expect("get").map(|b| b.len()), Some(200 << 10));
            }
        }
        let last: LastPrune = serde_json::from_str(
            &Index::open(&r.repo_dir().index(), crate::index::Mode::Read)
                .expect("index")
                .meta(LAST_PRUNE)
                .expect("meta")
                .expect("written"),
        )
        .expect("json");
        assert!(last.ok && last.error.is_none(), "{last:?}");
        drop(r);
        scrub_clean(d.path());
        // After compaction too, repair keeps them removed: the removal record was carried.
        let rb = rebuild(d.path());
        assert_eq!((rb.versions, rb.removal_records), (6, 1));
        let r = open(d.path());
        assert_eq!(listed(&r), kept);
        // New commits still work, and get numbers above every removed one.
        let (id, bytes) = sealed(9999, 100);
        r.put(&id, &bytes).expect("put");
        let c = NewCommit {
            commit_id: CommitId([200; 16]),
            file_id: FileId([0; 32]),
            manifest: vec![1],
            chunks: vec![id],
            deleted: false,
        };
        match r.flush(&[c]).expect("flush")[0] {
            CommitOutcome::Acked { version, .. } => assert!(version > 15, "{version}"),
            ref o => panic!("{o:?}"),
        }
    }

    #[test]
    fn a_commit_against_a_chunk_prune_deleted_gets_missing_chunks() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = open(d.path());
        history(&r, 1, 2);
        // An upload whose commit comes later: its chunk is indexed, unreferenced.
        let (id, bytes) = sealed(777, 5000);
        r.put(&id, &bytes).expect("put");
        r.flush(&[]).expect("flush");
        let rep =
            prune(&r, &keep_last(1, 0.1), now_secs(), &PruneOptions::default()).expect("prune");
        assert_eq!(rep.chunks_removed, 2);
        let c = NewCommit {
            commit_id: CommitId([99; 16]),
            file_id: FileId([5; 32]),
            manifest: vec![1],
            chunks: vec![id],
            deleted: false,
        };
        assert_eq!(
            r.flush(std::slice::from_ref(&c)).expect("flush"),
            [CommitOutcome::MissingChunks(vec![id])]
        );
        r.put(&id, &bytes).expect("sent again");
        assert!(matches!(
            r.flush(&[c]).expect("flush")[0],
            CommitOutcome::Acked { .. }
        ));
    }

    #[test]
    fn a_removal_record_past_the_indexed_end_is_applied_when_the_repository_opens() {
        let d = tempfile::tempdir().expect("tempdir");
        crate::init(d.path(), None).expect("init");
        let r = open(d.path());
        let h = history(&r, 2, 3);
        let index = r.repo_dir().index();
        drop(r);
        // The index as it was before the prune, and the packs as the prune left them: a
        // crash after the removal record's fsync, before its index transaction.
        let saved = tempfile::tempdir().expect("tempdir");
        for ext in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{ext}", index.display()));
            if from.exists() {
                std::fs::copy(&from, saved.path().join(format!("i{ext}"))).expect("copy");
            }
        }
        let r = open(d.path());
        let rep =
            prune(&r, &keep_last(1, 1.0), now_secs(), &PruneOptions::default()).expect("prune");
        // No pack went (the old index still describes every one).
        assert_eq!((rep.versions_removed, rep.packs_deleted), (4, 0));
        drop(r);
        for ext in ["", "-wal", "-shm"] {
            let to = PathBuf::from(format!("{}{ext}", index.display()));
            let from = saved.path().join(format!("i{ext}"));
            if from.exists() {
                std::fs::copy(&from, &to).expect("restore");
            } else {
                let _ = std::fs::remove_file(&to);
            }
        }
        let r = open(d.path());
        let newest: Vec<u64> = h.iter().skip(4).map(|x| x.1).collect();
        assert_eq!(listed(&r), newest);
        drop(r);
        // Chunk rows of removed versions are garbage now; scrub accepts the packs.
        scrub_clean(d.path());
    }
}
