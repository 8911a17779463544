//! Peers that try to exhaust the receiver or poison its log (issue 27): replies held behind
//! a commit, requests full of repeated ids, one key or repository holding every session,
//! sizes an honest agent never sends, control characters in the names it logs.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coffer_common::channel::RecvHalf;
use coffer_common::chunk::{ChunkId, FileId, MAX_CHUNK, SEAL_OVERHEAD};
use coffer_common::wire::{
    ErrorCode, FileCommit, Message, SealedChunk, MAX_IDS, MAX_MANIFEST, MAX_NAME, PROTOCOL_VERSION,
};
use coffer_tests::*;
use tokio::io::ReadHalf;
use tokio::net::TcpStream;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(20);

async fn setup(tmp: &tempfile::TempDir) -> Result<(Receiver, TestAgent)> {
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    let agent = TestAgent::new()?;
    rcv.authorize("r", &agent.public_key())?;
    rcv.serve()?;
    Ok((rcv, agent))
}

type Rx = RecvHalf<ReadHalf<TcpStream>>;

/// The next message is an `Error` with `code` whose text contains `says`, then the
/// session is closed.
async fn error_then_close(rx: &mut Rx, code: ErrorCode, says: &str) -> Result<()> {
    let m = timeout(T, rx.recv()).await.context("no reply")??;
    match &m {
        Message::Error { code: c, message } if *c == code => {
            assert!(message.contains(says), "{message:?} should say {says:?}")
        }
        m => bail!("expected Error{{{code:?}}}, got {m:?}"),
    }
    let next = timeout(T, rx.recv()).await.context("not closed")?;
    assert!(next.is_err(), "session still open: {next:?}");
    Ok(())
}

/// A line of `/proc/PID/status` in bytes (`VmHWM`: the peak resident set).
fn proc_status_bytes(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("no value")?
        .parse()?;
    Ok(kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_held_behind_a_commit_do_not_grow_without_bound() -> Result<()> {
    const N: usize = 60_000;
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let pid = rcv.pid().context("serve pid")?;
    let mut c = rcv.connect(&agent).await?;
    // Every `GetKeyFiles` is answered with every escrowed key file: 4 KiB a reply.
    for i in 0..28 {
        c.request(&Message::PutKeyFile { data: key_file(i) })
            .await?;
    }
    let key_files = match c.request(&Message::GetKeyFiles).await? {
        Message::KeyFiles { files } => files,
        m => bail!("expected KeyFiles, got {m:?}"),
    };
    let f = agent.seal_file("w/held", b"one small file")?;
    for (id, s) in &f.chunks {
        c.put(id, s).await?;
    }
    let before = proc_status_bytes(pid, "VmHWM:")?;
    // One commit, then many small requests pipelined behind it without a pause.
    let (mut tx, mut rx) = c.ch.split();
    let commit = f.commit_message();
    let sender = tokio::spawn(async move {
        tx.queue(&commit)?;
        for _ in 0..N {
            tx.queue(&Message::GetKeyFiles)?;
            if tx.queued() >= 64 << 10 {
                tx.flush_queued().await?;
            }
        }
        tx.queue(&Message::ListVersions { after: 0, limit: 0 })?;
        tx.flush_queued().await?;
        anyhow::Ok(tx)
    });
    // Every request is answered, in order.
    timeout(Duration::from_secs(180), async {
        match rx.recv().await? {
            Message::FileAcked { commit_id, .. } if commit_id == f.commit_id => {}
            m => bail!("expected the commit's FileAcked, got {m:?}"),
        }
        for i in 0..N {
            match rx.recv().await? {
                Message::KeyFiles { files } if files == key_files => {}
                m => bail!("reply {i}: expected the key files, got {}", m.kind()),
            }
        }
        match rx.recv().await? {
            Message::Versions { entries, .. } if entries.len() == 1 => Ok(()),
            m => bail!("expected one version, got {m:?}"),
        }
    })
    .await
    .context("the pipelined requests were not all answered")??;
    let _tx = sender.await??;
    // The replies were written as the receiver went, not gathered behind the commit:
    // 60,000 of 4 KiB would be 240 MiB.
    let grew = proc_status_bytes(pid, "VmHWM:")?.saturating_sub(before);
    eprintln!("peak RSS grew by {} KiB", grew >> 10);
    assert!(
        grew < 64 << 20,
        "the receiver's peak RSS grew by {} MiB",
        grew >> 20
    );
    Ok(())
}

/// 65,536 ids: `known` twice and 32,767 unknown ids twice each, in an interleaved order.
fn many_repeated_ids(known: ChunkId) -> (Vec<ChunkId>, Vec<ChunkId>) {
    let unknown: Vec<ChunkId> = (0..MAX_IDS / 2 - 1)
        .map(|i| ChunkId(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes()))
        .collect();
    let mut ids = vec![known];
    ids.extend(&unknown);
    ids.push(known);
    ids.extend(unknown.iter().rev());
    assert_eq!(ids.len(), MAX_IDS);
    (ids, unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_ids_a_request_may_carry_repeated_are_answered_promptly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let mut c = rcv.connect(&agent).await?;
    let f = agent.seal_file("w/known", b"a chunk the receiver has")?;
    c.upload(&f).await?;
    let known = f.ids()[0];
    let (ids, unknown) = many_repeated_ids(known);
    let started = Instant::now();
    // Missing: each unknown id once, in the order first asked.
    assert_eq!(c.have(&ids).await?, unknown);
    // A commit referencing them: refused, counting each missing chunk once.
    let mut g = agent.seal_file("w/many", b"x")?;
    g.chunks.clear();
    let m = Message::CommitFile {
        commit_id: g.commit_id,
        file_id: g.file_id,
        manifest: g.manifest.clone(),
        chunks: ids,
        deleted: false,
    };
    match c.request(&m).await? {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::MissingChunks);
            assert!(
                message.contains(&format!("{} chunk(s)", unknown.len())),
                "{message}"
            );
        }
        m => bail!("expected MissingChunks, got {m:?}"),
    }
    // A commit referencing one present chunk 65,536 times is acknowledged.
    let m = Message::CommitFile {
        commit_id: g.commit_id,
        file_id: g.file_id,
        manifest: g.manifest.clone(),
        chunks: vec![known; MAX_IDS],
        deleted: false,
    };
    match c.request(&m).await? {
        Message::FileAcked { commit_id, .. } if commit_id == g.commit_id => {}
        m => bail!("expected FileAcked, got {m:?}"),
    }
    let took = started.elapsed();
    assert!(took < T, "three requests took {took:?}");
    Ok(())
}

/// Connects `agent` and waits for the receiver's refusal, which must say "busy" and name
/// `cap`.
async fn refused_as_busy(rcv: &Receiver, agent: &TestAgent, cap: &str) -> Result<()> {
    let mut ch = agent.handshake(rcv.addr()?, &rcv.public_key).await?;
    match timeout(T, ch.recv()).await.context("no busy reply")?? {
        Message::Error { message, .. } if message.contains("busy") => {
            assert!(message.contains(cap), "{message:?} should name {cap}");
            Ok(())
        }
        m => bail!("expected a busy error naming {cap}, got {m:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_or_one_repository_cannot_take_every_session() -> Result<()> {
    // The defaults: 64 sessions, 8 per key, 16 per repository.
    let tmp = tempfile::tempdir()?;
    let (rcv, a) = setup(&tmp).await?;
    let a2 = TestAgent::new()?;
    let a3 = TestAgent::new()?;
    let b = TestAgent::new()?;
    rcv.authorize("r", &a2.public_key())?;
    rcv.authorize("r", &a3.public_key())?;
    rcv.authorize("other", &b.public_key())?;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(rcv.connect(&a).await?);
    }
    refused_as_busy(&rcv, &a, "max_sessions_per_key").await?;
    for _ in 0..8 {
        held.push(rcv.connect(&a2).await?);
    }
    // A third key of the same repository: the repository has all it may have.
    refused_as_busy(&rcv, &a3, "max_sessions_per_repo").await?;
    // Another repository's agent gets in and works.
    let mut cb = rcv.connect(&b).await?;
    let f = b.seal_file("w/other", &data(300_000, 3))?;
    cb.upload(&f).await?;
    b.verify(&mut cb, &f).await?;
    // The sessions held are alive, and once one ends its key gets a session again.
    assert!(held[15].all_versions().await?.is_empty());
    drop(held.remove(0));
    let mut again = timeout(T, async {
        loop {
            if let Ok(c) = rcv.connect(&a).await {
                return c;
            }
        }
    })
    .await
    .context("the key never got a session back")?;
    again.upload(&a.seal_file("w/a", b"a")?).await?;
    Ok(())
}

/// The repository's counts from `status`.
fn counts(rcv: &Receiver) -> Result<(u64, u64)> {
    let st = rcv.status()?;
    let r = st["repositories"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "r"))
        .context("repository r in status")?;
    Ok((
        r["chunks"].as_u64().unwrap_or(u64::MAX),
        r["versions"].as_u64().unwrap_or(u64::MAX),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_an_honest_agent_never_sends_end_the_session_and_store_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    // The largest sealed chunk the chunker can give (MAX_CHUNK, sealed uncompressed) and
    // one byte more.
    let largest = MAX_CHUNK as usize + SEAL_OVERHEAD;
    let mut c = rcv.connect(&agent).await?;
    let ok = vec![5u8; largest];
    c.put(&ChunkId([1; 32]), &ok).await?;
    c.commit(&SealedFile {
        path: b"w/largest".to_vec(),
        plain: Vec::new(),
        file_id: FileId([1; 32]),
        commit_id: commit_id()?,
        manifest: vec![6; MAX_MANIFEST],
        chunks: vec![(ChunkId([1; 32]), Vec::new())],
    })
    .await?;
    let before = counts(&rcv)?;
    assert_eq!(before, (1, 1));

    let big_chunk = vec![5u8; largest + 1];
    let (mut tx, mut rx) = rcv.connect(&agent).await?.ch.split();
    tx.send(&Message::put_chunk(ChunkId([2; 32]), big_chunk.clone()))
        .await?;
    error_then_close(&mut rx, ErrorCode::Malformed, "sealed chunk").await?;

    let (mut tx, mut rx) = rcv.connect(&agent).await?.ch.split();
    let small = agent.seal_file("w/small", b"small")?;
    tx.send(&Message::PutFiles {
        chunks: vec![
            SealedChunk {
                id: small.ids()[0],
                sealed: small.chunks[0].1.clone(),
            },
            SealedChunk {
                id: ChunkId([3; 32]),
                sealed: big_chunk,
            },
        ],
        commits: vec![],
    })
    .await?;
    error_then_close(&mut rx, ErrorCode::Malformed, "sealed chunk").await?;

    let (mut tx, mut rx) = rcv.connect(&agent).await?.ch.split();
    tx.send(&Message::CommitFile {
        commit_id: commit_id()?,
        file_id: FileId([2; 32]),
        manifest: vec![6; MAX_MANIFEST + 1],
        chunks: vec![],
        deleted: false,
    })
    .await?;
    error_then_close(&mut rx, ErrorCode::Malformed, "manifest").await?;

    let (mut tx, mut rx) = rcv.connect(&agent).await?.ch.split();
    tx.send(&Message::PutFiles {
        chunks: vec![],
        commits: vec![FileCommit {
            commit_id: commit_id()?,
            file_id: FileId([3; 32]),
            manifest: vec![6; MAX_MANIFEST + 1],
            chunks: vec![],
            deleted: false,
        }],
    })
    .await?;
    error_then_close(&mut rx, ErrorCode::Malformed, "manifest").await?;

    let long = "x".repeat(MAX_NAME + 1);
    for (agent_name, software) in [(&*long, "s"), ("n", &*long)] {
        let (mut tx, mut rx) = agent.handshake(rcv.addr()?, &rcv.public_key).await?.split();
        tx.send(&Message::Hello {
            protocol: PROTOCOL_VERSION,
            agent_name: agent_name.to_string(),
            software: software.to_string(),
        })
        .await?;
        error_then_close(&mut rx, ErrorCode::Malformed, "256").await?;
    }
    // A name of 256 bytes is fine.
    let mut ch = agent.handshake(rcv.addr()?, &rcv.public_key).await?;
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        agent_name: "n".repeat(MAX_NAME),
        software: "s".repeat(MAX_NAME),
    };
    let m = ch.request(&hello).await?;
    assert!(matches!(m, Message::Welcome { .. }), "{m:?}");
    drop(ch);
    assert_eq!(counts(&rcv)?, before, "nothing more was stored");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_names_are_escaped_in_the_log() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp).await?;
    let mut ch = agent.handshake(rcv.addr()?, &rcv.public_key).await?;
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        agent_name: "evil\nFORGED ERROR line\r\u{1b}[31m".into(),
        software: "soft\nFORGED too".into(),
    };
    let m = ch.request(&hello).await?;
    assert!(matches!(m, Message::Welcome { .. }), "{m:?}");
    drop(ch);
    let log = wait_for("the session's end in the log", T, || {
        let l = rcv.log();
        l.contains("session ended").then_some(l)
    })?;
    let forged: HashSet<&str> = log
        .lines()
        .filter(|l| l.starts_with("FORGED") || l.contains('\u{1b}') || l.contains('\r'))
        .collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}\n{log}");
    assert!(
        log.contains(r"evil\nFORGED ERROR line\r\u{1b}[31m"),
        "{log}"
    );
    assert!(log.contains(r"soft\nFORGED too"), "{log}");
    Ok(())
}
