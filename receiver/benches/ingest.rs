//! Ingest benchmark: concurrent clients over loopback send sealed 1 MiB chunks, one
//! `CommitFile` per chunk, pipelined; a file counts when its `FileAcked` arrives (so after
//! the pack fsync and the index transaction). Prints MB/s and the receiver's peak RSS.
//!
//! Run with `cargo bench -p coffer-receiver --bench ingest`. Environment:
//! `COFFER_BENCH_DIR` (where the backup tree goes; default the system temp dir),
//! `COFFER_BENCH_MIB` (MiB sent per scenario; default 3072).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use coffer_common::channel::{connect, PublicKey, StaticKeypair};
use coffer_common::chunk::{ChunkId, FileId, SEAL_OVERHEAD};
use coffer_common::wire::{CommitId, Message, PROTOCOL_VERSION};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const CHUNK: usize = 1 << 20;
/// Files in flight per client (unacknowledged).
const WINDOW: usize = 16;

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_coffer-receiver")
}

fn run(args: &[&str]) -> Result<String> {
    let o = Command::new(exe()).args(args).output()?;
    if !o.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8(o.stdout)?)
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn client(
    addr: std::net::SocketAddr,
    receiver: PublicKey,
    key: StaticKeypair,
    index: u32,
    files: u32,
    body: Arc<Vec<u8>>,
) -> Result<u64> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut ch = connect(s, &key, &receiver).await?;
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        agent_name: format!("bench-{index}"),
        software: coffer_common::SOFTWARE.into(),
    };
    match ch.request(&hello).await? {
        Message::Welcome { .. } => {}
        m => bail!("expected Welcome, got {m:?}"),
    }
    let (mut tx, mut rx) = ch.split();
    let len = body.len() as u64;
    let window = Arc::new(Semaphore::new(WINDOW));
    let w = window.clone();
    let sender = tokio::spawn(async move {
        for n in 0..files {
            w.acquire().await?.forget();
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&index.to_le_bytes());
            id[4..8].copy_from_slice(&n.to_le_bytes());
            let id = ChunkId(id);
            // Same bytes under distinct ids: the receiver neither knows nor checks.
            tx.send(&Message::put_chunk(id, body.to_vec())).await?;
            let mut c = [0u8; 16];
            c[..12].copy_from_slice(&id.0[..12]);
            tx.send(&Message::CommitFile {
                commit_id: CommitId(c),
                file_id: FileId(id.0),
                manifest: vec![0u8; 200],
                chunks: vec![id],
                deleted: false,
            })
            .await?;
        }
        anyhow::Ok(())
    });
    let mut acked = 0u64;
    while acked < files as u64 {
        match rx.recv().await? {
            Message::Stored { .. } => {}
            Message::FileAcked { .. } => {
                acked += 1;
                window.add_permits(1);
            }
            m => return Err(anyhow!("unexpected reply {m:?}")),
        }
    }
    sender.await??;
    Ok(acked * len)
}

fn scenario(clients: u32, total_mib: u64) -> Result<()> {
    let base = std::env::var_os("COFFER_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(base)?;
    let root = tmp.path().join("root");
    let root_s = root.to_str().context("utf-8 path")?;
    let rkey: PublicKey = run(&["init", "--root", root_s, "--listen", "127.0.0.1:0"])?
        .trim()
        .parse()?;
    let keys: Vec<StaticKeypair> = (0..clients)
        .map(|_| StaticKeypair::generate())
        .collect::<Result<_, _>>()?;
    for (i, k) in keys.iter().enumerate() {
        let name = format!("repo{}", i % 4);
        run(&[
            "authorize",
            "--root",
            root_s,
            "--name",
            &name,
            &k.public().to_string(),
        ])?;
    }
    let mut child = Command::new(exe())
        .args(["serve", "--root", root_s])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .context("listening line")?
        .parse()?;
    let mut body = vec![0u8; CHUNK + SEAL_OVERHEAD];
    blake3::Hasher::new()
        .update(b"ingest")
        .finalize_xof()
        .fill(&mut body);
    let body = Arc::new(body);
    let files = (total_mib / clients as u64) as u32;
    let rt = tokio::runtime::Runtime::new()?;
    let start = Instant::now();
    let bytes: u64 = rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, k) in keys.into_iter().enumerate() {
            tasks.push(tokio::spawn(client(
                addr,
                rkey,
                k,
                i as u32,
                files,
                body.clone(),
            )));
        }
        let mut sum = 0;
        for t in tasks {
            sum += t.await??;
        }
        anyhow::Ok(sum)
    })?;
    let secs = start.elapsed().as_secs_f64();
    let rss = peak_rss_kib(pid);
    let cpu = cpu_secs(pid).unwrap_or(0.0);
    let own = cpu_secs(std::process::id()).unwrap_or(0.0);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let st = child.wait()?;
    println!(
        "{clients:>2} clients: {:.0} MiB acked in {secs:.2} s = {:.0} MB/s; receiver peak RSS {}, \
         receiver CPU {cpu:.1} s, clients CPU {own:.1} s (receiver {st})",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / secs / 1e6,
        rss.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "unknown".into()),
    );
    Ok(())
}

/// The disk's own rate for the same work: 1 GiB in 16 MiB writes, each followed by an
/// fdatasync (the receiver can hardly beat it).
fn disk_baseline() -> Result<f64> {
    use std::io::Write;
    let base = std::env::var_os("COFFER_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(base)?;
    let mut f = std::fs::File::create(tmp.path().join("baseline"))?;
    let mut block = vec![0u8; 16 << 20];
    blake3::Hasher::new()
        .update(b"baseline")
        .finalize_xof()
        .fill(&mut block);
    let start = Instant::now();
    for _ in 0..64 {
        f.write_all(&block)?;
        f.sync_data()?;
    }
    Ok((64u64 * block.len() as u64) as f64 / start.elapsed().as_secs_f64() / 1e6)
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let mib: u64 = std::env::var("COFFER_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3072);
    println!(
        "disk baseline: {:.0} MB/s (16 MiB writes, fdatasync after each)",
        disk_baseline()?
    );
    println!("ingest: sealed 1 MiB chunks, one commit each, fsync before every ack");
    scenario(4, mib)?;
    scenario(16, mib)?;
    Ok(())
}
