//! Quotas, the free-disk floor and revocation, against the real `coffer-receiver`: a
//! repository over its quota is refused new chunks (`QuotaExceeded`, nothing stored) while
//! commits that need none and other repositories go on; SIGHUP raises it in place;
//! `min_free` refuses every repository before a small tmpfs is full and leaves `scrub`
//! clean; `revoke` ends an open session within a second and nothing sent after it is
//! acknowledged.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use coffer_common::wire::{
    ErrorCode, FileCommit, Message, QuotaInfo, SealedChunk, PROTOCOL_VERSION,
};
use coffer_tests::*;

const T: Duration = Duration::from_secs(30);

/// A tmpfs mount, unmounted on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` at `at`; `None` (with the reason printed) where mounting is
/// not permitted.
fn mount_tmpfs(at: &Path, size: &str) -> Option<Mount> {
    let o = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .output();
    match o {
        Ok(o) if o.status.success() => Some(Mount(at.to_path_buf())),
        Ok(o) => {
            println!(
                "SKIPPED min_free test: cannot mount a tmpfs here ({})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            println!("SKIPPED min_free test: cannot run mount ({e})");
            None
        }
    }
}

/// Bytes of `repo`'s pack files.
fn pack_bytes(root: &Path, repo: &str) -> u64 {
    snapshot_tree(&root.join("repos").join(repo).join("packs"))
        .iter()
        .map(|(_, l)| l)
        .sum()
}

/// Handshake and Hello; the `Welcome`'s quota.
async fn welcome(rcv: &Receiver, agent: &TestAgent) -> Result<(Client, Option<QuotaInfo>)> {
    let mut ch = agent.handshake(rcv.addr()?, &rcv.public_key).await?;
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        agent_name: "test".into(),
        software: "test".into(),
    };
    match ch.request(&hello).await? {
        Message::Welcome { repo, quota, .. } => Ok((Client { ch, repo }, quota)),
        m => bail!("expected Welcome, got {m:?}"),
    }
}

/// What refused a put: its code and message, and `packs()` just before that put.
type Refused = (ErrorCode, String, u64);

/// Puts `file`'s chunks; the first error reply, if any, with `packs()` just before it.
async fn put_all(
    c: &mut Client,
    file: &SealedFile,
    packs: impl Fn() -> u64,
) -> Result<Option<Refused>> {
    for (id, sealed) in &file.chunks {
        let before = packs();
        match c.request(&Message::put_chunk(*id, sealed.clone())).await? {
            Message::Stored { .. } => {}
            Message::Error { code, message } => return Ok(Some((code, message, before))),
            m => bail!("expected Stored, got {m:?}"),
        }
    }
    Ok(None)
}

/// A plain HTTP GET of `/metrics`: every sample line as `series -> value`.
fn scrape(addr: SocketAddr) -> Result<std::collections::BTreeMap<String, f64>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(T))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (_, body) = resp.split_once("\r\n\r\n").context("no body")?;
    let mut out = std::collections::BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        if let Some((k, v)) = line.rsplit_once(' ') {
            out.insert(k.to_string(), v.parse().unwrap_or(f64::NAN));
        }
    }
    Ok(out)
}

fn sighup(rcv: &Receiver) -> Result<()> {
    let pid = rcv.pid().context("serve is not running")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .context("sending SIGHUP")
}

fn repo_status<'a>(st: &'a serde_json::Value, name: &str) -> Result<&'a serde_json::Value> {
    st["repositories"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .with_context(|| format!("repository {name} not in status: {st}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_quota_a_repository_is_refused_new_chunks_only_until_sighup_raises_it(
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    let mut rcv = Receiver::init(&root)?;
    let config = |quota: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nwarn_at = \"50%\"\nmin_free = \"0\"\n\
             [repos.small]\nquota = \"{quota}\"\n"
        )
    };
    rcv.set_config(&config("2MiB"))?;
    let (small, big) = (TestAgent::new()?, TestAgent::new()?);
    rcv.authorize("small", &small.public_key())?;
    rcv.authorize("big", &big.public_key())?;
    let metrics = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    rcv.serve_with(&["--metrics", &metrics.to_string()])?;

    let (mut c, quota) = welcome(&rcv, &small).await?;
    assert_eq!(
        quota,
        Some(QuotaInfo {
            used: 0,
            quota: 2 << 20,
            warn_at_percent: 50
        })
    );
    let (mut other, quota) = welcome(&rcv, &big).await?;
    assert_eq!(quota, None, "no quota, none told");

    // Files of 700 KiB until one is refused.
    let mut stored = Vec::new();
    let (refused, code, message, before) = loop {
        ensure!(stored.len() < 4, "2 MiB quota never refused a chunk");
        let f = small.seal_file(
            &format!("w/f{}", stored.len()),
            &data(700 << 10, stored.len() as u64),
        )?;
        match put_all(&mut c, &f, || pack_bytes(&root, "small")).await? {
            None => {
                c.commit(&f).await?;
                stored.push(f);
            }
            Some((code, message, before)) => break (f, code, message, before),
        }
    };
    assert!(
        stored.len() >= 2,
        "only {} files fit in 2 MiB",
        stored.len()
    );
    assert_eq!(code, ErrorCode::QuotaExceeded, "{message}");
    assert!(
        message.starts_with("repository small is over its quota: ")
            && message.contains(
                " of 2 MiB used; ask the receiver's operator or let retention free space"
            ),
        "{message}"
    );
    // Nothing of the refused request was stored, and its commit is not acknowledged.
    assert_eq!(pack_bytes(&root, "small"), before);
    let r = c.request(&refused.commit_message()).await?;
    assert_eq!(error_code(&r), Some(ErrorCode::MissingChunks), "{r:?}");
    // A PutFiles over the quota is refused whole: nothing of it stored.
    let before = pack_bytes(&root, "small");
    let g = small.seal_file("w/g", &data(1 << 20, 99))?;
    let r = c
        .request(&Message::PutFiles {
            chunks: g
                .chunks
                .iter()
                .map(|(id, sealed)| SealedChunk {
                    id: *id,
                    sealed: sealed.clone(),
                })
                .collect(),
            commits: vec![FileCommit {
                commit_id: g.commit_id,
                file_id: g.file_id,
                manifest: g.manifest.clone(),
                chunks: g.ids(),
                deleted: false,
            }],
        })
        .await?;
    assert_eq!(error_code(&r), Some(ErrorCode::QuotaExceeded), "{r:?}");
    assert_eq!(pack_bytes(&root, "small"), before);
    // A commit that needs no new chunk still succeeds (a new version of a stored file).
    let again = SealedFile {
        commit_id: commit_id()?,
        ..stored[0].clone()
    };
    c.commit(&again).await?;
    // Another repository is untouched.
    for i in 0..4 {
        let f = big.seal_file(&format!("w/b{i}"), &data(1 << 20, 100 + i))?;
        other.upload(&f).await?;
    }

    // status and /metrics show where each stands.
    let st = rcv.status()?;
    let s = repo_status(&st, "small")?;
    assert_eq!(s["quota"], 2 << 20, "{st}");
    let used = s["used"].as_u64().context("used")?;
    assert!((1 << 20..=2 << 20).contains(&used), "{st}");
    assert_ne!(s["quota_state"], "ok", "{st}");
    let b = repo_status(&st, "big")?;
    assert_eq!(
        (b["quota"].as_u64(), b["quota_state"].as_str()),
        (Some(0), Some("ok")),
        "{st}"
    );
    let m = wait_for("quota series in /metrics", T, || {
        let m = scrape(metrics).ok()?;
        m.contains_key("coffer_receiver_repository_quota_state{repo=\"small\"}")
            .then_some(m)
    })?;
    assert_eq!(
        m["coffer_receiver_repository_quota_bytes{repo=\"small\"}"],
        (2 << 20) as f64
    );
    assert!(
        m["coffer_receiver_repository_quota_state{repo=\"small\"}"] >= 1.0,
        "{m:?}"
    );
    assert_eq!(
        m["coffer_receiver_repository_used_bytes{repo=\"small\"}"],
        used as f64
    );
    assert!(
        m["coffer_receiver_errors_total{kind=\"quota\"}"] >= 2.0,
        "{m:?}"
    );

    // SIGHUP with a larger quota: the same session stores the refused file.
    rcv.set_config(&config("64MiB"))?;
    sighup(&rcv)?;
    wait_for("serve to reload its quotas on SIGHUP", T, || {
        let log = rcv.log();
        log.contains("SIGHUP: quotas reloaded").then_some(())
    })?;
    assert_eq!(put_all(&mut c, &refused, || 0).await?, None);
    c.commit(&refused).await?;
    small.verify(&mut c, &refused).await?;
    let st = rcv.status()?;
    assert_eq!(repo_status(&st, "small")?["quota_state"], "ok", "{st}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_min_free_every_repository_is_refused_before_the_disk_is_full() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let Some(_mount) = mount_tmpfs(&mnt, "32m") else {
        return Ok(());
    };
    let root = mnt.join("root");
    let mut rcv = Receiver::init(&root)?;
    rcv.set_config("listen = \"127.0.0.1:0\"\nmin_free = \"16MiB\"\n")?;
    let (a, b) = (TestAgent::new()?, TestAgent::new()?);
    rcv.authorize("a", &a.public_key())?;
    rcv.authorize("b", &b.public_key())?;
    rcv.serve()?;
    let mut c = rcv.connect(&a).await?;
    let mut stored = Vec::new();
    let message = loop {
        ensure!(
            stored.len() < 32,
            "min_free never refused on a 32 MiB tmpfs"
        );
        let f = a.seal_file(
            &format!("w/f{}", stored.len()),
            &data(1 << 20, stored.len() as u64),
        )?;
        match put_all(&mut c, &f, || 0).await? {
            None => {
                c.commit(&f).await?;
                stored.push(f);
            }
            Some((code, message, _)) => {
                assert_eq!(code, ErrorCode::QuotaExceeded, "{message}");
                break message;
            }
        }
    };
    assert!(!stored.is_empty(), "refused from the start: {message}");
    assert!(
        message.starts_with("the receiver's disk is nearly full: ")
            && message.contains("below its min_free of 16 MiB"),
        "{message}"
    );
    // Refused well before the disk is full.
    let vfs = nix::sys::statvfs::statvfs(&mnt)?;
    let free = vfs.blocks_available() as u64 * vfs.fragment_size() as u64;
    assert!(free >= 12 << 20, "only {free} bytes free when refused");
    // Every repository is refused; a commit that needs no new chunk still succeeds.
    let mut other = rcv.connect(&b).await?;
    let f = b.seal_file("w/x", &data(1 << 20, 7))?;
    let (code, m, _) = put_all(&mut other, &f, || 0)
        .await?
        .context("b was not refused")?;
    assert_eq!(code, ErrorCode::QuotaExceeded, "{m}");
    assert!(m.contains("disk is nearly full"), "{m}");
    c.commit(&SealedFile {
        commit_id: commit_id()?,
        ..stored[0].clone()
    })
    .await?;
    for f in &stored {
        a.verify(&mut c, f).await?;
    }
    let st = rcv.status()?;
    assert_eq!(st["disk_state"], "below min_free", "{st}");
    assert_eq!(st["min_free"], 16 << 20, "{st}");
    drop((c, other));
    rcv.terminate(T)?;
    let o = rcv.run("scrub", &[])?;
    assert!(
        o.status.success(),
        "scrub: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// What the reply reader saw: `FilesAcked` replies (in request order) with their arrival,
/// and the session's end.
#[derive(Default)]
struct Seen {
    acked: Vec<Instant>,
    unauthorized: Option<(Instant, String)>,
    other: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_an_open_session_within_a_second_and_acknowledges_nothing_sent_after(
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    let (a, b) = (TestAgent::new()?, TestAgent::new()?);
    rcv.authorize("r", &a.public_key())?;
    rcv.authorize("other", &b.public_key())?;
    rcv.serve()?;
    let files: Vec<SealedFile> = (0..2000)
        .map(|i| a.seal_file(&format!("w/{i}"), &data(1024, i)))
        .collect::<Result<_>>()?;
    let c = rcv.connect(&a).await?;
    let (mut tx, mut rx) = c.ch.split();
    // One PutFiles every 5 ms, each noted with the moment before it was sent.
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sent_w = sent.clone();
    let sender = tokio::spawn(async move {
        for f in files {
            let m = Message::PutFiles {
                chunks: f
                    .chunks
                    .iter()
                    .map(|(id, sealed)| SealedChunk {
                        id: *id,
                        sealed: sealed.clone(),
                    })
                    .collect(),
                commits: vec![FileCommit {
                    commit_id: f.commit_id,
                    file_id: f.file_id,
                    manifest: f.manifest.clone(),
                    chunks: f.ids(),
                    deleted: false,
                }],
            };
            if let Ok(mut s) = sent_w.lock() {
                s.push(Instant::now());
            }
            if tx.send(&m).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let seen_w = seen.clone();
    let reader = tokio::spawn(async move {
        loop {
            let m = rx.recv().await;
            let now = Instant::now();
            let Ok(mut s) = seen_w.lock() else { return };
            match m {
                Ok(Message::FilesAcked { .. }) => s.acked.push(now),
                Ok(Message::Error {
                    code: ErrorCode::Unauthorized,
                    message,
                }) => {
                    s.unauthorized = Some((now, message));
                    return;
                }
                Ok(m) => s.other.push(format!("{m:?}")),
                Err(e) => {
                    s.other.push(format!("closed: {e}"));
                    return;
                }
            }
        }
    });
    wait_for("20 files acknowledged", T, || {
        (seen.lock().ok()?.acked.len() >= 20).then_some(())
    })?;
    rcv.revoke(&a.public_key())?;
    let revoked = Instant::now();
    tokio::time::timeout(T, reader)
        .await
        .map_err(|_| anyhow!("the session did not end"))??;
    sender.abort();
    let seen = std::mem::take(&mut *seen.lock().map_err(|_| anyhow!("poisoned"))?);
    let sent = std::mem::take(&mut *sent.lock().map_err(|_| anyhow!("poisoned"))?);
    let (at, message) = seen
        .unauthorized
        .clone()
        .with_context(|| format!("no Unauthorized; saw {:?}", seen.other))?;
    assert!(
        at.saturating_duration_since(revoked) < Duration::from_secs(1),
        "the session ended {:?} after the revocation",
        at.saturating_duration_since(revoked)
    );
    assert!(
        message.contains(&a.public_key().to_string()) && message.contains("revoked"),
        "{message}"
    );
    assert!(seen.other.is_empty(), "{:?}", seen.other);
    // Replies come in request order: the nth acknowledgement answers the nth request,
    // which must have been sent before the revocation.
    for (i, _) in seen.acked.iter().enumerate() {
        assert!(
            sent[i] < revoked,
            "request {i}, sent {:?} after the revocation, was acknowledged",
            sent[i].duration_since(revoked)
        );
    }
    assert!(
        sent.len() > seen.acked.len(),
        "nothing was sent after the revocation"
    );
    // Other keys' sessions go on; the revoked key cannot come back.
    let mut other = rcv.connect(&b).await?;
    other.upload(&b.seal_file("w/x", &data(4096, 1))?).await?;
    let e = match rcv.connect(&a).await {
        Ok(_) => bail!("a revoked key connected"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("not authorized"), "{e}");
    Ok(())
}
