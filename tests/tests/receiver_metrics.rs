//! `coffer-receiver serve --metrics ADDR`: the real binary serves the documented Prometheus
//! series at `/metrics` while agents back up, and the counters follow what happened.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use coffer_common::wire::{ErrorCode, Message};
use coffer_tests::*;

const T: Duration = Duration::from_secs(20);

/// Every series the docs list (counters with their `_total` suffix), with labels where the
/// series is labelled.
const DOCUMENTED: &[&str] = &[
    "coffer_receiver_sessions_active",
    "coffer_receiver_sessions_total",
    "coffer_receiver_bytes_stored_total",
    "coffer_receiver_chunks_stored_total",
    "coffer_receiver_chunks_deduplicated_total",
    "coffer_receiver_commits_total",
    "coffer_receiver_handshakes_rejected_total{reason=\"failed\"}",
    "coffer_receiver_handshakes_rejected_total{reason=\"unauthorized\"}",
    "coffer_receiver_errors_total{kind=\"protocol\"}",
    "coffer_receiver_errors_total{kind=\"storage\"}",
    "coffer_receiver_errors_total{kind=\"internal\"}",
];

/// A `serve` child, killed on drop.
struct Serve(Option<Child>);

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port nobody listens on right now.
fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Starts `serve --metrics METRICS` on `rcv`'s root (agents on 127.0.0.1:0) and records the
/// agent address in `rcv.addr`.
fn serve_with_metrics(rcv: &mut Receiver, metrics: SocketAddr) -> Result<Serve> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(rcv.log_path())
        .context("opening the serve log")?;
    let mut child = rcv
        .cmd()
        .args(["serve", "--root"])
        .arg(&rcv.root)
        .args(["--listen", "127.0.0.1:0", "--metrics", &metrics.to_string()])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("spawning coffer-receiver serve")?;
    let stdout = child.stdout.take().context("serve stdout")?;
    let serve = Serve(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = tx.send(r.read_line(&mut line).map(|_| line));
        let mut rest = String::new();
        while matches!(r.read_line(&mut rest), Ok(n) if n > 0) {
            rest.clear();
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow!("serve printed nothing in 30 s; log:\n{}", rcv.log()))?
        .context("reading serve stdout")?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| anyhow!("unexpected first line {line:?}; log:\n{}", rcv.log()))?
        .parse()
        .context("parsing the listening address")?;
    rcv.addr = Some(addr);
    Ok(serve)
}

/// A plain HTTP/1.1 GET; returns (status line, headers, body).
fn get(addr: SocketAddr, path: &str) -> Result<(String, String, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(T))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .context("reading the response")?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {resp:?}"))?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_string(), headers.to_string(), body.to_string()))
}

/// Scrapes `/metrics`: every sample line as `series -> value`.
fn scrape(addr: SocketAddr) -> Result<BTreeMap<String, f64>> {
    let (status, headers, body) = get(addr, "/metrics")?;
    ensure!(status == "HTTP/1.1 200 OK", "{status}\n{headers}\n{body}");
    ensure!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    ensure!(
        body.ends_with("# EOF\n"),
        "exposition not terminated:\n{body}"
    );
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("bad sample line {line:?}"))?;
        let v: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        out.insert(series.to_string(), v);
    }
    Ok(out)
}

fn value(m: &BTreeMap<String, f64>, series: &str) -> Result<f64> {
    m.get(series)
        .copied()
        .with_context(|| format!("{series} missing from /metrics: {m:#?}"))
}

/// Scrapes until `series` satisfies `ok`.
fn wait_metric(addr: SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
    let mut last = None;
    wait_for(&format!("{series} to change"), T, || {
        let v = scrape(addr).ok().and_then(|m| m.get(series).copied());
        last = v;
        v.filter(|v| ok(*v))
    })
    .with_context(|| format!("last value of {series}: {last:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_backup_and_refusals() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    let agent = TestAgent::new()?;
    rcv.authorize("laptop", &agent.public_key())?;
    let maddr = free_port()?;
    let _serve = serve_with_metrics(&mut rcv, maddr)?;

    // Every documented series is there from the start, at zero.
    let m = scrape(maddr)?;
    for s in DOCUMENTED {
        assert_eq!(value(&m, s)?, 0.0, "{s}");
    }
    let (status, _, body) = get(maddr, "/")?;
    assert!(status.starts_with("HTTP/1.1 404"), "{status} {body}");

    // A backup: several files, some sharing chunks.
    let shared_part = data(300 << 10, 7);
    let mut files = Vec::new();
    for i in 0..4u64 {
        let mut plain = data(((i as usize) + 1) * (90 << 10), 100 + i);
        if i % 2 == 1 {
            plain = [shared_part.clone(), plain].concat();
        }
        files.push(agent.seal_file(&format!("w/file{i}"), &plain)?);
    }
    let mut c = rcv.connect(&agent).await?;
    let (mut sealed_bytes, mut chunks) = (0u64, std::collections::HashSet::new());
    for f in &files {
        for (id, sealed) in &f.chunks {
            if chunks.insert(*id) {
                sealed_bytes += sealed.len() as u64;
            }
        }
        c.upload(f).await?;
    }
    // One chunk sent again although the receiver has it: stored once, counted as a dedup.
    let (id, sealed) = &files[0].chunks[0];
    c.put(id, sealed).await?;

    // While the session is open.
    let m = scrape(maddr)?;
    for s in DOCUMENTED {
        value(&m, s)?;
    }
    assert_eq!(value(&m, "coffer_receiver_sessions_active")?, 1.0);
    assert_eq!(value(&m, "coffer_receiver_sessions_total")?, 1.0);
    assert_eq!(
        value(&m, "coffer_receiver_commits_total")?,
        files.len() as f64
    );
    assert_eq!(
        value(&m, "coffer_receiver_bytes_stored_total")?,
        sealed_bytes as f64
    );
    assert_eq!(
        value(&m, "coffer_receiver_chunks_stored_total")?,
        chunks.len() as f64
    );
    assert_eq!(value(&m, "coffer_receiver_chunks_deduplicated_total")?, 1.0);
    let repo_bytes = value(
        &m,
        "coffer_receiver_repository_stored_bytes{repo=\"laptop\"}",
    )?;
    assert!(
        repo_bytes >= sealed_bytes as f64,
        "repository holds {repo_bytes} bytes, {sealed_bytes} sealed bytes were stored"
    );
    for s in [
        "coffer_receiver_errors_total{kind=\"protocol\"}",
        "coffer_receiver_errors_total{kind=\"storage\"}",
        "coffer_receiver_errors_total{kind=\"internal\"}",
    ] {
        assert_eq!(value(&m, s)?, 0.0, "{s}");
    }
    drop(c);
    wait_metric(maddr, "coffer_receiver_sessions_active", |v| v == 0.0)?;

    // An unknown agent key is refused and counted.
    let stranger = TestAgent::new()?;
    let mut ch = stranger.handshake(rcv.addr()?, &rcv.public_key).await?;
    let m = ch.recv().await?;
    assert_eq!(error_code(&m), Some(ErrorCode::Unauthorized), "{m:?}");
    drop(ch);
    wait_metric(
        maddr,
        "coffer_receiver_handshakes_rejected_total{reason=\"unauthorized\"}",
        |v| v == 1.0,
    )?;
    // So is a connection that never completes a handshake.
    {
        let mut s = TcpStream::connect(rcv.addr()?)?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    }
    wait_metric(
        maddr,
        "coffer_receiver_handshakes_rejected_total{reason=\"failed\"}",
        |v| v >= 1.0,
    )?;
    // A protocol violation ends the session and is counted as a protocol error.
    let mut c = rcv.connect(&agent).await?;
    let m = c.request(&Message::KeyFileStored).await?;
    assert_eq!(error_code(&m), Some(ErrorCode::Malformed), "{m:?}");
    drop(c);
    wait_metric(
        maddr,
        "coffer_receiver_errors_total{kind=\"protocol\"}",
        |v| v == 1.0,
    )?;
    let m = scrape(maddr)?;
    assert_eq!(value(&m, "coffer_receiver_sessions_total")?, 2.0);
    assert_eq!(
        value(&m, "coffer_receiver_commits_total")?,
        files.len() as f64,
        "no commit counted twice"
    );
    let log = rcv.log();
    assert!(
        log.contains(&format!("metrics at http://{maddr}/metrics")),
        "{log}"
    );
    Ok(())
}

#[test]
fn metrics_address_in_use_stops_serve_with_a_clear_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::init(&tmp.path().join("root"))?;
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let o = rcv
        .cmd()
        .args(["serve", "--root"])
        .arg(&rcv.root)
        .args(["--listen", "127.0.0.1:0", "--metrics", &addr.to_string()])
        .output()?;
    if o.status.success() {
        bail!("serve started although {addr} was taken");
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("serving metrics on {addr}")), "{err}");
    assert!(o.stdout.is_empty(), "serve reported ready: {:?}", o.stdout);
    Ok(())
}
