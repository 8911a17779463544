//! `service install` and `service uninstall`: runs `coffer-receiver serve` as a systemd
//! system service pointing at this binary and backup root.
//!
//! [`install`] and [`uninstall`] first build a [`Report`]: the files to write (with their
//! full content), the files to remove and the commands to run, in order. With `dry_run`
//! that is all they do and the caller prints the report; otherwise they check for root and
//! a running systemd, carry out each step (the unit is written atomically) and return the
//! same report of what was done. That machinery is `coffer_common::host::service`'s, shared
//! with the agent; this file holds what is the receiver's own: its unit, and the account
//! it runs as.
//!
//! The unit is `packaging/systemd/coffer-receiver.service` with its `ExecStart=`,
//! `ReadWritePaths=`, `User=`/`Group=` and state-directory lines rewritten, so a generated
//! unit and the packaged one never drift apart. The service runs as the owner of the root.

use std::path::{Path, PathBuf};

use coffer_common::host::service::{
    self as engine, build_dir_note, edit_unit, nothing_to_uninstall, systemctl, unit_word, Edit,
    EngineError,
};
pub use coffer_common::host::service::{Action, FileWrite, Report, ServiceCommand};

/// The systemd unit's name.
pub const UNIT_NAME: &str = "coffer-receiver.service";
/// Where the unit is installed.
pub const UNIT_PATH: &str = "/etc/systemd/system/coffer-receiver.service";

const UNIT_TEMPLATE: &str = include_str!("../../packaging/systemd/coffer-receiver.service");
/// The packaged unit's root (`StateDirectory=coffer-receiver`).
const PACKAGED_ROOT: &str = "/var/lib/coffer-receiver";

/// What `service install` should do.
#[derive(Debug, Clone)]
pub struct InstallOpts {
    /// Only report what would be written and run.
    pub dry_run: bool,
    /// The backup root (`serve --root`); it must have been made by `init`.
    pub root: PathBuf,
    /// The binary the service runs; `None` means this program (`std::env::current_exe`).
    pub binary: Option<PathBuf>,
}

/// What `service uninstall` should do.
#[derive(Debug, Clone)]
pub struct UninstallOpts {
    /// Only report what would be removed and run.
    pub dry_run: bool,
}

/// Errors of `service install` / `uninstall`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{path} is not a receiver root (no receiver.toml): run `coffer-receiver init --root {path}` first")]
    NotARoot { path: PathBuf },
    #[error("the receiver service is a systemd system service; on this system run `coffer-receiver serve --root DIR` under its own service manager")]
    Unsupported,
    #[error("installing or removing the receiver service needs root: run it with sudo")]
    NotRoot,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The account the service runs as: the owner of the root. `None` is root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    user: Option<String>,
    group: Option<String>,
}

impl Owner {
    fn of(path: &Path) -> Result<Self, ServiceError> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).map_err(EngineError::io("reading", path))?;
        let user = (m.uid() != 0).then(|| {
            nix::unistd::User::from_uid(m.uid().into())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| m.uid().to_string())
        });
        let group = (m.gid() != 0).then(|| {
            nix::unistd::Group::from_gid(m.gid().into())
                .ok()
                .flatten()
                .map(|g| g.name)
                .unwrap_or_else(|| m.gid().to_string())
        });
        Ok(Owner { user, group })
    }
}

/// `service install`: writes the unit for this binary and root, enables and (re)starts it.
/// With `dry_run`, only returns what it would do.
pub fn install(opts: &InstallOpts) -> Result<Report, ServiceError> {
    if cfg!(target_os = "macos") {
        return Err(ServiceError::Unsupported);
    }
    let binary = engine::service_binary(opts.binary.as_deref())?;
    let root = std::path::absolute(&opts.root).map_err(EngineError::io("resolving", &opts.root))?;
    if !root.join("receiver.toml").is_file() {
        return Err(ServiceError::NotARoot { path: root });
    }
    let owner = Owner::of(&root)?;
    let report = plan_install(opts.dry_run, &binary, &root, &owner)?;
    if opts.dry_run {
        return Ok(report);
    }
    apply(report)
}

/// `service uninstall`: stops and disables the service and removes its unit. Nothing
/// installed is not an error: the report says so.
pub fn uninstall(opts: &UninstallOpts) -> Result<Report, ServiceError> {
    if cfg!(target_os = "macos") {
        return Err(ServiceError::Unsupported);
    }
    let report = plan_uninstall(opts.dry_run, Path::new(UNIT_PATH));
    if opts.dry_run || report.actions.is_empty() {
        return Ok(report);
    }
    apply(report)
}

/// Carries out a plan after checking for root, a running systemd and systemctl.
fn apply(report: Report) -> Result<Report, ServiceError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(ServiceError::NotRoot);
    }
    engine::preflight(&report, true)?;
    Ok(engine::execute(report)?)
}

fn plan_install(
    dry_run: bool,
    binary: &Path,
    root: &Path,
    owner: &Owner,
) -> Result<Report, ServiceError> {
    let content = systemd_unit(binary, root, owner)?;
    let mut report = Report::new(dry_run);
    report.actions.push(Action::Write(FileWrite {
        path: UNIT_PATH.into(),
        content,
    }));
    report.actions.push(systemctl(false, &["daemon-reload"]));
    report
        .actions
        .push(systemctl(false, &["enable", UNIT_NAME]));
    // Restart, not `start`: a reinstall must apply the new unit to a running receiver.
    // It returns once the receiver listens (READY=1), or fails if it cannot start.
    report
        .actions
        .push(systemctl(false, &["restart", UNIT_NAME]));
    match &owner.user {
        Some(u) => report.notes.push(format!(
            "the receiver runs as {u}, the owner of {}; run admin commands (authorize, revoke) as {u} too, so that the files they write stay readable",
            root.display()
        )),
        None => report.notes.push(format!(
            "the receiver runs as root without capabilities, because root owns {}; for a dedicated account: `useradd --system coffer-receiver`, `chown -R coffer-receiver: {}`, then install again",
            root.display(),
            root.display()
        )),
    }
    report.notes.push(format!(
        "`systemctl status {UNIT_NAME}` shows whether it runs, `journalctl -u {UNIT_NAME}` its log"
    ));
    report.notes.extend(build_dir_note(binary, "receiver"));
    Ok(report)
}

fn plan_uninstall(dry_run: bool, unit: &Path) -> Report {
    if let Some(nothing) = nothing_to_uninstall(dry_run, unit) {
        return nothing;
    }
    let mut report = Report::new(dry_run);
    report
        .actions
        .push(systemctl(false, &["disable", "--now", UNIT_NAME]));
    report.actions.push(Action::Remove(unit.to_path_buf()));
    report.actions.push(systemctl(false, &["daemon-reload"]));
    report
        .notes
        .push("the backup root and everything in it stay where they are".into());
    report
}

/// The unit running `binary serve --root root` as `owner`, with `root` writable.
fn systemd_unit(binary: &Path, root: &Path, owner: &Owner) -> Result<String, ServiceError> {
    let exec = format!(
        "{} serve --root {}",
        unit_word(binary, true)?,
        unit_word(root, true)?
    );
    let packaged_root = root == Path::new(PACKAGED_ROOT);
    let keep_if = |keep: bool| if keep { Edit::Keep } else { Edit::Remove };
    let account = |name: &Option<String>| match name {
        Some(n) => Edit::Set(n.clone()),
        None => Edit::Remove,
    };
    // ProtectHome=yes would hide a root under a home; read-only keeps it reachable (and
    // ReadWritePaths= makes it writable again).
    let under_home = ["/home", "/root", "/run/user"]
        .iter()
        .any(|h| root.starts_with(h));
    let protect_home = if under_home {
        Edit::Set("read-only".into())
    } else {
        Edit::Keep
    };
    let header = format!(
        "# Coffer receiver, written by `coffer-receiver service install --root {}`.\n\
         # Run that again after moving the binary or the root; put local changes in a drop-in\n\
         # (`systemctl edit {UNIT_NAME}`), which a reinstall keeps.\n",
        root.display()
    );
    Ok(edit_unit(
        UNIT_TEMPLATE,
        &header,
        &[
            ("ExecStart", Edit::Set(exec)),
            ("ReadWritePaths", Edit::Set(unit_word(root, false)?)),
            ("StateDirectory", keep_if(packaged_root)),
            ("StateDirectoryMode", keep_if(packaged_root)),
            ("User", account(&owner.user)),
            ("Group", account(&owner.group)),
            ("ProtectHome", protect_home),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .collect()
    }

    fn owner(user: &str) -> Owner {
        Owner {
            user: Some(user.into()),
            group: Some(user.into()),
        }
    }

    const ROOT_OWNED: Owner = Owner {
        user: None,
        group: None,
    };

    #[test]
    fn unit_serves_this_root_with_this_binary() {
        let r = plan_install(
            true,
            Path::new("/opt/coffer/coffer-receiver"),
            Path::new("/srv/backup"),
            &owner("backup"),
        )
        .expect("plan");
        let f = r.files().next().expect("unit");
        assert_eq!(f.path, Path::new(UNIT_PATH));
        let unit = &f.content;
        assert_eq!(
            line(unit, "ExecStart"),
            ["/opt/coffer/coffer-receiver serve --root /srv/backup"]
        );
        assert_eq!(line(unit, "ReadWritePaths"), ["/srv/backup"]);
        assert_eq!(line(unit, "User"), ["backup"]);
        assert_eq!(line(unit, "Group"), ["backup"]);
        assert!(line(unit, "StateDirectory").is_empty(), "{unit}");
        assert_eq!(line(unit, "ProtectHome"), ["yes"]);
        for l in [
            "Type=notify",
            "WatchdogSec=60",
            "NotifyAccess=main",
            "Restart=on-failure",
            "RestartSec=10s",
            "StartLimitBurst=5",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallArchitectures=native",
            "WantedBy=multi-user.target",
        ] {
            assert!(unit.lines().any(|x| x == l), "missing {l} in:\n{unit}");
        }
        assert!(unit.starts_with("# Coffer receiver, written by"), "{unit}");
        let cmds: Vec<String> = r.commands().map(|c| c.to_string()).collect();
        assert_eq!(
            cmds,
            [
                "systemctl daemon-reload",
                "systemctl enable coffer-receiver.service",
                "systemctl restart coffer-receiver.service",
            ]
        );
        let shown = r.to_string();
        assert!(
            shown.starts_with(
                "would write /etc/systemd/system/coffer-receiver.service:\n# Coffer receiver"
            ),
            "{shown}"
        );
        assert!(
            shown.contains("note: the receiver runs as backup"),
            "{shown}"
        );
    }

    #[test]
    fn root_owned_root_runs_as_root_without_capabilities() {
        let unit = systemd_unit(
            Path::new("/usr/bin/coffer-receiver"),
            Path::new("/home/ops/backups"),
            &ROOT_OWNED,
        )
        .expect("unit");
        assert!(line(&unit, "User").is_empty() && line(&unit, "Group").is_empty());
        assert_eq!(line(&unit, "CapabilityBoundingSet"), [""]);
        // A root under /home stays reachable; ReadWritePaths= makes it writable.
        assert_eq!(line(&unit, "ProtectHome"), ["read-only"]);
    }

    #[test]
    fn packaged_root_gives_the_packaged_unit() {
        let unit = systemd_unit(
            Path::new("/usr/bin/coffer-receiver"),
            Path::new(PACKAGED_ROOT),
            &owner("coffer-receiver"),
        )
        .expect("unit");
        let body = |s| engine::unit_body(s).collect::<Vec<_>>();
        assert_eq!(body(&unit), body(UNIT_TEMPLATE));
    }

    #[test]
    fn odd_paths_are_quoted_and_escaped() {
        let unit = systemd_unit(
            Path::new("/opt/my bin/coffer-receiver"),
            Path::new("/srv/100% $backup"),
            &ROOT_OWNED,
        )
        .expect("unit");
        assert_eq!(
            line(&unit, "ExecStart"),
            [r#""/opt/my bin/coffer-receiver" serve --root "/srv/100%% $$backup""#]
        );
        assert_eq!(line(&unit, "ReadWritePaths"), [r#""/srv/100%% $backup""#]);
        let e = systemd_unit(Path::new("/bin/x"), Path::new("relative"), &ROOT_OWNED)
            .expect_err("relative");
        assert!(e.to_string().contains("not absolute"), "{e}");
    }

    #[test]
    fn uninstall_plans_and_nothing_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = dir.path().join(UNIT_NAME);
        let r = plan_uninstall(true, &unit);
        assert!(r.actions.is_empty());
        assert!(r.notes[0].contains("nothing to uninstall"));
        engine::write_atomic(&unit, b"[Unit]\n", 0o644).expect("write");
        assert_eq!(std::fs::read(&unit).expect("read"), b"[Unit]\n");
        let r = plan_uninstall(true, &unit);
        assert_eq!(r.removed().collect::<Vec<_>>(), [unit.as_path()]);
        let cmds: Vec<String> = r.commands().map(|c| c.to_string()).collect();
        assert_eq!(
            cmds,
            [
                "systemctl disable --now coffer-receiver.service",
                "systemctl daemon-reload"
            ]
        );
        assert!(r.to_string().contains("would remove "));
    }

    #[test]
    fn install_checks_the_root_and_reads_its_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = InstallOpts {
            dry_run: true,
            root: dir.path().to_path_buf(),
            binary: Some("/bin/sh".into()),
        };
        let e = install(&opts).expect_err("not initialized");
        assert!(e.to_string().contains("coffer-receiver init --root"), "{e}");
        std::fs::write(dir.path().join("receiver.toml"), "").expect("write");
        let r = install(&opts).expect("dry run");
        let unit = &r.files().next().expect("unit").content;
        let me = nix::unistd::geteuid();
        assert_eq!(line(unit, "User").is_empty(), me.is_root(), "{unit}");
        assert!(r.to_string().contains("would run: systemctl restart"));
    }

    /// `systemd-analyze verify` on a generated unit, where systemd-analyze exists.
    #[test]
    fn generated_unit_passes_systemd_analyze() {
        let dir = tempfile::tempdir().expect("tempdir");
        for o in [owner("coffer-receiver"), ROOT_OWNED] {
            // verify wants ExecStart= to exist and be executable.
            let unit =
                systemd_unit(Path::new("/bin/true"), &dir.path().join("root 1"), &o).expect("unit");
            let path = dir.path().join(UNIT_NAME);
            std::fs::write(&path, unit).expect("write unit");
            match engine::systemd_analyze_verify(&path, None) {
                None => return eprintln!("SKIP: systemd-analyze not available"),
                Some(verdict) => verdict.unwrap_or_else(|e| panic!("{o:?}: {e}")),
            }
        }
    }
}
