//! Agents against a receiver with quotas, and a revoked agent: real binaries on loopback.
//! One agent over its repository's quota keeps its backlog (nothing failed), shows the
//! refusal in `status` and finishes once SIGHUP raises the quota, without a restart; the
//! other agent backs up all along. A revoked agent shows `Unauthorized` and keeps its files.

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use support::*;

const T: Duration = Duration::from_secs(90);
/// The agent retries a refused backlog every 30-60 s.
const RETRY: Duration = Duration::from_secs(150);

/// `receiver.toml` as `init` wrote it, with `extra` appended.
fn configure(rcv: &Receiver, extra: &str) -> Result<()> {
    let path = rcv.root.join("receiver.toml");
    let base = std::fs::read_to_string(&path)?;
    // The keys set here are dropped from the top level, the tables from the end.
    let base: Vec<&str> = base
        .split("\n[repos.")
        .next()
        .unwrap_or(&base)
        .lines()
        .filter(|l| {
            !["min_free", "warn_at", "quota"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    std::fs::write(&path, format!("{}\n{extra}", base.join("\n"))).context("writing receiver.toml")
}

fn sighup(rcv: &Receiver) -> Result<()> {
    let pid = rcv.proc.pid().context("serve is not running")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .context("sending SIGHUP")
}

fn text_status(agent: &Agent) -> Result<String> {
    let o = agent
        .cmd()
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()?;
    Ok(ok(&o))
}

#[test]
fn an_agent_over_quota_keeps_its_backlog_and_finishes_once_the_quota_is_raised() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let limits = |small: &str| {
        format!(
            "min_free = \"0\"\nwarn_at = \"50%\"\n[repos.small]\nquota = \"{small}\"\n\
             [repos.big]\nquota = \"10MiB\"\n"
        )
    };
    configure(&rcv, &limits("3MiB"))?;
    rcv.proc.term();
    rcv.serve()?;
    let mut small = Agent::init(&tmp.path().join("small"), &rcv, "small")?;
    let mut big = Agent::init(&tmp.path().join("big"), &rcv, "big")?;
    for i in 0..6u64 {
        std::fs::write(small.watch.join(format!("s{i}.bin")), data(1 << 20, i))?;
        std::fs::write(big.watch.join(format!("b{i}.bin")), data(1 << 20, 100 + i))?;
    }
    small.run()?;
    big.run()?;

    // The small repository fills; its agent shows why and keeps every file pending.
    let st = wait_for("the small agent to show the quota refusal", T, || {
        let s = small.status().ok()?;
        (s["receiver_refusal"]["code"] == "QuotaExceeded").then_some(s)
    })
    .with_context(|| format!("agent log:\n{}", tail(&small.log())))?;
    let message = st["receiver_refusal"]["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("repository small is over its quota: ")
            && message.contains("of 3 MiB used"),
        "{st}"
    );
    assert!(st["receiver_refusal"]["since"].is_string(), "{st}");
    assert_eq!(st["files"]["failed"], 0, "{st}");
    assert!(st["files"]["pending"].as_i64() > Some(0), "{st}");
    assert_eq!(st["receiver_quota"]["quota"], 3 << 20, "{st}");
    let text = text_status(&small)?;
    assert!(text.contains("receiver quota exceeded since "), "{text}");
    assert!(text.contains("receiver quota: "), "{text}");

    // The other agent is untouched.
    let st = big.wait_settled(6, T)?;
    assert!(st["receiver_refusal"].is_null(), "{st}");
    let rst = rcv.status()?;
    let repo = |name: &str| {
        rst["repositories"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == name))
            .cloned()
            .unwrap_or_default()
    };
    assert_ne!(repo("small")["quota_state"], "ok", "{rst}");
    assert_eq!(
        repo("big")["quota_state"],
        "warning",
        "6 of 10 MiB, warn at 50%: {rst}"
    );

    // The big agent, reconnecting, learns that its repository is past the warning.
    big.proc.term();
    big.run()?;
    std::fs::write(big.watch.join("after-restart"), b"x")?;
    let st = wait_for("the big agent to show the quota warning", T, || {
        let s = big.status().ok()?;
        (s["receiver_quota"]["state"] == "warning").then_some(s)
    })?;
    assert_eq!(st["receiver_quota"]["warn_at"], "50%", "{st}");
    let text = text_status(&big)?;
    assert!(text.contains("WARNING: past 50%"), "{text}");

    // The quota is raised in place: the backlog finishes with no agent restart.
    configure(&rcv, &limits("64MiB"))?;
    sighup(&rcv)?;
    let st = small.wait_settled(6, RETRY)?;
    assert_eq!(st["files"]["failed"], 0, "{st}");
    assert!(st["receiver_refusal"].is_null(), "{st}");
    let n = small.restore_all_and_compare(&tmp.path().join("restored"))?;
    assert_eq!(n, 6);
    Ok(())
}

#[test]
fn a_revoked_agent_shows_unauthorized_and_keeps_its_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "laptop")?;
    std::fs::write(agent.watch.join("first"), b"first")?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    let out = std::process::Command::new(bin("coffer-receiver"))
        .args(["revoke", "--root"])
        .arg(&rcv.root)
        .arg(&agent.key)
        .output()?;
    ok(&out);
    std::fs::write(agent.watch.join("second"), b"second")?;
    let st = wait_for("the agent to show Unauthorized", T, || {
        let s = agent.status().ok()?;
        (s["receiver_refusal"]["code"] == "Unauthorized").then_some(s)
    })
    .with_context(|| format!("agent log:\n{}", tail(&agent.log())))?;
    assert!(
        st["receiver_refusal"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&agent.key)),
        "{st}"
    );
    assert_eq!(st["files"]["failed"], 0, "{st}");
    assert_eq!(st["files"]["pending"], 1, "{st}");
    let text = text_status(&agent)?;
    assert!(
        text.contains("receiver refused this agent since ")
            && text.contains("retrying every few minutes"),
        "{text}"
    );
    Ok(())
}
