//! Over a long link: through the delay proxy (`coffer_tests::proxy`, +25 ms each way, no
//! bandwidth limit) a backup takes about what it takes direct (the agent waits no round
//! trip per file or per window of chunks), and a saved file is acknowledged within the
//! debounce, 200 ms and two round trips. Real binaries; the proxy on loopback.
//!
//! Wall times are compared only within one test, direct against delayed on the same
//! machine at the same moment, as the best of a few alternating runs (a run slowed by the
//! machine's load makes the best of its kind no better, so the comparison does not flake
//! under load), with the allowances explained where they are set.

mod support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use coffer_tests::proxy::{DelayProxy, ProxyConfig};
use serde_json::Value;
use support::*;

/// Added each way by the proxy: a round trip costs twice this.
const DELAY: Duration = Duration::from_millis(25);
const RTT: Duration = Duration::from_millis(50);
const T: Duration = Duration::from_secs(120);

/// The test agent's debounce (see `Agent::init`).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Small files (one chunk each, sent in batches) and medium ones (several chunks, asked
/// about with `HaveChunks` before their puts): a few hundred files, ~19 MiB.
const SMALL: usize = 300;
const MEDIUM: usize = 48;
const MEDIUM_SIZE: usize = 384 << 10;

fn fill(watch: &std::path::Path) -> Result<usize> {
    let small = watch.join("small");
    let medium = watch.join("medium");
    std::fs::create_dir_all(&small)?;
    std::fs::create_dir_all(&medium)?;
    for i in 0..SMALL {
        std::fs::write(
            small.join(format!("{i:03}.txt")),
            data(1024 + (i * 97) % 16384, i as u64),
        )?;
    }
    for i in 0..MEDIUM {
        std::fs::write(
            medium.join(format!("{i:02}.bin")),
            data(MEDIUM_SIZE, 10_000 + i as u64),
        )?;
    }
    Ok(SMALL + MEDIUM)
}

/// An agent of `rcv` whose connections go through `via` (the proxy's address) when given.
fn agent_via(dir: &std::path::Path, rcv: &Receiver, via: Option<&str>) -> Result<Agent> {
    let agent = Agent::init(dir, rcv, "r")?;
    if let Some(via) = via {
        let text = std::fs::read_to_string(&agent.config)?;
        ensure!(text.contains(&rcv.addr), "{text}");
        std::fs::write(&agent.config, text.replace(&rcv.addr, via))?;
    }
    Ok(agent)
}

/// One first backup of the test's files, from the agent's start to every file
/// acknowledged (as `status` shows it); the restore is compared with the files.
fn first_backup(tmp: &std::path::Path, delayed: bool) -> Result<(Duration, u64)> {
    let rcv = Receiver::start(&tmp.join("rcv"))?;
    let target: std::net::SocketAddr = rcv.addr.parse()?;
    let proxy = DelayProxy::start(target, ProxyConfig::delay(DELAY))?;
    let via = proxy.addr().to_string();
    let mut agent = agent_via(&tmp.join("agent"), &rcv, delayed.then_some(via.as_str()))?;
    let n = fill(&agent.watch)?;
    let t = Instant::now();
    agent.run()?;
    agent.wait_settled(n as i64, T)?;
    let took = t.elapsed();
    if delayed {
        ensure!(
            proxy.bytes_up() > (MEDIUM * MEDIUM_SIZE) as u64,
            "not through the proxy"
        );
    }
    let compared = agent.restore_all_and_compare(&tmp.join("restored"))?;
    ensure!(compared == n, "restored {compared} files of {n}");
    Ok((took, proxy.bytes_up()))
}

#[test]
fn a_backup_over_a_long_link_takes_about_what_it_takes_direct() -> Result<()> {
    // Alternating runs; the best of each kind is compared.
    let mut direct = Duration::MAX;
    let mut delayed = Duration::MAX;
    let mut runs = Vec::new();
    for i in 0..3 {
        let tmp = tempfile::tempdir()?;
        let (d, _) = first_backup(&tmp.path().join("direct"), false)?;
        let (l, up) = first_backup(&tmp.path().join("delayed"), true)?;
        runs.push(format!(
            "run {i}: direct {d:?}, delayed {l:?} ({up} bytes up)"
        ));
        direct = direct.min(d);
        delayed = delayed.min(l);
    }
    // The target is 1.3x. A first backup this small is a few hundred milliseconds, so the
    // round trips no pipelining can hide are allowed on top: the connect (TCP, the Noise
    // handshake, Hello: 3), the last files' presence answers and puts (2), the last
    // acknowledgement (1); plus 2 for the status polling and the scheduler's wake-ups.
    // Waiting a round trip per medium file, as the agent did before, costs ~24 round trips
    // here (48 files on two workers): 1.2 s, well past this bound.
    let bound = direct.mul_f64(1.3) + RTT * 8;
    ensure!(
        delayed <= bound,
        "over +{DELAY:?} each way the backup took {delayed:?}, direct {direct:?} (bound \
         {bound:?})\n{}",
        runs.join("\n")
    );
    Ok(())
}

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

#[test]
fn a_saved_file_is_acknowledged_within_the_debounce_200ms_and_two_round_trips() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let proxy = DelayProxy::start(rcv.addr.parse()?, ProxyConfig::delay(DELAY))?;
    let via = proxy.addr().to_string();
    let mut agent = agent_via(&tmp.path().join("agent"), &rcv, Some(&via))?;
    std::fs::create_dir_all(&agent.watch)?;
    std::fs::write(agent.watch.join("first"), b"first")?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    // Saves of a small file (one PutFiles) and of a 1 MiB one (HaveChunks, then the puts
    // and the commit): from the write to `status` showing it acknowledged.
    let bound = DEBOUNCE + Duration::from_millis(200) + RTT * 2;
    for (name, size) in [("doc.txt", 1024), ("photo.bin", 1 << 20)] {
        let mut took = Vec::new();
        for i in 0..5u64 {
            let path = format!("w/{name}");
            let before = path_status(&agent, &path).map(|v| v["version"].clone());
            let saved = Instant::now();
            std::fs::write(agent.watch.join(name), data(size, 7_000 + i))?;
            // Timed at the start of the first `status` that shows it acknowledged: that
            // call reads the journal after its own start-up, so the time is not inflated by
            // the polling (a `status` process takes tens of milliseconds on a loaded
            // machine) and errs by at most one call's duration.
            let acked = wait_for(&format!("{name} acknowledged"), T, || {
                let polled = Instant::now();
                let v = path_status(&agent, &path)?;
                (v["state"] == "backed_up"
                    && v["changed_since"] == false
                    && Some(&v["version"]) != before.as_ref())
                .then_some(polled)
            })
            .with_context(|| tail(&agent.log()))?;
            took.push(acked.saturating_duration_since(saved));
        }
        took.sort();
        // The best of five: a save slowed by the machine's load does not fail the test;
        // an agent that waits more round trips than promised fails every save.
        ensure!(
            took[0] <= bound,
            "{name}: acknowledged after {:?} at best over +{DELAY:?} each way (bound {bound:?}; \
             all: {took:?})",
            took[0]
        );
    }
    Ok(())
}
