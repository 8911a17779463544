//! Crash safety: kill -9 at random moments during a stream of puts and commits, and a
//! graceful SIGTERM; every acknowledged file must read back intact afterwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use coffer_common::chunk::FileId;
use coffer_common::wire::{CommitId, ErrorCode, Message};
use coffer_tests::*;

const T: Duration = Duration::from_secs(30);

/// xorshift64*: reproducible randomness from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

type Acked = Arc<Mutex<Vec<(SealedFile, u64)>>>;

/// Streams `files` pipelined (every chunk, then the commit) on a new session and records
/// each acknowledged file. Returns the sender and reader tasks.
async fn stream(
    rcv: &Receiver,
    agent: &TestAgent,
    files: Vec<SealedFile>,
    acked: Acked,
) -> Result<(
    tokio::task::JoinHandle<Result<()>>,
    tokio::task::JoinHandle<Result<Option<Message>>>,
)> {
    let c = rcv.connect(agent).await?;
    let (mut tx, mut rx) = c.ch.split();
    let sent = files.clone();
    let sender = tokio::spawn(async move {
        for f in &sent {
            for (id, s) in &f.chunks {
                tx.send(&Message::put_chunk(*id, s.clone())).await?;
            }
            tx.send(&f.commit_message()).await?;
        }
        Ok(())
    });
    let reader = tokio::spawn(async move {
        for f in files {
            for (id, _) in &f.chunks {
                match rx.recv().await {
                    Ok(Message::Stored { id: got }) => assert_eq!(got, *id),
                    Ok(other) => return Ok(Some(other)),
                    Err(_) => return Ok(None),
                }
            }
            match rx.recv().await {
                Ok(Message::FileAcked {
                    commit_id, version, ..
                }) => {
                    assert_eq!(commit_id, f.commit_id, "acks in order");
                    if let Ok(mut a) = acked.lock() {
                        a.push((f, version));
                    }
                }
                Ok(other) => return Ok(Some(other)),
                Err(_) => return Ok(None),
            }
        }
        Ok(None)
    });
    Ok((sender, reader))
}

/// The version each intact commit record in repository `repo`'s packs gives its
/// `(file id, commit id)` (the higher, should one appear twice).
fn commit_records(root: &std::path::Path, repo: &str) -> Result<HashMap<(FileId, CommitId), u64>> {
    use coffer_receiver::records::CommitRecord;
    use coffer_receiver::store::{scan, Found, LocalPacks, PackStore, PACK_HEADER_LEN};
    let name = coffer_receiver::RepoName::new(repo)?;
    let packs = LocalPacks::new(coffer_receiver::Layout::new(root).repo(&name).packs());
    let mut out = HashMap::new();
    for p in packs.list()? {
        let len = packs.len(p)?;
        scan::<anyhow::Error>(&packs, p, PACK_HEADER_LEN, len, |f| {
            if let Found::Commit { header, body, .. } = f {
                let r = CommitRecord::decode(&header, body)?;
                let v = out.entry((r.file_id, r.commit_id)).or_insert(r.version);
                *v = (*v).max(r.version);
            }
            Ok(())
        })?;
    }
    Ok(out)
}

fn count(a: &Acked) -> usize {
    a.lock().map(|a| a.len()).unwrap_or(0)
}

async fn verify_all(rcv: &Receiver, agent: &TestAgent, acked: &[(SealedFile, u64)]) -> Result<()> {
    let mut c = rcv.connect(agent).await?;
    for (f, _) in acked {
        agent
            .verify(&mut c, f)
            .await
            .with_context(|| format!("acked file {}", String::from_utf8_lossy(&f.path)))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_files_survive_kill9_at_random_moments() -> Result<()> {
    const KILLS: usize = 22;
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    // Small packs, so kills also land around pack rotation.
    rcv.set_config("listen = \"127.0.0.1:0\"\npack_max_bytes = 1048576\n")?;
    let agent = TestAgent::new()?;
    rcv.authorize("r", &agent.public_key())?;
    rcv.serve()?;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    println!("kill -9 loop seed: {seed}");
    let mut rng = Rng(seed);
    let mut all: Vec<(SealedFile, u64)> = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    for round in 0..KILLS {
        let mut files = Vec::new();
        for _ in 0..60 {
            n += 1;
            let len = match rng.below(10) {
                0 => 600_000 + rng.below(900_000) as usize,
                1 => 0,
                _ => 1 + rng.below(60_000) as usize,
            };
            // Some files repeat earlier content, so dedup paths are exercised too.
            let seed = if rng.below(8) == 0 { n / 2 } else { n };
            files.push(agent.seal_file(&format!("w/{round}/{n}"), &data(len, seed))?);
        }
        let acked: Acked = Arc::new(Mutex::new(Vec::new()));
        let (sender, reader) = stream(&rcv, &agent, files, acked.clone()).await?;
        let target = rng.below(30) as usize;
        wait_for("acks before the kill", T, || {
            (count(&acked) >= target || reader.is_finished()).then_some(())
        })?;
        rcv.kill9();
        let _ = sender.await;
        let _ = reader.await;
        let got = acked.lock().map(|a| a.clone()).unwrap_or_default();
        all.extend(got);
        rcv.serve()
            .with_context(|| format!("restart after kill {round}"))?;
        verify_all(&rcv, &agent, &all)
            .await
            .with_context(|| format!("after kill {round} (seed {seed})"))?;
    }
    assert!(
        all.len() > KILLS,
        "only {} files were acknowledged",
        all.len()
    );
    // Commits stay idempotent across crashes: an acked commit id maps to its version.
    let mut c = rcv.connect(&agent).await?;
    for i in 0..5 {
        let (f, v) = &all[rng.below(all.len() as u64) as usize];
        assert_eq!(c.commit(f).await?.0, *v, "re-commit {i}");
    }
    // Every acked version is listed (a commit made durable just before a kill, whose ack
    // never left, is listed too: the agent would re-commit it and get that version).
    let versions = c.all_versions().await?;
    let listed: std::collections::HashMap<u64, _> =
        versions.iter().map(|v| (v.version, v.file_id)).collect();
    for (f, v) in &all {
        assert_eq!(listed.get(v), Some(&f.file_id), "acked version {v} listed");
    }
    assert!(versions.windows(2).all(|w| w[0].version < w[1].version));
    drop(c);
    rcv.kill9();
    // The packs alone hold every acknowledged version: its commit record, with its number.
    let records = commit_records(&rcv.root, "r")?;
    for (f, v) in &all {
        assert_eq!(
            records.get(&(f.file_id, f.commit_id)),
            Some(v),
            "commit record of acked version {v}"
        );
    }
    let o = rcv.run("scrub", &[])?;
    assert!(
        o.status.success(),
        "scrub: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let log = rcv.log();
    println!(
        "{KILLS} kills, {} acknowledged files verified, {} recoveries re-indexed a tail, {} \
         cut a torn tail, {:?}",
        all.len(),
        log.matches("re-indexed").count(),
        log.matches("cutting a torn tail").count(),
        started.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_commits_and_exits_zero() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    let agent = TestAgent::new()?;
    rcv.authorize("r", &agent.public_key())?;
    rcv.serve()?;
    let files: Vec<SealedFile> = (0..400u64)
        .map(|i| agent.seal_file(&format!("w/{i}"), &data(20_000, i)))
        .collect::<Result<_>>()?;
    let acked: Acked = Arc::new(Mutex::new(Vec::new()));
    let (sender, reader) = stream(&rcv, &agent, files, acked.clone()).await?;
    wait_for("some acks", T, || (count(&acked) >= 20).then_some(()))?;
    let status = rcv.terminate(T)?;
    assert!(status.success(), "serve exited with {status}");
    let _ = sender.await;
    let last = reader.await??;
    // The session ends with ShuttingDown (or simply closes if everything was done).
    if let Some(m) = &last {
        assert_eq!(error_code(m), Some(ErrorCode::ShuttingDown), "{m:?}");
    }
    assert_eq!(rcv.status()?["serve_running"], false);
    let got = acked.lock().map(|a| a.clone()).unwrap_or_default();
    rcv.serve()?;
    verify_all(&rcv, &agent, &got).await?;
    let mut c = rcv.connect(&agent).await?;
    assert!(c.all_versions().await?.len() >= got.len());
    Ok(())
}
