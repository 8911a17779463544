//! `coffer-receiver status [--json]` and `/metrics` per repository: files, versions, live
//! and unused bytes, and the last prune, on the real binaries. Live bytes are checked
//! against what the test itself uploaded; unused bytes appear when index rows go (here
//! removed by hand, as a prune would) and the packs still hold their records.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use coffer_common::chunk::ChunkId;
use coffer_tests::*;

const T: Duration = Duration::from_secs(30);
/// A record's header, chunk or commit.
const HEADER: u64 = 72;
/// A commit record's fixed body: commit id, version, time, flags, reserved, two lengths.
const COMMIT_FIXED: u64 = 44;

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// `/metrics`: every sample line as `series -> value`.
fn scrape(addr: SocketAddr) -> Result<BTreeMap<String, f64>> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(T))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no end of headers")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').context("bad sample line")?;
        out.insert(series.to_string(), value.parse()?);
    }
    Ok(out)
}

fn metric(m: &BTreeMap<String, f64>, name: &str) -> Result<f64> {
    let series = format!("coffer_receiver_repository_{name}{{repo=\"laptop\"}}");
    m.get(&series)
        .copied()
        .with_context(|| format!("{series} missing from /metrics: {m:#?}"))
}

/// The bytes a file's commit record takes: header, fixed body, manifest, its distinct
/// chunk ids.
fn commit_record_len(f: &SealedFile) -> u64 {
    let ids: HashSet<ChunkId> = f.ids().into_iter().collect();
    HEADER + COMMIT_FIXED + f.manifest.len() as u64 + 32 * ids.len() as u64
}

fn repo_json(status: &serde_json::Value) -> Result<&serde_json::Value> {
    status["repositories"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "laptop"))
        .with_context(|| format!("no repository laptop in {status}"))
}

fn num(r: &serde_json::Value, key: &str) -> Result<u64> {
    r[key]
        .as_u64()
        .with_context(|| format!("{key} is not a number in {r}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_live_and_unused_bytes_and_the_last_prune() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    let agent = TestAgent::new()?;
    rcv.authorize("laptop", &agent.public_key())?;
    let maddr = free_port()?;
    rcv.serve_with(&["--metrics", &maddr.to_string()])?;

    // Three files, the first in two versions; two files share a run of chunks.
    let shared = data(400 << 10, 7);
    let first_old = agent.seal_file("w/a", &data(200 << 10, 1))?;
    let first_new = agent.seal_file("w/a", &data(150 << 10, 2))?;
    let second = agent.seal_file("w/b", &[shared.clone(), data(50 << 10, 3)].concat())?;
    let third = agent.seal_file("w/c", &[shared, data(90 << 10, 4)].concat())?;
    let files = [&first_old, &second, &third, &first_new];
    let mut c = rcv.connect(&agent).await?;
    let mut stored: HashSet<ChunkId> = HashSet::new();
    let mut live = 0u64;
    for f in files {
        c.upload(f).await?;
        for (id, sealed) in &f.chunks {
            if stored.insert(*id) {
                live += HEADER + sealed.len() as u64;
            }
        }
        live += commit_record_len(f);
    }

    // Every acknowledged version is in the index: status sees all of it, nothing unused,
    // never pruned.
    let st = rcv.status()?;
    let r = repo_json(&st)?;
    assert_eq!(num(r, "files")?, 3, "{r}");
    assert_eq!(num(r, "versions")?, 4, "{r}");
    assert_eq!(num(r, "live_bytes")?, live, "{r}");
    assert_eq!(num(r, "unused_bytes")?, 0, "{r}");
    assert!(r["last_prune"].is_null(), "{r}");
    let m = scrape(maddr)?;
    assert_eq!(metric(&m, "files")?, 3.0);
    assert_eq!(metric(&m, "versions")?, 4.0);
    assert_eq!(metric(&m, "live_bytes")?, live as f64);
    assert_eq!(metric(&m, "unused_bytes")?, 0.0);
    assert_eq!(metric(&m, "last_prune_ok")?, -1.0);
    assert_eq!(metric(&m, "last_prune_timestamp_seconds")?, 0.0);
    drop(c);
    rcv.terminate(T)?;
    // Stopped, every byte of the pack files is a live record or a pack header.
    let st = rcv.status()?;
    let r = repo_json(&st)?;
    assert_eq!(num(r, "stored_bytes")?, live + 16 * num(r, "packs")?, "{r}");

    // What a prune does to the index: the first file's old version goes, with the chunks
    // only it referenced; its records stay in the packs until compaction.
    let db = rusqlite::Connection::open(rcv.root.join("repos/laptop/index.sqlite"))?;
    let old: u64 = db.query_row(
        "SELECT MIN(version) FROM versions WHERE file_id = ?1",
        [&first_old.file_id.0[..]],
        |r| r.get(0),
    )?;
    let mut freed = commit_record_len(&first_old);
    let others: HashSet<ChunkId> = [&second, &third, &first_new]
        .iter()
        .flat_map(|f| f.ids())
        .collect();
    let tx = db.unchecked_transaction()?;
    tx.execute("DELETE FROM version_chunks WHERE version = ?1", [old])?;
    tx.execute("DELETE FROM versions WHERE version = ?1", [old])?;
    let mut gone = HashSet::new();
    for (id, sealed) in &first_old.chunks {
        if !others.contains(id) && gone.insert(*id) {
            tx.execute("DELETE FROM chunks WHERE id = ?1", [&id.0[..]])?;
            freed += HEADER + sealed.len() as u64;
        }
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('last_prune', ?1)",
        [r#"{"at":"2026-12-03T18:00:00Z","ok":true,"error":null,"versions_removed":1,"bytes_freed":0,"packs_rewritten":0}"#],
    )?;
    tx.commit()?;
    drop(db);
    ensure!(!gone.is_empty(), "the old version had no chunk of its own");

    let st = rcv.status()?;
    let r = repo_json(&st)?;
    assert_eq!(num(r, "files")?, 3, "{r}");
    assert_eq!(num(r, "versions")?, 3, "{r}");
    assert_eq!(num(r, "live_bytes")?, live - freed, "{r}");
    assert_eq!(num(r, "unused_bytes")?, freed, "{r}");
    let p = &r["last_prune"];
    assert_eq!(p["at"], "2026-12-03T18:00:00Z", "{r}");
    assert_eq!(p["ok"], true, "{r}");
    assert_eq!(p["versions_removed"], 1, "{r}");
    // The human form says the same.
    let text = stdout_ok(&rcv.run("status", &[])?)?;
    assert!(
        text.contains("last prune:  2026-12-03T18:00:00Z, ok: 1 version removed"),
        "{text}"
    );
    assert!(text.contains("  live:        "), "{text}");

    // A failed prune, and /metrics of a serve that opened the repository.
    let db = rusqlite::Connection::open(rcv.root.join("repos/laptop/index.sqlite"))?;
    db.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'last_prune'",
        [r#"{"at":"2026-12-03T19:00:00Z","ok":false,"error":"No space left on device","versions_removed":0,"bytes_freed":0,"packs_rewritten":0}"#],
    )?;
    drop(db);
    let text = stdout_ok(&rcv.run("status", &[])?)?;
    assert!(
        text.contains("last prune:  2026-12-03T19:00:00Z, FAILED: No space left on device"),
        "{text}"
    );
    rcv.serve_with(&["--metrics", &maddr.to_string()])?;
    let mut c = rcv.connect(&agent).await?;
    assert_eq!(c.all_versions().await?.len(), 3);
    let m = scrape(maddr)?;
    assert_eq!(metric(&m, "versions")?, 3.0);
    assert_eq!(metric(&m, "live_bytes")?, (live - freed) as f64);
    assert_eq!(metric(&m, "unused_bytes")?, freed as f64);
    assert_eq!(metric(&m, "last_prune_ok")?, 0.0);
    // 2026-12-03T19:00:00Z
    assert_eq!(metric(&m, "last_prune_timestamp_seconds")?, 1_796_324_400.0);
    Ok(())
}
