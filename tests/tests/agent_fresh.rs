//! Fresh changes go first: a file saved while the agent works through a large first backup
//! is safe within the debounce and a second, whatever the backlog; `status` shows the
//! backlog by class and where a waiting file is in line. Real binaries on loopback.

mod support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use support::*;

/// The test agent's debounce (see `Agent::init`), and the promise: acknowledged within it
/// and a second.
const DEBOUNCE: Duration = Duration::from_millis(200);
const BOUND: Duration = Duration::from_millis(1200);
const T: Duration = Duration::from_secs(120);

/// The backlog: large files of random bytes (nothing to deduplicate or compress), 2 GiB,
/// enough that backing them up takes several times longer than the saves below on
/// loopback.
const BACKLOG_FILES: usize = 128;
const BACKLOG_FILE: usize = 16 << 20;

/// `status --json PATH` of one path.
fn path_status(agent: &Agent, path: &str) -> Option<Value> {
    let o = agent
        .cmd()
        .args(["status", "--json", "--config"])
        .arg(&agent.config)
        .arg(path)
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v.get(0).cloned()
}

/// Backed up, unchanged since, at a version other than `not`.
fn safe_at(agent: &Agent, path: &str, not: &Value) -> Option<Value> {
    let v = path_status(agent, path)?;
    (v["state"] == "backed_up" && v["changed_since"] == false && &v["version"] != not)
        .then(|| v["version"].clone())
}

/// Files of the backlog not yet backed up.
fn backlog_pending(agent: &Agent) -> Result<i64> {
    let s = agent.status()?;
    s["queue"]["backlog"]["files"]
        .as_i64()
        .with_context(|| format!("no queue.backlog.files in {s}"))
}

/// Saves `body` to `name` and waits until it is acknowledged; returns how long that took
/// and its version.
fn save_and_time(
    agent: &Agent,
    name: &str,
    body: &[u8],
    before: &Value,
) -> Result<(Duration, Value)> {
    let saved = Instant::now();
    std::fs::write(agent.watch.join(name), body)?;
    let version = wait_for(&format!("{name} backed up"), T, || {
        safe_at(agent, &format!("w/{name}"), before)
    })
    .with_context(|| tail(&agent.log()))?;
    Ok((saved.elapsed(), version))
}

#[test]
fn files_saved_during_a_large_first_backup_are_safe_within_a_second() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    // One worker besides the fresh lane's: every large file of the backlog occupies it. The
    // upload is capped at 128 MiB/s, so the 2 GiB backlog lasts at least 16 s however fast
    // the machine and the pipeline are (the saves below must happen while it runs); the
    // fresh lane shares that cap.
    let text = std::fs::read_to_string(&agent.config)?;
    ensure!(text.contains("upload_concurrency = "), "{text}");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("upload_concurrency = ") {
                "upload_concurrency = 1\nupload_limit = \"128MiB/s\""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&agent.config, text + "\n")?;
    let backlog = agent.watch.join("backlog");
    std::fs::create_dir_all(&backlog)?;
    for i in 0..BACKLOG_FILES {
        std::fs::write(
            backlog.join(format!("{i:02}")),
            data(BACKLOG_FILE, i as u64),
        )?;
    }
    let started = Instant::now();
    agent.run()?;
    // The first backup is under way: something is backed up, most is not.
    wait_for("the first backup to start", T, || {
        let s = agent.status().ok()?;
        (s["files"]["backed_up"].as_i64()? >= 1).then_some(())
    })
    .with_context(|| tail(&agent.log()))?;

    // status shows the backlog by class, and where a waiting file is in line.
    let s = agent.status()?;
    let q = &s["queue"];
    ensure!(q["backlog"]["files"].as_i64() > Some(0), "{s}");
    ensure!(q["backlog"]["bytes"].as_i64() > Some(0), "{s}");
    ensure!(q["fresh"]["files"].as_i64() == Some(0), "{s}");
    let last = format!("w/backlog/{:02}", BACKLOG_FILES - 1);
    let v = path_status(&agent, &last).context("status of the last backlog file")?;
    ensure!(v["state"] == "pending" && v["class"] == "backlog", "{v}");
    ensure!(v["place"].as_i64() > Some(1), "{v}");
    let text = agent
        .cmd()
        .args(["status", "--config"])
        .arg(&agent.config)
        .arg(&last)
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    ensure!(text.contains("in line, backlog"), "{text}");

    // A small document saved mid-way is safe within the debounce and a second, while most
    // of the backlog still waits.
    let (took, mut version) = save_and_time(&agent, "doc.txt", &data(1024, 1000), &Value::Null)?;
    let pending = backlog_pending(&agent)?;
    ensure!(
        took <= BOUND,
        "doc.txt took {took:?} to be acknowledged (bound {BOUND:?}, debounce {DEBOUNCE:?}); \
         backlog files pending: {pending}"
    );
    ensure!(
        pending as usize > BACKLOG_FILES / 2,
        "only {pending} of {BACKLOG_FILES} backlog files still pending: the backlog is too \
         small to show anything"
    );

    // Written again every second while the backlog lasts (at least three times, at most
    // eight): each version is safe within the bound.
    let mut times = vec![took];
    let mut during = 0;
    while during < 8 {
        let next = Instant::now() + Duration::from_secs(1);
        wait_for("the next save", T, || {
            (Instant::now() >= next).then_some(())
        })?;
        if backlog_pending(&agent)? == 0 {
            break;
        }
        let (took, v) = save_and_time(
            &agent,
            "doc.txt",
            &data(1024, 2000 + during as u64),
            &version,
        )?;
        times.push(took);
        version = v;
        during += 1;
    }
    let pending = backlog_pending(&agent)?;
    eprintln!("acknowledged after {times:?}; backlog files still pending: {pending}");
    ensure!(
        times.iter().all(|t| *t <= BOUND),
        "acknowledged after {times:?} (bound {BOUND:?}); backlog files pending: {pending}"
    );
    ensure!(
        during >= 3,
        "the backlog was done after {during} more saves ({:?}): too small to show anything",
        started.elapsed()
    );

    // The backlog still finishes, and the document's last version is the one backed up.
    agent.wait_settled(BACKLOG_FILES as i64 + 1, T)?;
    let v = path_status(&agent, "w/doc.txt").context("status of doc.txt")?;
    ensure!(
        v["version"] == version && v["changed_since"] == false,
        "{v}"
    );
    let s = agent.status()?;
    ensure!(
        s["queue"]["backlog"]["files"] == 0 && s["queue"]["fresh"]["files"] == 0,
        "{s}"
    );
    Ok(())
}
