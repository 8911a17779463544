//! Getting files back: point in time, prefixes, symlinks, hostile targets and repositories,
//! damaged packs, recovery on a new machine.

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use support::*;

const T: Duration = Duration::from_secs(90);

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Waits until the next wall-clock second so versions get distinct commit times.
fn next_second() {
    let s = now_s();
    let _ = wait_for("next second", Duration::from_secs(3), || {
        (now_s() > s).then_some(())
    });
}

#[test]
fn point_in_time_restore_across_versions_and_a_deletion() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let f = agent.watch.join("doc.txt");
    std::fs::write(agent.watch.join("keep.txt"), b"kept")?;
    std::fs::write(&f, b"version one")?;
    agent.run()?;
    agent.wait_settled(2, T)?;
    next_second();
    let t1 = now_s();
    next_second();
    std::fs::write(&f, b"version two, longer")?;
    wait_for("v2", T, || {
        let v = agent
            .cmd()
            .args(["versions", "--config"])
            .arg(&agent.config)
            .arg("w/doc.txt")
            .output()
            .ok()?;
        (String::from_utf8_lossy(&v.stdout).lines().count() == 2).then_some(())
    })?;
    agent.wait_settled(2, T)?;
    next_second();
    let t2 = now_s();
    next_second();
    std::fs::write(&f, b"three")?;
    wait_for("v3", T, || {
        let v = agent
            .cmd()
            .args(["versions", "--config"])
            .arg(&agent.config)
            .arg("w/doc.txt")
            .output()
            .ok()?;
        (String::from_utf8_lossy(&v.stdout).lines().count() == 3).then_some(())
    })?;
    next_second();
    let t3 = now_s();
    next_second();
    std::fs::remove_file(&f)?;
    let out = wait_for("deletion", T, || {
        let v = agent
            .cmd()
            .args(["versions", "--config"])
            .arg(&agent.config)
            .arg("w/doc.txt")
            .output()
            .ok()?;
        let s = String::from_utf8_lossy(&v.stdout).into_owned();
        s.contains("deleted").then_some(s)
    })?;
    assert_eq!(out.lines().count(), 4, "{out}");

    for (at, want) in [
        (t1, Some("version one")),
        (t2, Some("version two, longer")),
        (t3, Some("three")),
        (now_s() + 5, None),
    ] {
        let dest = tmp.path().join(format!("at-{at}"));
        ok(&agent.restore(&dest, &["--at", &at.to_string()])?);
        match want {
            Some(w) => assert_eq!(
                std::fs::read_to_string(dest.join("w/doc.txt"))?,
                w,
                "at {at}"
            ),
            None => assert!(!dest.join("w/doc.txt").exists(), "deleted file restored"),
        }
        assert_eq!(std::fs::read(dest.join("w/keep.txt"))?, b"kept");
        // ls agrees.
        let ls = ok(&agent
            .cmd()
            .args(["ls", "--config"])
            .arg(&agent.config)
            .args(["--at", &at.to_string()])
            .output()?);
        assert_eq!(ls.contains("w/doc.txt"), want.is_some(), "ls at {at}: {ls}");
    }
    // RFC 3339 works too.
    let rfc = ok(&agent
        .cmd()
        .args(["ls", "--config"])
        .arg(&agent.config)
        .args(["--at", "2001-01-01T00:00:00Z"])
        .output()?);
    assert!(rfc.trim().is_empty(), "nothing existed in 2001: {rfc}");
    Ok(())
}

#[test]
fn prefix_restore_symlinks_and_dump_to_stdout() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let w = agent.watch.clone();
    std::fs::create_dir_all(w.join("docs/sub"))?;
    std::fs::create_dir_all(w.join("docsextra"))?;
    std::fs::write(w.join("docs/a.txt"), b"a")?;
    std::fs::write(w.join("docs/sub/b.txt"), b"b")?;
    std::fs::write(w.join("docsextra/c.txt"), b"c")?;
    std::fs::write(w.join("top.bin"), data(700_000, 3))?;
    std::os::unix::fs::symlink("sub/b.txt", w.join("docs/link"))?;
    agent.run()?;
    agent.wait_settled(5, T)?;
    let dest = tmp.path().join("p");
    ok(&agent.restore(&dest, &["w/docs"])?);
    assert_eq!(std::fs::read(dest.join("w/docs/a.txt"))?, b"a");
    assert_eq!(std::fs::read(dest.join("w/docs/sub/b.txt"))?, b"b");
    assert_eq!(
        std::fs::read_link(dest.join("w/docs/link"))?,
        std::path::Path::new("sub/b.txt")
    );
    assert!(
        !dest.join("w/docsextra").exists(),
        "prefix matched a sibling"
    );
    assert!(!dest.join("w/top.bin").exists());
    // Streaming one file to stdout.
    let o = agent
        .cmd()
        .args(["restore", "--config"])
        .arg(&agent.config)
        .args(["--to", "-", "w/top.bin"])
        .output()?;
    assert!(o.status.success());
    assert_eq!(o.stdout, data(700_000, 3));
    // A non-empty target is refused without --overwrite.
    let again = agent.restore(&dest, &["w/docs"])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    ok(&agent.restore(&dest, &["--overwrite", "w/docs"])?);
    Ok(())
}

#[test]
fn a_symlink_in_the_target_is_never_followed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::create_dir_all(agent.watch.join("d"))?;
    std::fs::write(agent.watch.join("d/x.txt"), b"payload")?;
    std::fs::write(agent.watch.join("y.txt"), b"payload")?;
    agent.run()?;
    agent.wait_settled(2, T)?;
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    let dest = tmp.path().join("dest");
    std::fs::create_dir_all(&dest)?;
    // The target's `w` is a symlink to a folder outside it.
    std::os::unix::fs::symlink(&outside, dest.join("w"))?;
    let r = agent.restore(&dest, &["--overwrite"])?;
    assert!(!r.status.success(), "restore through a symlink must fail");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("symlink"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(
        std::fs::read_dir(&outside)?.count(),
        0,
        "something was written outside the target"
    );
    // A symlink at a file's own place is replaced, not written through.
    let dest2 = tmp.path().join("dest2");
    std::fs::create_dir_all(dest2.join("w"))?;
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"untouched")?;
    std::os::unix::fs::symlink(&victim, dest2.join("w/y.txt"))?;
    ok(&agent.restore(&dest2, &["--overwrite"])?);
    assert_eq!(std::fs::read(&victim)?, b"untouched");
    assert_eq!(std::fs::read(dest2.join("w/y.txt"))?, b"payload");
    assert!(!std::fs::symlink_metadata(dest2.join("w/y.txt"))?
        .file_type()
        .is_symlink());
    Ok(())
}

#[test]
fn a_tampered_pack_is_found_by_verify_and_scrub_and_fails_only_its_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    // Several chunks: the parts that open are written before the damaged one fails the file.
    std::fs::write(agent.watch.join("victim.bin"), data(3 << 20, 11))?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    let after_first = rcv.pack_bytes("r");
    std::fs::write(agent.watch.join("other.bin"), data(50_000, 12))?;
    agent.wait_settled(2, T)?;
    agent.proc.term();
    // Flip one byte inside the victim's sealed chunk (the first pack's first record).
    let packs = rcv.root.join("repos/r/packs");
    let mut files: Vec<_> = std::fs::read_dir(&packs)?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let first = files.first().context("a pack")?;
    let mut bytes = std::fs::read(first)?;
    let at = (after_first as usize).min(bytes.len()) - 1000;
    bytes[at] ^= 0x40;
    std::fs::write(first, &bytes)?;

    let v = agent
        .cmd()
        .args(["verify", "--read-data", "--config"])
        .arg(&agent.config)
        .output()?;
    assert!(!v.status.success(), "verify must fail");
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(out.contains("DAMAGED w/victim.bin"), "{out}");
    assert!(!out.contains("other.bin"), "{out}");
    let s = std::process::Command::new(bin("coffer-receiver"))
        .args(["scrub", "--root"])
        .arg(&rcv.root)
        .output()?;
    assert!(!s.status.success(), "scrub must fail");
    let dest = tmp.path().join("out");
    let r = agent.restore(&dest, &[])?;
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("w/victim.bin") && err.contains("damaged"),
        "{err}"
    );
    assert_eq!(std::fs::read(dest.join("w/other.bin"))?, data(50_000, 12));
    assert!(!dest.join("w/victim.bin").exists(), "wrong bytes written");
    let left: Vec<_> = std::fs::read_dir(dest.join("w"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["other.bin"], "only the intact file is left");
    Ok(())
}

#[test]
fn recovery_on_a_new_machine_with_only_the_passphrase() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "laptop")?;
    std::fs::create_dir_all(agent.watch.join("deep/er"))?;
    std::fs::write(agent.watch.join("deep/er/file.bin"), data(2 << 20, 5))?;
    std::fs::write(agent.watch.join("note.txt"), b"remember")?;
    agent.run()?;
    agent.wait_settled(2, T)?;
    wait_for("key escrowed", T, || {
        agent.status().ok()?["key_escrowed"]
            .as_bool()?
            .then_some(())
    })?;
    agent.proc.term();
    let original = tmp.path().join("original");
    std::fs::rename(&agent.watch, &original)?;
    std::fs::remove_dir_all(&agent.dir)?; // config, state dir, keys: all gone

    let newdir = tmp.path().join("new");
    std::fs::create_dir_all(&newdir)?;
    let cfg = newdir.join("agent.toml");
    let o = std::process::Command::new(bin("coffer-agent"))
        .args(["init", "--recover", "--config"])
        .arg(&cfg)
        .args(["--receiver", &rcv.addr, "--receiver-key", &rcv.key])
        .output()?;
    let key = ok(&o).trim().to_string();
    rcv.authorize("laptop", &key)?;
    // A wrong passphrase: clear error, nothing written.
    let dest = tmp.path().join("restored");
    let bad = std::process::Command::new(bin("coffer-agent"))
        .env("COFFER_PASSPHRASE", "wrong")
        .args(["restore", "--config"])
        .arg(&cfg)
        .arg("--to")
        .arg(&dest)
        .output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("wrong passphrase"));
    assert!(!dest.exists());
    let good = std::process::Command::new(bin("coffer-agent"))
        .env("COFFER_PASSPHRASE", PASS)
        .args(["restore", "--config"])
        .arg(&cfg)
        .arg("--to")
        .arg(&dest)
        .output()?;
    ok(&good);
    assert_eq!(assert_same_tree(&original, &dest.join("w"))?, 2);
    Ok(())
}

#[test]
fn a_hostile_repository_cannot_make_restore_write_outside_the_target() -> Result<()> {
    use coffer_common::chunk::Crypto;
    use coffer_common::keys::{unwrap_master, Passphrase};
    use coffer_common::manifest::{ChunkRef, EntryKind, Manifest};
    use coffer_common::wire::{CommitId, Message};

    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::write(agent.watch.join("honest.txt"), b"honest")?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    agent.proc.term();

    // Whoever holds the keys (or a damaged repository) commits manifests with unsafe paths.
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
        "attacker",
    ))?;
    let body = b"evil".to_vec();
    let id = crypto.chunk_id(&body);
    rt.block_on(conn.call(Message::put_chunk(id, crypto.seal_chunk(&id, &body)?)))?;
    for (n, path) in ["w/../escape.txt", "/tmp/abs-escape.txt", "w/./x", "w//y"]
        .iter()
        .enumerate()
    {
        let m = Manifest {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File,
            size: 4,
            mtime_ns: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            content_hash: *blake3::hash(&body).as_bytes(),
            chunks: vec![ChunkRef { id, len: 4 }],
            sparse: None,
            xattrs: vec![],
            hardlink: None,
        };
        let fid = crypto.file_id(path.as_bytes());
        let r = rt.block_on(conn.call(Message::CommitFile {
            commit_id: CommitId([n as u8 + 1; 16]),
            file_id: fid,
            manifest: crypto.seal_manifest(&fid, &m.encode())?,
            chunks: vec![id],
            deleted: false,
        }))?;
        assert!(matches!(r, Message::FileAcked { .. }), "{r:?}");
    }
    drop(conn);
    let dest = tmp.path().join("dest");
    let r = agent.restore(&dest, &[])?;
    assert!(!r.status.success(), "unsafe paths must fail the restore");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("unsafe path"), "{err}");
    assert_eq!(std::fs::read(dest.join("w/honest.txt"))?, b"honest");
    assert!(!tmp.path().join("escape.txt").exists());
    assert!(!std::path::Path::new("/tmp/abs-escape.txt").exists());
    Ok(())
}

#[test]
fn restoring_more_files_than_the_open_file_limit_works() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    for i in 0..600u64 {
        std::fs::write(agent.watch.join(format!("f{i:04}")), data(3000, i))?;
    }
    agent.run()?;
    agent.wait_settled(600, T)?;
    let dest = tmp.path().join("out");
    // 128 descriptors for 600 files: only files with chunks in flight may hold one.
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 128 && exec \"$0\" restore --config \"$1\" --to \"$2\"")
        .arg(bin("coffer-agent"))
        .arg(&agent.config)
        .arg(&dest)
        .env("COFFER_PASSPHRASE", PASS)
        .output()?;
    ok(&o);
    assert_eq!(assert_same_tree(&agent.watch, &dest.join("w"))?, 600);
    Ok(())
}

/// Every entry under `dir`: relative path -> (mode, owner, BLAKE3 of its bytes or of its
/// link target).
fn snapshot(
    dir: &std::path::Path,
) -> Result<std::collections::BTreeMap<std::path::PathBuf, (String, u32, String)>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(e.path())?;
            let body = if m.file_type().is_symlink() {
                std::fs::read_link(e.path())?
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            } else if m.is_dir() {
                stack.push(r.clone());
                Vec::new()
            } else {
                std::fs::read(e.path())?
            };
            out.insert(
                r,
                (
                    format!("{:o}", m.mode()),
                    m.uid(),
                    blake3::hash(&body).to_hex()[..16].to_string(),
                ),
            );
        }
    }
    Ok(out)
}

/// A racer swaps the folders a restore has just created for symlinks to a folder outside
/// the target (moving the real folder aside, inside the target) and back, over and over,
/// while many files, some of several chunks, are restored into them. Nothing outside the
/// target may change; the restore completes inside the target or fails saying why.
#[test]
fn a_restore_folder_swapped_for_a_symlink_is_never_written_through() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    const FOLDERS: usize = 6;
    const FILES: usize = 40;
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    for d in 0..FOLDERS {
        let dir = agent.watch.join(format!("d{d}"));
        std::fs::create_dir_all(&dir)?;
        for i in 0..FILES {
            std::fs::write(
                dir.join(format!("f{i:03}")),
                data(1500, (d * FILES + i) as u64),
            )?;
        }
    }
    // Files of several chunks (written beside, then renamed), one named as a file outside.
    std::fs::write(agent.watch.join("d0/big.bin"), data(3 << 20, 901))?;
    std::fs::write(agent.watch.join("d1/big.bin"), data(3 << 20, 902))?;
    agent.run()?;
    agent.wait_settled((FOLDERS * FILES + 2) as i64, T)?;
    agent.proc.term();

    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    std::fs::write(outside.join("big.bin"), b"precious, not to be replaced")?;
    std::fs::write(outside.join("f000"), b"mine")?;
    let before = snapshot(&outside)?;
    let dest = tmp.path().join("dest");
    let child = agent
        .cmd()
        .args(["restore", "--config"])
        .arg(&agent.config)
        .arg("--to")
        .arg(&dest)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let done = AtomicBool::new(false);
    let (out, swaps) = std::thread::scope(|s| {
        let racer = s.spawn(|| {
            let (start, mut swaps) = (Instant::now(), 0u64);
            while !done.load(Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(60)
                && swaps < 200_000
            {
                for d in 0..FOLDERS {
                    let p = dest.join(format!("w/d{d}"));
                    let aside = dest.join(format!("w/.aside-d{d}"));
                    let Ok(m) = std::fs::symlink_metadata(&p) else {
                        continue;
                    };
                    if m.is_dir() && std::fs::rename(&p, &aside).is_ok() {
                        let _ = std::os::unix::fs::symlink(&outside, &p);
                        swaps += 1;
                    } else if m.file_type().is_symlink() && std::fs::remove_file(&p).is_ok() {
                        // The real folder back, so that the next look races again.
                        let _ = std::fs::rename(&aside, &p);
                    }
                }
                std::thread::yield_now();
            }
            swaps
        });
        let out = child.wait_with_output();
        done.store(true, Ordering::Relaxed);
        (out, racer.join().unwrap_or(0))
    });
    let out = out?;
    for d in 0..FOLDERS {
        let p = dest.join(format!("w/d{d}"));
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&p)?;
        }
        let aside = dest.join(format!("w/.aside-d{d}"));
        if aside.exists() {
            std::fs::rename(&aside, &p)?;
        }
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let err = support::tail(&err);
    assert!(swaps > 0, "the racer never swapped a folder; stderr: {err}");
    assert_eq!(
        snapshot(&outside)?,
        before,
        "the restore wrote outside its target ({swaps} swaps); stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    eprintln!(
        "{swaps} swaps; restore {}; its last lines:\n{err}",
        if out.status.success() {
            "completed"
        } else {
            "failed"
        }
    );
    if out.status.success() {
        assert_eq!(
            assert_same_tree(&agent.watch, &dest.join("w"))?,
            FOLDERS * FILES + 2
        );
    } else {
        assert!(
            err.contains("symlink") || err.contains("replaced"),
            "a failed restore says why: {err}"
        );
    }
    Ok(())
}

/// Restoring as root drops setuid and setgid bits unless `--keep-setuid` asks for them: a
/// restore into a place another user can reach would otherwise hand out root programs.
#[test]
fn restoring_as_root_drops_setuid_and_setgid_unless_asked() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: restoring as root needs root");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    for (name, mode) in [("suid", 0o4755), ("sgid", 0o2750), ("plain", 0o755)] {
        let p = agent.watch.join(name);
        std::fs::write(&p, name)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    agent.run()?;
    agent.wait_settled(3, T)?;
    agent.proc.term();
    let mode = |p: std::path::PathBuf| -> Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o7777)
    };
    let dest = tmp.path().join("dropped");
    ok(&agent.restore(&dest, &[])?);
    assert_eq!(mode(dest.join("w/suid"))?, 0o755);
    assert_eq!(mode(dest.join("w/sgid"))?, 0o750);
    assert_eq!(mode(dest.join("w/plain"))?, 0o755);
    let kept = tmp.path().join("kept");
    ok(&agent.restore(&kept, &["--keep-setuid"])?);
    assert_eq!(mode(kept.join("w/suid"))?, 0o4755);
    assert_eq!(mode(kept.join("w/sgid"))?, 0o2750);
    Ok(())
}

/// A target that another user owns, or that group or others may write to, is refused
/// (another user could swap what the restore writes into) unless `--allow-shared-target`;
/// so is such a folder found inside the target.
#[test]
fn a_target_others_can_write_to_is_refused_unless_allowed() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::write(agent.watch.join("a.txt"), b"a")?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    agent.proc.term();
    let refused = |o: &std::process::Output, what: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what}: restored into it");
        assert!(err.contains("--allow-shared-target"), "{what}: {err}");
    };

    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared)?;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777))?;
    refused(&agent.restore(&shared, &[])?, "a world-writable target");
    assert_eq!(std::fs::read_dir(&shared)?.count(), 0, "written into");
    ok(&agent.restore(&shared, &["--allow-shared-target"])?);
    assert_eq!(std::fs::read(shared.join("w/a.txt"))?, b"a");

    let group = tmp.path().join("group");
    std::fs::create_dir_all(group.join("w"))?;
    std::fs::set_permissions(group.join("w"), std::fs::Permissions::from_mode(0o775))?;
    refused(
        &agent.restore(&group, &["--overwrite"])?,
        "a group-writable folder in the target",
    );
    assert!(!group.join("w/a.txt").exists(), "written into");

    if nix::unistd::geteuid().is_root() {
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs)?;
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534))?;
        refused(
            &agent.restore(&theirs, &[])?,
            "a target owned by another user",
        );
        assert_eq!(std::fs::read_dir(&theirs)?.count(), 0, "written into");
    }
    Ok(())
}
