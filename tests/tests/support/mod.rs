//! Fixtures for the agent's black-box tests: a real receiver and a real agent in temp dirs,
//! on loopback, driven through their command lines.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const PASS: &str = "correct horse battery staple";

/// The stdout of a command that must have succeeded (its stderr shown if not).
pub fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The binaries under test, built by this crate from the real `main.rs` files (so a fresh
/// `cargo test` always runs current code).
pub fn bin(name: &str) -> PathBuf {
    match name {
        "coffer-agent" => PathBuf::from(env!("CARGO_BIN_EXE_coffer-agent-test")),
        "coffer-receiver" => PathBuf::from(env!("CARGO_BIN_EXE_coffer-receiver-test")),
        other => panic!("unknown binary {other}"),
    }
}

pub use coffer_tests::{data, wait_for};

/// A child process killed on drop.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    pub fn term(&mut self) -> Option<std::process::ExitStatus> {
        let c = self.0.take()?;
        let mut c = c;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().ok()
    }
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(|c| c.id())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A receiver: `init`, `serve` on 127.0.0.1 (a fixed port once chosen, so agents can
/// reconnect after a restart).
pub struct Receiver {
    pub root: PathBuf,
    pub key: String,
    pub addr: String,
    pub proc: Proc,
}

impl Receiver {
    pub fn start(root: &Path) -> Result<Self> {
        let out = Command::new(bin("coffer-receiver"))
            .args(["init", "--root"])
            .arg(root)
            .args(["--listen", "127.0.0.1:0"])
            .output()?;
        if !out.status.success() {
            bail!("receiver init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let key = String::from_utf8(out.stdout)?.trim().to_string();
        let mut r = Receiver {
            root: root.to_path_buf(),
            key,
            addr: "127.0.0.1:0".into(),
            proc: Proc(None),
        };
        r.serve()?;
        Ok(r)
    }

    /// Starts `serve` (on the same address as before, if there was one).
    pub fn serve(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.with_extension("serve.log"))?;
        let mut child = Command::new(bin("coffer-receiver"))
            .args(["serve", "--root"])
            .arg(&self.root)
            .args(["--listen", &self.addr])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line from serve: {line:?}"))?;
        self.addr = addr.to_string();
        self.proc = Proc(Some(child));
        Ok(())
    }

    pub fn authorize(&self, repo: &str, key: &str) -> Result<()> {
        let out = Command::new(bin("coffer-receiver"))
            .args(["authorize", "--root"])
            .arg(&self.root)
            .args(["--name", repo, key])
            .output()?;
        if !out.status.success() {
            bail!("authorize: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    pub fn status(&self) -> Result<Value> {
        let out = Command::new(bin("coffer-receiver"))
            .args(["status", "--json", "--root"])
            .arg(&self.root)
            .output()?;
        if !out.status.success() {
            bail!("receiver status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Bytes in the repository's pack files.
    pub fn pack_bytes(&self, repo: &str) -> u64 {
        let dir = self.root.join("repos").join(repo).join("packs");
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// An agent with its config in a temp dir, watching `watch/` (named "w").
pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub watch: PathBuf,
    pub key: String,
    pub proc: Proc,
}

impl Agent {
    pub fn init(dir: &Path, rcv: &Receiver, repo: &str) -> Result<Self> {
        let watch = dir.join("w");
        let config = dir.join("agent.toml");
        let out = Command::new(bin("coffer-agent"))
            .env("COFFER_PASSPHRASE", PASS)
            .args(["init", "--config"])
            .arg(&config)
            .args([
                "--receiver",
                &rcv.addr,
                "--receiver-key",
                &rcv.key,
                "--name",
                "test",
            ])
            .arg("--watch")
            .arg(&watch)
            .output()?;
        if !out.status.success() {
            bail!("agent init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let key = String::from_utf8(out.stdout)?.trim().to_string();
        let text =
            std::fs::read_to_string(&config)?.replace("debounce = \"2s\"", "debounce = \"200ms\"");
        std::fs::write(&config, text)?;
        rcv.authorize(repo, &key)?;
        Ok(Agent {
            dir: dir.to_path_buf(),
            config,
            watch,
            key,
            proc: Proc(None),
        })
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin("coffer-agent"));
        c.env("COFFER_PASSPHRASE", PASS);
        c
    }

    pub fn run(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let child = self
            .cmd()
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.proc = Proc(Some(child));
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn status(&self) -> Result<Value> {
        let out = self
            .cmd()
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()?;
        if !out.status.success() {
            bail!("status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until nothing is pending and at least `files` are backed up.
    pub fn wait_settled(&self, files: i64, limit: Duration) -> Result<Value> {
        wait_for(&format!("{files} files backed up"), limit, || {
            let s = self.status().ok()?;
            let f = &s["files"];
            (f["pending"].as_i64() == Some(0) && f["backed_up"].as_i64()? >= files).then_some(s)
        })
        .with_context(|| {
            format!(
                "last status: {:?}\nagent log:\n{}",
                self.status().ok(),
                tail(&self.log())
            )
        })
    }

    pub fn restore(&self, to: &Path, extra: &[&str]) -> Result<std::process::Output> {
        Ok(self
            .cmd()
            .args(["restore", "--config"])
            .arg(&self.config)
            .arg("--to")
            .arg(to)
            .args(extra)
            .output()?)
    }

    /// Restores everything into `to`, checks that the restore succeeded, and compares the
    /// restored watch folder with the watched one; returns the number of files compared.
    pub fn restore_all_and_compare(&self, to: &Path) -> Result<usize> {
        let r = self.restore(to, &[])?;
        if !r.status.success() {
            bail!("restore failed: {}", String::from_utf8_lossy(&r.stderr));
        }
        assert_same_tree(&self.watch, &to.join("w"))
    }
}

pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Compares two trees: same files, same bytes, same symlinks.
pub fn assert_same_tree(a: &Path, b: &Path) -> Result<usize> {
    let mut n = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(a.join(&rel))
            .with_context(|| format!("{}", a.join(&rel).display()))?
        {
            let e = e?;
            let r = rel.join(e.file_name());
            let ta = e.file_type()?;
            let pb = b.join(&r);
            let mb = std::fs::symlink_metadata(&pb)
                .with_context(|| format!("missing in restore: {}", r.display()))?;
            if ta.is_dir() {
                stack.push(r);
            } else if ta.is_symlink() {
                if !mb.file_type().is_symlink() {
                    bail!("{} should be a symlink", r.display());
                }
                if std::fs::read_link(e.path())? != std::fs::read_link(&pb)? {
                    bail!("{}: symlink target differs", r.display());
                }
                n += 1;
            } else if ta.is_file() {
                if std::fs::read(e.path())? != std::fs::read(&pb)? {
                    bail!("{}: content differs", r.display());
                }
                let ma = e.metadata()?;
                use std::os::unix::fs::MetadataExt;
                if ma.mode() & 0o7777 != mb.mode() & 0o7777 {
                    bail!("{}: mode {:o} vs {:o}", r.display(), ma.mode(), mb.mode());
                }
                if ma.mtime() != mb.mtime() || ma.mtime_nsec() != mb.mtime_nsec() {
                    bail!("{}: mtime differs", r.display());
                }
                n += 1;
            }
        }
    }
    Ok(n)
}

/// A small tmpfs mounted at a folder (made if missing), unmounted (lazily) when dropped.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"4m"`) at `at`; `None` (with the reason printed)
    /// when not permitted here.
    pub fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(at.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    pub fn unmount(&self) -> Result<()> {
        let o = Command::new("umount").arg(&self.0).output()?;
        if !o.status.success() {
            bail!("umount: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}
