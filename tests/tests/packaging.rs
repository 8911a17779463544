//! The files under `packaging/`: every example config parses with the real parser and
//! documents every key; the systemd units pass `systemd-analyze verify` (where it exists)
//! and carry the hardening and restart settings; the launchd plist is well-formed; the
//! cargo-deb metadata names files that exist or that `build-deb.sh` makes; the local demo
//! suggests short commands after an `export COFFER_CONFIG=...` line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn packaging() -> PathBuf {
    workspace().join("packaging")
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn files_with_ext(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == ext) {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// Keys assigned in a TOML file (top level and in tables), each with whether a comment
/// line sits right above at least one of its assignments.
fn documented_keys(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut all = BTreeSet::new();
    let mut documented = BTreeSet::new();
    let mut prev = "";
    for line in text.lines().map(str::trim) {
        if !line.starts_with('#') && !line.starts_with('[') {
            if let Some((k, _)) = line.split_once('=') {
                let k = k.trim().to_string();
                if prev.starts_with('#') {
                    documented.insert(k.clone());
                }
                all.insert(k);
            }
        }
        if !line.is_empty() {
            prev = line;
        }
    }
    (all, documented)
}

fn assert_every_key_documented(path: &Path, text: &str) {
    let (all, documented) = documented_keys(text);
    let missing: Vec<_> = all.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{}: keys without a comment above them: {missing:?}",
        path.display()
    );
}

#[test]
fn every_example_config_parses() -> Result<()> {
    let files = files_with_ext(&packaging(), "toml")?;
    ensure!(!files.is_empty(), "no example configs under packaging/");
    for path in files {
        let text = read(&path)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        match name {
            "agent.toml" => {
                let raw: coffer_agent::config::RawConfig =
                    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
                // The example shows every key, optional ones included.
                ensure!(
                    raw.name.is_some() && raw.state_dir.is_some() && raw.passphrase_file.is_some(),
                    "{name} should set name, state_dir and passphrase_file"
                );
                ensure!(
                    raw.watch
                        .iter()
                        .any(|w| w.name.is_some() && !w.exclude.is_empty()),
                    "{name} should show a [[watch]] with name and exclude"
                );
                let cfg = coffer_agent::config::Config::from_raw(&path, raw)?;
                ensure!(
                    cfg.watches.len() >= 2,
                    "{name}: expected two example watches"
                );
                ensure!(cfg.debounce.as_secs() == 2 && cfg.upload_concurrency == 2);
                // Same as the system unit's writable state directory.
                ensure!(cfg.state_dir == Path::new("/var/lib/coffer-agent"));
            }
            "receiver.toml" => {
                coffer_receiver::config::Config::parse(&text, &path.display().to_string())?;
            }
            other => {
                bail!("packaging/{other}: no parser for this example config; add one to this test")
            }
        }
        assert_every_key_documented(&path, &text);
    }
    Ok(())
}

/// `Key=value` lines of a unit (continuations are not used in ours).
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn units_are_hardened_and_restart_with_back_off() -> Result<()> {
    let units = files_with_ext(&packaging().join("systemd"), "service")?;
    let names: Vec<_> = units
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .collect();
    assert_eq!(
        names,
        [
            "coffer-agent-user.service",
            "coffer-agent.service",
            "coffer-receiver.service"
        ]
    );
    for path in &units {
        let unit = read(path)?;
        let name = path.display();
        for line in [
            "Type=notify",
            "NotifyAccess=main",
            "WatchdogSec=60",
            "Restart=on-failure",
            "StartLimitIntervalSec=10min",
            "StartLimitBurst=5",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallArchitectures=native",
            "UMask=0077",
        ] {
            assert!(unit.lines().any(|l| l == line), "{name}: missing {line}");
        }
        assert_eq!(unit_values(&unit, "RestartSec").len(), 1, "{name}");
        assert_eq!(unit_values(&unit, "ReadWritePaths").len(), 1, "{name}");
        let exec = unit_values(&unit, "ExecStart");
        assert_eq!(exec.len(), 1, "{name}");
        let is_agent = name.to_string().contains("coffer-agent");
        if is_agent {
            let config = exec[0]
                .strip_prefix("/usr/bin/coffer-agent run --config ")
                .unwrap_or("");
            assert!(
                config.starts_with('/') || config.starts_with("%h/"),
                "{name}: {exec:?}"
            );
            // The agent reads users' homes: nothing may hide them.
            assert!(unit_values(&unit, "ProtectHome").is_empty(), "{name}");
        } else {
            assert_eq!(
                exec[0],
                "/usr/bin/coffer-receiver serve --root /var/lib/coffer-receiver"
            );
            assert_eq!(unit_values(&unit, "ProtectHome"), ["yes"]);
            assert_eq!(unit_values(&unit, "CapabilityBoundingSet"), [""]);
            assert_eq!(unit_values(&unit, "User"), ["coffer-receiver"]);
        }
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

#[test]
fn units_pass_systemd_analyze_verify() -> Result<()> {
    if !on_path("systemd-analyze") {
        eprintln!("SKIP: systemd-analyze not available");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let runtime = tmp.path().join("runtime");
    std::fs::create_dir(&runtime)?;
    for path in files_with_ext(&packaging().join("systemd"), "service")? {
        let unit = read(&path)?;
        // verify wants ExecStart='s program to exist: point it at /bin/true.
        let unit: String = unit
            .lines()
            .map(|l| match l.strip_prefix("ExecStart=") {
                Some(rest) => {
                    let args = rest.split_once(' ').map(|(_, a)| a).unwrap_or("");
                    format!("ExecStart=/bin/true {args}\n")
                }
                None => format!("{l}\n"),
            })
            .collect();
        let file_name = path.file_name().context("unit name")?;
        let copy = tmp.path().join(file_name);
        std::fs::write(&copy, unit)?;
        let user = copy.to_string_lossy().ends_with("-user.service");
        let mut cmd = Command::new("systemd-analyze");
        if user {
            // A user manager needs a runtime dir; a private one is enough for verify.
            cmd.arg("--user").env("XDG_RUNTIME_DIR", &runtime);
        }
        // The man pages are built by build-deb.sh, not installed here.
        let out = cmd.args(["verify", "--man=no"]).arg(&copy).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // verify exits 0 on mere warnings (unknown keys, bad values): those fail here too.
        ensure!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {}: {}\n{stderr}",
            path.display(),
            out.status
        );
    }
    Ok(())
}

#[test]
fn launchd_plist_is_well_formed() -> Result<()> {
    let path = packaging().join("launchd/net.coffer.agent.plist");
    let text = read(&path)?;
    ensure!(text.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"));
    // XML forbids "--" inside comments; launchd would refuse the file.
    for c in text.split("<!--").skip(1) {
        let body = c.split("-->").next().unwrap_or("");
        ensure!(!body.contains("--"), "\"--\" inside an XML comment: {body}");
    }
    for needle in [
        "<key>Label</key>\n\t<string>net.coffer.agent</string>",
        "<string>run</string>\n\t\t<string>--config</string>",
        "<key>KeepAlive</key>",
        "<key>RunAtLoad</key>\n\t<true/>",
    ] {
        ensure!(
            text.contains(needle),
            "{}: missing {needle:?}",
            path.display()
        );
    }
    // Every element opened is closed (no attributes or entities in ours beyond <plist>).
    for tag in ["plist", "dict", "array", "key", "string", "integer"] {
        let open =
            text.matches(&format!("<{tag}>")).count() + text.matches(&format!("<{tag} ")).count();
        let close = text.matches(&format!("</{tag}>")).count();
        ensure!(open == close, "<{tag}>: {open} opened, {close} closed");
    }
    Ok(())
}

/// `(source, dest, mode)` of each cargo-deb asset.
fn assets(meta: &toml::Value) -> Result<Vec<(String, String, String)>> {
    let list = meta
        .get("assets")
        .and_then(|a| a.as_array())
        .context("no assets array")?;
    let mut out = Vec::new();
    for a in list {
        let field = |i: usize, k: &str| -> Result<String> {
            let v = match a {
                toml::Value::Array(v) => v.get(i),
                toml::Value::Table(t) => t.get(k),
                _ => None,
            };
            Ok(v.and_then(|v| v.as_str())
                .with_context(|| format!("asset {a} has no {k}"))?
                .to_string())
        };
        out.push((field(0, "source")?, field(1, "dest")?, field(2, "mode")?));
    }
    Ok(out)
}

#[test]
fn deb_metadata_names_files_that_exist() -> Result<()> {
    let ws = workspace();
    let readme = read(&packaging().join("debian/README.md"))?;
    let build_script = read(&packaging().join("build-deb.sh"))?;
    for (crate_dir, bin) in [("agent", "coffer-agent"), ("receiver", "coffer-receiver")] {
        let file = packaging().join(format!("debian/{crate_dir}-deb.toml"));
        let text = read(&file)?;
        ensure!(
            readme.contains(&text),
            "packaging/debian/README.md does not hold {} verbatim",
            file.display()
        );
        let doc: toml::Value =
            toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        let meta = doc
            .get("package")
            .and_then(|p| p.get("metadata"))
            .and_then(|m| m.get("deb"))
            .context("no [package.metadata.deb]")?;
        ensure!(meta.get("name").and_then(|n| n.as_str()) == Some(bin));
        ensure!(
            meta.get("maintainer").is_some(),
            "{bin}: cargo-deb needs a maintainer"
        );
        let base = ws.join(crate_dir);
        if let Some(dir) = meta.get("maintainer-scripts").and_then(|d| d.as_str()) {
            let postinst = base.join(dir).join("postinst");
            let script = read(&postinst)?;
            ensure!(script.starts_with("#!/bin/sh\n") && script.contains("#DEBHELPER#"));
            use std::os::unix::fs::PermissionsExt;
            ensure!(
                std::fs::metadata(&postinst)?.permissions().mode() & 0o111 != 0,
                "{} is not executable",
                postinst.display()
            );
        }
        let assets = assets(meta)?;
        for (src, dest, mode) in &assets {
            ensure!(
                u32::from_str_radix(mode, 8).is_ok_and(|m| m <= 0o7777),
                "{bin}: bad mode {mode:?} for {src}"
            );
            ensure!(
                !dest.starts_with('/'),
                "{bin}: dest {dest} should be relative"
            );
            if src.starts_with("target/release/") {
                ensure!(
                    src == &format!("target/release/{bin}"),
                    "{bin}: odd binary {src}"
                );
            } else if let Some(generated) = src.strip_prefix("../target/packaging/") {
                // Made by build-deb.sh: check the script writes this very name.
                let name = Path::new(generated)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .context("asset name")?;
                let pattern = name.replace(bin, "$bin");
                ensure!(
                    build_script.contains(&format!("/{pattern}\""))
                        || build_script.contains(&format!("/{pattern} ")),
                    "{bin}: build-deb.sh does not make {src}"
                );
            } else {
                let p = base.join(src);
                ensure!(p.is_file(), "{bin}: asset {} does not exist", p.display());
            }
        }
        let dests: Vec<&str> = assets.iter().map(|(_, d, _)| d.as_str()).collect();
        for want in [
            "usr/bin/".to_string(),
            format!("lib/systemd/system/{bin}.service"),
            format!("usr/share/doc/{bin}/examples/"),
            format!("usr/share/man/man1/{bin}.1"),
            format!("usr/share/bash-completion/completions/{bin}"),
            format!("usr/share/zsh/vendor-completions/_{bin}"),
            format!("usr/share/fish/vendor_completions.d/{bin}.fish"),
        ] {
            ensure!(
                dests.iter().any(|d| d.starts_with(&want)),
                "{bin}: no asset installed to {want}"
            );
        }
    }
    Ok(())
}

/// The demo's closing message, printed by the script's own lines (from where it quotes the
/// paths to the end of the message) for a demo folder and a binary folder with spaces: an
/// `export COFFER_CONFIG=...` line a shell reads back as the config's path, and agent
/// commands without `--config`.
#[test]
fn local_demo_suggests_short_commands_after_export_coffer_config() -> Result<()> {
    let path = packaging().join("local-demo.sh");
    let script = read(&path)?;
    let syntax = Command::new("bash").arg("-n").arg(&path).output()?;
    ensure!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let start = script
        .find("CONFIG_Q=")
        .context("CONFIG_Q= in local-demo.sh")?;
    let end = start
        + script[start..]
            .find("\nMSG\n")
            .context("the end of the message")?
        + "\nMSG\n".len();
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script[start..end])
        .env("DEMO", "/srv/my demo")
        .env("BIN", "/opt/coffer bin")
        .env("PORT", "7797")
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let export = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("export COFFER_CONFIG="))
        .with_context(|| format!("no export COFFER_CONFIG= line in:\n{text}"))?;
    let read_back = Command::new("bash")
        .arg("-c")
        .arg(format!("{export}; printf %s \"$COFFER_CONFIG\""))
        .output()?;
    assert_eq!(
        String::from_utf8(read_back.stdout)?,
        "/srv/my demo/agent.toml",
        "{export}"
    );
    assert!(
        text.contains("  export PATH=/opt/coffer\\ bin:$PATH\n"),
        "{text}"
    );
    let agent_lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("coffer-agent "))
        .collect();
    assert!(agent_lines.contains(&"coffer-agent status"), "{text}");
    assert!(agent_lines.len() >= 4, "{text}");
    for l in agent_lines {
        assert!(!l.contains("--config"), "{l}");
    }
    Ok(())
}
