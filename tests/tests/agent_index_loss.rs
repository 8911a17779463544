//! The packs are the repository: what real agents see when the receiver loses its index.
//! Two agents' histories survive the deletion of `index.sqlite` (same version numbers, the
//! same bytes at every point in time), and after a kill -9 of the receiver mid-backup and a
//! `repair`, every file an agent holds as acknowledged restores byte-exact.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use coffer_common::host::time::rfc3339;
use support::*;

const T: Duration = Duration::from_secs(90);

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Waits for the clock's next second, so the receiver's commit times (whole seconds) of
/// what comes before and after differ. Polls; times nothing.
fn next_second() -> Result<i64> {
    let now = now_secs();
    wait_for("the next second", Duration::from_secs(3), || {
        (now_secs() > now).then_some(())
    })?;
    Ok(now_secs())
}

fn out(agent: &Agent, args: &[&str], path: Option<&Path>) -> Result<String> {
    let mut c = agent.cmd();
    c.args([args[0], "--config"]).arg(&agent.config);
    c.args(&args[1..]);
    if let Some(p) = path {
        c.arg(p);
    }
    Ok(ok(&c.output()?))
}

fn delete_index(rcv: &Receiver, repo: &str) -> Result<()> {
    let dir = rcv.root.join("repos").join(repo);
    for name in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    if dir.join("index.sqlite").exists() {
        bail!("index of {repo} still there");
    }
    Ok(())
}

#[test]
fn two_agents_histories_survive_the_loss_of_the_index() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agents = Vec::new();
    for repo in ["laptop", "desktop"] {
        let mut a = Agent::init(&tmp.path().join(repo), &rcv, repo)?;
        std::fs::write(a.watch.join("gone"), data(40_000, 7))?;
        a.run()?;
        agents.push((repo, a));
    }
    // Three versions of `doc` and the deletion of `gone`, each at its own second; the time
    // just after each is a point to restore at.
    let mut points: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(), Vec::new()];
    for v in 0..3u64 {
        next_second()?;
        for (i, (_, a)) in agents.iter().enumerate() {
            let content = data(70_000 + v as usize * 1000, 100 * i as u64 + v);
            std::fs::write(a.watch.join("doc"), &content)?;
            if v == 2 {
                std::fs::remove_file(a.watch.join("gone"))?;
            }
            points[i].push((String::new(), content));
        }
        for (_, a) in &agents {
            a.wait_settled(1, T)?;
            if v == 2 {
                wait_for("the deletion acknowledged", T, || {
                    let s = a.status().ok()?;
                    let f = &s["files"];
                    (f["deleted"].as_i64() == Some(1) && f["pending"].as_i64() == Some(0))
                        .then_some(())
                })?;
            }
        }
        let at = rfc3339(next_second()?);
        for p in points.iter_mut() {
            if let Some(last) = p.last_mut() {
                last.0 = at.clone();
            }
        }
    }
    let mut before = Vec::new();
    for (_, a) in &agents {
        before.push((
            out(a, &["versions"], Some(&a.watch.join("doc")))?,
            out(a, &["ls"], None)?,
        ));
    }
    for (_, a) in agents.iter_mut() {
        a.proc.term();
    }
    rcv.proc.term();
    for (repo, _) in &agents {
        delete_index(&rcv, repo)?;
    }
    rcv.serve()?;
    for (i, (repo, a)) in agents.iter().enumerate() {
        let versions = out(a, &["versions"], Some(&a.watch.join("doc")))?;
        let ls = out(a, &["ls"], None)?;
        assert_eq!(
            versions, before[i].0,
            "{repo}: versions after the index was lost"
        );
        assert_eq!(ls, before[i].1, "{repo}: ls after the index was lost");
        assert_eq!(versions.lines().count(), 3, "{versions}");
        for (n, (at, content)) in points[i].iter().enumerate() {
            let to = tmp.path().join(format!("restore-{repo}-{n}"));
            let r = a.restore(&to, &["--at", at])?;
            if !r.status.success() {
                bail!(
                    "{repo}: restore --at {at}: {}",
                    String::from_utf8_lossy(&r.stderr)
                );
            }
            let got =
                std::fs::read(to.join("w/doc")).with_context(|| format!("{repo}: doc at {at}"))?;
            assert!(got == *content, "{repo}: doc at {at} differs");
            assert_eq!(
                to.join("w/gone").exists(),
                n < 2,
                "{repo}: `gone` at {at} (deleted at the last point)"
            );
        }
    }
    assert!(
        std::fs::read_to_string(rcv.root.with_extension("serve.log"))?
            .contains("rebuilding it from the packs"),
        "serve rebuilt the index"
    );
    Ok(())
}

#[test]
fn after_a_kill9_mid_backup_and_repair_every_acknowledged_file_restores() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "laptop")?;
    let n = 400;
    for i in 0..n {
        let len = if i % 50 == 0 { 900_000 } else { 3_000 + i * 7 };
        std::fs::write(agent.watch.join(format!("f{i:04}")), data(len, i as u64))?;
    }
    agent.run()?;
    wait_for("some files acknowledged", T, || {
        let s = agent.status().ok()?;
        (s["files"]["backed_up"].as_i64()? >= 40).then_some(())
    })?;
    rcv.proc.kill9();
    agent.proc.kill9();
    // What the agent holds as acknowledged, file by file.
    let paths: Vec<_> = (0..n)
        .map(|i| agent.watch.join(format!("f{i:04}")))
        .collect();
    let mut c = agent.cmd();
    c.args(["status", "--json", "--config"])
        .arg(&agent.config)
        .args(&paths);
    let o = c.output()?;
    let entries: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("status: {}", String::from_utf8_lossy(&o.stderr)))?;
    let acked: Vec<usize> = entries
        .as_array()
        .context("a list")?
        .iter()
        .enumerate()
        .filter(|(_, e)| e["state"] == "backed_up")
        .map(|(i, _)| i)
        .collect();
    assert!(acked.len() >= 40, "{} acknowledged", acked.len());
    delete_index(&rcv, "laptop")?;
    let r = Command::new(bin("coffer-receiver"))
        .args(["repair", "--root"])
        .arg(&rcv.root)
        .output()?;
    assert!(
        r.status.success(),
        "repair: {}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    rcv.serve()?;
    let to = tmp.path().join("restored");
    let r = agent.restore(&to, &[])?;
    if !r.status.success() {
        bail!("restore: {}", String::from_utf8_lossy(&r.stderr));
    }
    for i in acked {
        let name = format!("f{i:04}");
        let got = std::fs::read(to.join("w").join(&name))
            .with_context(|| format!("{name} was acknowledged but is not restored"))?;
        assert!(
            got == std::fs::read(agent.watch.join(&name))?,
            "{name} differs"
        );
    }
    Ok(())
}
