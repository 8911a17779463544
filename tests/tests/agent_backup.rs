//! The agent end to end: real `coffer-receiver` and `coffer-agent` binaries on loopback.

mod support;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result};
use support::*;

const T: Duration = Duration::from_secs(90);

#[test]
fn backup_then_restore_is_byte_exact_for_every_kind_of_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "laptop")?;
    let w = &agent.watch.clone();
    std::fs::write(w.join("empty"), b"")?;
    std::fs::write(w.join("tiny"), b"x")?;
    std::fs::write(w.join("one-mib.bin"), data(1 << 20, 1))?;
    std::fs::write(w.join("hundred-mib.bin"), data(100 << 20, 2))?;
    std::fs::create_dir_all(w.join("a/b/c/d"))?;
    std::fs::write(w.join("a/b/c/d/deep.txt"), b"deep".repeat(1000))?;
    std::fs::write(w.join("a/ünïcødé ✓.txt"), "unicode")?;
    let raw = std::ffi::OsStr::from_bytes(b"bad-\xff\xfe-name\nwith newline");
    std::fs::write(w.join("a").join(raw), b"non-utf8")?;
    let long = "n".repeat(255);
    std::fs::write(w.join(&long), b"long name")?;
    std::fs::write(w.join("script.sh"), b"#!/bin/sh\n")?;
    std::fs::set_permissions(w.join("script.sh"), std::fs::Permissions::from_mode(0o750))?;
    std::os::unix::fs::symlink("a/b", w.join("link-to-dir"))?;
    std::os::unix::fs::symlink("/etc/passwd", w.join("abs-link"))?;
    agent.run()?;
    let st = agent.wait_settled(11, T)?;
    assert_eq!(st["files"]["failed"], 0);
    assert!(st["last_backup_at"].is_string(), "{st}");

    let out = tmp.path().join("restored");
    let r = agent.restore(&out, &[])?;
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let n = assert_same_tree(w, &out.join("w"))?;
    assert_eq!(n, 11);

    // The receiver holds sealed data only: no plaintext of a distinctive file in its tree.
    let marker = b"deepdeepdeepdeep";
    for e in walk(&rcv.root) {
        let bytes = std::fs::read(&e)?;
        assert!(
            !bytes.windows(marker.len()).any(|x| x == marker),
            "plaintext found in {}",
            e.display()
        );
    }
    Ok(())
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut st = vec![p.to_path_buf()];
    while let Some(d) = st.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().expect("type");
            if t.is_dir() {
                st.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn changes_while_running_are_backed_up_and_status_says_so() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::write(agent.watch.join("first.txt"), b"one")?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    std::fs::write(agent.watch.join("second.txt"), b"two")?;
    std::fs::create_dir_all(agent.watch.join("new/dir"))?;
    std::fs::write(agent.watch.join("new/dir/third.txt"), b"three")?;
    std::fs::write(agent.watch.join("first.txt"), b"one, edited")?;
    agent.wait_settled(3, T)?;
    // A deletion is recorded and the file leaves the latest restore.
    std::fs::remove_file(agent.watch.join("second.txt"))?;
    wait_for("deletion backed up", T, || {
        let s = agent.status().ok()?;
        (s["files"]["deleted"] == 1 && s["files"]["pending"] == 0).then_some(())
    })?;
    let out = agent
        .cmd()
        .args(["status", "--json", "--config"])
        .arg(&agent.config)
        .arg(agent.watch.join("first.txt"))
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v[0]["state"], "backed_up", "{v}");
    assert_eq!(v[0]["changed_since"], false, "{v}");
    let human = agent
        .cmd()
        .args(["status", "--config"])
        .arg(&agent.config)
        .arg("w/first.txt")
        .output()?;
    assert!(String::from_utf8_lossy(&human.stdout).contains("backed up: version"));
    let dest = tmp.path().join("out");
    let r = agent.restore(&dest, &[])?;
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(dest.join("w/first.txt"))?, b"one, edited");
    assert_eq!(std::fs::read(dest.join("w/new/dir/third.txt"))?, b"three");
    assert!(!dest.join("w/second.txt").exists());
    Ok(())
}

/// The agent asks which chunks the receiver lacks on a second session when it can (so the
/// question does not wait behind other files' commits). A receiver that allows a single
/// session refuses that second one: the agent asks on its one connection instead, and
/// every file, new or changed, still ends backed up and restores byte-exact.
#[test]
fn a_receiver_allowing_one_session_still_gets_every_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    rcv.proc.term();
    let cfg = rcv.root.join("receiver.toml");
    let text = std::fs::read_to_string(&cfg)?;
    anyhow::ensure!(text.contains("max_sessions = 64"), "{text}");
    std::fs::write(&cfg, text.replace("max_sessions = 64", "max_sessions = 1"))?;
    rcv.serve()?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    // Files above the small-file size go through the presence question.
    for i in 0..4 {
        std::fs::write(
            agent.watch.join(format!("m{i}")),
            data((1 << 20) + i, i as u64),
        )?;
    }
    agent.run()?;
    agent.wait_settled(4, T)?;
    let paths = |a: &Agent| -> Option<serde_json::Value> {
        let o = a
            .cmd()
            .args(["status", "--json", "--config"])
            .arg(&a.config)
            .args(["w/m1", "w/m4"])
            .output()
            .ok()?;
        serde_json::from_slice(&o.stdout).ok()
    };
    let first = paths(&agent).context("status of m1")?[0]["version"].clone();
    anyhow::ensure!(first.is_u64(), "m1 has no version: {first}");
    let serve_log = rcv.root.with_extension("serve.log");
    wait_for("the receiver to refuse the second session", T, || {
        let log = std::fs::read_to_string(&serve_log).ok()?;
        log.contains("sessions in use").then_some(())
    })?;
    // A changed file (its first chunk new) and a new one, asked about after the refusal.
    let mut changed = data((1 << 20) + 1, 1);
    changed[..1000].copy_from_slice(&data(1000, 77));
    std::fs::write(agent.watch.join("m1"), &changed)?;
    std::fs::write(agent.watch.join("m4"), data(3 << 20, 4))?;
    wait_for("the change to m1 and the new m4 backed up", T, || {
        let v = paths(&agent)?;
        let safe = |x: &serde_json::Value| x["state"] == "backed_up" && x["changed_since"] == false;
        (safe(&v[0]) && safe(&v[1]) && v[0]["version"] != first).then_some(())
    })
    .with_context(|| tail(&agent.log()))?;
    // Restoring needs the one session.
    assert_eq!(agent.proc.term().map(|s| s.success()), Some(true));
    let out = tmp.path().join("restored");
    assert_eq!(agent.restore_all_and_compare(&out)?, 5);
    Ok(())
}

/// The query lane is closed once the agent has asked nothing for a while: an idle agent
/// holds one of the receiver's sessions (`max_sessions`), not two.
#[test]
fn an_idle_agent_holds_one_session() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::write(agent.watch.join("big"), data(3 << 20, 9))?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    let serve_log = rcv.root.with_extension("serve.log");
    let sessions = || -> Option<(usize, usize)> {
        let l = std::fs::read_to_string(&serve_log).ok()?;
        Some((
            l.matches("session started").count(),
            l.matches("session ended").count(),
        ))
    };
    // The query lane (and the fresh lane, if the folder's change while the backlog was busy
    // opened it) open, then close when idle: one session is left.
    let settled = wait_for("the query lane to open, then close when idle", T, || {
        let (started, ended) = sessions()?;
        (started >= 2 && started == ended + 1).then_some((started, ended))
    })
    .with_context(|| format!("sessions (started, ended): {:?}", sessions()))?;
    // The main session stays: a new file is backed up without a new session.
    std::fs::write(agent.watch.join("small"), b"after the lane closed")?;
    agent.wait_settled(2, T)?;
    assert_eq!(sessions(), Some(settled));
    Ok(())
}

#[test]
fn restart_with_nothing_changed_rereads_and_resends_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    for i in 0..50 {
        std::fs::write(agent.watch.join(format!("f{i}")), data(5000 + i, i as u64))?;
    }
    std::fs::write(agent.watch.join("big"), data(3 << 20, 99))?;
    agent.run()?;
    let before = agent.wait_settled(51, T)?;
    assert_eq!(
        agent.proc.term().map(|s| s.success()),
        Some(true),
        "SIGTERM exits 0"
    );
    let packs = rcv.pack_bytes("r");
    let rs = rcv.status()?;
    agent.run()?;
    wait_for("the restart's scan", T, || {
        agent.log().matches("scan done").nth(1).map(|_| ())
    })?;
    let after = agent.wait_settled(51, T)?;
    assert_eq!(before["last_backup_at"], after["last_backup_at"]);
    assert_eq!(rcv.pack_bytes("r"), packs, "nothing re-sent");
    assert_eq!(
        rcv.status()?["repositories"],
        rs["repositories"],
        "no new versions"
    );
    let log = agent.log();
    let scans: Vec<&str> = log.lines().filter(|l| l.contains("scan done")).collect();
    assert_eq!(scans.len(), 2, "{}", tail(&log));
    assert!(
        scans[1].contains("changed=0"),
        "the restart scan found changes: {}",
        scans[1]
    );
    Ok(())
}

#[test]
fn kill_9_of_the_agent_mid_upload_loses_and_duplicates_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let total: usize = 40 << 20;
    std::fs::write(agent.watch.join("big.bin"), data(32 << 20, 7))?;
    for i in 0..200 {
        std::fs::write(agent.watch.join(format!("s{i}")), data(40_000, 1000 + i))?;
    }
    for round in 0..4u64 {
        agent.run()?;
        // Let it get somewhere, then kill it at a different point each round.
        let target = ((round + 1) * 4) << 20;
        let _ = wait_for("some progress", Duration::from_secs(20), || {
            (rcv.pack_bytes("r") >= target).then_some(())
        });
        agent.proc.kill9();
    }
    agent.run()?;
    agent.wait_settled(201, T)?;
    let stored = rcv.pack_bytes("r");
    assert!(
        (stored as f64) < total as f64 * 1.25,
        "store inflated by re-uploads: {stored} bytes for {total}"
    );
    let out = tmp.path().join("out");
    assert_eq!(agent.restore_all_and_compare(&out)?, 201);
    Ok(())
}

#[test]
fn kill_9_of_the_receiver_mid_upload_the_agent_reconnects_and_finishes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::write(agent.watch.join("big.bin"), data(48 << 20, 8))?;
    for i in 0..100 {
        std::fs::write(agent.watch.join(format!("s{i}")), data(30_000, 2000 + i))?;
    }
    agent.run()?;
    let _ = wait_for("some progress", Duration::from_secs(30), || {
        (rcv.pack_bytes("r") >= 8 << 20).then_some(())
    });
    rcv.proc.kill9();
    wait_for("agent notices", T, || {
        let s = agent.status().ok()?;
        s["receiver"]["state"]
            .as_str()?
            .starts_with("unreachable")
            .then_some(())
    })?;
    rcv.serve()?;
    agent.wait_settled(101, T)?;
    let out = tmp.path().join("out");
    assert_eq!(agent.restore_all_and_compare(&out)?, 101);
    Ok(())
}

#[test]
fn unreadable_files_and_fifos_do_not_stop_the_others() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::write(agent.watch.join("fine.txt"), b"fine")?;
    nix::unistd::mkfifo(
        &agent.watch.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )?;
    let secret = agent.watch.join("secret.txt");
    std::fs::write(&secret, b"no")?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000))?;
    // Root reads anything; drop the capabilities that allow it when we are root.
    let root = nix::unistd::geteuid().is_root();
    let setpriv = std::path::Path::new("/usr/bin/setpriv").exists();
    if root && !setpriv {
        eprintln!("SKIP part: running as root without setpriv; cannot make a file unreadable");
    }
    let log = std::fs::File::create(agent.dir.join("agent.log"))?;
    let mut cmd = if root && setpriv {
        let mut c = std::process::Command::new("/usr/bin/setpriv");
        c.args([
            "--bounding-set",
            "-dac_override,-dac_read_search",
            "--inh-caps",
            "-dac_override,-dac_read_search",
        ]);
        c.arg(bin("coffer-agent"));
        c
    } else {
        std::process::Command::new(bin("coffer-agent"))
    };
    cmd.env("COFFER_PASSPHRASE", PASS)
        .args(["run", "--config"])
        .arg(&agent.config)
        .stderr(log);
    agent.proc = Proc(Some(cmd.spawn()?));
    let st = wait_for(
        "fine.txt and the FIFO backed up and secret.txt failed",
        T,
        || {
            let s = agent.status().ok()?;
            let want_failed = if !root || setpriv { 1 } else { 0 };
            // The FIFO is backed up as what it is (agent_fidelity restores one).
            (s["files"]["backed_up"] == 2 && s["files"]["failed"] == want_failed).then_some(s)
        },
    )
    .with_context(|| tail(&agent.log()))?;
    if !root || setpriv {
        let reason = st["failed"][0]["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("secret.txt") && reason.contains("ermission denied"),
            "{st}"
        );
        let human = agent
            .cmd()
            .args(["status", "--failed", "--config"])
            .arg(&agent.config)
            .output()?;
        assert!(String::from_utf8_lossy(&human.stdout).contains("secret.txt"));
    }
    Ok(())
}

#[test]
fn wrong_passphrase_on_restore_is_clear_and_writes_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::write(agent.watch.join("a"), b"a")?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    let dest = tmp.path().join("out");
    let r = agent
        .cmd()
        .env("COFFER_PASSPHRASE", "not the passphrase")
        .args(["restore", "--config"])
        .arg(&agent.config)
        .arg("--to")
        .arg(&dest)
        .output()?;
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!dest.exists(), "restore wrote something");
    Ok(())
}

#[test]
fn wrong_passphrase_on_run_is_clear_and_sends_nothing() -> Result<()> {
    // The keys are unwrapped beside the startup scan; a wrong passphrase must still stop
    // the daemon with a clear error before anything is uploaded.
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    for i in 0..200 {
        std::fs::write(agent.watch.join(format!("f{i}")), data(1000, i))?;
    }
    let r = agent
        .cmd()
        .env("COFFER_PASSPHRASE", "not the passphrase")
        .args(["run", "--config"])
        .arg(&agent.config)
        .output()?;
    assert!(!r.status.success(), "run with a wrong passphrase exited 0");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("wrong passphrase"), "{err}");
    assert_eq!(rcv.pack_bytes("r"), 0, "chunks reached the receiver");
    let st = agent.status()?;
    assert_eq!(st["files"]["backed_up"], 0, "{st}");
    Ok(())
}

#[test]
fn twenty_thousand_files_created_at_once_all_end_backed_up() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    // A tiny kernel event queue forces overflows where the machine lets us set it.
    let q = "/proc/sys/fs/inotify/max_queued_events";
    let old = std::fs::read_to_string(q).ok();
    let shrunk = std::fs::write(q, "64").is_ok();
    if !shrunk {
        eprintln!("note: cannot shrink {q}; testing without forced overflow");
    }
    agent.run()?;
    wait_for("agent running", T, || {
        agent.status().ok()?["running"].as_bool()?.then_some(())
    })?;
    for d in 0..20 {
        let dir = agent.watch.join(format!("d{d}"));
        std::fs::create_dir(&dir)?;
        for f in 0..1000 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}"))?;
        }
    }
    let res = agent.wait_settled(20_000, Duration::from_secs(180));
    if let (true, Some(old)) = (shrunk, old) {
        let _ = std::fs::write(q, old.trim());
    }
    let st = res?;
    assert_eq!(st["files"]["backed_up"], 20_000);
    if shrunk {
        assert!(
            st["watcher"]["rescans_overflow"].as_i64().unwrap_or(0) >= 1,
            "{st}"
        );
    }
    Ok(())
}
