//! The receiver's command line as a user meets it: init, authorize, serve, status, scrub.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result};
use coffer_common::chunk::ChunkId;
use coffer_common::wire::{ErrorCode, Message};
use coffer_tests::*;

const T: Duration = Duration::from_secs(20);

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn init_prints_one_key_and_refuses_to_initialize_twice() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    let rcv = Receiver::init(&root)?;
    assert_eq!(rcv.public_key.to_string().len(), 43);
    let key_path = root.join("keys/receiver.key");
    let key = std::fs::read(&key_path)?;
    assert_eq!(key.len(), 64);
    assert_eq!(
        std::fs::metadata(&key_path)?.permissions().mode() & 0o777,
        0o600
    );
    assert!(root.join("repos").is_dir());
    let cfg = std::fs::read_to_string(root.join("receiver.toml"))?;
    assert!(cfg.contains("listen = \"127.0.0.1:0\""), "{cfg}");
    // Default listen address is loopback.
    let other = tmp.path().join("other");
    let o = rcv.cmd().args(["init", "--root"]).arg(&other).output()?;
    stdout_ok(&o)?;
    let cfg = std::fs::read_to_string(other.join("receiver.toml"))?;
    assert!(cfg.contains("listen = \"127.0.0.1:7700\""), "{cfg}");

    let o = rcv.cmd().args(["init", "--root"]).arg(&root).output()?;
    assert!(!o.status.success());
    assert!(o.stdout.is_empty());
    assert!(stderr(&o).contains("already initialized"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&key_path)?, key, "the key was not replaced");
    // Commands on a root that was never initialized say so.
    let o = rcv
        .cmd()
        .args(["status", "--root"])
        .arg(tmp.path().join("nope"))
        .output()?;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("coffer-receiver init"),
        "{}",
        stderr(&o)
    );
    Ok(())
}

#[test]
fn authorize_refuses_unsafe_names_bad_keys_and_a_second_repository() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::init(&tmp.path().join("root"))?;
    let a = TestAgent::new()?.public_key().to_string();
    let b = TestAgent::new()?.public_key().to_string();
    let long = "x".repeat(65);
    for bad in [
        "..",
        ".",
        "a/b",
        "a\\b",
        "",
        ".hidden",
        "tab\there",
        "nl\nx",
        &long,
    ] {
        let o = rcv.run("authorize", &["--name", bad, &a])?;
        assert!(!o.status.success(), "name {bad:?} accepted");
        assert!(
            stderr(&o).contains("invalid repository name"),
            "{}",
            stderr(&o)
        );
    }
    let o = rcv.run("authorize", &["--name", "ok", "not-a-key"])?;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a Coffer public key"),
        "{}",
        stderr(&o)
    );
    // Nothing was created for refused names.
    assert!(snapshot_tree(&rcv.root.join("repos")).is_empty());
    assert!(std::fs::read_dir(rcv.root.join("repos"))?.next().is_none());

    stdout_ok(&rcv.run("authorize", &["--name", "laptop", &a])?)?;
    stdout_ok(&rcv.run("authorize", &["--name", "laptop", &b])?)?;
    stdout_ok(&rcv.run("authorize", &["--name", "laptop", &a])?)?;
    let o = rcv.run("authorize", &["--name", "desktop", &a])?;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already authorized"), "{}", stderr(&o));
    let st = rcv.status()?;
    let repos = st["repositories"].as_array().context("repositories")?;
    assert_eq!(repos.len(), 1);
    assert_eq!(repos[0]["keys"].as_array().map(Vec::len), Some(2));
    stdout_ok(&rcv.run("revoke", &[&a])?)?;
    let o = rcv.run("revoke", &[&a])?;
    assert!(!o.status.success(), "revoking twice");
    stdout_ok(&rcv.run("authorize", &["--name", "desktop", &a])?)?;
    assert_eq!(
        rcv.status()?["repositories"].as_array().map(Vec::len),
        Some(2)
    );
    // One key in 64 begins with '-': it is a key, not an option.
    let dash = coffer_common::channel::PublicKey([0xF8; 32]).to_string();
    assert!(dash.starts_with('-'));
    stdout_ok(&rcv.run("authorize", &["--name", "laptop", &dash])?)?;
    stdout_ok(&rcv.run("revoke", &[&dash])?)?;
    Ok(())
}

#[test]
fn serve_reports_its_address_and_holds_the_root() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::start(&tmp.path().join("root"))?;
    let addr = rcv.addr()?;
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    let written = std::fs::read_to_string(rcv.root.join("serve.addr"))?;
    assert_eq!(written.trim(), addr.to_string());
    let st = rcv.status()?;
    assert_eq!(st["serve_running"], true);
    assert_eq!(st["serve_addr"], addr.to_string());
    let text = stdout_ok(&rcv.run("status", &[])?)?;
    assert!(
        text.contains(&format!("running, listening on {addr}")),
        "{text}"
    );
    // A second serve on the same root refuses clearly (and promptly).
    let o = rcv.run("serve", &["--listen", "127.0.0.1:0"])?;
    assert!(!o.status.success());
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));
    let status = rcv.terminate(T)?;
    assert!(status.success(), "{status}");
    assert_eq!(rcv.status()?["serve_running"], false);
    assert!(!rcv.root.join("serve.addr").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_names_damaged_records_and_damage_never_opens() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    let agent = TestAgent::new()?;
    rcv.authorize("r", &agent.public_key())?;
    rcv.serve()?;
    let mut c = rcv.connect(&agent).await?;
    let a = agent.seal_file("w/a", &data(100_000, 1))?;
    let b = agent.seal_file("w/b", &data(100_000, 2))?;
    c.upload(&a).await?;
    c.upload(&b).await?;
    drop(c);
    rcv.terminate(T)?;
    let o = rcv.run("scrub", &[])?;
    let out = stdout_ok(&o)?;
    assert!(
        out.contains("2 records") && out.contains("0 damaged"),
        "{out}"
    );

    // Flip one byte inside the first record's sealed bytes (pack header 16, record
    // header 72).
    let pack = rcv.root.join("repos/r/packs/00000001.pack");
    let mut bytes = std::fs::read(&pack)?;
    bytes[16 + 72 + 1000] ^= 0x01;
    std::fs::write(&pack, &bytes)?;
    let o = rcv.run("scrub", &[])?;
    assert!(!o.status.success(), "scrub must fail on damage");
    let out = String::from_utf8_lossy(&o.stdout);
    let (id, _) = &a.chunks[0];
    assert!(out.contains(&pack.display().to_string()), "{out}");
    assert!(out.contains("offset 16 "), "{out}");
    assert!(out.contains(&id.to_hex()), "{out}");
    assert!(out.contains("1 damaged"), "{out}");

    // The receiver serves the record as stored (it checks the record's header, not the
    // hash of its body: the agent opens every chunk); the damaged chunk fails to open,
    // never gives wrong bytes, and the other file is fine.
    rcv.serve()?;
    let mut c = rcv.connect(&agent).await?;
    let e = agent
        .verify(&mut c, &a)
        .await
        .expect_err("a damaged chunk must not open");
    assert!(e.to_string().contains("authentication"), "{e:#}");
    agent.verify(&mut c, &b).await?;
    let r = c
        .request(&Message::GetChunk {
            id: ChunkId([0; 32]),
        })
        .await?;
    assert_eq!(error_code(&r), Some(ErrorCode::NotFound), "{r:?}");
    Ok(())
}

#[test]
fn serve_tells_systemd_it_is_ready_and_alive() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(T))?;
    let mut rcv = Receiver::init(&tmp.path().join("root"))?;
    rcv.env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.clone()),
        ("WATCHDOG_USEC".into(), "200000".into()),
    ];
    let addr = rcv.serve()?;
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).context("no READY=1")?;
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("READY=1"), "{msg}");
    assert!(msg.contains(&addr.to_string()), "{msg}");
    for _ in 0..2 {
        let n = sock.recv(&mut buf).context("no WATCHDOG=1")?;
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
    let st = rcv.terminate(T)?;
    assert!(st.success());
    // STOPPING=1 arrives (after any further watchdog pings).
    let stopping = wait_for("STOPPING=1", T, || {
        let n = sock.recv(&mut buf).ok()?;
        (&buf[..n] == b"STOPPING=1").then_some(())
    });
    assert!(stopping.is_ok(), "no STOPPING=1");
    Ok(())
}

#[test]
fn service_install_dry_run_prints_the_unit_and_changes_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rcv = Receiver::init(&tmp.path().join("root"))?;
    let unit_path = std::path::Path::new("/etc/systemd/system/coffer-receiver.service");
    let before = std::fs::read(unit_path).ok();
    let o = rcv
        .cmd()
        .args(["service", "install", "--dry-run", "--root"])
        .arg(&rcv.root)
        .output()?;
    let out = stdout_ok(&o)?;
    let root = std::fs::canonicalize(&rcv.root)?;
    let exec = out
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .context("no ExecStart")?;
    assert!(
        exec.ends_with(&format!(" serve --root {}", root.display())),
        "{exec}"
    );
    assert!(
        out.contains(&format!("ReadWritePaths={}", root.display())),
        "{out}"
    );
    assert!(out.contains("Type=notify"), "{out}");
    assert!(
        out.contains("would run: systemctl enable coffer-receiver.service"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(unit_path).ok(),
        before,
        "dry run wrote the unit"
    );
    // A root that was never initialized is refused.
    let o = rcv
        .cmd()
        .args(["service", "install", "--dry-run", "--root"])
        .arg(tmp.path().join("nope"))
        .output()?;
    assert!(!o.status.success());
    let o = rcv
        .cmd()
        .args(["service", "uninstall", "--dry-run"])
        .output()?;
    stdout_ok(&o)?;
    Ok(())
}
