//! Running the agent as a service: `service install --dry-run`, SIGHUP reloads, metrics.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use support::*;

const T: Duration = Duration::from_secs(90);

/// An agent set up under `dir` (a receiver beside it) and the outputs of
/// `service install --dry-run` for the user unit and then the system unit, with `HOME` at
/// `dir/home`.
fn dry_runs(
    dir: &std::path::Path,
) -> Result<(Agent, std::path::PathBuf, Vec<std::process::Output>)> {
    let rcv = Receiver::start(&dir.join("rcv"))?;
    let agent = Agent::init(&dir.join("agent"), &rcv, "r")?;
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let mut outputs = Vec::new();
    for user in [true, false] {
        let mut c = agent.cmd();
        c.env("HOME", &home)
            .args(["service", "install", "--dry-run", "--config"])
            .arg(&agent.config);
        if user {
            c.arg("--user");
        }
        let o = c.output()?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        outputs.push(o);
    }
    drop(rcv);
    Ok((agent, home, outputs))
}

#[test]
fn service_install_dry_run_shows_the_unit_for_this_binary_and_config() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (agent, home, outputs) = dry_runs(tmp.path())?;
    for (o, user) in outputs.iter().zip([true, false]) {
        let out = String::from_utf8_lossy(&o.stdout);
        let unit = if user {
            home.join(".config/systemd/user/coffer-agent.service")
        } else {
            std::path::PathBuf::from("/etc/systemd/system/coffer-agent.service")
        };
        assert!(out.contains(&unit.display().to_string()), "{out}");
        assert!(
            out.contains(&format!(
                "ExecStart={} run --config {}",
                bin("coffer-agent").display(),
                agent.config.display()
            )),
            "{out}"
        );
        assert!(
            out.contains("Type=notify") && out.contains("WatchdogSec="),
            "{out}"
        );
        assert!(out.contains("systemctl"), "{out}");
        assert!(!unit.exists(), "a dry run wrote {}", unit.display());
    }
    Ok(())
}

#[test]
fn service_install_dry_run_warns_of_a_config_under_tmp_with_the_fix() -> Result<()> {
    // Under /tmp itself, whatever TMPDIR says: the unit's PrivateTmp=yes hides it.
    let tmp = tempfile::tempdir_in("/tmp")?;
    let (agent, _home, outputs) = dry_runs(tmp.path())?;
    for o in &outputs {
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(out.contains("ExecStart="), "{out}");
        assert!(
            err.contains(&format!(
                "warning: without --dry-run, the install is refused: config {} is out of the service's reach: PrivateTmp=yes gives the service a private, empty /tmp and /var/tmp; move it out of /tmp and /var/tmp",
                agent.config.display()
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!("watch \"w\" ({})", agent.watch.display())),
            "{err}"
        );
        // The warnings are on stderr only; stdout is the plan as before.
        assert!(!out.contains("out of the service's reach"), "{out}");
    }
    Ok(())
}

#[test]
fn sighup_adds_a_watched_folder_without_a_restart() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    std::fs::write(agent.watch.join("old.txt"), b"old")?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    let extra = tmp.path().join("extra");
    std::fs::create_dir_all(&extra)?;
    std::fs::write(extra.join("new.txt"), b"in the new folder")?;
    let mut cfg = std::fs::read_to_string(&agent.config)?;
    cfg.push_str(&format!(
        "\n[[watch]]\npath = \"{}\"\nname = \"extra\"\n",
        extra.display()
    ));
    std::fs::write(&agent.config, cfg)?;
    let pid = agent.proc.pid().context("pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    agent.wait_settled(2, T)?;
    // And a file written afterwards into the new folder is picked up by its OS watch.
    std::fs::write(extra.join("later.txt"), b"later")?;
    agent.wait_settled(3, T)?;
    let dest = tmp.path().join("out");
    let r = agent.restore(&dest, &["extra"])?;
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        std::fs::read(dest.join("extra/new.txt"))?,
        b"in the new folder"
    );
    assert_eq!(std::fs::read(dest.join("extra/later.txt"))?, b"later");
    assert!(
        agent.log().contains("watch list updated"),
        "{}",
        tail(&agent.log())
    );
    Ok(())
}

fn scrape(addr: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn metrics_answer_with_the_documented_series_while_a_backup_runs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    for i in 0..20 {
        std::fs::write(agent.watch.join(format!("f{i}")), data(200_000, i))?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(agent.dir.join("agent.log"))?;
    let child = agent
        .cmd()
        .args(["run", "--metrics", &addr, "--config"])
        .arg(&agent.config)
        .stderr(log)
        .spawn()?;
    agent.proc = Proc(Some(child));
    let first = wait_for("metrics endpoint", T, || scrape(&addr).ok())?;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    for series in [
        "coffer_agent_files{state=\"pending\"}",
        "coffer_agent_files{state=\"backed_up\"}",
        "coffer_agent_files{state=\"failed\"}",
        "coffer_agent_pending_bytes",
        "coffer_agent_upload_rate_bytes_per_second",
        "coffer_agent_rescans_overflow_total",
        "coffer_agent_last_ack_timestamp_seconds",
    ] {
        assert!(first.contains(series), "missing {series} in:\n{first}");
    }
    agent.wait_settled(20, T)?;
    let done = scrape(&addr)?;
    assert!(
        done.contains("coffer_agent_files{state=\"backed_up\"} 20"),
        "{done}"
    );
    assert!(
        done.contains("coffer_agent_files{state=\"pending\"} 0"),
        "{done}"
    );
    Ok(())
}
