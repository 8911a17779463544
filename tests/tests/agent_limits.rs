//! Over a real network (issue 24): a bandwidth limit the agent holds (and changes on
//! SIGHUP), pause and resume (nothing reaches the receiver's disk while paused; the pause
//! survives a restart and `--for` ends by itself), a link that goes quiet without closing
//! replaced within 30 s, and receivers reached by host name and over IPv6.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use support::*;

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// Sets (or replaces) a top-level key of the agent's config, above its `[[watch]]` tables.
fn set_key(agent: &Agent, key: &str, value: &str) -> Result<()> {
    let text = std::fs::read_to_string(&agent.config)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(&format!("{key} =")))
        .collect();
    let text = kept.join("\n");
    let at = text.find("[[watch]]").context("config has a [[watch]]")?;
    let new = format!("{}{key} = {value}\n{}", &text[..at], &text[at..]);
    std::fs::write(&agent.config, new)?;
    Ok(())
}

/// Writes `n` files of `size` incompressible bytes named `prefix-I.bin`.
fn write_files(dir: &Path, prefix: &str, n: usize, size: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..n {
        let seed = prefix.bytes().map(u64::from).sum::<u64>() * 1000 + i as u64;
        std::fs::write(dir.join(format!("{prefix}-{i}.bin")), data(size, seed))?;
    }
    Ok(())
}

fn packs(rcv: &Receiver, repo: &str) -> std::path::PathBuf {
    rcv.root.join("repos").join(repo).join("packs")
}

/// Pack bytes over time: `(seconds since start, bytes)` sampled every 20 ms until
/// `until` says stop (given the latest bytes), or `limit` passes.
fn sample_packs(
    rcv: &Receiver,
    repo: &str,
    limit: Duration,
    mut until: impl FnMut(u64) -> bool,
) -> Result<Vec<(f64, u64)>> {
    let t0 = Instant::now();
    let mut out = Vec::new();
    loop {
        let b = rcv.pack_bytes(repo);
        out.push((t0.elapsed().as_secs_f64(), b));
        if until(b) {
            return Ok(out);
        }
        if t0.elapsed() > limit {
            bail!("pack bytes stuck at {b} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The rate (bytes/s) between the first sample at or above `from` bytes and the first at
/// or above `to`, counting the bytes actually there at those two moments.
fn rate_between(samples: &[(f64, u64)], from: u64, to: u64) -> Result<(f64, u64, f64)> {
    let a = samples
        .iter()
        .find(|s| s.1 >= from)
        .context("never reached the start mark")?;
    let b = samples
        .iter()
        .find(|s| s.1 >= to)
        .context("never reached the end mark")?;
    let (dt, db) = (b.0 - a.0, b.1 - a.1);
    if dt <= 0.0 {
        bail!("no time between the marks");
    }
    Ok((db as f64 / dt, db, dt))
}

fn agent_cmd(agent: &Agent, args: &[&str]) -> Result<String> {
    let out = agent
        .cmd()
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .output()?;
    if !out.status.success() {
        bail!(
            "coffer-agent {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sighup(agent: &Agent) -> Result<()> {
    let pid = agent.proc.pid().context("agent runs")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    Ok(())
}

/// `upload_limit` holds on the wire (the receiver's packs grow no faster than the limit
/// plus 5%, measured over seconds), and a SIGHUP with a new limit applies it without a
/// restart.
#[test]
fn the_upload_limit_holds_and_sighup_changes_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "limits")?;
    set_key(&agent, "upload_limit", "\"1MiB/s\"")?;
    // 24 MiB that does not compress: about 6 s at 1 MiB/s, then 4-5 s at 4 MiB/s.
    write_files(&agent.watch, "big", 24, MIB as usize)?;
    agent.run()?;

    // Phase 1: 1 MiB/s. Measured over 5 MiB of pack growth, after the first MiB.
    let slow = 1.0 * MIB as f64;
    let samples =
        sample_packs(&rcv, "limits", T, |b| b >= 6 * MIB).with_context(|| tail(&agent.log()))?;
    let (r1, db, dt) = rate_between(&samples, MIB, 6 * MIB)?;
    eprintln!("at 1 MiB/s: {db} bytes in {dt:.2} s = {:.0} B/s", r1);
    assert!(
        r1 <= slow * 1.05,
        "the packs grew at {r1:.0} B/s under a limit of {slow} B/s"
    );
    assert!(
        r1 >= slow * 0.5,
        "the packs grew at only {r1:.0} B/s under a limit of {slow} B/s"
    );

    // Phase 2: SIGHUP with 4 MiB/s.
    set_key(&agent, "upload_limit", "\"4MiB/s\"")?;
    sighup(&agent)?;
    wait_for("the new limit applied", T, || {
        agent.log().contains("upload=4.0 MiB/s").then_some(())
    })
    .with_context(|| tail(&agent.log()))?;
    let start = rcv.pack_bytes("limits");
    let fast = 4.0 * MIB as f64;
    let samples = sample_packs(&rcv, "limits", T, |b| b >= start + 14 * MIB)
        .with_context(|| tail(&agent.log()))?;
    let (r2, db, dt) = rate_between(&samples, start + MIB, start + 14 * MIB)?;
    eprintln!("at 4 MiB/s: {db} bytes in {dt:.2} s = {:.0} B/s", r2);
    assert!(
        r2 <= fast * 1.05,
        "the packs grew at {r2:.0} B/s under a limit of {fast} B/s"
    );
    assert!(
        r2 >= r1 * 1.5,
        "raising the limit by SIGHUP did not speed the upload ({r1:.0} -> {r2:.0} B/s)"
    );
    agent.wait_settled(24, T)?;
    assert_eq!(
        agent.restore_all_and_compare(&tmp.path().join("restored"))?,
        24
    );
    Ok(())
}

/// `restore --limit-rate` caps the download of one restore; a bad rate (on the command
/// line or in the config) is an error naming it.
#[test]
fn restore_limit_rate_caps_the_download_and_bad_rates_are_named() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "dl")?;
    write_files(&agent.watch, "f", 6, MIB as usize)?;
    agent.run()?;
    agent.wait_settled(6, T)?;

    let to = tmp.path().join("restored");
    let t = Instant::now();
    let out = agent.restore(&to, &["--limit-rate", "2MiB/s"])?;
    let took = t.elapsed();
    ok(&out);
    assert_eq!(assert_same_tree(&agent.watch, &to.join("w"))?, 6);
    // 6 MiB (and more: framing) at 2 MiB/s, from an empty bucket: at least 2.75 s.
    assert!(
        took >= Duration::from_millis(2750),
        "6 MiB restored in {took:?} under --limit-rate 2MiB/s"
    );

    let out = agent.restore(&tmp.path().join("r2"), &["--limit-rate", "quick"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--limit-rate") && err.contains("\"quick\" is not a rate"),
        "{err}"
    );

    set_key(&agent, "download_limit", "\"lots\"")?;
    let out = agent
        .cmd()
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent.toml") && err.contains("key `download_limit`"),
        "{err}"
    );
    Ok(())
}

/// Waits until `status --json` says paused with at least `files` waiting; returns it.
fn wait_paused_with(agent: &Agent, files: i64) -> Result<Value> {
    wait_for(&format!("paused with {files} files waiting"), T, || {
        let s = agent.status().ok()?;
        (s["paused"]["waiting_files"].as_i64()? >= files).then_some(s)
    })
    .with_context(|| format!("status {:?}\n{}", agent.status().ok(), tail(&agent.log())))
}

/// Checks for `hold` that the packs stay exactly as `before` (an absence: it can only be
/// watched for a while).
fn packs_hold(rcv: &Receiver, repo: &str, before: &[(std::path::PathBuf, u64)], hold: Duration) {
    let end = Instant::now() + hold;
    while Instant::now() < end {
        let now = coffer_tests::snapshot_tree(&packs(rcv, repo));
        assert_eq!(now, before, "the receiver's packs changed while paused");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// While paused the agent journals changes and sends nothing: the receiver's packs stay
/// byte for byte as they were, across a restart of the agent, and `status` says paused,
/// until when and what waits. `resume` sends the backlog; `--for` ends by itself.
#[test]
fn pause_holds_every_byte_survives_a_restart_and_resume_sends_the_backlog() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "p")?;
    write_files(&agent.watch, "a", 3, 100_000)?;
    agent.run()?;
    agent.wait_settled(3, T)?;

    let out = agent_cmd(&agent, &["pause"])?;
    assert!(
        out.contains("paused until `coffer-agent resume`") && out.contains("stopped sending"),
        "{out}"
    );
    let before = coffer_tests::snapshot_tree(&packs(&rcv, "p"));
    assert!(!before.is_empty());
    write_files(&agent.watch, "b", 5, 300_000)?;
    std::fs::write(agent.watch.join("a-0.bin"), data(50_000, 99))?;
    let s = wait_paused_with(&agent, 6)?;
    assert_eq!(s["paused"]["until"], Value::Null, "{s}");
    assert_eq!(s["paused"]["reason"], "coffer-agent pause", "{s}");
    assert!(s["paused"]["since"].is_string(), "{s}");
    assert!(
        s["paused"]["waiting_bytes"].as_i64().unwrap_or(0) >= 1_500_000,
        "{s}"
    );
    packs_hold(&rcv, "p", &before, Duration::from_secs(3));
    let text = agent_cmd(&agent, &["status"])?;
    assert!(
        text.contains("paused until `coffer-agent resume`") && text.contains("files"),
        "{text}"
    );

    // A restart keeps the pause, and the changes made while stopped are journaled.
    agent.proc.term();
    write_files(&agent.watch, "c", 2, 10_000)?;
    agent.run()?;
    wait_paused_with(&agent, 8)?;
    wait_for("the restarted agent to say it is paused", T, || {
        (agent
            .log()
            .matches("paused until `coffer-agent resume`")
            .count()
            >= 2)
            .then_some(())
    })
    .with_context(|| tail(&agent.log()))?;
    packs_hold(&rcv, "p", &before, Duration::from_secs(3));

    let out = agent_cmd(&agent, &["resume"])?;
    assert!(out.contains("resumed"), "{out}");
    let s = agent.wait_settled(10, T)?;
    assert_eq!(s["paused"], Value::Null, "{s}");
    assert_eq!(
        agent.restore_all_and_compare(&tmp.path().join("restored"))?,
        10
    );
    let out = agent_cmd(&agent, &["resume"])?;
    assert!(out.contains("not paused"), "{out}");

    // `--for 2s`: paused now, ends by itself.
    let out = agent_cmd(&agent, &["pause", "--for", "2s"])?;
    assert!(out.contains("paused until 20"), "{out}");
    let s = agent.status()?;
    assert!(s["paused"]["until"].is_string(), "{s}");
    assert_eq!(s["paused"]["reason"], "coffer-agent pause --for 2s", "{s}");
    std::fs::write(agent.watch.join("late.txt"), b"after the pause")?;
    let s = agent.wait_settled(11, T)?;
    assert_eq!(s["paused"], Value::Null, "{s}");

    let out = agent
        .cmd()
        .args(["pause", "--for", "forever", "--config"])
        .arg(&agent.config)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--for \"forever\""), "{err}");
    Ok(())
}

/// A pause set while the agent is stopped holds from its first moment: it journals what
/// it finds and sends nothing until `resume`.
#[test]
fn a_pause_set_while_stopped_holds_from_the_start() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "s")?;
    let out = agent_cmd(&agent, &["pause", "--for", "1d"])?;
    assert!(out.contains("not running"), "{out}");
    write_files(&agent.watch, "x", 4, 20_000)?;
    agent.run()?;
    let s = wait_paused_with(&agent, 4)?;
    assert!(s["paused"]["until"].is_string(), "{s}");
    let empty = coffer_tests::snapshot_tree(&packs(&rcv, "s"));
    packs_hold(&rcv, "s", &empty, Duration::from_secs(3));
    assert_eq!(rcv.pack_bytes("s"), 0, "something reached the receiver");
    agent_cmd(&agent, &["resume"])?;
    agent.wait_settled(4, T)?;
    Ok(())
}

/// A link that goes quiet without closing (the proxy forwards nothing more, and closes
/// nothing) is replaced within 30 s, and what waits is then backed up.
#[test]
fn a_black_holed_connection_is_replaced_within_30_s() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let target = rcv.addr.parse()?;
    let proxy = coffer_tests::proxy::DelayProxy::start(
        target,
        coffer_tests::proxy::ProxyConfig::default(),
    )?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "bh")?;
    let text =
        std::fs::read_to_string(&agent.config)?.replace(&rcv.addr, &proxy.addr().to_string());
    std::fs::write(&agent.config, text)?;
    write_files(&agent.watch, "before", 3, 50_000)?;
    agent.run()?;
    agent.wait_settled(3, T)?;

    let holed = proxy.black_hole_open_connections();
    assert!(holed >= 1, "no connection to black-hole");
    let t = Instant::now();
    write_files(&agent.watch, "after", 5, 200_000)?;
    wait_for(
        "the quiet link to be noticed",
        Duration::from_secs(40),
        || agent.log().contains("went quiet").then_some(()),
    )
    .with_context(|| tail(&agent.log()))?;
    let noticed = t.elapsed();
    agent.wait_settled(8, Duration::from_secs(60))?;
    let done = t.elapsed();
    eprintln!("black hole noticed after {noticed:?}; backlog done after {done:?}");
    if std::env::var_os("LIMITS_LOG").is_some() {
        eprintln!("{}", agent.log());
    }
    assert!(
        noticed <= Duration::from_secs(30),
        "the quiet link was noticed after {noticed:?}"
    );
    assert_eq!(
        agent.restore_all_and_compare(&tmp.path().join("restored"))?,
        8
    );
    Ok(())
}

/// A receiver listening on `[::1]` is reached by an agent configured with `[::1]:PORT`.
#[test]
fn an_ipv6_receiver_address_works() -> Result<()> {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: ::1 is not configured on this host");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("rcv");
    let out = Command::new(bin("coffer-receiver"))
        .args(["init", "--root"])
        .arg(&root)
        .args(["--listen", "[::1]:0"])
        .output()?;
    let key = ok(&out).trim().to_string();
    let mut rcv = Receiver {
        root,
        key,
        addr: "[::1]:0".into(),
        proc: Proc(None),
    };
    rcv.serve()?;
    assert!(rcv.addr.starts_with("[::1]:"), "{}", rcv.addr);
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "v6")?;
    let cfg = std::fs::read_to_string(&agent.config)?;
    assert!(
        cfg.contains(&format!("receiver = \"{}\"", rcv.addr)),
        "{cfg}"
    );
    write_files(&agent.watch, "v", 3, 30_000)?;
    agent.run()?;
    agent.wait_settled(3, T)?;
    assert_eq!(
        agent.restore_all_and_compare(&tmp.path().join("restored"))?,
        3
    );
    Ok(())
}

/// A host name is resolved at every connect: `localhost:PORT` works (whichever of its
/// addresses answers), and again after the receiver restarts.
#[test]
fn a_receiver_named_by_host_name_is_reached() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let port = rcv.addr.rsplit(':').next().context("port")?.to_string();
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "n")?;
    let text =
        std::fs::read_to_string(&agent.config)?.replace(&rcv.addr, &format!("localhost:{port}"));
    std::fs::write(&agent.config, text)?;
    write_files(&agent.watch, "n", 2, 10_000)?;
    agent.run()?;
    agent.wait_settled(2, T)?;
    rcv.proc.term();
    rcv.serve()?;
    write_files(&agent.watch, "m", 2, 10_000)?;
    agent.wait_settled(4, T)?;
    Ok(())
}
