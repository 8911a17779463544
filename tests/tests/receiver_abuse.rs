//! Hostile and careless peers: garbage, oversized frames, replies sent as requests, idle
//! connections by the hundred, sessions over the cap. Each ends only its own session.

use std::time::Duration;

use anyhow::{Context, Result};
use coffer_common::channel::RecvHalf;
use coffer_common::wire::{ErrorCode, Message};
use coffer_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(20);

async fn setup(tmp: &tempfile::TempDir, config: Option<&str>) -> Result<(Receiver, TestAgent)> {
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    if let Some(c) = config {
        rcv.set_config(c)?;
    }
    let agent = TestAgent::new()?;
    rcv.authorize("r", &agent.public_key())?;
    rcv.serve()?;
    Ok((rcv, agent))
}

/// Reads from a raw socket until the peer closes it.
async fn closed_by_peer(s: &mut TcpStream) -> Result<()> {
    let mut buf = [0u8; 4096];
    timeout(T, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .context("the receiver did not close the connection")
}

type Rx = RecvHalf<ReadHalf<TcpStream>>;

/// The next message is an `Error` with `code`, then the session is closed.
async fn error_then_close(rx: &mut Rx, code: ErrorCode) -> Result<()> {
    let m = timeout(T, rx.recv()).await.context("no reply")??;
    assert_eq!(error_code(&m), Some(code), "{m:?}");
    let next = timeout(T, rx.recv()).await.context("not closed")?;
    assert!(next.is_err(), "session still open: {next:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_end_only_their_own_session() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp, None).await?;
    let mut good = rcv.connect(&agent).await?;
    let first = agent.seal_file("w/first", &data(300_000, 1))?;
    good.upload(&first).await?;

    // Plain garbage instead of a handshake.
    let mut raw = TcpStream::connect(rcv.addr()?).await?;
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    closed_by_peer(&mut raw).await?;

    // Garbage bytes inside the secure channel: an unknown message kind.
    let (mut tx, mut rx) = rcv.connect(&agent).await?.ch.split();
    tx.send_raw(&[250, 1, 2, 3]).await?;
    error_then_close(&mut rx, ErrorCode::Malformed).await?;

    // A huge length prefix is refused before anything is allocated.
    let (mut tx, mut rx) = rcv.connect(&agent).await?.ch.split();
    tx.send_with_claimed_len(u32::MAX, b"x").await?;
    error_then_close(&mut rx, ErrorCode::Malformed).await?;

    // A reply kind sent as a request.
    let (mut tx, mut rx) = rcv.connect(&agent).await?.ch.split();
    tx.send(&Message::KeyFileStored).await?;
    error_then_close(&mut rx, ErrorCode::Malformed).await?;

    // Garbage after a pipelined commit: the commit is still acknowledged first.
    let mut c4 = rcv.connect(&agent).await?;
    let f = agent.seal_file("w/before-garbage", b"acked before the error")?;
    for (id, s) in &f.chunks {
        c4.put(id, s).await?;
    }
    let (mut tx, mut rx) = c4.ch.split();
    tx.send(&f.commit_message()).await?;
    tx.send_raw(&[0xff; 64]).await?;
    let m = timeout(T, rx.recv()).await??;
    assert!(matches!(m, Message::FileAcked { .. }), "{m:?}");
    error_then_close(&mut rx, ErrorCode::Malformed).await?;

    // The good session never noticed, and new sessions work.
    let second = agent.seal_file("w/second", &data(2 << 20, 2))?;
    good.upload(&second).await?;
    agent.verify(&mut good, &first).await?;
    let mut fresh = rcv.connect(&agent).await?;
    agent.verify(&mut fresh, &second).await?;
    agent.verify(&mut fresh, &f).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_idle_connections_do_not_block_real_work() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // One agent key from one address: its caps raised to let it hold them all.
    let config = "listen = \"127.0.0.1:0\"\nmax_sessions = 256\nmax_sessions_per_key = 256\n\
                  max_sessions_per_repo = 256\nmax_handshakes_per_address = 512\n";
    let (rcv, agent) = setup(&tmp, Some(config)).await?;
    let addr = rcv.addr()?;
    // 100 connections that never say anything (stuck before the handshake)...
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(addr).await?);
    }
    // ...and 100 authenticated sessions that said Hello and went quiet.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(rcv.connect(&agent).await?);
    }
    // A real agent still gets its work done promptly.
    let f = agent.seal_file("w/real", &data(3 << 20, 5))?;
    timeout(T, async {
        let mut c = rcv.connect(&agent).await?;
        c.upload(&f).await?;
        agent.verify(&mut c, &f).await
    })
    .await
    .context("real work was blocked by idle connections")??;
    // The idle sessions are still alive and usable.
    let v = idle[99].all_versions().await?;
    assert_eq!(v.len(), 1);
    drop(silent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_session_cap_is_a_clear_busy_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(&tmp, Some("listen = \"127.0.0.1:0\"\nmax_sessions = 1\n")).await?;
    let holder = rcv.connect(&agent).await?;
    let mut ch = agent.handshake(rcv.addr()?, &rcv.public_key).await?;
    let m = timeout(T, ch.recv()).await.context("no busy reply")??;
    match &m {
        Message::Error { message, .. } => assert!(message.contains("busy"), "{message}"),
        m => panic!("expected a busy error, got {m:?}"),
    }
    drop(holder);
    // Once the slot is free, the next agent gets in.
    let mut c = wait_for_session(&rcv, &agent).await?;
    c.upload(&agent.seal_file("w/x", b"x")?).await?;
    Ok(())
}

async fn wait_for_session(rcv: &Receiver, agent: &TestAgent) -> Result<Client> {
    timeout(T, async {
        loop {
            if let Ok(c) = rcv.connect(agent).await {
                return c;
            }
        }
    })
    .await
    .context("no session slot came free")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_closed_after_the_timeout() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (rcv, agent) = setup(
        &tmp,
        Some("listen = \"127.0.0.1:0\"\nidle_timeout_secs = 1\n"),
    )
    .await?;
    let mut c = rcv.connect(&agent).await?;
    let r = timeout(T, c.ch.recv())
        .await
        .context("idle session not closed")?;
    assert!(r.is_err(), "expected the session to be closed, got {r:?}");
    // A session that keeps talking is not cut.
    let mut c = rcv.connect(&agent).await?;
    for i in 0..3u64 {
        c.upload(&agent.seal_file(&format!("w/{i}"), &data(1000, i))?)
            .await?;
    }
    Ok(())
}
