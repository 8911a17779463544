//! `service install` and `service uninstall`: runs `coffer-receiver serve` as a systemd
//! system service pointing at this binary and backup root.
//!
//! [`install`] and [`uninstall`] first build a [`Report`]: the files to write (with their
//! full content), the files to remove and the commands to run, in order. With `dry_run`
//! that is all they do and the caller prints the report; otherwise they check for root and
//! a running systemd, carry out each step (the unit is written atomically) and return the
//! same report of what was done.
//!
//! The unit is `packaging/systemd/coffer-receiver.service` with its `ExecStart=`,
//! `ReadWritePaths=`, `User=`/`Group=` and state-directory lines rewritten, so a generated
//! unit and the packaged one never drift apart. The service runs as the owner of the root.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    #[error("finding this program's path: {0}")]
    CurrentExe(std::io::Error),
    #[error("binary {path}: {msg}")]
    Binary { path: PathBuf, msg: String },
    #[error("{path} is not a receiver root (no receiver.toml): run `coffer-receiver init --root {path}` first")]
    NotARoot { path: PathBuf },
    #[error("path {path:?} cannot go into a service file: {msg}")]
    BadPath { path: PathBuf, msg: &'static str },
    #[error("the receiver service is a systemd system service; on this system run `coffer-receiver serve --root DIR` under its own service manager")]
    Unsupported,
    #[error("installing or removing the receiver service needs root: run it with sudo")]
    NotRoot,
    #[error("systemd is not running on this system (no /run/systemd/system): use --dry-run to see the unit and install it by hand")]
    SystemdNotRunning,
    #[error("{program} not found: {hint}")]
    CommandNotFound { program: String, hint: &'static str },
    #[error("running `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}){stderr}{done}")]
    CommandFailed {
        command: String,
        status: String,
        /// ": <stderr>" or empty.
        stderr: String,
        /// " (already done: ...)" or empty.
        done: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A file a service install writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWrite {
    pub path: PathBuf,
    pub content: String,
}

/// A command a service install runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCommand {
    pub program: String,
    pub args: Vec<String>,
}

/// One step of an install or uninstall, in the order they are (or would be) carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Write(FileWrite),
    Remove(PathBuf),
    Run(ServiceCommand),
}

/// What an install or uninstall did, or with `dry_run` would do.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub dry_run: bool,
    pub actions: Vec<Action>,
    /// Things the user should know (printed after the actions).
    pub notes: Vec<String>,
}

impl Report {
    /// The files written, in order.
    pub fn files(&self) -> impl Iterator<Item = &FileWrite> {
        self.actions.iter().filter_map(|a| match a {
            Action::Write(f) => Some(f),
            _ => None,
        })
    }

    /// The files removed, in order.
    pub fn removed(&self) -> impl Iterator<Item = &Path> {
        self.actions.iter().filter_map(|a| match a {
            Action::Remove(p) => Some(p.as_path()),
            _ => None,
        })
    }

    /// The commands run, in order.
    pub fn commands(&self) -> impl Iterator<Item = &ServiceCommand> {
        self.actions.iter().filter_map(|a| match a {
            Action::Run(c) => Some(c),
            _ => None,
        })
    }
}

impl fmt::Display for ServiceCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shell_quote(&self.program))?;
        for a in &self.args {
            write!(f, " {}", shell_quote(a))?;
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (write, remove, run) = if self.dry_run {
            ("would write", "would remove", "would run")
        } else {
            ("wrote", "removed", "ran")
        };
        for a in &self.actions {
            match a {
                Action::Write(w) if self.dry_run => {
                    writeln!(f, "{write} {}:", w.path.display())?;
                    f.write_str(&w.content)?;
                    if !w.content.ends_with('\n') {
                        writeln!(f)?;
                    }
                    writeln!(f)?;
                }
                Action::Write(w) => writeln!(f, "{write} {}", w.path.display())?,
                Action::Remove(p) => writeln!(f, "{remove} {}", p.display())?,
                Action::Run(c) => writeln!(f, "{run}: {c}")?,
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
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
        let m = std::fs::metadata(path).map_err(|source| ServiceError::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })?;
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
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(ServiceError::CurrentExe)?,
    };
    let binary = check_binary(&binary)?;
    let root = std::path::absolute(&opts.root).map_err(|source| ServiceError::Io {
        what: "resolving",
        path: opts.root.clone(),
        source,
    })?;
    if !root.join("receiver.toml").is_file() {
        return Err(ServiceError::NotARoot { path: root });
    }
    let owner = Owner::of(&root)?;
    let report = plan_install(opts.dry_run, &binary, &root, &owner)?;
    if opts.dry_run {
        return Ok(report);
    }
    preflight(&report)?;
    execute(report)
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
    preflight(&report)?;
    execute(report)
}

fn plan_install(
    dry_run: bool,
    binary: &Path,
    root: &Path,
    owner: &Owner,
) -> Result<Report, ServiceError> {
    let content = systemd_unit(binary, root, owner)?;
    let mut report = Report {
        dry_run,
        ..Report::default()
    };
    report.actions.push(Action::Write(FileWrite {
        path: UNIT_PATH.into(),
        content,
    }));
    report.actions.push(systemctl(&["daemon-reload"]));
    report.actions.push(systemctl(&["enable", UNIT_NAME]));
    // Restart, not `start`: a reinstall must apply the new unit to a running receiver.
    // It returns once the receiver listens (READY=1), or fails if it cannot start.
    report.actions.push(systemctl(&["restart", UNIT_NAME]));
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
    let b = binary.to_string_lossy();
    if b.contains("/target/debug/") || b.contains("/target/release/") {
        report.notes.push(format!(
            "the service runs {b} from a build directory; a rebuild or `cargo clean` changes it under the running service (install it first: `cargo install --path receiver` or the .deb)"
        ));
    }
    Ok(report)
}

fn plan_uninstall(dry_run: bool, unit: &Path) -> Report {
    let mut report = Report {
        dry_run,
        ..Report::default()
    };
    if !unit.exists() {
        report.notes.push(format!(
            "nothing to uninstall: {} does not exist",
            unit.display()
        ));
        return report;
    }
    report
        .actions
        .push(systemctl(&["disable", "--now", UNIT_NAME]));
    report.actions.push(Action::Remove(unit.to_path_buf()));
    report.actions.push(systemctl(&["daemon-reload"]));
    report
        .notes
        .push("the backup root and everything in it stay where they are".into());
    report
}

fn systemctl(args: &[&str]) -> Action {
    Action::Run(ServiceCommand {
        program: "systemctl".into(),
        args: args.iter().map(|s| s.to_string()).collect(),
    })
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

/// How [`edit_unit`] changes a `Key=` line.
#[derive(Debug, Clone)]
enum Edit {
    Set(String),
    Remove,
    Keep,
}

/// Replaces the template's leading comment block with `header` and applies `edits` to the
/// `Key=value` lines they name.
fn edit_unit(template: &str, header: &str, edits: &[(&str, Edit)]) -> String {
    let mut out = String::from(header);
    let mut lines = template.lines().peekable();
    while lines.peek().is_some_and(|l| l.starts_with('#')) {
        lines.next();
    }
    for line in lines {
        let key = line.split_once('=').map(|(k, _)| k.trim());
        match edits
            .iter()
            .find(|(k, _)| Some(*k) == key && !line.starts_with('#'))
        {
            Some((k, Edit::Set(v))) => {
                out.push_str(k);
                out.push('=');
                out.push_str(v);
            }
            Some((_, Edit::Remove)) => continue,
            Some((_, Edit::Keep)) | None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A path as one word of a unit setting: specifiers (`%`) escaped, and for command lines
/// `$` too; quoted when it holds spaces, quotes or backslashes.
fn unit_word(path: &Path, exec: bool) -> Result<String, ServiceError> {
    let s = path.to_str().ok_or_else(|| ServiceError::BadPath {
        path: path.to_path_buf(),
        msg: "it is not valid UTF-8",
    })?;
    if s.chars().any(char::is_control) {
        return Err(ServiceError::BadPath {
            path: path.to_path_buf(),
            msg: "it holds control characters",
        });
    }
    if !path.is_absolute() {
        return Err(ServiceError::BadPath {
            path: path.to_path_buf(),
            msg: "it is not absolute",
        });
    }
    let mut w = s.replace('%', "%%");
    if exec {
        w = w.replace('$', "$$");
    }
    if w.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';')) {
        w = format!("\"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
    }
    Ok(w)
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn check_binary(binary: &Path) -> Result<PathBuf, ServiceError> {
    let abs = std::path::absolute(binary).map_err(|e| ServiceError::Binary {
        path: binary.to_path_buf(),
        msg: e.to_string(),
    })?;
    match std::fs::metadata(&abs) {
        Ok(m) if m.is_file() => Ok(abs),
        Ok(_) => Err(ServiceError::Binary {
            path: abs,
            msg: "not a file".into(),
        }),
        Err(e) => Err(ServiceError::Binary {
            path: abs,
            msg: e.to_string(),
        }),
    }
}

/// Checks before changing anything: root, a running systemd, systemctl on PATH.
fn preflight(report: &Report) -> Result<(), ServiceError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(ServiceError::NotRoot);
    }
    if !Path::new("/run/systemd/system").is_dir() {
        return Err(ServiceError::SystemdNotRunning);
    }
    for c in report.commands() {
        if find_on_path(&c.program).is_none() {
            return Err(ServiceError::CommandNotFound {
                program: c.program.clone(),
                hint: SYSTEMCTL_HINT,
            });
        }
    }
    Ok(())
}

const SYSTEMCTL_HINT: &str =
    "this system does not use systemd; use --dry-run to see the unit and install it by hand";

fn find_on_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Carries out the report's actions in order; stops at the first failure, naming it and
/// what was already done.
fn execute(report: Report) -> Result<Report, ServiceError> {
    let mut done: Vec<String> = Vec::new();
    for a in &report.actions {
        match a {
            Action::Write(w) => {
                write_atomic(&w.path, w.content.as_bytes(), 0o644)?;
                done.push(format!("wrote {}", w.path.display()));
            }
            Action::Remove(p) => {
                match std::fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(ServiceError::Io {
                            what: "removing",
                            path: p.clone(),
                            source,
                        })
                    }
                }
                done.push(format!("removed {}", p.display()));
            }
            Action::Run(c) => {
                run(c, &done)?;
                done.push(format!("ran `{c}`"));
            }
        }
    }
    Ok(Report {
        dry_run: false,
        ..report
    })
}

fn run(c: &ServiceCommand, done: &[String]) -> Result<(), ServiceError> {
    let out = match Command::new(&c.program).args(&c.args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ServiceError::CommandNotFound {
                program: c.program.clone(),
                hint: SYSTEMCTL_HINT,
            })
        }
        Err(source) => {
            return Err(ServiceError::Spawn {
                command: c.to_string(),
                source,
            })
        }
    };
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(ServiceError::CommandFailed {
        command: c.to_string(),
        status: out.status.to_string(),
        stderr: if err.is_empty() {
            String::new()
        } else {
            format!(": {err}")
        },
        done: if done.is_empty() {
            String::new()
        } else {
            format!(" (already done: {})", done.join("; "))
        },
    })
}

/// Writes `path` as temp file + fsync + rename + fsync(dir), creating its folder.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), ServiceError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |what: &'static str, p: &Path| {
        let path = p.to_path_buf();
        move |source| ServiceError::Io { what, path, source }
    };
    let dir = path.parent().ok_or_else(|| ServiceError::BadPath {
        path: path.to_path_buf(),
        msg: "it has no parent folder",
    })?;
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        f.write_all(data).map_err(io("writing", &tmp))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io("setting permissions of", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
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
        let body = |s: &str| -> String {
            s.lines()
                .skip_while(|l| l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        };
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
        write_atomic(&unit, b"[Unit]\n", 0o644).expect("write");
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

    #[test]
    fn failing_command_is_named() {
        let c = ServiceCommand {
            program: "sh".into(),
            args: vec!["-c".into(), "echo boom >&2; exit 4".into()],
        };
        let e = run(&c, &["wrote /x".into()]).expect_err("fails");
        let s = e.to_string();
        assert!(
            s.contains("`sh -c 'echo boom >&2; exit 4'` failed")
                && s.contains(": boom")
                && s.contains("already done: wrote /x"),
            "{s}"
        );
    }

    /// `systemd-analyze verify` on a generated unit, where systemd-analyze exists.
    #[test]
    fn generated_unit_passes_systemd_analyze() {
        if find_on_path("systemd-analyze").is_none() {
            eprintln!("SKIP: systemd-analyze not available");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for o in [owner("coffer-receiver"), ROOT_OWNED] {
            // verify wants ExecStart= to exist and be executable.
            let unit =
                systemd_unit(Path::new("/bin/true"), &dir.path().join("root 1"), &o).expect("unit");
            let path = dir.path().join(UNIT_NAME);
            std::fs::write(&path, unit).expect("write unit");
            let out = Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(&path)
                .output()
                .expect("run systemd-analyze");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "{o:?}: {}\n{stderr}",
                out.status
            );
        }
    }
}
