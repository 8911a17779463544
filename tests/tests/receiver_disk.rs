//! The receiver and its disk: a full file system, and nothing ever written outside `--root`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use coffer_common::wire::{ErrorCode, Message};
use coffer_tests::*;

const T: Duration = Duration::from_secs(20);

/// A tmpfs mount, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn pack_bytes(root: &Path) -> u64 {
    snapshot_tree(&root.join("repos/r/packs"))
        .iter()
        .map(|(_, l)| l)
        .sum()
}

/// Fills the file system holding `path` (writes until ENOSPC).
fn fill(path: &Path) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let block = vec![0x55u8; 64 * 1024];
    loop {
        if f.write_all(&block).is_err() {
            break;
        }
    }
    // Whatever fits in a partial block too.
    while f.write_all(&block[..512]).is_ok() {}
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_cleanly_keeps_serving_and_recovers() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let m = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .output();
    match m {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIPPED full-disk test: cannot mount a tmpfs here ({})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return Ok(());
        }
        Err(e) => {
            println!("SKIPPED full-disk test: cannot run mount ({e})");
            return Ok(());
        }
    }
    let _mount = Mount(mnt.clone());
    let root = mnt.join("root");
    let mut rcv = Receiver::init(&root)?;
    let agent = TestAgent::new()?;
    rcv.authorize("r", &agent.public_key())?;
    rcv.serve()?;
    let mut c = rcv.connect(&agent).await?;
    let first = agent.seal_file("w/first", &data(1 << 20, 1))?;
    c.upload(&first).await?;
    let before = pack_bytes(&root);

    let filler = mnt.join("filler");
    fill(&filler)?;
    let big = agent.seal_file("w/big", &data(2 << 20, 2))?;
    let (id, sealed) = &big.chunks[0];
    let r = c.request(&Message::put_chunk(*id, sealed.clone())).await?;
    match &r {
        Message::Error {
            code: ErrorCode::Storage,
            message,
        } => {
            assert!(message.contains("no space left on device"), "{message}");
            assert!(
                message.contains(&root.join("repos/r/packs").display().to_string()),
                "{message}"
            );
        }
        m => panic!("expected a Storage error, got {m:?}"),
    }
    // Nothing of the failed batch is acknowledged, and the pack was cut back.
    let r = c.request(&big.commit_message()).await?;
    assert!(
        matches!(
            error_code(&r),
            Some(ErrorCode::MissingChunks | ErrorCode::Storage)
        ),
        "{r:?}"
    );
    assert_eq!(
        pack_bytes(&root),
        before,
        "the failed write was rolled back"
    );
    // The session keeps serving: reads and presence queries work.
    agent.verify(&mut c, &first).await?;
    assert_eq!(c.have(&big.ids()).await?, big.ids());

    // Space comes back: the same session stores and acknowledges again.
    std::fs::remove_file(&filler)?;
    c.upload(&big).await?;
    agent.verify(&mut c, &big).await?;
    drop(c);
    rcv.terminate(T)?;
    rcv.serve()?;
    let mut c = rcv.connect(&agent).await?;
    agent.verify(&mut c, &first).await?;
    agent.verify(&mut c, &big).await?;
    drop(c);
    rcv.kill9();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_written_outside_the_root() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let t = tmp.path();
    for d in ["sibling", "home", "tmpdir", "cwd"] {
        std::fs::create_dir(t.join(d))?;
    }
    std::fs::write(t.join("sibling/keep.txt"), b"untouched")?;
    let sibling_before = snapshot_tree(&t.join("sibling"));
    let env = vec![
        ("HOME".to_string(), t.join("home")),
        ("TMPDIR".to_string(), t.join("tmpdir")),
        ("SQLITE_TMPDIR".to_string(), t.join("tmpdir")),
    ];
    let root = t.join("root");
    let mut rcv = Receiver::init_with_env(&root, env)?;
    rcv.cwd = Some(t.join("cwd"));
    let agent = TestAgent::new()?;
    rcv.authorize("r", &agent.public_key())?;
    rcv.serve()?;
    let mut c = rcv.connect(&agent).await?;
    for i in 0..20u64 {
        c.upload(&agent.seal_file(&format!("w/{i}"), &data(50_000 * i as usize, i))?)
            .await?;
    }
    c.request(&Message::PutKeyFile { data: key_file(9) })
        .await?;
    c.all_versions().await?;
    drop(c);
    stdout_ok(&rcv.run("status", &["--json"])?)?;
    stdout_ok(&rcv.run("status", &[])?)?;
    stdout_ok(&rcv.run("scrub", &[])?)?;
    rcv.revoke(&agent.public_key())?;
    let st = rcv.terminate(T)?;
    assert!(st.success());

    assert_eq!(snapshot_tree(&t.join("sibling")), sibling_before);
    for d in ["home", "tmpdir", "cwd"] {
        assert!(
            snapshot_tree(&t.join(d)).is_empty(),
            "{d} was written to: {:?}",
            snapshot_tree(&t.join(d))
        );
    }
    let mut top: Vec<String> = std::fs::read_dir(t)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    top.sort();
    // root.serve.log is the test harness's capture of serve's stderr.
    assert_eq!(
        top,
        ["cwd", "home", "root", "root.serve.log", "sibling", "tmpdir"]
    );
    // Inside the root, only the documented layout.
    for (p, _) in snapshot_tree(&root) {
        let rel = p
            .strip_prefix(&root)
            .context("under root")?
            .to_string_lossy()
            .into_owned();
        let ok = [
            "receiver.toml",
            "keys/receiver.key",
            "authorized.toml",
            "authorized.lock",
            "serve.lock",
            "repos/r/keyfiles/00000001.key",
            "repos/r/index.sqlite",
            "repos/r/index.sqlite-wal",
            "repos/r/index.sqlite-shm",
        ]
        .contains(&rel.as_str())
            || (rel.starts_with("repos/r/packs/") && rel.ends_with(".pack"));
        assert!(ok, "unexpected file in the root: {rel}");
    }
    Ok(())
}
