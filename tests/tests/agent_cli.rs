//! The agent's command line as a newcomer uses it: `--at` in every form a person writes,
//! `status PATH...` exit codes a script can use, files named by their local path, and
//! outputs numbered and labelled for people (and JSON for scripts).

mod support;

use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};
use jiff::tz::{Offset, TimeZone};
use serde_json::Value;
use support::*;

const T: Duration = Duration::from_secs(90);

fn now_s() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Waits until the next wall-clock second so versions get distinct commit times.
fn next_second() {
    let s = now_s();
    let _ = wait_for("next second", Duration::from_secs(3), || {
        (now_s() > s).then_some(())
    });
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn agent_cmd(agent: &Agent, args: &[&str]) -> Result<Output> {
    Ok(agent
        .cmd()
        .arg(args[0])
        .arg("--config")
        .arg(&agent.config)
        .args(&args[1..])
        .output()?)
}

/// `versions --json` of one file: its versions, oldest first.
fn versions_json(agent: &Agent, path: &str) -> Result<Vec<Value>> {
    let out = ok(&agent_cmd(agent, &["versions", "--json", path])?);
    let v: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    Ok(v[0]["versions"].as_array().cloned().unwrap_or_default())
}

/// The version of `w/doc.txt` that `ls --at AT` lists (run with `TZ=tz`), if any.
fn ls_at(agent: &Agent, at: &str, tz: &str) -> Result<Option<u64>> {
    let o = agent
        .cmd()
        .env("TZ", tz)
        .args(["ls", "--json", "--config"])
        .arg(&agent.config)
        .args(["--at", at])
        .output()?;
    let out = ok(&o);
    let v: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let list = v.as_array().context("ls --json: an array")?;
    if list.is_empty() {
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("no files backed up"),
            "an empty ls says so: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(list
        .iter()
        .find(|e| e["path"] == "w/doc.txt")
        .and_then(|e| e["version"].as_u64()))
}

/// `t` as a person in a zone `offset_s` east of UTC writes it.
fn written(t: i64, offset_s: i32, with_offset: bool) -> Result<String> {
    let tz = TimeZone::fixed(Offset::from_seconds(offset_s)?);
    let z = jiff::Timestamp::from_second(t)?.to_zoned(tz);
    let fmt = if with_offset {
        "%Y-%m-%dT%H:%M:%S%:z"
    } else {
        "%Y-%m-%dT%H:%M:%S"
    };
    Ok(z.strftime(fmt).to_string())
}

/// A POSIX `TZ` for a fixed zone `offset_s` east of UTC (whole minutes).
fn posix_tz(offset_s: i32) -> String {
    let (sign, a) = if offset_s < 0 {
        ('+', -offset_s)
    } else {
        ('-', offset_s)
    };
    format!("XYZ{sign}{}:{:02}", a / 3600, a % 3600 / 60)
}

#[test]
fn at_in_every_form_picks_the_version_a_person_expects() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let f = agent.watch.join("doc.txt");
    std::fs::write(&f, b"one")?;
    agent.run()?;
    agent.wait_settled(1, T)?;
    next_second();
    std::fs::write(&f, b"two, later")?;
    let vs = wait_for("a second version", T, || {
        let v = versions_json(&agent, "w/doc.txt").ok()?;
        (v.len() == 2).then_some(v)
    })?;
    let at = |i: usize| vs[i]["backed_up_at_unix"].as_i64().unwrap_or(0);
    let ver = |i: usize| vs[i]["version"].as_u64();
    let (t1, t2) = (at(0), at(1));
    assert!(t1 < t2, "{vs:?}");
    assert_eq!(vs[0]["n"], 1);
    assert_eq!(vs[1]["n"], 2);
    // The machine's own zone must not matter: every run names one.
    let utc = "UTC";
    // With an offset: the same instant however it is written, in any TZ.
    for (s, tz) in [
        (written(t1, 0, true)?.replace("+00:00", "Z"), utc),
        (written(t1, 3600, true)?, "XYZ+7"),
        (written(t1, -(5 * 3600 + 1800), true)?, utc),
        (written(t2 - 1, 3600, true)?, utc),
    ] {
        assert_eq!(ls_at(&agent, &s, tz)?, ver(0), "--at {s} (TZ={tz})");
    }
    assert_eq!(ls_at(&agent, &written(t2, -19800, true)?, utc)?, ver(1));
    assert_eq!(ls_at(&agent, &written(t1 - 1, 3600, true)?, utc)?, None);
    // Without an offset: local time. Read as UTC it would be 5h30 later (version 2).
    let ist = 5 * 3600 + 1800;
    let local = written(t1, ist, false)?;
    assert_eq!(ls_at(&agent, &local, &posix_tz(ist))?, ver(0), "{local}");
    assert_eq!(
        ls_at(&agent, &written(t1 - 1, -ist, false)?, &posix_tz(-ist))?,
        None
    );
    // A date alone: its start in local time. Of today's and tomorrow's dates in zones 14h
    // east and 12h west, take one whose start, read in UTC, would give another answer.
    let expect = |start: i64| {
        if start >= t2 {
            ver(1)
        } else if start >= t1 {
            ver(0)
        } else {
            None
        }
    };
    let mut checked = 0;
    for off in [14 * 3600, -12 * 3600] {
        for days in [0, 1] {
            let local_day = (t2 + off as i64).div_euclid(86_400) + days;
            let start = local_day * 86_400 - off as i64;
            if expect(start) == expect(local_day * 86_400) {
                continue;
            }
            let date = written(start, off, false)?[..10].to_string();
            assert_eq!(
                ls_at(&agent, &date, &posix_tz(off))?,
                expect(start),
                "--at {date} in a zone {off}s east"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no date told local from UTC");
    // restore agrees with ls.
    let dest = tmp.path().join("r1");
    let o = agent
        .cmd()
        .env("TZ", posix_tz(ist))
        .args(["restore", "--config"])
        .arg(&agent.config)
        .arg("--to")
        .arg(&dest)
        .args(["--at", &local])
        .output()?;
    ok(&o);
    assert_eq!(std::fs::read(dest.join("w/doc.txt"))?, b"one");
    // A bad time names every accepted form.
    let bad = agent_cmd(&agent, &["ls", "--at", "yesterday"])?;
    assert!(!bad.status.success());
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(
        e.contains("RFC 3339") && e.contains("local time") && e.contains("unix seconds"),
        "{e}"
    );
    Ok(())
}

/// `status PATH...` with `--json`: its exit code and the objects.
fn status_paths(agent: &Agent, paths: &[&str]) -> Result<(i32, Vec<Value>)> {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(paths);
    let o = agent_cmd(agent, &args)?;
    let v: Value = serde_json::from_slice(&o.stdout)
        .with_context(|| String::from_utf8_lossy(&o.stderr).into_owned())?;
    Ok((
        o.status.code().unwrap_or(-1),
        v.as_array().cloned().unwrap_or_default(),
    ))
}

#[test]
fn status_paths_exit_codes_and_unknown_causes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let text = std::fs::read_to_string(&agent.config)?;
    assert!(text.contains("name = \"w\"\n"), "{text}");
    std::fs::write(
        &agent.config,
        text.replace("name = \"w\"\n", "name = \"w\"\nexclude = [\"*.tmp\"]\n"),
    )?;
    let w = agent.watch.clone();
    std::fs::write(w.join("a.txt"), b"a")?;
    std::fs::write(w.join("b.txt"), b"b")?;
    std::fs::write(w.join("skip.tmp"), b"t")?;
    agent.run()?;
    agent.wait_settled(2, T)?;
    let a = w.join("a.txt");
    let a = a.to_str().context("utf-8 path")?;

    // 0: backed up and unchanged, named either way.
    let (code, v) = status_paths(&agent, &[a, "w/b.txt"])?;
    assert_eq!(code, 0, "{v:?}");
    assert_eq!(v[0]["path"], "w/a.txt");
    assert_eq!(v[0]["state"], "backed_up");
    let human = agent_cmd(&agent, &["status", "w/a.txt"])?;
    assert_eq!(human.status.code(), Some(0));

    // 2: unknown, with its cause.
    let outside = tmp.path().join("elsewhere.txt");
    std::fs::write(&outside, b"x")?;
    let (code, v) = status_paths(&agent, &[outside.to_str().context("utf-8")?])?;
    assert_eq!(code, 2);
    assert_eq!(v[0]["cause"], "outside_watches", "{v:?}");
    let (code, v) = status_paths(&agent, &["w/skip.tmp"])?;
    assert_eq!(code, 2);
    assert_eq!(v[0]["cause"], "excluded", "{v:?}");
    assert_eq!(v[0]["pattern"], "*.tmp");
    let human = agent_cmd(&agent, &["status", "w/skip.tmp"])?;
    assert_eq!(human.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("excluded by pattern \"*.tmp\""),
        "{}",
        String::from_utf8_lossy(&human.stdout)
    );

    // 1: pending. With the receiver gone, a change stays pending.
    rcv.proc.kill9();
    std::fs::write(w.join("a.txt"), b"a, changed")?;
    let (code, v) = wait_for("a.txt pending", T, || {
        let (code, v) = status_paths(&agent, &["w/a.txt"]).ok()?;
        (v[0]["state"] == "pending").then_some((code, v))
    })?;
    assert_eq!(code, 1, "{v:?}");
    // 1 wins over 0; 2 wins over 1.
    assert_eq!(status_paths(&agent, &["w/b.txt", "w/a.txt"])?.0, 1);
    assert_eq!(status_paths(&agent, &["w/a.txt", "w/skip.tmp"])?.0, 2);

    // A stopped agent: a file it has not seen yet is "not scanned yet"; a backed-up file
    // changed since is not safe (1).
    agent.proc.term();
    std::fs::write(w.join("new.txt"), b"n")?;
    std::fs::write(w.join("b.txt"), b"b, changed while stopped")?;
    let (code, v) = status_paths(&agent, &["w/new.txt"])?;
    assert_eq!(code, 2);
    assert_eq!(v[0]["cause"], "not_scanned", "{v:?}");
    let (code, v) = status_paths(&agent, &["w/b.txt"])?;
    assert_eq!(code, 1, "{v:?}");
    assert_eq!(v[0]["changed_since"], true);
    let (code, v) = status_paths(&agent, &["w/gone.txt"])?;
    assert_eq!(code, 2);
    assert_eq!(v[0]["cause"], "missing", "{v:?}");
    Ok(())
}

#[test]
fn files_named_by_local_path_in_versions_restore_and_ls() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::start(&tmp.path().join("rcv"))?;
    let mut agent = Agent::init(&tmp.path().join("agent"), &rcv, "r")?;
    let w = agent.watch.clone();
    std::fs::create_dir_all(w.join("d"))?;
    std::fs::write(w.join("d/x.txt"), b"x1")?;
    std::fs::write(w.join("y.txt"), data(3000, 7))?;
    agent.run()?;
    agent.wait_settled(2, T)?;
    std::fs::write(w.join("d/x.txt"), b"x2")?;
    wait_for("second version of x", T, || {
        (versions_json(&agent, "w/d/x.txt").ok()?.len() == 2).then_some(())
    })?;

    // versions: relative to the working directory, absolute, and as watch-name/...: the
    // same lines, numbered 1, 2 with the receiver's version beside.
    let rel = agent
        .cmd()
        .current_dir(w.join("d"))
        .args(["versions", "--config"])
        .arg(&agent.config)
        .arg("x.txt")
        .output()?;
    let rel = ok(&rel);
    let abs = ok(&agent_cmd(
        &agent,
        &["versions", w.join("d/x.txt").to_str().context("utf-8")?],
    )?);
    let named = ok(&agent_cmd(&agent, &["versions", "w/d/x.txt"])?);
    assert_eq!(rel, named);
    assert_eq!(abs, named);
    let lines: Vec<&str> = named.lines().collect();
    assert_eq!(lines.len(), 2, "{named}");
    assert!(lines[0].trim_start().starts_with("1  v"), "{named}");
    assert!(lines[1].trim_start().starts_with("2  v"), "{named}");

    // Several paths; one with no versions is said on stderr and is not an error.
    let o = agent_cmd(&agent, &["versions", "w/d/x.txt", "w/y.txt", "w/nope"])?;
    let out = ok(&o);
    assert!(
        out.contains("w/d/x.txt:") && out.contains("w/y.txt:"),
        "{out}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("no versions of w/nope"));
    let o = agent_cmd(&agent, &["versions", "--json", "w/nope"])?;
    let v: Value = serde_json::from_str(&ok(&o))?;
    assert_eq!(v, serde_json::json!([{"path": "w/nope", "versions": []}]));

    // restore by local path lands at TO/watch-name/relative/path.
    let dest = tmp.path().join("out");
    ok(&agent.restore(&dest, &[w.join("d/x.txt").to_str().context("utf-8")?])?);
    assert_eq!(std::fs::read(dest.join("w/d/x.txt"))?, b"x2");
    assert!(!dest.join("w/y.txt").exists());
    let dest2 = tmp.path().join("out2");
    let o = agent
        .cmd()
        .current_dir(&w)
        .args(["restore", "--config"])
        .arg(&agent.config)
        .arg("--to")
        .arg(&dest2)
        .arg("./d")
        .output()?;
    ok(&o);
    assert_eq!(std::fs::read(dest2.join("w/d/x.txt"))?, b"x2");
    // A local path under no watch is refused before anything is asked.
    let o = agent_cmd(
        &agent,
        &["versions", tmp.path().join("x").to_str().context("utf-8")?],
    )?;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not under a watched folder"));

    // ls by local folder, as JSON.
    let o = agent_cmd(
        &agent,
        &["ls", "--json", w.join("d").to_str().context("utf-8")?],
    )?;
    let v: Value = serde_json::from_str(&ok(&o))?;
    let list = v.as_array().context("array")?;
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["path"], "w/d/x.txt");
    assert_eq!(list[0]["size"], 2);
    // Nothing to list: said on stderr, exit 0, nothing on stdout.
    let o = agent_cmd(&agent, &["ls", "--at", "2020-01-01T00:00:00Z"])?;
    assert!(ok(&o).is_empty());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("no files backed up at or before 2020-01-01T00:00:00Z"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = agent
        .cmd()
        .env("TZ", "XYZ-1")
        .args(["ls", "--config"])
        .arg(&agent.config)
        .args(["--at", "2020-01-01"])
        .output()?;
    assert!(ok(&o).is_empty());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("no files backed up at or before 2020-01-01 (2019-12-31T23:00:00Z)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}
