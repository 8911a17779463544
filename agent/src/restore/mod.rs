//! Getting files back: `ls`, `versions`, `restore`, `verify`. Files are named as
//! `status` names them ([`crate::paths`]).
//!
//! The catalog is every version the receiver holds for this repository, listed in pages and
//! opened with the manifest key. A point in time picks, per path, the latest version
//! committed at or before it; a deletion hides the file. Restore fetches chunks pipelined
//! (a bounded window in flight), opens and verifies each on worker threads, and writes them
//! at their offsets: a new file of at most one chunk is created under its own name
//! (`O_EXCL`, so nothing that appeared there meanwhile is followed or replaced) and written
//! with one write; a file of several chunks, or one that exists (`--overwrite`), is written
//! to a temporary file beside it and renamed into place when complete, so no file is left
//! half-written or half-replaced under its name by a restore that stops. A file that fails
//! is removed. Unsafe manifest paths are refused.
//!
//! This file decides what is written where; `tree.rs` owns the target: every folder,
//! file and symlink is reached through folder handles, never by a path that a symlink
//! swapped into the target could redirect, and it holds the rules on whose folders are
//! written into and on the mode a restored file gets.

mod tree;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use coffer_common::chunk::{ChunkId, Crypto, FileId, Opened, MAX_PLAIN, SEAL_OVERHEAD};
use coffer_common::host::fs::{Context as _, IoError};
use coffer_common::host::time::rfc3339;
use coffer_common::manifest::{place, EntryKind, Extent, Manifest};
use coffer_common::wire::{Message, VersionEntry};

use crate::config::Config;
use crate::conn::{Conn, ConnError, Pending};
use crate::paths::{self, Named};
use crate::state;
pub use tree::Shared;
use tree::{restored_mode, temp_name, Dest, Owner, Refusal, Tree};

/// Errors of restore-side commands.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("starting runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{failed} of {total} files could not be restored (see the messages above)")]
    Partial { failed: usize, total: usize },
    #[error("{0} damaged or missing files (see the messages above)")]
    Damaged(usize),
    /// A target (or a folder in it) that another user could change under the restore.
    #[error(transparent)]
    Shared(#[from] Shared),
}

/// One version of one file, opened.
#[derive(Debug, Clone)]
pub struct Item {
    pub version: u64,
    pub commit_time: i64,
    pub file_id: FileId,
    pub manifest: Manifest,
}

/// A connected session for restore-side commands: runtime, connection, keys.
pub struct Session {
    pub rt: tokio::runtime::Runtime,
    pub conn: Conn,
    pub crypto: Crypto,
}

impl Session {
    /// Connects, unlocks the keys (fetching the escrowed key file if this machine has
    /// none) and reads the catalog. Argon2id, slow by design, runs on its own thread while
    /// the version list is fetched; the manifests are opened once the keys are there. A
    /// wrong passphrase fails before anything is written.
    pub fn open(cfg: &Config) -> Result<(Self, Vec<Item>), RestoreError> {
        let t0 = std::time::Instant::now();
        let keypair = state::load_agent_key(cfg)?;
        let kf = cfg.keyfile_path();
        let local = read_keyfile(&kf)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(RestoreError::Runtime)?;
        // `download_limit` (or `restore --limit-rate`) caps what comes from the receiver.
        crate::rate::global().set(cfg.upload_limit, cfg.download_limit);
        let conn = rt.block_on(Conn::connect(
            &cfg.receiver,
            &cfg.receiver_key,
            &keypair,
            &cfg.name,
        ))?;
        let (candidates, escrowed) = match local {
            Some(bytes) => (vec![(bytes, kf.clone())], false),
            None => (fetch_keyfiles(&rt, &conn)?, true),
        };
        let Some((first, first_origin)) = candidates.first() else {
            return Err(no_escrowed_keyfile());
        };
        let pass = state::unlock_passphrase(cfg, first, first_origin)?;
        // Which candidate opened (the escrow's entries are tried newest first).
        let opened = std::sync::atomic::AtomicUsize::new(0);
        // Pages listed before the keys are ready wait sealed; once they are, each page is
        // opened as it arrives, so only the pages fetched during Argon2id are held twice.
        let (crypto, items) = std::thread::scope(|scope| {
            let unwrap = || {
                let (i, c) = unlock_first(&candidates, &pass)?;
                opened.store(i, Ordering::Relaxed);
                Ok(c)
            };
            let mut thread = std::thread::Builder::new()
                .name("coffer-unlock".into())
                .spawn_scoped(scope, unwrap)
                .ok();
            let mut crypto: Option<Crypto> = None;
            let mut sealed: Vec<VersionEntry> = Vec::new();
            let mut items = Vec::new();
            let mut after = 0u64;
            let mut listed = Ok(());
            loop {
                match list_page(&rt, &conn, after) {
                    Ok((entries, more)) => {
                        after = entries.iter().map(|e| e.version).fold(after, u64::max);
                        let done = !more || entries.is_empty();
                        sealed.extend(entries);
                        keys_ready(&mut thread, &mut crypto, done, &unwrap)?;
                        if let Some(c) = &crypto {
                            open_entries(c, sealed.drain(..), &mut items);
                        }
                        if done {
                            break;
                        }
                    }
                    Err(e) => {
                        listed = Err(e);
                        break;
                    }
                }
            }
            // A wrong passphrase is reported before a listing error.
            keys_ready(&mut thread, &mut crypto, true, &unwrap)?;
            listed?;
            match crypto {
                Some(c) => Ok((c, items)),
                None => Err(RestoreError::Usage("keys not unlocked".into())),
            }
        })?;
        if escrowed {
            let (bytes, _) = &candidates[opened.load(Ordering::Relaxed).min(candidates.len() - 1)];
            state::write_private(&kf, bytes)?;
        }
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            versions = items.len(),
            "connected, keys unlocked, versions listed and opened"
        );
        Ok((Session { rt, conn, crypto }, items))
    }
}

/// This machine's key file, or `None` when it has none (a new machine: the escrowed one is
/// fetched). Only a missing file is `None`: one that exists but cannot be read is an error
/// that names it, never a reason to fetch another key file and ask for its passphrase.
fn read_keyfile(path: &Path) -> Result<Option<Vec<u8>>, RestoreError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IoError::new("reading key file", path, e).into()),
    }
}

/// The key unwrapping thread of [`Session::open`].
type Unlock<'s> = std::thread::ScopedJoinHandle<'s, Result<Crypto, RestoreError>>;

/// Fills `crypto` once the unwrapping thread has finished (at once, waiting, with `wait`;
/// on this thread when none could be started).
fn keys_ready(
    thread: &mut Option<Unlock<'_>>,
    crypto: &mut Option<Crypto>,
    wait: bool,
    unwrap: &dyn Fn() -> Result<Crypto, RestoreError>,
) -> Result<(), RestoreError> {
    if crypto.is_some() {
        return Ok(());
    }
    *crypto = Some(match thread.take() {
        Some(h) if wait || h.is_finished() => h.join().unwrap_or_else(|_| {
            Err(RestoreError::Usage(
                "the key unwrapping thread failed".into(),
            ))
        })?,
        Some(h) => {
            *thread = Some(h);
            return Ok(());
        }
        None => unwrap()?,
    });
    Ok(())
}

/// Opens listed versions' manifests into `out`. Versions whose manifest does not open are
/// reported and skipped.
fn open_entries(crypto: &Crypto, entries: impl Iterator<Item = VersionEntry>, out: &mut Vec<Item>) {
    for e in entries {
        match crypto
            .open_manifest(&e.file_id, &e.manifest)
            .map_err(|x| x.to_string())
            .and_then(|b| Manifest::decode(&b).map_err(|x| x.to_string()))
        {
            Ok(m) => out.push(Item {
                version: e.version,
                commit_time: e.commit_time,
                file_id: e.file_id,
                manifest: m,
            }),
            Err(err) => {
                tracing::error!(version = e.version, error = %err, "a version's manifest does not open (damaged repository); skipped")
            }
        }
    }
}

/// One page of versions after `after` (manifests still sealed), and whether more follow.
fn list_page(
    rt: &tokio::runtime::Runtime,
    conn: &Conn,
    after: u64,
) -> Result<(Vec<VersionEntry>, bool), RestoreError> {
    let r = rt.block_on(conn.call(Message::ListVersions {
        after,
        limit: 10_000,
    }))?;
    match r {
        Message::Versions { entries, more } => Ok((entries, more)),
        r => Err(ConnError::Unexpected(r.kind()).into()),
    }
}

/// The escrow's key files, newest first, each named by its entry number; one that is not
/// a well-formed key file is skipped with a warning naming it.
fn fetch_keyfiles(
    rt: &tokio::runtime::Runtime,
    conn: &Conn,
) -> Result<Vec<(Vec<u8>, PathBuf)>, RestoreError> {
    let files = match rt.block_on(conn.call(Message::GetKeyFiles))? {
        Message::KeyFiles { files } => files,
        m => return Err(ConnError::Unexpected(m.kind()).into()),
    };
    let total = files.len();
    let usable: Vec<_> = files
        .into_iter()
        .filter_map(|f| {
            let origin = PathBuf::from(format!("escrowed key file #{}", f.number));
            match state::check_key_file(&f.data, &origin) {
                Ok(()) => Some((f.data, origin)),
                Err(e) => {
                    tracing::warn!("{e}; skipped");
                    None
                }
            }
        })
        .collect();
    if usable.is_empty() {
        return Err(if total == 0 {
            no_escrowed_keyfile()
        } else {
            RestoreError::Usage(format!(
                "none of the {total} key files escrowed for this repository is a usable key file \
                 (see the warnings above)"
            ))
        });
    }
    Ok(usable)
}

fn no_escrowed_keyfile() -> RestoreError {
    RestoreError::Usage(
        "the receiver holds no key file for this repository (was the first agent ever run?)".into(),
    )
}

/// Opens the first of `candidates` (newest first) that the passphrase opens, and says
/// which. A wrong passphrase is the answer only when it opens none: then the newest's
/// error is returned.
fn unlock_first(
    candidates: &[(Vec<u8>, PathBuf)],
    pass: &coffer_common::keys::Passphrase,
) -> Result<(usize, Crypto), RestoreError> {
    let mut first_err = None;
    for (i, (bytes, origin)) in candidates.iter().enumerate() {
        match state::unlock_with(bytes, pass, origin) {
            Ok(c) => return Ok((i, c)),
            Err(e) => {
                if candidates.len() > 1 {
                    tracing::debug!("{e}; trying an older escrowed key file");
                }
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err
        .map(RestoreError::from)
        .unwrap_or_else(no_escrowed_keyfile))
}

/// Does `path` fall under one of `prefixes` (whole components)?
fn matches(path: &[u8], prefixes: &[Vec<u8>]) -> bool {
    prefixes.is_empty()
        || prefixes.iter().any(|p| {
            let p = p.strip_suffix(b"/").unwrap_or(p);
            path == p || (path.starts_with(p) && path.get(p.len()) == Some(&b'/'))
        })
}

/// The latest version of each file at `at` (or now): deletions and folders left out.
pub fn select(items: &[Item], at: Option<i64>, prefixes: &[Vec<u8>]) -> BTreeMap<Vec<u8>, Item> {
    select_all(items, at, prefixes).0
}

/// The latest version of each path at `at` (or now), deletions left out, split into files
/// (and symlinks) and folders (`Dir` versions). A path's versions are one history whatever
/// their kind: a folder that became a file is a file from its first file version on.
pub fn select_all(
    items: &[Item],
    at: Option<i64>,
    prefixes: &[Vec<u8>],
) -> (BTreeMap<Vec<u8>, Item>, BTreeMap<Vec<u8>, Item>) {
    let mut latest: BTreeMap<Vec<u8>, &Item> = BTreeMap::new();
    for it in items {
        if at.is_some_and(|t| it.commit_time > t) || !matches(&it.manifest.path, prefixes) {
            continue;
        }
        let e = latest.entry(it.manifest.path.clone()).or_insert(it);
        if it.version > e.version {
            *e = it;
        }
    }
    let (mut files, mut dirs) = (BTreeMap::new(), BTreeMap::new());
    for (k, v) in latest {
        match v.manifest.kind {
            EntryKind::Deleted => {}
            EntryKind::Dir => {
                dirs.insert(k, v.clone());
            }
            EntryKind::File | EntryKind::Symlink { .. } | EntryKind::Special { .. } => {
                files.insert(k, v.clone());
            }
        }
    }
    (files, dirs)
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// The repository name (`watch-name/relative/path`) of a file or folder named on the
/// command line (see [`paths::resolve`]). A path on disk under no watched folder is refused;
/// `name/...` with a name this config does not watch is taken as it is (a file another
/// machine, or an older config, backed up).
pub fn repo_name(cfg: &Config, arg: &str) -> Result<Vec<u8>, RestoreError> {
    match paths::resolve(cfg, arg) {
        Named::Elsewhere { local: true, .. } => Err(RestoreError::Usage(format!(
            "{arg} is not under a watched folder ({}); name a file by its path under one, \
             or as watch-name/relative/path",
            paths::watched_list(cfg)
        ))),
        n => Ok(n.key().to_vec()),
    }
}

fn kind_name(k: &EntryKind) -> &'static str {
    match k {
        EntryKind::File => "file",
        EntryKind::Symlink { .. } => "symlink",
        EntryKind::Deleted => "deleted",
        EntryKind::Dir => "folder",
        EntryKind::Special { kind, .. } => kind.name(),
    }
}

fn mtime(m: &Manifest) -> String {
    rfc3339(m.mtime_ns.div_euclid(1_000_000_000))
}

/// `ls`: one line per file (or, with `json`, one array). `at_text` is `--at` as given, for
/// the message that nothing matched.
pub fn ls(
    cfg: &Config,
    at: Option<i64>,
    at_text: Option<&str>,
    prefix: Option<&str>,
    json: bool,
) -> Result<(), RestoreError> {
    let prefixes: Vec<Vec<u8>> = prefix
        .map(|p| repo_name(cfg, p))
        .transpose()?
        .into_iter()
        .collect();
    let (_session, items) = Session::open(cfg)?;
    let sel = select(&items, at, &prefixes);
    let mut out = std::io::stdout().lock();
    if json {
        let list: Vec<serde_json::Value> = sel
            .iter()
            .map(|(path, it)| {
                let m = &it.manifest;
                let mut v = serde_json::json!({
                    "path": show(path),
                    "kind": kind_name(&m.kind),
                    "size": m.size,
                    "mtime": mtime(m),
                    "version": it.version,
                    "backed_up_at": rfc3339(it.commit_time),
                });
                if let EntryKind::Symlink { target } = &m.kind {
                    v["target"] = show(target).into();
                }
                v
            })
            .collect();
        let _ = writeln!(out, "{}", serde_json::Value::Array(list));
    } else {
        if std::io::stdout().is_terminal() && !sel.is_empty() {
            let _ = writeln!(
                out,
                "{:>12}  {:<20}  {:<7} path",
                "size", "modified (mtime)", "version"
            );
        }
        for (path, it) in &sel {
            let m = &it.manifest;
            let kind = match &m.kind {
                EntryKind::Symlink { target } => format!(" -> {}", show(target)),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{:>12}  {}  v{:<6} {}{}",
                m.size,
                mtime(m),
                it.version,
                show(path),
                kind
            );
        }
    }
    if sel.is_empty() {
        eprintln!(
            "no files backed up{}{}",
            prefix.map(|p| format!(" under {p}")).unwrap_or_default(),
            at.map(|t| match (rfc3339(t), at_text.map(str::trim)) {
                (utc, Some(given)) if given != utc => format!(" at or before {given} ({utc})"),
                (utc, _) => format!(" at or before {utc}"),
            })
            .unwrap_or_default()
        );
    }
    Ok(())
}

/// `versions PATH...`: every version of each file, oldest first, numbered from 1.
pub fn versions(cfg: &Config, args: &[String], json: bool) -> Result<(), RestoreError> {
    let keys = args
        .iter()
        .map(|a| repo_name(cfg, a))
        .collect::<Result<Vec<_>, _>>()?;
    let (_session, items) = Session::open(cfg)?;
    let mut out = std::io::stdout().lock();
    let terminal = std::io::stdout().is_terminal();
    let mut docs = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        let mut v: Vec<&Item> = items.iter().filter(|i| &i.manifest.path == key).collect();
        v.sort_by_key(|i| i.version);
        if v.is_empty() {
            eprintln!("no versions of {}", show(key));
        }
        if json {
            let list: Vec<serde_json::Value> = v
                .iter()
                .enumerate()
                .map(|(k, i)| {
                    let m = &i.manifest;
                    let mut e = serde_json::json!({
                        "n": k + 1,
                        "version": i.version,
                        "backed_up_at": rfc3339(i.commit_time),
                        "backed_up_at_unix": i.commit_time,
                        "kind": kind_name(&m.kind),
                        "size": m.size,
                        "mtime": mtime(m),
                    });
                    match &m.kind {
                        EntryKind::File => {
                            e["content_hash"] = coffer_common::chunk::to_hex(&m.content_hash).into()
                        }
                        EntryKind::Symlink { target } => e["target"] = show(target).into(),
                        EntryKind::Dir => e["mode"] = format!("{:04o}", m.mode).into(),
                        EntryKind::Deleted | EntryKind::Special { .. } => {}
                    }
                    if let Some(l) = m.hardlink.as_ref().filter(|l| !l.to.is_empty()) {
                        e["link_to"] = show(&l.to).into();
                    }
                    if !m.xattrs.is_empty() {
                        e["xattrs"] = m
                            .xattrs
                            .iter()
                            .map(|x| serde_json::Value::from(show(&x.name)))
                            .collect::<Vec<_>>()
                            .into();
                    }
                    e
                })
                .collect();
            docs.push(serde_json::json!({"path": show(key), "versions": list}));
            continue;
        }
        if v.is_empty() {
            continue;
        }
        if keys.len() > 1 {
            let _ = writeln!(out, "{}{}:", if n > 0 { "\n" } else { "" }, show(key));
        }
        if terminal {
            let _ = writeln!(
                out,
                "{:>4}  {:<7} {:<20}  {:>12}  content",
                "#", "version", "backed up at", "size"
            );
        }
        for (k, i) in v.iter().enumerate() {
            let m = &i.manifest;
            let what = match &m.kind {
                EntryKind::File => format!(
                    "{:>12}  {}",
                    m.size,
                    &coffer_common::chunk::to_hex(&m.content_hash)[..12]
                ),
                EntryKind::Symlink { target } => format!("{:>12}  -> {}", m.size, show(target)),
                EntryKind::Deleted => format!("{:>12}  deleted", "-"),
                EntryKind::Dir => format!("{:>12}  folder {:04o}", "-", m.mode),
                EntryKind::Special { kind, .. } => format!("{:>12}  {}", "-", kind.name()),
            };
            let _ = writeln!(
                out,
                "{:>4}  v{:<6} {}  {}",
                k + 1,
                i.version,
                rfc3339(i.commit_time),
                what
            );
        }
    }
    if json {
        let _ = writeln!(out, "{}", serde_json::Value::Array(docs));
    }
    Ok(())
}

/// Options of `restore`.
pub struct RestoreOpts {
    pub to: PathBuf,
    pub at: Option<i64>,
    pub paths: Vec<String>,
    pub overwrite: bool,
    pub progress: bool,
    /// Restore into a target, or a folder in it, that another user owns or that group or
    /// others may write to (refused otherwise).
    pub allow_shared_target: bool,
    /// Restoring as root, keep setuid and setgid bits (dropped otherwise).
    pub keep_setuid: bool,
}

/// How restored files get their owner and mode.
#[derive(Debug, Clone, Copy)]
struct Perms {
    /// Restoring as root: owners are set.
    as_root: bool,
    keep_setuid: bool,
}

/// Chunks fetched ahead by `dump` and `verify`.
const WINDOW: usize = 24;

struct Target {
    /// The folder of the tree it is in, and its name there.
    folder: usize,
    name: OsString,
    /// The name written: `name` itself when it did not exist, else a temporary one.
    tmp: OsString,
    /// Opened when the first chunk lands, closed when the file is finished, so only files
    /// with chunks in flight hold a descriptor (a restore of 100k files stays far below the
    /// open-file limit).
    file: Option<Arc<std::fs::File>>,
    /// Whether this restore created `tmp` (so may remove it): when `tmp` is the destination
    /// itself, a file that appeared there meanwhile is someone else's and stays.
    created: bool,
    /// Held while a part is written. Buffered writes to one file are serialized by the
    /// kernel on its inode lock, where a waiting thread spins; this lock makes the second
    /// writer sleep instead.
    writing: Arc<Mutex<()>>,
    remaining: usize,
    failed: Option<String>,
    item: Item,
    /// A sparse file's data extents: the chunks' bytes go there, the rest is holes.
    extents: Option<Arc<[Extent]>>,
    /// A file others are hard-linked to: its path is added once it is in place.
    linked: Option<Arc<Mutex<HashSet<Vec<u8>>>>>,
}

/// `restore`.
pub fn restore(cfg: &Config, o: RestoreOpts) -> Result<(), RestoreError> {
    let prefixes = o
        .paths
        .iter()
        .map(|p| repo_name(cfg, p))
        .collect::<Result<Vec<_>, _>>()?;
    let (s, items) = Session::open(cfg)?;
    let (sel, dirs) = select_all(&items, o.at, &prefixes);
    if sel.is_empty() && (dirs.is_empty() || o.to.as_os_str() == "-") {
        return Err(RestoreError::Usage(if o.paths.is_empty() {
            "nothing to restore: the repository holds no files at that time".into()
        } else {
            format!("nothing matches {:?} at that time", o.paths)
        }));
    }
    if o.to.as_os_str() == "-" {
        return dump(&s, &sel, &o);
    }
    let mut tree = Tree::open(&o.to, o.overwrite, o.allow_shared_target)?;
    let total = sel.len();
    let total_bytes: u64 = sel.values().map(|i| i.manifest.size).sum();
    let perms = Perms {
        as_root: nix::unistd::geteuid().is_root(),
        keep_setuid: o.keep_setuid,
    };
    // Every destination first, its folders made: a folder found that another user could
    // change refuses the restore before any file is written. Folders with a version of
    // their own first (an empty one is made too); their metadata is set once every file is
    // written.
    let mut failed = 0usize;
    // Folders that failed: counted with the files in the error's total only then, so the
    // usual message counts files as it always did.
    let mut folders_failed = 0usize;
    let mut recorded = HashMap::new();
    for (path, it) in &dirs {
        match tree.folder(path) {
            Ok(f) => {
                recorded.insert(f, &it.manifest);
            }
            Err(Refusal::File(e)) => {
                eprintln!("error: {}: {e}", show(path));
                folders_failed += 1;
            }
            Err(Refusal::Shared(e)) => return Err(e.into()),
        }
    }
    let mut dests = Vec::with_capacity(sel.len());
    for (path, it) in sel {
        match tree.prepare(&path) {
            Ok(d) => dests.push((path, it, Ok(d))),
            Err(Refusal::File(e)) => dests.push((path, it, Err(e))),
            Err(Refusal::Shared(e)) => return Err(e.into()),
        }
    }
    let bar = progress_bar(o.progress, total_bytes, "restoring");
    // Hard links restored together: the first path of each inode is restored, the others
    // are linked to it once it is in place.
    let leaders = link_leaders(dests.iter().map(|(p, it, _)| (p, it)));
    let leading: HashSet<Vec<u8>> = leaders.values().cloned().collect();
    let linked: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let mut links: Vec<(Vec<u8>, Dest, Vec<u8>, u64)> = Vec::new();
    let mut placed: HashMap<Vec<u8>, (usize, OsString)> = HashMap::new();
    // Prepare targets; symlinks and empty files finish at once.
    let mut targets: HashMap<usize, Target> = HashMap::new();
    let mut order: Vec<(Job, ChunkId, u32)> = Vec::new();
    for (n, (path, it, dest)) in dests.into_iter().enumerate() {
        let dest: Dest = match dest {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: {}: {e}", show(&path));
                failed += 1;
                continue;
            }
        };
        if let Some(leader) = leaders.get(&path) {
            links.push((path, dest, leader.clone(), it.manifest.size));
            continue;
        }
        let is_leader = leading.contains(&path);
        if is_leader {
            placed.insert(path.clone(), (dest.folder, dest.name.clone()));
        }
        match &it.manifest.kind {
            EntryKind::Special { kind, rdev } => {
                match tree.place_special(&dest, *kind, *rdev, &it.manifest, perms.as_root) {
                    Ok(None) => {}
                    Ok(Some(w)) => eprintln!("warning: {w}"),
                    Err(e) => {
                        eprintln!("error: {}: {e}", show(&path));
                        failed += 1;
                    }
                }
            }
            EntryKind::Symlink { target } => {
                if let Err(e) = tree.place_symlink(&dest, target, &it.manifest, perms.as_root) {
                    eprintln!("error: {}: {e}", show(&path));
                    failed += 1;
                }
            }
            EntryKind::File => {
                if let Err(e) = it.manifest.check_extents() {
                    eprintln!("error: {}: {e}", show(&path));
                    failed += 1;
                    continue;
                }
                let chunks: Vec<(ChunkId, u32)> =
                    it.manifest.chunks.iter().map(|c| (c.id, c.len)).collect();
                // A new file of at most one chunk is created under its own name and written
                // with one write; a larger one, written part by part, and any file that
                // exists are written beside the destination and renamed into place whole.
                let tmp = if dest.fresh && chunks.len() <= 1 {
                    dest.name.clone()
                } else {
                    temp_name()
                };
                let t = Target {
                    folder: dest.folder,
                    name: dest.name,
                    tmp,
                    file: None,
                    created: false,
                    writing: Arc::default(),
                    remaining: chunks.len(),
                    failed: None,
                    extents: it.manifest.sparse.as_deref().map(Arc::from),
                    linked: is_leader.then(|| linked.clone()),
                    item: it,
                };
                match chunks.as_slice() {
                    [] => {
                        let written = if t.extents.is_some() { u64::MAX } else { 0 };
                        if let Err(e) = finish(t, written, &tree, perms) {
                            eprintln!("error: {}: {e}", show(&path));
                            failed += 1;
                        }
                    }
                    [(id, len)] => order.push((Job::Whole(Box::new(t)), *id, *len)),
                    _ => {
                        let mut off = 0u64;
                        for (id, len) in chunks {
                            order.push((Job::Part { n, off }, id, len));
                            off += len as u64;
                        }
                        targets.insert(n, t);
                    }
                }
            }
            EntryKind::Deleted | EntryKind::Dir => {}
        }
    }
    let targets = Arc::new(Mutex::new(targets));
    failed += fetch_all(&s, order, &targets, &bar, &tree, perms);
    let left: Vec<Target> = match targets.lock() {
        Ok(mut t) => t.drain().map(|(_, v)| v).collect(),
        Err(_) => Vec::new(),
    };
    for t in left {
        // Files whose chunks did not all arrive.
        let name = show(&t.item.manifest.path);
        let why = t.failed.clone().unwrap_or_else(|| "incomplete".into());
        t.discard(&tree);
        eprintln!("error: {name}: {why}");
        failed += 1;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // Hard links to the files now in place.
    let done = linked.lock().map(|d| d.clone()).unwrap_or_default();
    for (path, dest, leader, size) in links {
        let r = match placed.get(&leader) {
            Some((folder, name)) if done.contains(&leader) => tree.link(*folder, name, &dest, size),
            _ => Err(format!(
                "not linked: {} (the file it is a hard link to) was not restored",
                show(&leader)
            )),
        };
        if let Err(e) = r {
            eprintln!("error: {}: {e}", show(&path));
            failed += 1;
        }
    }
    // Every file is in place: each folder gets its recorded mode, owner and mtime (or, one
    // this restore made without a version of its own, the mode it always had), deepest
    // first, so nothing written afterwards changes a folder's mtime.
    for e in tree.settle_folders(&recorded, perms.as_root, perms.keep_setuid) {
        eprintln!("error: {e}");
        folders_failed += 1;
    }
    if failed + folders_failed > 0 {
        return Err(RestoreError::Partial {
            failed: failed + folders_failed,
            total: total + folders_failed,
        });
    }
    eprintln!(
        "restored {total} files ({total_bytes} bytes) into {}",
        o.to.display()
    );
    Ok(())
}

fn progress_bar(on: bool, total: u64, what: &'static str) -> Option<indicatif::ProgressBar> {
    if !on || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(st) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        b.set_style(st.progress_chars("=> "));
    }
    b.set_message(what);
    Some(b)
}

/// Bytes of chunk data requested and not yet written, at most: bounds memory whatever the
/// sizes of the files (a 10 GiB file never has more than this in flight).
const WINDOW_BYTES: u64 = 16 << 20;
/// Requests in flight at most (a small file is one small chunk: many may be in flight so
/// that round trips do not bound the rate).
const WINDOW_CHUNKS: usize = 4096;
/// Threads opening chunks and writing them.
const WORKERS: usize = 2;

/// The budget of bytes and requests in flight, shared by the thread that sends requests
/// and the workers that finish them.
struct Budget {
    used: Mutex<(u64, usize)>,
    freed: std::sync::Condvar,
}

impl Budget {
    fn new() -> Self {
        Budget {
            used: Mutex::new((0, 0)),
            freed: std::sync::Condvar::new(),
        }
    }

    /// The bytes one request is charged: its sealed reply at most (a hostile manifest's
    /// length cannot exceed what a reply can carry).
    fn cost(len: u32) -> u64 {
        (len as u64).min(MAX_PLAIN as u64) + SEAL_OVERHEAD as u64
    }

    /// Waits until `cost` more bytes fit (a request always fits when nothing is in flight).
    fn take(&self, cost: u64) {
        let Ok(mut u) = self.used.lock() else { return };
        while u.1 > 0 && (u.0 + cost > WINDOW_BYTES || u.1 >= WINDOW_CHUNKS) {
            u = match self.freed.wait(u) {
                Ok(u) => u,
                Err(_) => return,
            };
        }
        u.0 += cost;
        u.1 += 1;
    }

    fn give(&self, cost: u64) {
        if let Ok(mut u) = self.used.lock() {
            u.0 = u.0.saturating_sub(cost);
            u.1 = u.1.saturating_sub(1);
        }
        self.freed.notify_one();
    }
}

/// One chunk to fetch: a whole one-chunk file (finished by the worker that opens it, without
/// touching the shared map), or a part of file `n` in the shared map.
enum Job {
    Whole(Box<Target>),
    Part { n: usize, off: u64 },
}

/// Fetches every chunk in `order` with a window bounded in bytes and in requests, opening
/// and writing them on worker threads. Completed files are finished (renamed into place) as
/// their last chunk lands; files left in `targets` afterwards failed (their reason is
/// recorded in them). Returns the number of files that failed otherwise (already reported).
fn fetch_all(
    s: &Session,
    order: Vec<(Job, ChunkId, u32)>,
    targets: &Arc<Mutex<HashMap<usize, Target>>>,
    bar: &Option<indicatif::ProgressBar>,
    tree: &Tree,
    perms: Perms,
) -> usize {
    let (tx, rx) = crossbeam_channel::unbounded::<(Job, ChunkId, u32, Result<Pending, String>)>();
    let budget = Budget::new();
    let bad = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            let rx = rx.clone();
            let (budget, bad) = (&budget, &bad);
            let crypto = &s.crypto;
            scope.spawn(move || {
                while let Ok((job, id, len, p)) = rx.recv() {
                    let res = p.and_then(|p| {
                        p.wait_blocking()
                            .map_err(|e| e.to_string())
                            .and_then(|m| match m {
                                Message::Chunk { sealed, .. } => {
                                    crypto.open_chunk_owned(&id, sealed).map_err(|e| {
                                        format!("chunk {} is damaged: {e}", &id.to_hex()[..16])
                                    })
                                }
                                m => Err(format!("unexpected reply {}", m.kind())),
                            })
                    });
                    let res = res.and_then(|plain| {
                        if plain.len() as u64 == len as u64 {
                            Ok(plain)
                        } else {
                            Err(format!(
                                "chunk {} holds {} bytes but the manifest says {len}",
                                &id.to_hex()[..16],
                                plain.len()
                            ))
                        }
                    });
                    let written = res.as_ref().map(|p| p.len() as u64).unwrap_or(0);
                    match job {
                        Job::Whole(t) => {
                            let name = show(&t.item.manifest.path);
                            if let Err(e) =
                                res.and_then(|plain| write_whole(*t, &plain, tree, perms))
                            {
                                eprintln!("error: {name}: {e}");
                                bad.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Job::Part { n, off } => {
                            if !write_part(targets, n, off, res, tree, perms) {
                                bad.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    budget.give(Budget::cost(len));
                    if let Some(b) = bar {
                        b.inc(written);
                    }
                }
            });
        }
        drop(rx);
        for (job, id, len) in order {
            budget.take(Budget::cost(len));
            let p = s
                .conn
                .start_blocking(Message::GetChunk { id })
                .map_err(|e| e.to_string());
            if tx.send((job, id, len, p)).is_err() {
                break;
            }
        }
        drop(tx);
    });
    bad.load(Ordering::Relaxed) as usize
}

/// Writes `plain`, the file's data from `data_off` on, where it goes: at that offset, or a
/// sparse file's at its extents (the holes are never written).
fn write_data(
    f: &std::fs::File,
    plain: &[u8],
    data_off: u64,
    extents: Option<&[Extent]>,
) -> std::io::Result<()> {
    for (at, a, b) in place(extents, data_off, plain.len()) {
        f.write_all_at(&plain[a..b], at)?;
    }
    Ok(())
}

/// The hard links among `files` restored together: each path that is a link to an earlier
/// one (the same inode, as recorded, and the same content and size) maps to that first
/// path, which is restored with the content.
fn link_leaders<'a>(
    files: impl Iterator<Item = (&'a Vec<u8>, &'a Item)>,
) -> HashMap<Vec<u8>, Vec<u8>> {
    let mut first: HashMap<(u64, u64, [u8; 32], u64), &Vec<u8>> = HashMap::new();
    let mut out = HashMap::new();
    for (path, it) in files {
        let m = &it.manifest;
        let Some(l) = m.hardlink.as_ref().filter(|_| m.kind == EntryKind::File) else {
            continue;
        };
        let key = (l.dev, l.ino, m.content_hash, m.size);
        match first.get(&key) {
            Some(leader) => {
                out.insert(path.clone(), (*leader).clone());
            }
            None => {
                first.insert(key, path);
            }
        }
    }
    out
}

/// Writes a one-chunk file and finishes it.
fn write_whole(mut t: Target, plain: &[u8], tree: &Tree, perms: Perms) -> Result<(), String> {
    let extents = t.extents.clone();
    let wrote = match t.open(tree) {
        Ok(f) => write_data(f, plain, 0, extents.as_deref())
            .map_err(|e| format!("writing {}: {e}", tree.shown(t.folder, &t.tmp).display())),
        Err(e) => Err(e),
    };
    // A sparse file's length is its size once its holes are made (in `finish`).
    let written = if extents.is_some() {
        u64::MAX
    } else {
        plain.len() as u64
    };
    match wrote {
        Ok(()) => finish(t, written, tree, perms),
        Err(e) => {
            t.file = None;
            t.discard(tree);
            Err(e)
        }
    }
}

/// Writes one part of a file of several chunks, outside the map's lock, and finishes the
/// file when it was the last. False when finishing failed (reported here); a failure to
/// fetch or write is recorded in the target and reported by the caller.
fn write_part(
    targets: &Mutex<HashMap<usize, Target>>,
    n: usize,
    off: u64,
    res: Result<Opened, String>,
    tree: &Tree,
    perms: Perms,
) -> bool {
    let file = {
        let Ok(mut t) = targets.lock() else {
            return true;
        };
        let Some(tg) = t.get_mut(&n) else { return true };
        match &res {
            Ok(_) if tg.failed.is_none() => match tg.open_shared(tree) {
                Ok(f) => Some((f, tg.writing.clone(), tg.extents.clone())),
                Err(e) => {
                    tg.failed = Some(e);
                    None
                }
            },
            Ok(_) => None,
            Err(e) => {
                tg.failed.get_or_insert_with(|| e.clone());
                None
            }
        }
    };
    let wrote = match (file, &res) {
        (Some((f, writing, extents)), Ok(plain)) => {
            let _one_writer = writing.lock().unwrap_or_else(|p| p.into_inner());
            Some(write_data(&f, plain, off, extents.as_deref()).map_err(|e| e.to_string()))
        }
        _ => None,
    };
    let Ok(mut t) = targets.lock() else {
        return true;
    };
    let Some(tg) = t.get_mut(&n) else { return true };
    if let Some(Err(e)) = wrote {
        let shown = tree.shown(tg.folder, &tg.tmp);
        tg.failed
            .get_or_insert_with(|| format!("writing {}: {e}", shown.display()));
    }
    tg.remaining -= 1;
    if tg.remaining == 0 && tg.failed.is_some() {
        tg.file = None;
    }
    if tg.remaining > 0 || tg.failed.is_some() {
        // A failed file stays in the map; the caller reports it once all its chunks are in.
        return true;
    }
    let Some(tg) = t.remove(&n) else { return true };
    drop(t);
    let name = show(&tg.item.manifest.path);
    match finish(tg, u64::MAX, tree, perms) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("error: {name}: {e}");
            false
        }
    }
}

impl Target {
    /// The file being written (`tmp`: the destination itself when it did not exist),
    /// created on first use.
    fn open(&mut self, tree: &Tree) -> Result<&std::fs::File, String> {
        self.open_shared(tree)?;
        self.file
            .as_deref()
            .ok_or_else(|| format!("creating {}", tree.shown(self.folder, &self.tmp).display()))
    }

    /// The file being written, created on first use (in its folder, by handle, never
    /// through anything already there), shared with writers outside the lock.
    fn open_shared(&mut self, tree: &Tree) -> Result<Arc<std::fs::File>, String> {
        if let Some(f) = &self.file {
            return Ok(f.clone());
        }
        let f = Arc::new(tree.create(self.folder, &self.tmp)?);
        self.file = Some(f.clone());
        self.created = true;
        Ok(f)
    }

    /// Removes the file this restore created for the target, if any.
    fn discard(&self, tree: &Tree) {
        if self.created {
            tree.remove(self.folder, &self.tmp);
        }
    }
}

/// Checks the written file's size and sets its owner (as root), mode and times through its
/// descriptor, then renames it into place, within its folder, if it is a temporary file.
/// `written` is the byte count when the caller knows it (one write), `u64::MAX` to ask the
/// file. The file written is removed on failure.
fn finish(mut t: Target, written: u64, tree: &Tree, perms: Perms) -> Result<(), String> {
    t.open(tree)?;
    let shown = tree.shown(t.folder, &t.tmp);
    let Some(file) = t.file.take() else {
        t.discard(tree);
        return Err(format!("creating {}", shown.display()));
    };
    let cleanup = |e: String| {
        t.discard(tree);
        e
    };
    let m = &t.item.manifest;
    if m.sparse.is_some() {
        // The holes: the file's length, with only the data written.
        file.set_len(m.size)
            .map_err(|e| cleanup(format!("sizing {}: {e}", shown.display())))?;
    }
    let len = if written == u64::MAX {
        file.metadata()
            .map_err(|e| cleanup(format!("{}: {e}", shown.display())))?
            .len()
    } else {
        written
    };
    if len != m.size {
        return Err(cleanup(format!(
            "restored {len} bytes but the manifest says {}",
            m.size
        )));
    }
    let owner = if !perms.as_root {
        Owner::Unchanged
    } else if m.uid != u32::MAX
        && m.gid != u32::MAX
        && std::os::unix::fs::fchown(&*file, Some(m.uid), Some(m.gid)).is_ok()
    {
        Owner::Set
    } else {
        Owner::Failed
    };
    let mode = restored_mode(m.mode, owner, perms.keep_setuid);
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| cleanup(format!("setting mode of {}: {e}", shown.display())))?;
    // Attributes after the owner and mode (a change of owner clears `security.capability`,
    // and an access ACL sets the group bits of the mode).
    let named = tree.shown(t.folder, &t.name);
    for w in crate::fidelity::xattr::restore_fd(&*file, &m.xattrs, &named) {
        eprintln!("warning: {w}");
    }
    let ts = nix::sys::time::TimeSpec::new(
        m.mtime_ns.div_euclid(1_000_000_000),
        m.mtime_ns.rem_euclid(1_000_000_000),
    );
    nix::sys::stat::futimens(std::os::fd::AsRawFd::as_raw_fd(&*file), &ts, &ts)
        .map_err(|e| cleanup(format!("setting mtime of {}: {e}", shown.display())))?;
    drop(file);
    if t.tmp != t.name {
        tree.rename(t.folder, &t.tmp, &t.name).map_err(cleanup)?;
    }
    if let Some(l) = &t.linked {
        if let Ok(mut l) = l.lock() {
            l.insert(t.item.manifest.path.clone());
        }
    }
    Ok(())
}

/// `restore --to - PATH`: one file's bytes to stdout.
fn dump(s: &Session, sel: &BTreeMap<Vec<u8>, Item>, o: &RestoreOpts) -> Result<(), RestoreError> {
    if o.paths.len() != 1 {
        return Err(RestoreError::Usage(
            "`--to -` takes exactly one PATH".into(),
        ));
    }
    let want = o.paths[0].as_bytes();
    let it = sel.get(want).ok_or_else(|| {
        RestoreError::Usage(format!("{:?} is not a file at that time", o.paths[0]))
    })?;
    if let EntryKind::Special { kind, .. } = it.manifest.kind {
        return Err(RestoreError::Usage(format!(
            "{:?} is a {} at that time, which has no bytes to write",
            o.paths[0],
            kind.name()
        )));
    }
    it.manifest
        .check_extents()
        .map_err(|e| RestoreError::Usage(format!("{}: {e}", o.paths[0])))?;
    // A sparse file's holes are written as zeros between its extents' data.
    let extents = it.manifest.sparse.as_deref();
    let mut at = 0u64;
    let mut data_off = 0u64;
    let mut out = std::io::stdout().lock();
    let mut pend = std::collections::VecDeque::new();
    let mut iter = it.manifest.chunks.iter();
    loop {
        while pend.len() < WINDOW {
            match iter.next() {
                Some(c) => pend.push_back((
                    c.id,
                    s.rt.block_on(s.conn.start(Message::GetChunk { id: c.id }))?,
                )),
                None => break,
            }
        }
        let Some((id, p)) = pend.pop_front() else {
            break;
        };
        let plain = match p.wait_blocking()? {
            Message::Chunk { sealed, .. } => {
                s.crypto.open_chunk_owned(&id, sealed).map_err(|e| {
                    RestoreError::Usage(format!(
                        "{}: chunk {} is damaged: {e}",
                        o.paths[0],
                        &id.to_hex()[..16]
                    ))
                })?
            }
            m => return Err(ConnError::Unexpected(m.kind()).into()),
        };
        for (off, a, b) in place(extents, data_off, plain.len()) {
            write_zeros(&mut out, off.saturating_sub(at))?;
            out.write_all(&plain[a..b])
                .ctx("writing", Path::new("stdout"))?;
            at = off + (b - a) as u64;
        }
        data_off += plain.len() as u64;
    }
    if extents.is_some() {
        write_zeros(&mut out, it.manifest.size.saturating_sub(at))?;
    }
    Ok(out.flush().ctx("writing", Path::new("stdout"))?)
}

/// Writes `n` zeros (a hole) to `out`.
fn write_zeros(out: &mut impl Write, mut n: u64) -> Result<(), RestoreError> {
    let zeros = [0u8; 64 * 1024];
    while n > 0 {
        let k = n.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..k])
            .ctx("writing", Path::new("stdout"))?;
        n -= k as u64;
    }
    Ok(())
}

/// `verify`: checks that every chunk referenced by the latest (or all) versions exists, and
/// with `read_data` downloads and opens each one.
pub fn verify(
    cfg: &Config,
    read_data: bool,
    all: bool,
    progress: bool,
) -> Result<(), RestoreError> {
    let (s, items) = Session::open(cfg)?;
    let chosen: Vec<Item> = if all {
        items
            .into_iter()
            .filter(|i| i.manifest.kind == EntryKind::File)
            .collect()
    } else {
        select(&items, None, &[]).into_values().collect()
    };
    let mut users: HashMap<ChunkId, Vec<usize>> = HashMap::new();
    for (n, it) in chosen.iter().enumerate() {
        for c in &it.manifest.chunks {
            users.entry(c.id).or_default().push(n);
        }
    }
    let ids: Vec<ChunkId> = users.keys().copied().collect();
    let mut bad: HashMap<usize, String> = HashMap::new();
    for page in ids.chunks(50_000) {
        if let Message::Missing { ids } =
            s.rt.block_on(s.conn.call(Message::HaveChunks { ids: page.to_vec() }))?
        {
            for id in ids {
                for &n in users.get(&id).into_iter().flatten() {
                    bad.entry(n).or_insert_with(|| {
                        format!("chunk {} is missing on the receiver", &id.to_hex()[..16])
                    });
                }
            }
        }
    }
    if read_data {
        let sizes: HashMap<ChunkId, u64> = chosen
            .iter()
            .flat_map(|i| i.manifest.chunks.iter().map(|c| (c.id, c.len as u64)))
            .collect();
        let bar = progress_bar(progress, sizes.values().sum(), "verifying");
        let mut pend = std::collections::VecDeque::new();
        let mut it = ids.iter();
        let mut seen = HashSet::new();
        loop {
            while pend.len() < WINDOW {
                match it.next() {
                    Some(id) if seen.insert(*id) => pend.push_back((
                        *id,
                        s.rt.block_on(s.conn.start(Message::GetChunk { id: *id }))?,
                    )),
                    Some(_) => continue,
                    None => break,
                }
            }
            let Some((id, p)) = pend.pop_front() else {
                break;
            };
            let res = match p.wait_blocking() {
                Ok(Message::Chunk { sealed, .. }) => s
                    .crypto
                    .open_chunk_owned(&id, sealed)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Ok(m) => Err(format!("unexpected reply {}", m.kind())),
                Err(e) if e.is_connection() => return Err(e.into()),
                Err(e) => Err(e.to_string()),
            };
            if let Some(b) = &bar {
                b.inc(sizes.get(&id).copied().unwrap_or(0));
            }
            if let Err(e) = res {
                for &n in users.get(&id).into_iter().flatten() {
                    bad.entry(n)
                        .or_insert_with(|| format!("chunk {} is damaged: {e}", &id.to_hex()[..16]));
                }
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    }
    let mut out = std::io::stdout().lock();
    let mut names: Vec<(String, u64, &String)> = bad
        .iter()
        .map(|(n, why)| (show(&chosen[*n].manifest.path), chosen[*n].version, why))
        .collect();
    names.sort();
    for (name, v, why) in &names {
        let _ = writeln!(out, "DAMAGED {name} (v{v}): {why}");
    }
    let _ = writeln!(
        out,
        "checked {} files, {} chunks{}: {} damaged",
        chosen.len(),
        ids.len(),
        if read_data {
            " (data read and verified)"
        } else {
            ""
        },
        names.len()
    );
    if names.is_empty() {
        Ok(())
    } else {
        Err(RestoreError::Damaged(names.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(v: u64, t: i64, path: &str, kind: EntryKind) -> Item {
        Item {
            version: v,
            commit_time: t,
            file_id: FileId([0; 32]),
            manifest: Manifest {
                path: path.as_bytes().to_vec(),
                kind,
                size: v,
                mtime_ns: 0,
                mode: 0o644,
                uid: 0,
                gid: 0,
                content_hash: [0; 32],
                chunks: vec![],
                sparse: None,
                xattrs: vec![],
                hardlink: None,
            },
        }
    }

    #[test]
    fn point_in_time_selection() {
        let items = vec![
            item(1, 100, "w/a", EntryKind::File),
            item(2, 200, "w/a", EntryKind::File),
            item(3, 300, "w/a", EntryKind::Deleted),
            item(4, 150, "w/sub/b", EntryKind::File),
            item(5, 150, "w/subway", EntryKind::File),
        ];
        assert_eq!(select(&items, Some(150), &[])[&b"w/a".to_vec()].version, 1);
        assert_eq!(select(&items, Some(250), &[])[&b"w/a".to_vec()].version, 2);
        assert!(!select(&items, None, &[]).contains_key(b"w/a".as_slice()));
        let sub = select(&items, None, &[b"w/sub".to_vec()]);
        assert_eq!(sub.len(), 1);
        assert!(sub.contains_key(b"w/sub/b".as_slice()));
    }

    /// Paths of one inode with the same content are linked to the first of them; another
    /// inode, or the same inode with other content (versions of two times), is not.
    #[test]
    fn hard_links_restored_together_link_to_the_first_path() {
        let linked = |path: &str, ino: u64, hash: u8| {
            let mut it = item(1, 1, path, EntryKind::File);
            it.manifest.content_hash = [hash; 32];
            it.manifest.hardlink = Some(coffer_common::manifest::HardLink {
                dev: 1,
                ino,
                to: vec![],
            });
            (path.as_bytes().to_vec(), it)
        };
        let files = [
            linked("w/a", 7, 1),
            linked("w/b", 7, 1),
            linked("w/c", 7, 2),
            linked("w/d", 8, 1),
            linked("w/e", 7, 1),
            (b"w/f".to_vec(), item(1, 1, "w/f", EntryKind::File)),
        ];
        let l = link_leaders(files.iter().map(|(p, i)| (p, i)));
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!(l[&b"w/b".to_vec()], b"w/a");
        assert_eq!(l[&b"w/e".to_vec()], b"w/a");
    }

    /// A sparse file's chunks land at its extents, across two where a chunk spans them;
    /// the holes are never written.
    #[test]
    fn sparse_data_is_written_at_its_extents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = std::fs::File::create(dir.path().join("s")).expect("create");
        let ext = [Extent { offset: 4, len: 2 }, Extent { offset: 10, len: 3 }];
        write_data(&f, b"abc", 0, Some(&ext)).expect("write");
        write_data(&f, b"de", 3, Some(&ext)).expect("write");
        f.set_len(16).expect("len");
        let got = std::fs::read(dir.path().join("s")).expect("read");
        assert_eq!(got, b"\0\0\0\0ab\0\0\0\0cde\0\0\0");
    }

    /// A key file that exists but cannot be read is reported as such: not taken for a
    /// missing one (which would fetch the escrowed key file and ask for its passphrase).
    #[test]
    fn an_unreadable_key_file_is_named_not_replaced_by_the_escrowed_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            format!(
                "receiver = \"127.0.0.1:1\"\nreceiver_key = \"{}\"\nstate_dir = \"{}\"\n",
                "A".repeat(43),
                dir.path().join("state").display()
            ),
        )
        .expect("write config");
        let cfg = Config::load(&p).expect("config");
        let kp = coffer_common::channel::StaticKeypair::generate().expect("keypair");
        state::write_private(&cfg.agent_key_path(), &kp.to_bytes()).expect("agent key");
        // A key file that cannot be read, also by root: a symlink to itself.
        std::os::unix::fs::symlink(cfg.keyfile_path(), cfg.keyfile_path()).expect("symlink");
        let e = match Session::open(&cfg) {
            Err(e) => e,
            Ok(_) => panic!("opened a session with an unreadable key file"),
        };
        let text = coffer_common::error_text(&e);
        assert!(matches!(e, RestoreError::Io(_)), "{text}");
        assert!(text.starts_with("reading key file "), "{text}");
        assert!(!text.contains("passphrase"), "{text}");
        assert!(read_keyfile(&dir.path().join("none"))
            .expect("absent")
            .is_none());
    }
}
