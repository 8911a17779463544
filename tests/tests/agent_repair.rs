//! What an agent sees of a repository whose index is damaged: `status` shows the
//! receiver's refusal with the command to run, and after `repair` it carries on by itself.

mod support;

use std::time::Duration;

use anyhow::Result;
use support::*;

const T: Duration = Duration::from_secs(90);

#[test]
fn status_shows_a_refusal_for_repair_and_the_agent_resumes_after_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "laptop")?;
    std::fs::write(agent.watch.join("a"), data(50_000, 1))?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    rcv.proc.term();
    // The index's header destroyed: SQLite cannot open it.
    let index = rcv.root.join("repos/laptop/index.sqlite");
    let mut bytes = std::fs::read(&index)?;
    bytes[..100].copy_from_slice(&data(100, 9));
    std::fs::write(&index, &bytes)?;
    rcv.serve()?;
    std::fs::write(agent.watch.join("b"), data(30_000, 2))?;
    let hint = format!(
        "coffer-receiver repair --root {} --repo laptop",
        rcv.root.display()
    );
    let st = wait_for("the refusal in status", T, || {
        let s = agent.status().ok()?;
        let state = s["receiver"]["state"].as_str()?.to_string();
        state.contains(&hint).then_some(state)
    })?;
    assert!(st.contains("needs repair"), "{st}");
    // Human status says it too.
    let o = agent
        .cmd()
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()?;
    assert!(String::from_utf8_lossy(&o.stdout).contains(&hint));
    rcv.proc.term();
    let o = std::process::Command::new(bin("coffer-receiver"))
        .args(["repair", "--root"])
        .arg(&rcv.root)
        .output()?;
    // Versions come back only from commit records: until the receiver writes them, the
    // repair says versions were lost (exit 1) and the agent sends its files again.
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() || out.contains("VERSIONS NOT RECOVERED"),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    rcv.serve()?;
    agent.wait_settled(2, T)?;
    let dest = tmp.path().join("out");
    let r = agent.restore(&dest, &[])?;
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(dest.join("w/b"))?, data(30_000, 2));
    if o.status.success() {
        // With commit records, the version acknowledged before the damage is back.
        assert_eq!(std::fs::read(dest.join("w/a"))?, data(50_000, 1));
    }
    Ok(())
}
