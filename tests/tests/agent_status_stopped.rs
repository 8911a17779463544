//! `status` of an agent that is not running: what was last true and when, never
//! "connected" or "watching".

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use support::*;

const T: Duration = Duration::from_secs(90);

fn status_text(agent: &Agent, paths: &[&std::path::Path]) -> Result<String> {
    let out = agent
        .cmd()
        .args(["status", "--config"])
        .arg(&agent.config)
        .args(paths)
        .output()?;
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn status_of_a_stopped_agent_says_when_it_last_watched_and_was_connected() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let file = agent.watch.join("a.txt");
    std::fs::write(&file, b"first")?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    let live = status_text(&agent, &[])?;
    assert!(live.contains("(running)"), "{live}");
    assert!(live.contains(": connected"), "{live}");
    assert!(live.contains("(watching)"), "{live}");

    let stopped = agent.proc.term().expect("the agent was running");
    assert!(stopped.success(), "{stopped}: {}", tail(&agent.log()));
    let s = agent.status()?;
    assert_eq!(s["running"], false, "{s}");
    assert_eq!(s["agent_running"], false, "{s}");
    assert_eq!(s["files"]["backed_up"], 1, "{s}");
    assert_eq!(s["files"]["pending"], 0, "{s}");
    assert!(s["last_backup_at"].is_string(), "{s}");
    assert_eq!(s["receiver"]["state"], "agent not running", "{s}");
    let connected = s["receiver"]["last_connected_at"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_connected_at: {s}"));
    assert!(s["agent_last_seen_at"].is_string(), "{s}");
    let w = &s["watches"][0];
    assert_eq!(w["mode"], "stopped", "{s}");
    assert!(w["last_watched_at"].is_string(), "{s}");

    let text = status_text(&agent, &[])?;
    assert!(text.contains("(not running; last ran "), "{text}");
    assert!(
        text.contains(&format!(
            "receiver {}: last connected {connected} (agent not running)",
            rcv.addr
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("watching w = {}: last at ", agent.watch.display())),
        "{text}"
    );
    assert!(!text.contains(": connected"), "{text}");
    assert!(!text.contains("(watching)"), "{text}");

    // COFFER_CONFIG stands for --config (the demo's suggested commands rely on it).
    let by_env = agent
        .cmd()
        .env("COFFER_CONFIG", &agent.config)
        .args(["status", "--json"])
        .output()?;
    assert!(
        by_env.status.success(),
        "{}",
        String::from_utf8_lossy(&by_env.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&by_env.stdout)?;
    assert_eq!(v["receiver"]["last_connected_at"], connected, "{v}");

    // A change made while it is stopped is not "on its way".
    std::fs::write(&file, b"changed while stopped")?;
    let text = status_text(&agent, &[&file])?;
    assert!(text.contains("changed since"), "{text}");
    assert!(!text.contains("on its way"), "{text}");
    assert!(text.contains("once the agent runs"), "{text}");
    Ok(())
}

#[test]
fn pending_bytes_count_files_still_settling() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    // A debounce long enough that the file is still settling (dirty, not hashed) when
    // `status` looks.
    let cfg = std::fs::read_to_string(&agent.config)?;
    assert!(cfg.contains("debounce = \"200ms\""), "{cfg}");
    std::fs::write(
        &agent.config,
        cfg.replace("debounce = \"200ms\"", "debounce = \"1h\""),
    )?;
    agent.run()?;
    wait_for("agent running", T, || {
        agent.status().ok()?["agent_running"]
            .as_bool()?
            .then_some(())
    })?;
    std::fs::write(agent.watch.join("new.bin"), data(300_000, 1))?;
    // Counted at the size it was last seen with (its events may come before the last write).
    let s = wait_for("the new file's bytes pending", T, || {
        let s = agent.status().ok()?;
        (s["files"]["dirty"] == 1 && s["pending_bytes"] == 300_000).then_some(s)
    })
    .with_context(|| format!("last status: {:?}", agent.status().ok()))?;
    assert_eq!(s["files"]["pending"], 1, "{s}");
    // Still counted once the agent has stopped.
    assert!(agent.proc.term().is_some_and(|st| st.success()));
    let s = agent.status()?;
    assert_eq!(
        (&s["files"]["pending"], &s["pending_bytes"]),
        (&1.into(), &300_000.into()),
        "{s}"
    );
    Ok(())
}
