//! Folders in the backup (issue 27 item 9) and the journal's keyed hashes (item 6): a
//! folder's mode and mtime come back as recorded, an empty folder comes back, folders
//! without a version of their own end as they always did, `ls` and `status` stay about
//! files, and the journal holds no plain hash of what it backed up.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use support::*;

const T: Duration = Duration::from_secs(90);

/// Sets a path's mtime (and atime) to `secs` since the epoch, `nsec` nanoseconds on.
fn set_mtime(p: &Path, secs: i64, nsec: i64) -> Result<()> {
    let ts = nix::sys::time::TimeSpec::new(secs, nsec);
    nix::sys::stat::utimensat(
        None,
        p,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("utimensat {}", p.display()))
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .mode()
        & 0o7777)
}

/// The folder versions of `path` the agent lists, as `(mode, mtime)` pairs.
fn folder_versions(agent: &Agent, path: &str) -> Option<Vec<(String, String)>> {
    let out = agent
        .cmd()
        .args(["versions", "--json", "--config"])
        .arg(&agent.config)
        .arg(path)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let list = v.get(0)?.get("versions")?.as_array()?;
    Some(
        list.iter()
            .filter(|e| e["kind"] == "folder")
            .map(|e| {
                (
                    e["mode"].as_str().unwrap_or("").to_string(),
                    e["mtime"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect(),
    )
}

/// Whether `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn folder_modes_and_mtimes_are_restored_and_the_journal_keeps_no_plain_hash() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let w = agent.watch.clone();
    let content = b"the content of a file whose hash must not be in the journal";
    std::fs::create_dir_all(w.join("shared"))?;
    std::fs::create_dir_all(w.join("a/b/empty"))?;
    std::fs::write(w.join("shared/file.txt"), content)?;
    // A file of several chunks, streamed: its hash is recorded keyed too.
    let big = data(700_000, 9);
    std::fs::write(w.join("a/big.bin"), &big)?;
    std::fs::set_permissions(w.join("shared"), std::fs::Permissions::from_mode(0o750))?;
    std::fs::set_permissions(w.join("a/b/empty"), std::fs::Permissions::from_mode(0o700))?;
    // In the past, after everything in them was made.
    set_mtime(&w.join("shared"), 1_500_000_000, 123_456_789)?;
    set_mtime(&w.join("a/b/empty"), 1_400_000_000, 0)?;
    agent.run()?;
    let s = agent.wait_settled(2, T)?;
    wait_for("the folders' versions", T, || {
        let shared = folder_versions(&agent, "w/shared")?;
        let empty = folder_versions(&agent, "w/a/b/empty")?;
        (shared.iter().any(|(m, _)| m == "0750") && empty.iter().any(|(m, _)| m == "0700"))
            .then_some(())
    })
    .with_context(|| tail(&agent.log()))?;
    // `status` counts files only; `ls` lists files only.
    let s = agent.status().unwrap_or(s);
    assert_eq!(s["files"]["backed_up"], 2, "{s}");
    assert_eq!(s["files"]["pending"], 0, "{s}");
    let ls = ok(&agent
        .cmd()
        .args(["ls", "--config"])
        .arg(&agent.config)
        .output()?);
    assert_eq!(ls.lines().count(), 2, "{ls}");
    assert!(
        ls.contains("w/shared/file.txt") && ls.contains("w/a/big.bin"),
        "{ls}"
    );

    // Everything, into a new place: folders as recorded, the empty one included.
    let dest = tmp.path().join("restored");
    ok(&agent.restore(&dest, &[])?);
    assert_eq!(std::fs::read(dest.join("w/shared/file.txt"))?, content);
    assert_eq!(std::fs::read(dest.join("w/a/big.bin"))?, big);
    assert_eq!(mode(&dest.join("w/shared"))?, 0o750);
    assert_eq!(mode(&dest.join("w/a/b/empty"))?, 0o700);
    let m = std::fs::metadata(dest.join("w/shared"))?;
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_500_000_000, 123_456_789));
    let m = std::fs::metadata(dest.join("w/a/b/empty"))?;
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_400_000_000, 0));
    assert!(std::fs::read_dir(dest.join("w/a/b/empty"))?
        .next()
        .is_none());
    // The other folders as recorded too.
    for f in ["w", "w/a", "w/a/b"] {
        let rel = f.strip_prefix('w').unwrap_or(f).trim_start_matches('/');
        assert_eq!(mode(&dest.join(f))?, mode(&w.join(rel))?, "{f}");
    }

    // One file alone: its folders have no version in what is restored, so they end as a
    // new folder does (as restores of backups made before folders had versions do).
    let umask = {
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        nix::sys::stat::umask(old);
        old.bits() as u32
    };
    let one = tmp.path().join("one");
    ok(&agent.restore(&one, &["w/shared/file.txt"])?);
    assert_eq!(std::fs::read(one.join("w/shared/file.txt"))?, content);
    assert_eq!(mode(&one.join("w/shared"))?, 0o777 & !umask);
    assert_eq!(mode(&one.join("w"))?, 0o777 & !umask);

    // A changed folder mode is backed up as a new version.
    std::fs::set_permissions(w.join("shared"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(w.join("shared/new.txt"), b"new")?;
    agent.wait_settled(3, T)?;
    wait_for("the folder's new mode", T, || {
        let shared = folder_versions(&agent, "w/shared")?;
        shared.iter().any(|(m, _)| m == "0755").then_some(())
    })
    .with_context(|| tail(&agent.log()))?;

    // The journal: no plain BLAKE3 of the content, in its rows or anywhere in its files.
    agent.proc.term();
    let cfg = coffer_agent::config::Config::load(&agent.config)?;
    let journal = cfg.journal_path();
    let plain = *blake3::hash(content).as_bytes();
    let plain_big = *blake3::hash(&big).as_bytes();
    let db = rusqlite::Connection::open_with_flags(
        &journal,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let (hash, backed): (Option<Vec<u8>>, Option<Vec<u8>>) = db.query_row(
        "SELECT hash, backed_hash FROM files WHERE path = CAST(?1 AS BLOB)",
        ["w/shared/file.txt"],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (hash, backed) = (hash.context("hash")?, backed.context("backed_hash")?);
    assert_eq!(hash.len(), 32);
    assert_eq!(hash, backed, "the hash sent is the hash acknowledged");
    assert_ne!(hash, plain, "the journal holds the plain content hash");
    drop(db);
    let mut bytes = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = journal.clone().into_os_string();
        p.push(suffix);
        if let Ok(b) = std::fs::read(&p) {
            bytes.extend(b);
        }
    }
    assert!(
        contains(&bytes, &hash),
        "the keyed hash is where it is looked for"
    );
    assert!(
        !contains(&bytes, &plain) && !contains(&bytes, &plain_big),
        "the journal's files hold a plain content hash"
    );
    Ok(())
}

/// A repository written before folders had versions (only `File` and `Deleted` manifests,
/// committed here as that release did, the agent never run) restores as it always did: its
/// files, and folders with the mode a new folder gets.
#[test]
fn a_backup_without_folder_versions_restores_as_before() -> Result<()> {
    use coffer_common::chunk::Crypto;
    use coffer_common::keys::{unwrap_master, Passphrase};
    use coffer_common::manifest::{ChunkRef, EntryKind, Manifest};
    use coffer_common::wire::{CommitId, Message};

    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let state = agent.dir.join("state");
    let master = unwrap_master(
        &std::fs::read(state.join("keyfile"))?,
        &Passphrase::new(PASS.into())?,
    )?;
    let crypto = Crypto::new(&master.sub_keys());
    let kp =
        coffer_common::channel::StaticKeypair::from_bytes(&std::fs::read(state.join("agent.key"))?)
            .context("agent key")?;
    let rt = tokio::runtime::Runtime::new()?;
    let conn = rt.block_on(coffer_agent::conn::Conn::connect(
        &rcv.addr,
        &rcv.key.parse()?,
        &kp,
        "an older agent",
    ))?;
    let body = b"written before folders had versions".to_vec();
    let id = crypto.chunk_id(&body);
    rt.block_on(conn.call(Message::put_chunk(id, crypto.seal_chunk(&id, &body)?)))?;
    let file = |path: &str, kind: EntryKind| Manifest {
        path: path.as_bytes().to_vec(),
        size: if kind == EntryKind::File {
            body.len() as u64
        } else {
            0
        },
        chunks: match kind {
            EntryKind::File => vec![ChunkRef {
                id,
                len: body.len() as u32,
            }],
            _ => vec![],
        },
        kind,
        mtime_ns: 1_600_000_000_000_000_000,
        mode: 0o640,
        uid: 0,
        gid: 0,
        content_hash: *blake3::hash(&body).as_bytes(),
        sparse: None,
        xattrs: vec![],
        hardlink: None,
    };
    for (n, m) in [
        file("w/old/sub/kept.txt", EntryKind::File),
        file("w/old/gone.txt", EntryKind::File),
        file("w/old/gone.txt", EntryKind::Deleted),
    ]
    .into_iter()
    .enumerate()
    {
        let fid = crypto.file_id(&m.path);
        let r = rt.block_on(conn.call(Message::CommitFile {
            commit_id: CommitId([n as u8 + 1; 16]),
            file_id: fid,
            manifest: crypto.seal_manifest(&fid, &m.encode())?,
            chunks: m.chunks.iter().map(|c| c.id).collect(),
            deleted: m.kind == EntryKind::Deleted,
        }))?;
        assert!(matches!(r, Message::FileAcked { .. }), "{r:?}");
    }
    drop(conn);
    let umask = {
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        nix::sys::stat::umask(old);
        old.bits() as u32
    };
    let dest = tmp.path().join("dest");
    let r = agent.restore(&dest, &[])?;
    ok(&r);
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("restored 1 files"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(std::fs::read(dest.join("w/old/sub/kept.txt"))?, body);
    assert_eq!(mode(&dest.join("w/old/sub/kept.txt"))?, 0o640);
    assert!(!dest.join("w/old/gone.txt").exists());
    for f in ["w", "w/old", "w/old/sub"] {
        assert_eq!(mode(&dest.join(f))?, 0o777 & !umask, "{f}");
    }
    Ok(())
}
