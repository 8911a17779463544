//! The packs are the repository: `repair` rebuilds `index.sqlite` from them, `serve`
//! rebuilds a missing index and refuses (only) a repository whose index is damaged, and
//! `scrub` checks the index against the packs.
//!
//! Until every receiver writes commit records, [`record_versions`] writes them for the
//! versions a stopped receiver left without one (as the upgrade does), so that these tests
//! see repositories whose packs hold every version. Once the receiver writes them itself,
//! it finds nothing to write.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use coffer_common::chunk::{ChunkId, FileId};
use coffer_common::wire::{CommitId, VersionEntry};
use coffer_receiver::records::{CommitRecord, Deletion};
use coffer_receiver::store::{pack_header, PackStore};
use coffer_tests::*;

const T: Duration = Duration::from_secs(30);

/// Writes a commit record, in a new pack, for each version of `repo` whose index row has
/// none, and notes its location in the index (what the upgrade does). The receiver must
/// be stopped. Returns how many it wrote.
fn record_versions(rcv: &Receiver, repo: &str) -> Result<usize> {
    let dir = rcv.root.join("repos").join(repo);
    let db = rusqlite::Connection::open(dir.join("index.sqlite"))?;
    let mut recs = Vec::new();
    {
        let mut s = db.prepare(
            "SELECT version, file_id, commit_id, commit_time, manifest FROM versions \
             WHERE record_pack IS NULL ORDER BY version",
        )?;
        let mut refs = db.prepare("SELECT chunk FROM version_chunks WHERE version = ?1")?;
        let mut rows = s.query([])?;
        while let Some(r) = rows.next()? {
            let version: u64 = r.get(0)?;
            let chunks = refs
                .query_map([version], |c| c.get::<_, ChunkId>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            recs.push(CommitRecord {
                commit_id: r.get::<_, CommitId>(2)?,
                file_id: r.get::<_, FileId>(1)?,
                version,
                commit_time: r.get(3)?,
                deletion: Deletion::Unknown,
                manifest: r.get(4)?,
                chunks,
            });
        }
    }
    if recs.is_empty() {
        return Ok(0);
    }
    let packs = coffer_receiver::store::LocalPacks::new(
        coffer_receiver::Layout::new(&rcv.root)
            .repo(&repo.parse()?)
            .packs(),
    );
    let p = coffer_receiver::store::PackNo(packs.list()?.last().map_or(1, |p| p.0 + 1));
    packs.create(p)?;
    let mut bytes = pack_header().to_vec();
    let mut at = Vec::new();
    for r in &recs {
        at.push(bytes.len() as u64);
        r.encode_into(&mut bytes);
    }
    packs.write_at(p, 0, &bytes)?;
    packs.sync(p)?;
    let tx = db.unchecked_transaction()?;
    for (r, o) in recs.iter().zip(&at) {
        tx.execute(
            "UPDATE versions SET record_pack = ?1, record_offset = ?2 WHERE version = ?3",
            rusqlite::params![p.0, o, r.version],
        )?;
    }
    tx.execute(
        "INSERT INTO packs (pack, length) VALUES (?1, ?2)",
        rusqlite::params![p.0, bytes.len() as u64],
    )?;
    tx.commit()?;
    Ok(recs.len())
}

/// True when some version of `repo` has no commit record yet.
fn record_versions_pending(rcv: &Receiver, repo: &str) -> Result<bool> {
    let db = rusqlite::Connection::open(rcv.root.join("repos").join(repo).join("index.sqlite"))?;
    let n: i64 = db.query_row(
        "SELECT COUNT(*) FROM versions WHERE record_pack IS NULL",
        [],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// Removes `index.sqlite` and SQLite's files beside it.
fn delete_index(rcv: &Receiver, repo: &str) -> Result<()> {
    let dir = rcv.root.join("repos").join(repo);
    for n in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        match std::fs::remove_file(dir.join(n)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Two versions of each of `n` files, then a third of the first; returns the files.
async fn back_up(
    rcv: &Receiver,
    agent: &TestAgent,
    n: usize,
    seed: u64,
) -> Result<Vec<SealedFile>> {
    let mut c = rcv.connect(agent).await?;
    let mut files = Vec::new();
    for round in 0..2u64 {
        for i in 0..n {
            let len = [0, 1000, 70_000, 300_000][i % 4];
            let f =
                agent.seal_file(&format!("w/{i}"), &data(len, seed + 100 * round + i as u64))?;
            c.upload(&f).await?;
            files.push(f);
        }
    }
    let f = agent.seal_file("w/0", &data(5000, seed + 999))?;
    c.upload(&f).await?;
    files.push(f);
    Ok(files)
}

/// Every version listed, and every file's bytes read back.
async fn check_all(
    rcv: &Receiver,
    agent: &TestAgent,
    files: &[SealedFile],
    want: &[VersionEntry],
) -> Result<()> {
    let mut c = rcv.connect(agent).await?;
    let got = c.all_versions().await?;
    if got != want {
        bail!(
            "versions differ: got {:?}, want {:?}",
            got.iter()
                .map(|v| (v.version, v.commit_time))
                .collect::<Vec<_>>(),
            want.iter()
                .map(|v| (v.version, v.commit_time))
                .collect::<Vec<_>>()
        );
    }
    for f in files {
        agent.verify(&mut c, f).await?;
    }
    Ok(())
}

fn text(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A receiver serving repositories `a` and `b`, each backed up by its own agent.
struct Setup {
    _tmp: tempfile::TempDir,
    rcv: Receiver,
    a: TestAgent,
    b: TestAgent,
    files_a: Vec<SealedFile>,
    files_b: Vec<SealedFile>,
}

async fn setup(files: usize) -> Result<Setup> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    let (a, b) = (TestAgent::new()?, TestAgent::new()?);
    rcv.authorize("a", &a.public_key())?;
    rcv.authorize("b", &b.public_key())?;
    rcv.serve()?;
    let files_a = back_up(&rcv, &a, files, 1).await?;
    let files_b = back_up(&rcv, &b, 3, 2).await?;
    Ok(Setup {
        _tmp: tmp,
        rcv,
        a,
        b,
        files_a,
        files_b,
    })
}

async fn versions(rcv: &Receiver, agent: &TestAgent) -> Result<Vec<VersionEntry>> {
    rcv.connect(agent).await?.all_versions().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_rebuilds_the_index_from_the_packs_with_the_same_versions() -> Result<()> {
    let mut s = setup(6).await?;
    let want = versions(&s.rcv, &s.a).await?;
    assert_eq!(want.len(), 13);
    s.rcv.terminate(T)?;
    record_versions(&s.rcv, "a")?;
    delete_index(&s.rcv, "a")?;
    let o = s.rcv.run("repair", &["--repo", "a"])?;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("1 repositories") && out.contains("13 versions"),
        "{out}"
    );
    assert!(
        out.contains("0 damaged records, 0 versions with lost chunks"),
        "{out}"
    );
    assert!(!s.rcv.root.join("repos/a/index.sqlite.repair").exists());
    // `b`'s index lists versions its packs may not hold yet: repair leaves it alone.
    if record_versions_pending(&s.rcv, "b")? {
        let before = std::fs::read(s.rcv.root.join("repos/b/index.sqlite"))?;
        let o = s.rcv.run("repair", &[])?;
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("repository b: NOT repaired")
                && out.contains("no commit record in the packs yet"),
            "{out}"
        );
        assert!(out.contains("1 repositories NOT repaired"), "{out}");
        assert_eq!(
            std::fs::read(s.rcv.root.join("repos/b/index.sqlite"))?,
            before
        );
    }
    let o = s.rcv.run("scrub", &["--repo", "a", "--json"])?;
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(j["problems"], 0, "{j}");
    assert_eq!(j["repositories"][0]["versions"], 13, "{j}");
    assert_eq!(j["repositories"][0]["upgrade_pending"], 0, "{j}");
    s.rcv.serve()?;
    check_all(&s.rcv, &s.a, &s.files_a, &want).await?;
    // New versions continue above the rebuilt ones.
    let mut c = s.rcv.connect(&s.a).await?;
    let v = c.upload(&s.a.seal_file("w/new", &data(100, 5))?).await?;
    assert_eq!(v, want.last().map_or(0, |w| w.version) + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_rebuilds_a_missing_index_or_refuses_when_the_packs_cannot() -> Result<()> {
    let mut s = setup(4).await?;
    let (want_a, want_b) = (versions(&s.rcv, &s.a).await?, versions(&s.rcv, &s.b).await?);
    s.rcv.terminate(T)?;
    record_versions(&s.rcv, "a")?;
    // `b` is left as the receiver wrote it: without commit records unless it writes them.
    let b_has_records = {
        let packs = std::fs::read_dir(s.rcv.root.join("repos/b/packs"))?;
        let mut found = false;
        for p in packs {
            found |= std::fs::read(p?.path())?.windows(4).any(|w| w == b"CCMT");
        }
        found
    };
    delete_index(&s.rcv, "a")?;
    delete_index(&s.rcv, "b")?;
    s.rcv.serve()?;
    check_all(&s.rcv, &s.a, &s.files_a, &want_a).await?;
    assert!(
        s.rcv.log().contains("rebuilding it from the packs"),
        "{}",
        s.rcv.log()
    );
    if b_has_records {
        check_all(&s.rcv, &s.b, &s.files_b, &want_b).await?;
    } else {
        // Versions cannot come back from packs without commit records: refused, not
        // opened empty.
        let e = s
            .rcv
            .connect(&s.b)
            .await
            .err()
            .context("b must be refused")?;
        let e = format!("{e:#}");
        assert!(
            e.contains("Storage") && e.contains("no commit records"),
            "{e}"
        );
        assert!(
            e.contains("coffer-receiver repair --root") && e.contains("--repo b"),
            "{e}"
        );
        assert!(!s.rcv.root.join("repos/b/index.sqlite").exists());
        // `repair` does it, loudly, and exits 1: versions were lost.
        s.rcv.terminate(T)?;
        let o = s.rcv.run("repair", &["--repo", "b"])?;
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("VERSIONS NOT RECOVERED"),
            "{}",
            text(&o)
        );
        s.rcv.serve()?;
        let mut c = s.rcv.connect(&s.b).await?;
        assert!(c.all_versions().await?.is_empty());
        for f in &s.files_b {
            s.b.verify(&mut c, f).await?;
        }
    }
    Ok(())
}

/// Overwrites `len` bytes at `offset` of `path` with junk.
fn damage(path: &std::path::Path, offset: u64, len: usize) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(&data(len, offset ^ 0x5a5a), offset)?;
    f.sync_all()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_index_refuses_only_its_repository_until_repair() -> Result<()> {
    let mut s = setup(40).await?;
    let want = versions(&s.rcv, &s.a).await?;
    let index = s.rcv.root.join("repos/a/index.sqlite");
    s.rcv.terminate(T)?;
    record_versions(&s.rcv, "a")?;
    // Pages that hold the tables' roots (SQLite checks those on use), and the header:
    // read from the index as it is in each round (a repair lays out a new one).
    let roots = |index: &std::path::Path| -> Result<Vec<(String, u64)>> {
        let db = rusqlite::Connection::open(index)?;
        let mut st = db.prepare(
            "SELECT name, rootpage FROM sqlite_master \
             WHERE name IN ('chunks', 'versions', 'version_chunks') ORDER BY name",
        )?;
        let r = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(r)
    };
    let page = 4096u64;
    let places = (0..4).map(|round| {
        move |roots: &[(String, u64)]| match round {
            0 => (0u64, 100usize, "the file header".to_string()),
            // A whole page, half a page, or just its page header.
            i => {
                let (name, root) = &roots[i - 1];
                let len = [page as usize, page as usize / 2, 16][i - 1];
                (
                    (root - 1) * page,
                    len,
                    format!("the root page of {name} ({len} bytes)"),
                )
            }
        }
    });
    let mut extra = Vec::new();
    for (round, place) in places.enumerate() {
        let r = roots(&index)?;
        assert_eq!(r.len(), 3, "{r:?}");
        let (offset, len, what) = place(&r);
        damage(&index, offset, len)?;
        s.rcv.serve()?;
        for _ in 0..2 {
            let e = s
                .rcv
                .connect(&s.a)
                .await
                .err()
                .with_context(|| format!("a must be refused with {what} damaged"))?;
            let e = format!("{e:#}");
            assert!(
                e.contains("Storage") && e.contains("needs repair"),
                "{what}: {e}"
            );
            let root = s.rcv.root.display().to_string();
            assert!(
                e.contains(&format!("coffer-receiver repair --root {root} --repo a")),
                "{what}: {e}"
            );
        }
        // The other repository keeps taking backups.
        let mut c = s.rcv.connect(&s.b).await?;
        let f =
            s.b.seal_file(&format!("w/more{round}"), &data(20_000, 70 + round as u64))?;
        c.upload(&f).await?;
        s.b.verify(&mut c, &f).await?;
        extra.push(f);
        drop(c);
        s.rcv.terminate(T)?;
        let log = s.rcv.log();
        assert_eq!(
            log.matches("refusing sessions").count(),
            round + 1,
            "logged once per serve: {log}"
        );
        // Refused while serve runs; done once it is stopped.
        let o = s.rcv.run("repair", &["--repo", "a"])?;
        assert!(o.status.success(), "{what}: {}", text(&o));
        s.rcv.serve()?;
        check_all(&s.rcv, &s.a, &s.files_a, &want)
            .await
            .with_context(|| format!("after repairing {what}"))?;
        let mut c = s.rcv.connect(&s.b).await?;
        for f in s.files_b.iter().chain(&extra) {
            s.b.verify(&mut c, f).await?;
        }
        drop(c);
        s.rcv.terminate(T)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_is_refused_while_serve_runs() -> Result<()> {
    let s = setup(1).await?;
    let o = s.rcv.run("repair", &[])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("serve is running") && err.contains("serve.lock"),
        "{err}"
    );
    assert!(!s.rcv.root.join("repos/a/index.sqlite.repair").exists());
    let o = s.rcv.run("repair", &["--repo", "nope"])?;
    assert!(!o.status.success());
    Ok(())
}

/// xorshift64*: reproducible randomness from a printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_killed_at_random_points_finishes_next_time_and_loses_nothing() -> Result<()> {
    const KILLS: usize = 12;
    let mut s = setup(120).await?;
    let want = versions(&s.rcv, &s.a).await?;
    s.rcv.terminate(T)?;
    record_versions(&s.rcv, "a")?;
    let started = Instant::now();
    let o = s.rcv.run("repair", &["--repo", "a"])?;
    assert!(o.status.success(), "{}", text(&o));
    let took = started.elapsed().as_micros() as u64;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    println!("repair took {took} us; kill seed {seed}");
    let mut rng = Rng(seed);
    let mut cut_short = 0;
    for i in 0..KILLS {
        if i % 3 == 0 {
            delete_index(&s.rcv, "a")?;
        }
        let mut child = s
            .rcv
            .cmd()
            .args(["repair", "--root"])
            .arg(&s.rcv.root)
            .args(["--repo", "a"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_micros(rng.below(took + took / 4)));
        let _ = child.kill();
        let st = child.wait()?;
        if !st.success() {
            cut_short += 1;
        }
    }
    println!("{cut_short} of {KILLS} repairs were killed before they finished");
    let o = s.rcv.run("repair", &["--repo", "a"])?;
    assert!(o.status.success(), "seed {seed}: {}", text(&o));
    s.rcv.serve()?;
    check_all(&s.rcv, &s.a, &s.files_a, &want)
        .await
        .with_context(|| format!("seed {seed}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_commit_record_is_named_by_scrub_and_repair() -> Result<()> {
    let mut s = setup(4).await?;
    let want = versions(&s.rcv, &s.a).await?;
    s.rcv.terminate(T)?;
    record_versions(&s.rcv, "a")?;
    record_versions(&s.rcv, "b")?;
    // The newest version's record (the last record of its pack), as the index says
    // where it is.
    let victim = want.last().context("versions")?.version;
    let (pack, offset): (u32, u64) =
        rusqlite::Connection::open(s.rcv.root.join("repos/a/index.sqlite"))?.query_row(
            "SELECT record_pack, record_offset FROM versions WHERE version = ?1",
            [victim],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
    let pack_path = s.rcv.root.join(format!("repos/a/packs/{pack:08}.pack"));
    // A byte of its sealed manifest (header 72, fixed part 40).
    let at = offset + 72 + 40 + 5;
    let mut b = [0u8; 1];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pack_path)?;
        f.read_exact_at(&mut b, at)?;
        f.write_all_at(&[b[0] ^ 0x10], at)?;
    }
    let o = s.rcv.run("scrub", &[])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("version {victim} pack {}", pack_path.display())),
        "{out}"
    );
    let o = s.rcv.run("scrub", &["--json", "--repo", "a"])?;
    let j: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let problems = j["repositories"][0]["problems"]
        .as_array()
        .context("problems")?
        .clone();
    assert_eq!(problems.len(), 1, "{j}");
    assert_eq!(problems[0]["kind"], "damaged_commit", "{j}");
    assert_eq!(problems[0]["version"], victim, "{j}");
    assert_eq!(problems[0]["offset"], offset, "{j}");
    let o = s.rcv.run("repair", &[])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(
            "damaged_commit: repository a version {victim} pack"
        )),
        "{out}"
    );
    assert!(out.contains("1 damaged records"), "{out}");
    s.rcv.serve()?;
    let rest: Vec<VersionEntry> = want
        .iter()
        .filter(|v| v.version != victim)
        .cloned()
        .collect();
    // Every other version lists and restores; the victim's file has its other versions.
    check_all(&s.rcv, &s.a, &s.files_a, &rest).await?;
    // Its number is not given to another commit.
    let mut c = s.rcv.connect(&s.a).await?;
    let v = c.upload(&s.a.seal_file("w/new", &data(10, 77))?).await?;
    assert_eq!(v, victim + 1);
    let mut c = s.rcv.connect(&s.b).await?;
    for f in &s.files_b {
        s.b.verify(&mut c, f).await?;
    }
    Ok(())
}

/// A repository of `COFFER_SYNTH_CHUNKS` (default 300,000) small chunk records and a
/// commit record per three of them, written straight into packs of 64 MiB, then rebuilt
/// by `repair`: the counts must come back. Large, so run on demand (the benchmark of
/// `repair` at scale keeps the root when `COFFER_SYNTH_ROOT` is set).
#[test]
#[ignore = "writes a large synthetic repository; run on demand"]
fn repair_rebuilds_a_synthetic_repository_of_many_chunks() -> Result<()> {
    use coffer_receiver::store::{PackNo, RecordHeader};
    let n: u64 = std::env::var("COFFER_SYNTH_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let tmp = tempfile::tempdir()?;
    let root = match std::env::var_os("COFFER_SYNTH_ROOT") {
        Some(r) => std::path::PathBuf::from(r),
        None => tmp.path().join("root"),
    };
    let rcv = Receiver::init(&root)?;
    let dir = coffer_receiver::Layout::new(&root).repo(&"synth".parse()?);
    dir.create()?;
    let packs = coffer_receiver::store::LocalPacks::new(dir.packs());
    let (mut pack, mut buf) = (PackNo(1), pack_header().to_vec());
    let mut pending = Vec::new();
    let mut version = 0u64;
    let flush = |pack: PackNo, buf: &[u8]| -> Result<()> {
        packs.create(pack)?;
        packs.write_at(pack, 0, buf)?;
        packs.sync(pack)?;
        Ok(())
    };
    for i in 0..n {
        let sealed = data(200, i);
        let id = ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes());
        buf.extend_from_slice(
            &RecordHeader {
                id,
                len: sealed.len() as u32,
                hash: *blake3::hash(&sealed).as_bytes(),
            }
            .encode(),
        );
        buf.extend_from_slice(&sealed);
        pending.push(id);
        if pending.len() == 3 {
            version += 1;
            CommitRecord {
                commit_id: CommitId(
                    *blake3::hash(&version.to_be_bytes())
                        .as_bytes()
                        .first_chunk()
                        .context("16")?,
                ),
                file_id: FileId(*blake3::hash(&(version % 1000).to_le_bytes()).as_bytes()),
                version,
                commit_time: 1_700_000_000 + version as i64,
                deletion: Deletion::No,
                manifest: data(120, version),
                chunks: std::mem::take(&mut pending),
            }
            .encode_into(&mut buf);
        }
        if buf.len() > 64 << 20 {
            flush(pack, &buf)?;
            pack = PackNo(pack.0 + 1);
            buf = pack_header().to_vec();
        }
    }
    flush(pack, &buf)?;
    let started = Instant::now();
    let o = rcv.run("repair", &[])?;
    println!("repair of {n} chunks took {:?}", started.elapsed());
    let out = stdout_ok(&o)?;
    assert!(
        out.contains(&format!("{n} chunks, {version} versions;")),
        "{out}"
    );
    Ok(())
}
