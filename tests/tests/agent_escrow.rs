//! The escrowed key file against a stolen agent key: the receiver keeps every well-formed
//! key file it was given, recovery tries them newest first, and the agent checks the escrow
//! and says so in `status`.

mod support;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use coffer_common::channel::PublicKey;
use coffer_common::keys::{wrap_master, KdfParams, MasterSecret, Passphrase};
use coffer_common::wire::{ErrorCode, Message};
use support::*;

const T: Duration = Duration::from_secs(90);

/// The files of a repository's escrow folder, sorted by name.
fn escrow_files(rcv: &Receiver, repo: &str) -> Vec<(String, Vec<u8>)> {
    let dir = rcv.root.join("repos").join(repo).join("keyfiles");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| {
                    let data = std::fs::read(e.path()).unwrap_or_default();
                    (e.file_name().to_string_lossy().into_owned(), data)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Sends `requests` with a second agent key authorized to `repo`; returns the replies.
fn as_second_key(rcv: &Receiver, repo: &str, requests: Vec<Message>) -> Result<Vec<Message>> {
    let thief = coffer_tests::TestAgent::new()?;
    rcv.authorize(repo, &thief.public_key().to_string())?;
    let addr: std::net::SocketAddr = rcv.addr.parse()?;
    let key: PublicKey = rcv.key.parse()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut c = thief.connect(addr, &key).await?;
        let mut out = Vec::new();
        for m in &requests {
            out.push(c.request(m).await?);
        }
        Ok(out)
    })
}

fn new_machine(rcv: &Receiver, dir: &Path, repo: &str) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let cfg = dir.join("agent.toml");
    let o = std::process::Command::new(bin("coffer-agent"))
        .args(["init", "--recover", "--config"])
        .arg(&cfg)
        .args(["--receiver", &rcv.addr, "--receiver-key", &rcv.key])
        .output()?;
    let key = ok(&o).trim().to_string();
    rcv.authorize(repo, &key)?;
    Ok(cfg)
}

#[test]
fn a_stolen_agent_key_cannot_destroy_recovery() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "laptop")?;
    std::fs::write(agent.watch.join("note.bin"), data(300_000, 1))?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    wait_for("key escrowed", T, || {
        agent.status().ok()?["key_escrowed"]
            .as_bool()?
            .then_some(())
    })?;
    agent.proc.term();
    let own = std::fs::read(agent.dir.join("state/keyfile")).context("agent key file")?;

    // A thief with a second key of the repository: junk, an empty body, then a well-formed
    // key file of its own (another master secret, another passphrase).
    let theirs = wrap_master(
        &MasterSecret::generate()?,
        &Passphrase::new("the thief's passphrase".into())?,
        KdfParams {
            m_kib: KdfParams::MIN_M_KIB,
            t: KdfParams::MIN_T,
            p: 1,
        },
    )?;
    let replies = as_second_key(
        &rcv,
        "laptop",
        vec![
            Message::PutKeyFile {
                data: b"junk".to_vec(),
            },
            Message::PutKeyFile { data: Vec::new() },
            Message::PutKeyFile {
                data: theirs.clone(),
            },
        ],
    )?;

    // A damaged newest entry on the receiver's disk is skipped with a warning naming it.
    let escrow = rcv.root.join("repos/laptop/keyfiles");
    std::fs::create_dir_all(&escrow)?;
    std::fs::write(escrow.join("00000009.key"), b"damaged")?;

    let original = tmp.path().join("original");
    std::fs::rename(&agent.watch, &original)?;
    std::fs::remove_dir_all(&agent.dir)?;
    let cfg = new_machine(&rcv, &tmp.path().join("new"), "laptop")?;
    let dest = tmp.path().join("restored");
    let bad = std::process::Command::new(bin("coffer-agent"))
        .env("COFFER_PASSPHRASE", "wrong")
        .args(["restore", "--config"])
        .arg(&cfg)
        .arg("--to")
        .arg(&dest)
        .output()?;
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("wrong passphrase"), "{stderr}");
    assert!(!dest.exists());
    let good = std::process::Command::new(bin("coffer-agent"))
        .env("COFFER_PASSPHRASE", PASS)
        .args(["restore", "--config"])
        .arg(&cfg)
        .arg("--to")
        .arg(&dest)
        .output()?;
    ok(&good);
    let stderr = String::from_utf8_lossy(&good.stderr);
    assert!(
        stderr.contains("escrowed key file #9"),
        "the damaged entry is named: {stderr}"
    );
    assert_eq!(assert_same_tree(&original, &dest.join("w"))?, 1);
    assert_eq!(
        std::fs::read(cfg.with_file_name("state").join("keyfile"))?,
        own,
        "the new machine keeps the key file that opened"
    );

    // Junk and an empty body were refused; every well-formed key file is kept.
    assert!(matches!(
        &replies[..],
        [
            Message::Error {
                code: ErrorCode::Malformed,
                ..
            },
            Message::Error {
                code: ErrorCode::Malformed,
                ..
            },
            Message::KeyFileStored
        ]
    ));
    let kept: Vec<Vec<u8>> = escrow_files(&rcv, "laptop")
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    assert!(kept.contains(&own), "the agent's own key file is kept");
    assert!(kept.contains(&theirs), "the thief's is kept too");
    assert_eq!(
        kept.len(),
        3,
        "two entries and the damaged file, nothing else"
    );
    Ok(())
}

#[test]
fn status_shows_the_escrow_check_and_a_missing_key_file_is_escrowed_again() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "laptop")?;
    // The agent connects when it has something to send.
    std::fs::write(agent.watch.join("a.txt"), b"first")?;
    agent.run()?;
    let v = wait_for("escrow checked", T, || {
        let v = agent.status().ok()?;
        (v["escrow"]["state"] == "ok").then_some(v)
    })?;
    assert!(v["escrow"]["checked_at"].is_string(), "{v}");
    let text = ok(&agent
        .cmd()
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()?);
    assert!(text.contains("key escrow: ok, checked "), "{text}");
    agent.proc.term();

    // The receiver's copy is lost (its disk, its operator): the next start escrows it again.
    let own = std::fs::read(agent.dir.join("state/keyfile"))?;
    std::fs::remove_dir_all(rcv.root.join("repos/laptop/keyfiles"))?;
    std::fs::write(agent.watch.join("b.txt"), b"second")?;
    agent.run()?;
    wait_for("escrowed again", T, || {
        let v = agent.status().ok()?;
        (v["escrow"]["state"] == "reescrowed").then_some(())
    })?;
    let text = ok(&agent
        .cmd()
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()?);
    assert!(
        text.contains("key escrow: MISSING/ALTERED on the receiver, re-escrowed "),
        "{text}"
    );
    let kept: Vec<Vec<u8>> = escrow_files(&rcv, "laptop")
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    assert_eq!(kept, [own]);
    agent.proc.term();
    Ok(())
}
