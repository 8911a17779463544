//! Strangers flooding the receiver with half-open connections, reopening each as soon as it
//! is closed, from many addresses (issue 27): a real agent still gets its files backed up,
//! and the receiver's log says so in a few summary lines, not one line per connection.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// Loopback addresses the flood comes from (not the agent's 127.0.0.1).
const ADDRESSES: u8 = 64;
/// Connections kept open from each: more than 512 handshakes in all.
const PER_ADDRESS: usize = 12;

/// One stranger: connects from `from`, sends the preamble (every other one) or nothing,
/// then waits for the receiver to close the connection, and does it again.
async fn stranger(
    i: usize,
    from: Ipv4Addr,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) {
    let mut preamble = b"COFR".to_vec();
    preamble.extend_from_slice(&coffer_common::wire::PROTOCOL_VERSION.to_le_bytes());
    while !stop.load(Ordering::Relaxed) {
        let conn = async {
            let s = TcpSocket::new_v4()?;
            s.bind(SocketAddr::from((from, 0)))?;
            s.connect(to).await
        };
        let mut s = match conn.await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        opened.fetch_add(1, Ordering::Relaxed);
        if i.is_multiple_of(2) {
            let _ = s.write_all(&preamble).await;
        }
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
        }
    }
}

#[test]
fn a_flood_of_half_open_connections_does_not_keep_an_agent_out() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("root"))?;
    let to: SocketAddr = rcv.addr.parse()?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::create_dir_all(&agent.watch)?;
    for i in 0..5u64 {
        std::fs::write(
            agent.watch.join(format!("f{i}")),
            data(10_000 + i as usize, i),
        )?;
    }
    std::fs::write(agent.watch.join("big"), data(3 << 20, 9))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let mut strangers = Vec::new();
    for i in 0..ADDRESSES as usize * PER_ADDRESS {
        let from = Ipv4Addr::new(127, 0, 0, 2 + (i % ADDRESSES as usize) as u8);
        strangers.push(rt.spawn(stranger(i, from, to, stop.clone(), opened.clone())));
    }
    let total = (ADDRESSES as usize * PER_ADDRESS) as u64;
    wait_for(
        "the flood to open its connections",
        Duration::from_secs(30),
        || (opened.load(Ordering::Relaxed) >= total).then_some(()),
    )?;
    let log_before = std::fs::read_to_string(rcv.root.with_extension("serve.log"))?;

    agent.run()?;
    let settled = agent.wait_settled(6, Duration::from_secs(30));
    // The flood goes on until the receiver has summarised it.
    let serve_log = || std::fs::read_to_string(rcv.root.with_extension("serve.log"));
    let summary = settled.is_ok().then(|| {
        wait_for(
            "the refusals' summary line",
            Duration::from_secs(30),
            || {
                let log = serve_log().ok()?;
                log.contains("connections turned away").then_some(log)
            },
        )
    });
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for s in strangers {
            let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    settled.with_context(|| {
        format!(
            "the flood kept the agent out ({} stranger connections opened)",
            opened.load(Ordering::Relaxed)
        )
    })?;
    let log = summary.context("no summary")??;
    // The flood is summarised, not logged connection by connection.
    let lines = log.lines().count() - log_before.lines().count();
    assert!(
        lines < 100,
        "{lines} log lines during the flood; the last ones:\n{}",
        tail(&log)
    );
    assert!(
        log.contains("failed or timed out in the handshake"),
        "{}",
        tail(&log)
    );
    Ok(())
}
