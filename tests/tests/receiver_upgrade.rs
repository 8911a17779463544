//! The upgrade: a repository written by the release before commit records (the fixture in
//! `tests/fixtures/upgrade-6e2e1f5`) is read by `status` without being written, is upgraded
//! when `serve` first opens it (every version gets its commit record, once), and restores
//! byte-exact, at its latest state and at an earlier one.

#[allow(unused_imports)] // `data` is not needed here
mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use coffer_receiver::records::CommitRecord;
use coffer_receiver::store::{scan, Found, LocalPacks, PackStore, PACK_HEADER_LEN};
use support::*;

/// Where the fixture's paths pointed when it was made.
const MADE_AT: &str = "/tmp/cb/fx";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/upgrade-6e2e1f5")
}

/// Copies the tree `from` into `to` (files, folders, symlinks).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            copy_tree(&src, &dst)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// Every file and symlink under `dir`, by relative path: its bytes, or `-> target`.
fn tree(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel))
            .with_context(|| format!("listing {}", dir.join(&rel).display()))?
        {
            let e = e?;
            let r = rel.join(e.file_name());
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(r);
            } else if t.is_symlink() {
                let target = std::fs::read_link(e.path())?;
                out.insert(r, format!("-> {}", target.display()).into_bytes());
            } else {
                out.insert(r, std::fs::read(e.path())?);
            }
        }
    }
    Ok(out)
}

/// The version numbers of the intact commit records in repository `r`'s packs, in order.
fn record_versions(root: &Path) -> Result<Vec<u64>> {
    let name = coffer_receiver::RepoName::new("r")?;
    let packs = LocalPacks::new(coffer_receiver::Layout::new(root).repo(&name).packs());
    let mut out = Vec::new();
    for p in packs.list()? {
        let len = packs.len(p)?;
        scan::<anyhow::Error>(&packs, p, PACK_HEADER_LEN, len, |f| {
            if let Found::Commit { header, body, .. } = f {
                out.push(CommitRecord::decode(&header, body)?.version);
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// Versions of the index without a record location.
fn unrecorded(root: &Path) -> Result<i64> {
    let c = rusqlite::Connection::open(root.join("repos/r/index.sqlite"))?;
    Ok(c.query_row(
        "SELECT COUNT(*) FROM versions WHERE record_pack IS NULL",
        [],
        |r| r.get(0),
    )?)
}

/// Restores everything (at `at`, if given) into a new folder under `tmp`, and checks it
/// holds exactly the fixture's `expected/<want>`.
fn restore_matches(agent: &Agent, tmp: &Path, at: Option<&str>, want: &str) -> Result<()> {
    let to = tmp.join(format!("restored-{want}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&to);
    let extra: Vec<&str> = at.map(|a| vec!["--at", a]).unwrap_or_default();
    let o = agent.restore(&to, &extra)?;
    if !o.status.success() {
        bail!("restore {want}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let expected = tree(&fixture().join("expected").join(want))?;
    let got = tree(&to.join("w"))?;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "files restored ({want})"
    );
    for (path, bytes) in &expected {
        assert!(got[path] == *bytes, "{} differs ({want})", path.display());
    }
    std::fs::remove_dir_all(&to)?;
    Ok(())
}

#[test]
fn a_repository_of_the_previous_release_is_upgraded_once_and_restores_byte_exact() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let base = tmp.path().join("fx");
    copy_tree(&fixture(), &base)?;
    for secret in [
        "receiver/keys/receiver.key",
        "agent/state/agent.key",
        "agent/state/keyfile",
    ] {
        std::fs::set_permissions(base.join(secret), std::fs::Permissions::from_mode(0o600))?;
    }
    for d in ["receiver", "receiver/keys", "agent/state"] {
        std::fs::set_permissions(base.join(d), std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::create_dir_all(base.join("agent/w"))?;
    let root = base.join("receiver");
    let pack = root.join("repos/r/packs/00000001.pack");
    let pack_before = std::fs::read(&pack)?;
    let mut rcv = Receiver {
        root: root.clone(),
        key: String::new(),
        addr: "127.0.0.1:0".into(),
        proc: Proc(None),
    };

    // `status` only reads: the old index is counted, nothing is written.
    let s = rcv.status()?;
    let repo = &s["repositories"][0];
    assert_eq!(
        (repo["name"].as_str(), repo["versions"].as_u64()),
        (Some("r"), Some(9))
    );
    assert_eq!(std::fs::read(&pack)?, pack_before);
    assert_eq!(
        std::fs::read_dir(root.join("repos/r/packs"))?.count(),
        1,
        "no pack written by status"
    );

    rcv.serve()?;
    let config = base.join("agent/agent.toml");
    let text = std::fs::read_to_string(&config)?.replace(MADE_AT, &base.display().to_string());
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("receiver = ") {
                format!("receiver = \"{}\"", rcv.addr)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&config, text + "\n")?;
    let agent = Agent {
        dir: base.join("agent"),
        config,
        watch: base.join("agent/w"),
        key: String::new(),
        proc: Proc(None),
    };

    // The first session opens the repository: the upgrade writes every version out.
    restore_matches(&agent, tmp.path(), None, "latest")?;
    assert_eq!(record_versions(&root)?, (1..=9).collect::<Vec<u64>>());
    assert_eq!(unrecorded(&root)?, 0);
    assert!(
        rcv_log(&rcv).contains("upgraded: 9 versions written out as commit records"),
        "{}",
        rcv_log(&rcv)
    );
    assert_eq!(
        std::fs::read(&pack)?,
        pack_before,
        "the old pack is not appended to"
    );
    let first_at = std::fs::read_to_string(fixture().join("first_at"))?;
    restore_matches(&agent, tmp.path(), Some(first_at.trim()), "first")?;

    // A second open finds nothing to do.
    rcv.proc.kill9();
    rcv.serve()?;
    restore_matches(&agent, tmp.path(), None, "latest")?;
    assert_eq!(record_versions(&root)?, (1..=9).collect::<Vec<u64>>());
    assert_eq!(rcv_log(&rcv).matches("upgraded:").count(), 1);
    Ok(())
}

fn rcv_log(r: &Receiver) -> String {
    std::fs::read_to_string(r.root.with_extension("serve.log")).unwrap_or_default()
}
