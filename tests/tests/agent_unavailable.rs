//! A deletion must be real before it is recorded: a watch whose folder is unmounted or
//! renamed away is unavailable (no deletion recorded, `status` says so) and is watched
//! again once back, without a restart; a scan that finds most of a watch's files gone
//! holds those deletions until `confirm-deletions`; a user deleting a file while the agent
//! runs is recorded as before.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use support::*;

const T: Duration = Duration::from_secs(90);

/// The paths `ls --json` lists now.
fn listed(agent: &Agent) -> Result<Vec<String>> {
    let out = agent
        .cmd()
        .args(["ls", "--json", "--config"])
        .arg(&agent.config)
        .output()?;
    let v: Value = serde_json::from_str(&ok(&out))?;
    Ok(v.as_array()
        .context("ls --json prints an array")?
        .iter()
        .filter(|e| e["kind"] != "dir")
        .filter_map(|e| e["path"].as_str().map(str::to_string))
        .collect())
}

fn status_text(agent: &Agent, extra: &[&str]) -> Result<String> {
    let out = agent
        .cmd()
        .arg("status")
        .args(extra)
        .arg("--config")
        .arg(&agent.config)
        .output()?;
    Ok(ok(&out))
}

/// Waits until `status --json` says watch `w` is unavailable for `reason`, as the running
/// daemon recorded it (`since` set); returns the status.
fn wait_unavailable(agent: &Agent, reason: &str) -> Result<Value> {
    wait_for(&format!("watch w unavailable ({reason})"), T, || {
        let s = agent.status().ok()?;
        let w = &s["watches"][0];
        (w["state"] == "unavailable"
            && w["unavailable"]["reason"] == reason
            && w["unavailable"]["since"].is_string())
        .then_some(s)
    })
    .with_context(|| {
        format!(
            "status {:?}\nlog:\n{}",
            agent.status().ok(),
            tail(&agent.log())
        )
    })
}

/// Waits until the agent's log says its startup scan passed over the unavailable watch.
fn wait_scan_skipped(agent: &Agent) -> Result<()> {
    wait_for("the startup scan to pass over the watch", T, || {
        agent
            .log()
            .contains("not scanned: the watch is unavailable")
            .then_some(())
    })
    .with_context(|| tail(&agent.log()))
}

/// Starts `run --metrics` on a free loopback port; returns its address.
fn run_with_metrics(agent: &mut Agent) -> Result<SocketAddr> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(agent.dir.join("agent.log"))?;
    let child = agent
        .cmd()
        .args(["run", "--metrics", &addr.to_string(), "--config"])
        .arg(&agent.config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    agent.proc = Proc(Some(child));
    Ok(addr)
}

/// The value of `series` (with its labels) at `/metrics`, once it is served.
fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(T)).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn write_files(dir: &Path, n: usize) -> Result<()> {
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i:02}.txt")), data(200 + i, i as u64))?;
    }
    Ok(())
}

#[test]
fn an_unmounted_watch_records_no_deletion_and_is_watched_again_once_remounted() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let Some(disk) = Tmpfs::mount(&agent.watch, "4m") else {
        return Ok(());
    };
    write_files(&agent.watch, 30)?;
    let saved = tmp.path().join("saved");
    std::fs::create_dir(&saved)?;
    write_files(&saved, 30)?;
    agent.run()?;
    agent.wait_settled(30, T)?;

    // Unmounted while the agent runs: unavailable without a restart, nothing deleted.
    disk.unmount()?;
    wait_unavailable(&agent, "empty_mount_point")?;
    let text = status_text(&agent, &[])?;
    assert!(
        text.contains("watch w: UNAVAILABLE since ")
            && text.contains("is an empty mount point): nothing under it is backed up and no deletions are recorded"),
        "{text}"
    );
    // Restarted meanwhile: the startup scan records no deletion either.
    let stopped = agent.proc.term().context("running")?;
    assert!(stopped.success(), "{}", tail(&agent.log()));
    agent.run()?;
    wait_scan_skipped(&agent)?;
    let s = wait_unavailable(&agent, "empty_mount_point")?;
    assert_eq!(s["files"]["deleted"], 0, "{s}");
    assert_eq!(s["files"]["backed_up"], 30, "{s}");
    assert_eq!(listed(&agent)?.len(), 30, "ls lists every file");
    let versions = agent
        .cmd()
        .args(["versions", "--json", "--config"])
        .arg(&agent.config)
        .arg("w/f00.txt")
        .output()?;
    let v: Value = serde_json::from_str(&ok(&versions))?;
    let kinds: Vec<&Value> = v[0]["versions"]
        .as_array()
        .context("versions")?
        .iter()
        .map(|x| &x["kind"])
        .collect();
    assert!(kinds.iter().all(|k| *k != "deleted"), "{v}");

    // Remounted with the same files (a disk holding them, mounted there at once: a tmpfs
    // filled aside and bind-mounted): watched again without a restart.
    let aside = tmp.path().join("aside");
    std::fs::create_dir(&aside)?;
    let filled = Tmpfs::mount(&aside, "4m").context("a second tmpfs")?;
    for i in 0..30 {
        let name = format!("f{i:02}.txt");
        std::fs::copy(saved.join(&name), aside.join(&name))?;
    }
    let o = Command::new("mount")
        .arg("--bind")
        .arg(&aside)
        .arg(&agent.watch)
        .output()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let disk = Tmpfs(agent.watch.clone());
    wait_for("watch w available again", T, || {
        let s = agent.status().ok()?;
        (s["watches"][0]["state"] == "available").then_some(())
    })?;
    std::fs::write(agent.watch.join("new.txt"), b"written after the remount")?;
    let s = agent.wait_settled(31, T)?;
    assert_eq!(s["files"]["deleted"], 0, "{s}");
    assert!(listed(&agent)?.contains(&"w/new.txt".to_string()));
    // Every file restores with its bytes (the copies' content equals the backup's, so no
    // new version was made of them).
    let restored = tmp.path().join("restored");
    ok(&agent.restore(&restored, &[])?);
    for i in 0..30 {
        let name = format!("f{i:02}.txt");
        assert_eq!(
            std::fs::read(restored.join("w").join(&name))?,
            std::fs::read(saved.join(&name))?
        );
    }
    assert_eq!(
        std::fs::read(restored.join("w/new.txt"))?,
        b"written after the remount"
    );
    assert_eq!(s["held_deletions"], 0, "{s}");
    drop(agent);
    drop(disk);
    drop(filled);
    Ok(())
}

#[test]
fn a_watch_renamed_away_records_no_deletion_and_is_rescanned_when_back() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    write_files(&agent.watch, 5)?;
    agent.run()?;
    agent.wait_settled(5, T)?;
    agent.proc.term().context("running")?;

    let moved = agent.dir.join("w.moved");
    std::fs::rename(&agent.watch, &moved)?;
    let metrics = run_with_metrics(&mut agent)?;
    wait_scan_skipped(&agent)?;
    let s = wait_unavailable(&agent, "missing")?;
    let gauge = r#"coffer_agent_watch_available{watch="w"}"#;
    wait_for("the watch's gauge at 0", T, || {
        (metric(metrics, gauge)? == 0.0).then_some(())
    })?;
    assert_eq!(s["files"]["deleted"], 0, "{s}");
    assert_eq!(listed(&agent)?.len(), 5);
    assert_eq!(s["watches"][0]["mode"], "unavailable", "{s}");
    let text = status_text(&agent, &[])?;
    assert!(
        text.contains("is missing): nothing under it is backed up"),
        "{text}"
    );
    assert!(!text.contains("(watching)"), "{text}");

    // Back under its name, with a new file: rescanned and watched, no restart.
    std::fs::rename(&moved, &agent.watch)?;
    wait_for("watch w available again", T, || {
        let s = agent.status().ok()?;
        (s["watches"][0]["state"] == "available").then_some(())
    })?;
    std::fs::write(agent.watch.join("later.txt"), b"after it came back")?;
    let s = agent.wait_settled(6, T)?;
    assert_eq!(metric(metrics, gauge), Some(1.0));
    assert_eq!(s["files"]["deleted"], 0, "{s}");
    assert_eq!(listed(&agent)?.len(), 6);
    Ok(())
}

#[test]
fn deleting_most_of_a_watch_while_stopped_is_held_until_confirmed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    write_files(&agent.watch, 10)?;
    agent.run()?;
    agent.wait_settled(10, T)?;
    agent.proc.term().context("running")?;

    for i in 0..8 {
        std::fs::remove_file(agent.watch.join(format!("f{i:02}.txt")))?;
    }
    agent.run()?;
    let s = wait_for("8 deletions held", T, || {
        let s = agent.status().ok()?;
        (s["watches"][0]["held_deletions"] == 8).then_some(s)
    })
    .with_context(|| tail(&agent.log()))?;
    assert_eq!(s["held_deletions"], 8, "{s}");
    assert_eq!(s["files"]["deleted"], 0, "{s}");
    assert_eq!(s["files"]["pending"], 0, "{s}");
    assert_eq!(listed(&agent)?.len(), 10, "nothing recorded as deleted");
    let text = status_text(&agent, &[])?;
    assert!(
        text.contains(
            "8 deletions held for watch w: more than 50% of its files; run \
             `coffer-agent confirm-deletions w` if they are real"
        ),
        "{text}"
    );
    let held: Value = serde_json::from_str(&status_text(&agent, &["--held", "--json"])?)?;
    let mut paths: Vec<&str> = held
        .as_array()
        .context("array")?
        .iter()
        .filter_map(|h| h["path"].as_str())
        .collect();
    paths.sort();
    let want: Vec<String> = (0..8).map(|i| format!("w/f{i:02}.txt")).collect();
    assert_eq!(paths, want, "{held}");
    assert!(
        held[0]["watch"] == "w" && held[0]["held_at"].is_string(),
        "{held}"
    );
    let lines = status_text(&agent, &["--held"])?;
    assert_eq!(lines.lines().count(), 8, "{lines}");
    assert!(lines.starts_with("w\tw/f00.txt\theld since "), "{lines}");

    // An unknown watch is an error naming it.
    let bad = agent
        .cmd()
        .args(["confirm-deletions", "--config"])
        .arg(&agent.config)
        .arg("nope")
        .output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no watch is named \"nope\""));

    let out = agent
        .cmd()
        .args(["confirm-deletions", "--config"])
        .arg(&agent.config)
        .arg("w")
        .output()?;
    assert!(ok(&out).contains("8 deletions confirmed for watch w"));
    let s = wait_for("8 deletions recorded", T, || {
        let s = agent.status().ok()?;
        (s["files"]["deleted"] == 8 && s["files"]["pending"] == 0).then_some(s)
    })
    .with_context(|| tail(&agent.log()))?;
    assert_eq!(s["held_deletions"], 0, "{s}");
    assert_eq!(listed(&agent)?.len(), 2);
    assert_eq!(status_text(&agent, &["--held", "--json"])?.trim(), "[]");
    Ok(())
}

#[test]
fn a_file_deleted_while_the_agent_runs_is_recorded() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    write_files(&agent.watch, 3)?;
    agent.run()?;
    agent.wait_settled(3, T)?;
    std::fs::remove_file(agent.watch.join("f01.txt"))?;
    let s = wait_for("the deletion recorded", T, || {
        let s = agent.status().ok()?;
        (s["files"]["deleted"] == 1 && s["files"]["pending"] == 0).then_some(s)
    })
    .with_context(|| tail(&agent.log()))?;
    assert_eq!(s["held_deletions"], 0, "{s}");
    assert_eq!(s["watches"][0]["state"], "available", "{s}");
    assert_eq!(listed(&agent)?.len(), 2);
    Ok(())
}
