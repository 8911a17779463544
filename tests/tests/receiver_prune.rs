//! `coffer-receiver prune` with real agents and real binaries: what the policy keeps is what
//! the agent lists and restores afterwards, byte for byte; the receiver's disk shrinks by
//! what only the removed versions held; `repair` never brings a removed version back; a
//! kill -9 at any point and a full disk during compaction lose nothing.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use coffer_common::host::time::rfc3339;
use serde_json::Value;
use support::*;

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Waits for the clock's next second (polls), so commit times before and after differ.
fn next_second() -> Result<i64> {
    let now = now_secs();
    wait_for("the next second", Duration::from_secs(3), || {
        (now_secs() > now).then_some(())
    })?;
    Ok(now_secs())
}

/// Sets the pack cap and the `[retention]` table of the receiver's configuration (read
/// by `prune` each time it runs; `serve` does not prune: `prune_interval = "0"`).
fn configure(rcv: &Receiver, retention: &str) -> Result<()> {
    let path = rcv.root.join("receiver.toml");
    let text = std::fs::read_to_string(&path)?;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("[retention]") {
            break;
        }
        if line.starts_with("pack_max_bytes") {
            out.push_str(&format!("pack_max_bytes = {MIB}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("[retention]\nprune_interval = \"0\"\nkeep_within = \"0\"\nkeep_hourly = 0\n");
    out.push_str("keep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nkeep_yearly = 0\n");
    out.push_str(retention);
    std::fs::write(path, out)?;
    Ok(())
}

fn receiver(rcv: &Receiver, args: &[&str]) -> Result<Output> {
    Ok(Command::new(bin("coffer-receiver"))
        .arg(args[0])
        .arg("--root")
        .arg(&rcv.root)
        .args(&args[1..])
        .output()?)
}

/// Runs `prune --json` (serve stopped) and returns its one repository's report.
fn prune(rcv: &Receiver, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["prune", "--json"];
    args.extend_from_slice(extra);
    let o = receiver(rcv, &args)?;
    if !o.status.success() {
        bail!(
            "prune failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("prune --json: {}", String::from_utf8_lossy(&o.stdout)))?;
    Ok(v["repositories"][0].clone())
}

fn scrub_clean(rcv: &Receiver) -> Result<()> {
    let o = receiver(rcv, &["scrub"])?;
    if !o.status.success() {
        bail!(
            "scrub: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// The version numbers and commit times `coffer-agent versions --json` lists for `path`.
fn versions(agent: &Agent, path: &str) -> Result<Vec<(u64, i64)>> {
    let o = agent
        .cmd()
        .args(["versions", "--json", "--config"])
        .arg(&agent.config)
        .arg(path)
        .output()?;
    if !o.status.success() {
        bail!("versions: {}", String::from_utf8_lossy(&o.stderr));
    }
    let v: Value = serde_json::from_slice(&o.stdout)?;
    let doc = if v.is_array() { v[0].clone() } else { v };
    Ok(doc["versions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| Some((e["version"].as_u64()?, e["backed_up_at_unix"].as_i64()?)))
                .collect()
        })
        .unwrap_or_default())
}

fn ls_at(agent: &Agent, at: &str) -> Result<String> {
    Ok(ok(&agent
        .cmd()
        .args(["ls", "--config"])
        .arg(&agent.config)
        .args(["--at", at])
        .output()?))
}

/// Bytes of the pack files of repository `repo` (what `du` of `packs/` counts).
fn pack_bytes(rcv: &Receiver, repo: &str) -> u64 {
    rcv.pack_bytes(repo)
}

/// One history: `files` files, each written `versions` times with random content of
/// `len` bytes, one second apart; returns each version's content and a time just after it
/// was acknowledged (before the next).
struct History {
    files: usize,
    contents: Vec<Vec<Vec<u8>>>,
    after: Vec<i64>,
}

fn name(f: usize) -> String {
    format!("w/f{f}")
}

fn build_history(agent: &Agent, files: usize, versions: usize, len: usize) -> Result<History> {
    let mut contents = vec![Vec::new(); files];
    let mut after = Vec::new();
    for v in 0..versions {
        next_second()?;
        for (f, c) in contents.iter_mut().enumerate() {
            let bytes = data(len, (v * 1000 + f) as u64 + 17);
            std::fs::write(agent.watch.join(format!("f{f}")), &bytes)?;
            c.push(bytes);
        }
        for f in 0..files {
            wait_for(&format!("version {} of f{f}", v + 1), T, || {
                (versions_count(agent, &name(f)) == Some(v + 1)).then_some(())
            })
            .with_context(|| tail(&agent.log()))?;
        }
        after.push(next_second()?);
    }
    Ok(History {
        files,
        contents,
        after,
    })
}

fn versions_count(agent: &Agent, path: &str) -> Option<usize> {
    versions(agent, path).ok().map(|v| v.len())
}

/// Restores at `at` and checks each file: `want(f)` is its expected content, or `None`
/// when it must be absent.
fn restore_at(
    agent: &Agent,
    to: &Path,
    at: i64,
    want: impl Fn(usize) -> Option<Vec<u8>>,
    files: usize,
) -> Result<()> {
    let o = agent.restore(to, &["--at", &at.to_string()])?;
    if !o.status.success() {
        bail!("restore --at {at}: {}", String::from_utf8_lossy(&o.stderr));
    }
    for f in 0..files {
        let p = to.join(format!("w/f{f}"));
        match want(f) {
            Some(w) => {
                let got = std::fs::read(&p).with_context(|| format!("f{f} at {at}"))?;
                assert!(got == w, "f{f} at {at}: restored bytes differ");
            }
            None => assert!(!p.exists(), "f{f} at {at} should not be there"),
        }
    }
    Ok(())
}

#[test]
fn keep_last_keeps_exactly_n_versions_that_restore_and_the_disk_shrinks() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    configure(&rcv, "keep_last = 4\nmax_unused = \"100%\"\n")?;
    rcv.proc.term();
    rcv.serve()?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    agent.run()?;
    let len = 300_000;
    let h = build_history(&agent, 3, 6, len)?;
    agent.proc.term();
    rcv.proc.term();
    let before = pack_bytes(&rcv, "r");

    // A dry run prints the plan and changes nothing.
    let plan = prune(&rcv, &["--dry-run"])?;
    // Four versions of each file stay (and the watch folder's own, which `versions` of a
    // file does not list).
    assert_eq!(plan["versions_removed"], 6, "{plan}");
    assert!(plan["versions_kept"].as_u64() >= Some(12), "{plan}");
    assert_eq!(plan["dry_run"], true);
    assert_eq!(pack_bytes(&rcv, "r"), before);
    let text = ok(&receiver(&rcv, &["prune", "--dry-run"])?);
    assert!(text.contains("6 to remove"), "{text}");

    // keep_last = 4, no compaction (nothing passes 100%): the removal records stay beside
    // the removed versions' commit records, and a repair does not bring them back.
    let r = prune(&rcv, &[])?;
    assert_eq!(r["versions_removed"], 6, "{r}");
    assert!(r["files"].as_u64() >= Some(3), "{r}");
    scrub_clean(&rcv)?;
    let o = receiver(&rcv, &["repair"])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // Some removed versions' commit records are still in the packs (a pack of nothing
    // live was deleted with the others'): the removal records keep those out.
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    let n: u64 = said
        .split(" removed by prune")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("repair's line: {said}"))?;
    assert!((1..=6).contains(&n), "{said}");
    rcv.serve()?;
    for f in 0..h.files {
        assert_eq!(versions(&agent, &name(f))?.len(), 4, "f{f} after repair");
    }
    rcv.proc.term();

    // keep_last = 2, compaction at 10%.
    configure(&rcv, "keep_last = 2\nmax_unused = \"10%\"\n")?;
    let mid = pack_bytes(&rcv, "r");
    let r = prune(&rcv, &[])?;
    assert_eq!(r["versions_removed"], 6, "{r}");
    let after = pack_bytes(&rcv, "r");
    let removed = 12 * len as u64;
    let freed = before - after;
    assert!(
        freed + MIB >= removed && freed <= removed + MIB,
        "the disk shrank by {freed} bytes; the removed versions held {removed}: {r}"
    );
    assert_eq!(r["bytes_freed"].as_u64(), Some(mid - after), "{r}");
    scrub_clean(&rcv)?;
    let o = receiver(&rcv, &["status", "--json"])?;
    assert!(o.status.success());

    rcv.serve()?;
    for f in 0..h.files {
        let v = versions(&agent, &name(f))?;
        assert_eq!(v.len(), 2, "f{f}: {v:?}");
    }
    // The kept versions (the last two) restore byte-exact at their times; a time between
    // the two gives the older; before them the file was (as far as history goes) not there.
    let n = h.after.len();
    for (k, at) in [(n - 1, h.after[n - 1]), (n - 2, h.after[n - 2])] {
        let to = tmp.path().join(format!("restore-{k}"));
        restore_at(&agent, &to, at, |f| Some(h.contents[f][k].clone()), h.files)?;
    }
    let to = tmp.path().join("restore-removed");
    restore_at(&agent, &to, h.after[n - 3], |_| None, h.files)?;
    let ls = ls_at(&agent, &rfc3339(h.after[n - 3]))?;
    assert!(!ls.contains("f0"), "ls at a removed version's time: {ls}");
    let ls = ls_at(&agent, &rfc3339(h.after[n - 2]))?;
    assert!(ls.contains("f0") && ls.contains("f2"), "{ls}");
    let o = agent
        .cmd()
        .args(["verify", "--all", "--read-data", "--config"])
        .arg(&agent.config)
        .output()?;
    assert!(
        o.status.success(),
        "verify --all --read-data: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    agent.restore_all_and_compare(&tmp.path().join("latest"))?;

    // A repair after compaction keeps them removed too.
    rcv.proc.term();
    let o = receiver(&rcv, &["repair"])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    rcv.serve()?;
    for f in 0..h.files {
        assert_eq!(versions(&agent, &name(f))?.len(), 2, "f{f} after repair");
    }
    Ok(())
}

#[test]
fn a_deleted_files_versions_go_after_keep_deleted_for_and_others_stay() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    configure(&rcv, "keep_last = 0\nkeep_deleted_for = \"5s\"\n")?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    agent.run()?;
    let h = build_history(&agent, 2, 2, 50_000)?;
    std::fs::remove_file(agent.watch.join("f1"))?;
    wait_for("the deletion acknowledged", T, || {
        (versions_count(&agent, &name(1)) == Some(3)).then_some(())
    })?;
    let deleted_at = versions(&agent, &name(1))?
        .last()
        .map(|v| v.1)
        .context("a deletion")?;
    agent.proc.term();
    // Until the deletion is 5 s old, the deleted file's versions stay (whatever the
    // policy's other rules keep: its last version before the deletion at least).
    wait_for("5 s past the deletion", Duration::from_secs(30), || {
        (now_secs() >= deleted_at + 6).then_some(())
    })?;
    rcv.proc.term();
    let r = prune(&rcv, &[])?;
    // f1: its two versions and the deletion; f0: its older version (and the watch
    // folder's older versions).
    assert!(r["versions_removed"].as_u64() >= Some(4), "{r}");
    scrub_clean(&rcv)?;
    rcv.serve()?;
    assert_eq!(versions(&agent, &name(1))?.len(), 0);
    let v0 = versions(&agent, &name(0))?;
    assert_eq!(v0.len(), 1, "{v0:?}");
    let to = tmp.path().join("restore");
    restore_at(
        &agent,
        &to,
        now_secs(),
        |f| (f == 0).then(|| h.contents[0][1].clone()),
        2,
    )?;
    Ok(())
}

/// A small deterministic generator (the seed is printed, to replay a failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn kill9_of_prune_at_random_points_loses_nothing_the_policy_keeps() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    configure(&rcv, "keep_last = 12\nmax_unused = \"1%\"\n")?;
    rcv.proc.term();
    rcv.serve()?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    agent.run()?;
    let h = build_history(&agent, 12, 8, 90_000)?;
    agent.proc.term();
    rcv.proc.term();
    let seed = now_secs() as u64 | 1;
    eprintln!("kill -9 seed {seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut kills = 0;
    let mut keep = 8;
    // Each round prunes to one version fewer (so each has work to do: removal records,
    // chunk rows, compaction), killed after a random delay.
    while kills < 22 && started.elapsed() < Duration::from_secs(240) {
        keep = if keep <= 2 { 8 } else { keep - 1 };
        configure(&rcv, &format!("keep_last = {keep}\nmax_unused = \"1%\"\n"))?;
        let mut child = Command::new(bin("coffer-receiver"))
            .args(["prune", "--root"])
            .arg(&rcv.root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let delay = Duration::from_millis(rng.next() % 400);
        let t = Instant::now();
        let finished = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if t.elapsed() >= delay {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if finished.is_none() {
            child.kill()?;
            child.wait()?;
            kills += 1;
        }
        // The repository opens (a dry run opens it as serve does) and scrubs clean.
        let o = receiver(&rcv, &["prune", "--dry-run"])?;
        assert!(
            o.status.success(),
            "after a kill at {delay:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        scrub_clean(&rcv).with_context(|| format!("after a kill at {delay:?}"))?;
    }
    assert!(
        kills >= 20,
        "only {kills} prunes were killed before they ended"
    );
    // A last prune at keep_last = 2 completes; every kept version restores byte-exact.
    configure(&rcv, "keep_last = 2\nmax_unused = \"1%\"\n")?;
    prune(&rcv, &[])?;
    scrub_clean(&rcv)?;
    rcv.serve()?;
    let n = h.after.len();
    for f in 0..h.files {
        let v = versions(&agent, &name(f))?;
        assert_eq!(v.len(), 2, "f{f}: {v:?}");
    }
    for k in [n - 2, n - 1] {
        let to = tmp.path().join(format!("restore-{k}"));
        restore_at(
            &agent,
            &to,
            h.after[k],
            |f| Some(h.contents[f][k].clone()),
            h.files,
        )?;
    }
    Ok(())
}

#[test]
fn a_full_disk_during_compaction_is_named_loses_nothing_and_the_next_prune_succeeds() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let Some(disk) = Tmpfs::mount(&tmp.path().join("disk"), "24m") else {
        return Ok(());
    };
    let mut rcv = Receiver::start(&disk.0.join("rcv"))?;
    configure(&rcv, "keep_last = 1\nmax_unused = \"1%\"\n")?;
    let toml = rcv.root.join("receiver.toml");
    let text = std::fs::read_to_string(&toml)?.replace("# min_free", "min_free = \"0\"\n#");
    std::fs::write(&toml, text)?;
    rcv.proc.term();
    rcv.serve()?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    agent.run()?;
    // Each round adds a file (kept) and changes f0 (only its last version is kept), so
    // every pack keeps something live: compaction must copy before it can delete.
    let len = 400_000;
    let mut last = Vec::new();
    for i in 0..3 {
        next_second()?;
        std::fs::write(agent.watch.join(format!("k{i}")), data(len, 100 + i))?;
        last = data(len, 200 + i);
        std::fs::write(agent.watch.join("f0"), &last)?;
        wait_for("the round acknowledged", T, || {
            (versions_count(&agent, &name(0)) == Some(i as usize + 1)
                && versions_count(&agent, &format!("w/k{i}")) == Some(1))
            .then_some(())
        })?;
    }
    agent.proc.term();
    rcv.proc.term();
    // Fill the disk, leaving too little room for compaction's copies.
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler)?;
        let block = vec![7u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let free_now = || -> u64 {
        nix::sys::statvfs::statvfs(&disk.0)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0)
    };
    // Give back a little: enough for the index and the removal record, not the copies.
    let full = std::fs::metadata(&filler)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)?
        .set_len(full.saturating_sub(150 << 10))?;
    eprintln!("free before prune: {}", free_now());
    let o = receiver(&rcv, &["prune"])?;
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "prune on a full disk succeeded: {err}");
    assert!(
        err.to_lowercase().contains("no space left on device")
            || err.contains("database or disk is full"),
        "{err}"
    );
    assert!(
        err.contains(&rcv.root.display().to_string()),
        "names where: {err}"
    );
    // Nothing lost: scrub is clean, the newest versions restore.
    std::fs::remove_file(&filler)?;
    scrub_clean(&rcv)?;
    let r = prune(&rcv, &[])?;
    assert!(r["packs_rewritten"].as_u64().unwrap_or(0) > 0, "{r}");
    scrub_clean(&rcv)?;
    rcv.serve()?;
    assert_eq!(versions(&agent, &name(0))?.len(), 1);
    let to = tmp.path().join("restore");
    let o = agent.restore(&to, &[])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(to.join("w/f0"))? == last, "f0 restored");
    for i in 0..3 {
        assert!(std::fs::read(to.join(format!("w/k{i}")))? == data(len, 100 + i));
    }
    rcv.proc.term();
    drop(rcv);
    Ok(())
}
