//! The engine behind `service install` and `service uninstall`, written once for both
//! binaries.
//!
//! An install or uninstall is first planned as a [`Report`]: the files to write (with their
//! full content), the files to remove and the commands to run, in order. With `--dry-run`
//! the report is printed as it stands ("would write", "would run"); otherwise the caller
//! checks what it must ([`preflight`]: nothing the service needs out of its reach, a running
//! systemd, every command on `PATH`) and
//! [`execute`] carries the steps out (files written atomically), stops at the first failure
//! naming what was already done, and returns the report of what was done.
//!
//! A systemd unit is a packaged template with some `Key=` lines rewritten ([`edit_unit`]),
//! each path one escaped word ([`unit_word`]). [`Sandbox`] reads back from a unit's text
//! which paths its service could see and write, for the checks before an install.
//!
//! This module knows no unit name, template or config: what a service runs, where its file
//! goes and what the user is told belong to each binary's `service` module.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::fs::{self, IoError};

/// Errors of planning or carrying out an install or uninstall.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("finding this program's path: {0}")]
    CurrentExe(io::Error),
    #[error("binary {path}: {msg}")]
    Binary { path: PathBuf, msg: String },
    #[error("path {path:?} cannot go into a service file: {msg}")]
    BadPath { path: PathBuf, msg: &'static str },
    #[error("the service could not start, so nothing was installed:\n  - {}", .0.join("\n  - "))]
    Unreachable(Vec<String>),
    #[error("systemd is not running on this system (no /run/systemd/system): use --dry-run to see the unit and install it by hand")]
    SystemdNotRunning,
    #[error("{program} not found: {hint}")]
    CommandNotFound { program: String, hint: &'static str },
    #[error("running `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed ({status}){stderr}{done}")]
    CommandFailed {
        command: String,
        status: String,
        /// `": <stderr>"` or empty.
        stderr: String,
        /// " (already done: ...)" or empty.
        done: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl EngineError {
    /// Wraps an `io::Error` with what was being done to `path`.
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| EngineError::Io { what, path, source }
    }
}

/// An [`IoError`] keeps its operation and path, and the system's message as it has always
/// been printed here.
impl From<IoError> for EngineError {
    fn from(e: IoError) -> Self {
        EngineError::Io {
            what: e.what,
            path: e.path,
            source: e.source,
        }
    }
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
    /// A failure is expected in normal use (e.g. unloading a job that is not loaded) and
    /// ignored.
    pub may_fail: bool,
}

/// One step of an install or uninstall, in the order they are (or would be) carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Write(FileWrite),
    Remove(PathBuf),
    Run(ServiceCommand),
}

impl Action {
    /// Running `program` with `args`; a failure stops the rest unless `may_fail`.
    pub fn run(program: &str, args: &[&str], may_fail: bool) -> Self {
        Action::Run(ServiceCommand {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            may_fail,
        })
    }
}

/// `systemctl args`, or `systemctl --user args` for the user's service manager.
pub fn systemctl(user: bool, args: &[&str]) -> Action {
    let mut all = Vec::new();
    if user {
        all.push("--user");
    }
    all.extend_from_slice(args);
    Action::run("systemctl", &all, false)
}

/// What an install or uninstall did, or with `dry_run` would do.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub dry_run: bool,
    pub actions: Vec<Action>,
    /// Things the user should know (printed after the actions).
    pub notes: Vec<String>,
    /// What may keep the service from working well, with the fix: not part of the printed
    /// report (the caller prints them on stderr).
    pub warnings: Vec<String>,
    /// What would keep the service from starting, with the fix: [`preflight`] refuses the
    /// install; a dry run shows them (on stderr, as the warnings).
    pub refusals: Vec<String>,
}

impl Report {
    /// An empty plan.
    pub fn new(dry_run: bool) -> Self {
        Report {
            dry_run,
            ..Report::default()
        }
    }

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
                Action::Run(c) if c.may_fail => writeln!(f, "{run}: {c}  (failure ignored)")?,
                Action::Run(c) => writeln!(f, "{run}: {c}")?,
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// The report of an uninstall when `service_file` does not exist: nothing to do, and a note
/// saying so. `None` when there is something to uninstall.
pub fn nothing_to_uninstall(dry_run: bool, service_file: &Path) -> Option<Report> {
    if service_file.exists() {
        return None;
    }
    let mut report = Report::new(dry_run);
    report.notes.push(format!(
        "nothing to uninstall: {} does not exist",
        service_file.display()
    ));
    Some(report)
}

/// What a service does with a path: read it, or write in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// The settings of a systemd unit that decide which paths its service can see and write:
/// `PrivateTmp=`, `ProtectHome=`, `ProtectSystem=`, `ReadWritePaths=`, `InaccessiblePaths=`
/// and `BindPaths=`/`BindReadOnlyPaths=` (read from the unit's text by
/// [`Sandbox::of_unit`]), so an install can tell before starting the service that it would
/// not find its config or could not write its state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    pub private_tmp: bool,
    /// `no`, `yes`, `read-only` or `tmpfs`.
    pub protect_home: String,
    /// `no`, `yes`, `full` or `strict`.
    pub protect_system: String,
    pub read_write: Vec<PathBuf>,
    pub inaccessible: Vec<PathBuf>,
    /// `BindPaths=` and `BindReadOnlyPaths=` sources: seen even under `ProtectHome=`.
    pub bound: Vec<PathBuf>,
}

/// Why a unit's service cannot reach a path, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    /// The setting, as in the unit (`PrivateTmp=yes`).
    pub setting: String,
    /// What it does to the path.
    pub why: String,
    /// What to do.
    pub fix: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}; {}", self.setting, self.why, self.fix)
    }
}

/// The folders `ProtectHome=` covers.
const HOMES: [&str; 3] = ["/home", "/root", "/run/user"];

impl Sandbox {
    /// The sandbox of a unit's text: the `[Service]` section's settings, the last one of each
    /// winning (an empty list setting clears the list, as in systemd). Paths holding a
    /// specifier (`%h`) other than `%%` are left out.
    pub fn of_unit(unit: &str) -> Sandbox {
        let mut sb = Sandbox {
            protect_home: "no".into(),
            protect_system: "no".into(),
            ..Sandbox::default()
        };
        let mut in_service = false;
        for line in unit.lines().map(str::trim) {
            if line.starts_with('[') {
                in_service = line == "[Service]";
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if !in_service || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let value = value.trim();
            let key = key.trim();
            let list = match key {
                "PrivateTmp" => {
                    sb.private_tmp = matches!(value, "yes" | "true" | "on" | "1");
                    continue;
                }
                "ProtectHome" => {
                    sb.protect_home = match value {
                        "true" | "on" | "1" => "yes".into(),
                        "false" | "off" | "0" | "" => "no".into(),
                        v => v.into(),
                    };
                    continue;
                }
                "ProtectSystem" => {
                    sb.protect_system = match value {
                        "true" | "on" | "1" => "yes".into(),
                        "false" | "off" | "0" | "" => "no".into(),
                        v => v.into(),
                    };
                    continue;
                }
                "ReadWritePaths" => &mut sb.read_write,
                "InaccessiblePaths" => &mut sb.inaccessible,
                "BindPaths" | "BindReadOnlyPaths" => &mut sb.bound,
                _ => continue,
            };
            if value.is_empty() {
                list.clear();
            }
            list.extend(unit_paths(value, key.starts_with("Bind")));
        }
        sb
    }

    /// Why the service could not `access` `path`, if it could not. A path and the file it
    /// resolves to (through symlinks) must both be within reach.
    pub fn check(&self, path: &Path, access: Access) -> Option<Unreachable> {
        let real = std::fs::canonicalize(path).ok();
        std::iter::once(path)
            .chain(real.as_deref().filter(|r| *r != path))
            .find_map(|p| self.check_one(p, access))
    }

    fn check_one(&self, path: &Path, access: Access) -> Option<Unreachable> {
        let under = |dirs: &[PathBuf]| dirs.iter().any(|d| path.starts_with(d));
        if self.private_tmp && (path.starts_with("/tmp") || path.starts_with("/var/tmp")) {
            return Some(Unreachable {
                setting: "PrivateTmp=yes".into(),
                why: "gives the service a private, empty /tmp and /var/tmp".into(),
                fix: "move it out of /tmp and /var/tmp".into(),
            });
        }
        if let Some(d) = self.inaccessible.iter().find(|d| path.starts_with(d)) {
            return Some(Unreachable {
                setting: format!("InaccessiblePaths={}", d.display()),
                why: "hides it from the service".into(),
                fix: "move it elsewhere, or take it out of InaccessiblePaths= in a drop-in (`systemctl edit`)".into(),
            });
        }
        let in_home = HOMES.iter().any(|h| path.starts_with(h));
        let ph = self.protect_home.as_str();
        if in_home && matches!(ph, "yes" | "tmpfs") && !under(&self.bound) {
            return Some(Unreachable {
                setting: format!("ProtectHome={ph}"),
                why: "hides /home, /root and /run/user from the service".into(),
                fix: "move it out of those folders, or set ProtectHome=read-only in a drop-in (`systemctl edit`)".into(),
            });
        }
        if access == Access::Read || under(&self.read_write) {
            return None;
        }
        let ps = self.protect_system.as_str();
        let system_ro: &[&str] = match ps {
            "yes" => &["/usr", "/boot", "/efi"],
            "full" => &["/usr", "/boot", "/efi", "/etc"],
            "strict" => &["/"],
            _ => &[],
        };
        let (setting, what) = if system_ro.iter().any(|d| path.starts_with(d)) {
            let what = if ps == "strict" {
                "the whole file system".to_string()
            } else {
                system_ro.join(", ")
            };
            (format!("ProtectSystem={ps}"), what)
        } else if in_home && ph == "read-only" {
            (
                format!("ProtectHome={ph}"),
                "/home, /root and /run/user".to_string(),
            )
        } else {
            return None;
        };
        Some(Unreachable {
            setting,
            why: format!("makes {what} read-only to the service, except ReadWritePaths="),
            fix: "add it to ReadWritePaths= in a drop-in (`systemctl edit`), or move it under one"
                .into(),
        })
    }
}

/// The paths of a unit setting's value: words split on white space (double or single
/// quotes group, a backslash escapes), each path's `-`/`+` prefix dropped (with `bind`, the
/// source before `:`), `%%` read as `%`; a word with another specifier is left out.
fn unit_paths(value: &str, bind: bool) -> Vec<PathBuf> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    let mut started = false;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (_, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                started = true;
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                started = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if started {
                    words.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            (_, c) => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(cur);
    }
    words
        .into_iter()
        .filter_map(|w| {
            let w = w.trim_start_matches(['-', '+']);
            let w = match w.split_once(':') {
                Some((src, _)) if bind => src,
                _ => w,
            };
            let plain = w.replace("%%", "");
            (!plain.contains('%') && w.starts_with('/'))
                .then(|| PathBuf::from(w.replace("%%", "%")))
        })
        .collect()
}

/// A note when the service would run `binary` from a cargo build directory; `package` is
/// the crate's folder, for `cargo install --path`.
pub fn build_dir_note(binary: &Path, package: &str) -> Option<String> {
    let b = binary.to_string_lossy();
    (b.contains("/target/debug/") || b.contains("/target/release/")).then(|| format!(
        "the service runs {b} from a build directory; a rebuild or `cargo clean` changes it under the running service (install it first: `cargo install --path {package}` or the .deb)"
    ))
}

/// How [`edit_unit`] changes a `Key=` line.
#[derive(Debug, Clone)]
pub enum Edit {
    Set(String),
    Remove,
    Keep,
}

/// Replaces the template's leading comment block with `header` and applies `edits` to the
/// `Key=value` lines they name.
pub fn edit_unit(template: &str, header: &str, edits: &[(&str, Edit)]) -> String {
    let mut out = String::from(header);
    for line in unit_body(template) {
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

/// A unit's lines after its leading comment block (the header [`edit_unit`] replaces).
pub fn unit_body(unit: &str) -> impl Iterator<Item = &str> {
    unit.lines().skip_while(|l| l.starts_with('#'))
}

/// A path as one word of a unit setting: specifiers (`%`) escaped, and for command lines
/// `$` too; quoted when it holds spaces, quotes or backslashes.
pub fn unit_word(path: &Path, exec: bool) -> Result<String, EngineError> {
    let s = service_path(path)?;
    let mut w = s.replace('%', "%%");
    if exec {
        w = w.replace('$', "$$");
    }
    if w.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';')) {
        w = format!("\"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
    }
    Ok(w)
}

/// `path` as text that may go into a service file: UTF-8, absolute, no control characters.
pub fn service_path(path: &Path) -> Result<&str, EngineError> {
    let bad = |msg| EngineError::BadPath {
        path: path.to_path_buf(),
        msg,
    };
    let s = path.to_str().ok_or_else(|| bad("it is not valid UTF-8"))?;
    if s.chars().any(char::is_control) {
        return Err(bad("it holds control characters"));
    }
    if !path.is_absolute() {
        return Err(bad("it is not absolute"));
    }
    Ok(s)
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

/// The binary a service runs, absolute and checked to be a file: `given`, or by default
/// this program.
pub fn service_binary(given: Option<&Path>) -> Result<PathBuf, EngineError> {
    let binary = match given {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe().map_err(EngineError::CurrentExe)?,
    };
    let abs = std::path::absolute(&binary).map_err(|e| EngineError::Binary {
        path: binary.clone(),
        msg: e.to_string(),
    })?;
    match std::fs::metadata(&abs) {
        Ok(m) if m.is_file() => Ok(abs),
        Ok(_) => Err(EngineError::Binary {
            path: abs,
            msg: "not a file".into(),
        }),
        Err(e) => Err(EngineError::Binary {
            path: abs,
            msg: e.to_string(),
        }),
    }
}

/// Checks before changing anything (after the caller's own, such as root): nothing the
/// service needs is out of its reach ([`Report::refusals`]); with `systemd`, that systemd
/// runs; every command the report runs on `PATH`.
pub fn preflight(report: &Report, systemd: bool) -> Result<(), EngineError> {
    if !report.refusals.is_empty() {
        return Err(EngineError::Unreachable(report.refusals.clone()));
    }
    if systemd && !Path::new("/run/systemd/system").is_dir() {
        return Err(EngineError::SystemdNotRunning);
    }
    for c in report.commands() {
        if find_on_path(&c.program).is_none() {
            return Err(EngineError::CommandNotFound {
                program: c.program.clone(),
                hint: hint_for(&c.program),
            });
        }
    }
    Ok(())
}

fn hint_for(program: &str) -> &'static str {
    match program {
        "systemctl" => {
            "this system does not use systemd; use --dry-run to see the unit and install it by hand"
        }
        "launchctl" => {
            "launchctl comes with macOS; use --dry-run to see the plist and load it by hand"
        }
        _ => "use --dry-run to see what to do by hand",
    }
}

/// The executable file `program` names in a folder of `PATH`.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
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
pub fn execute(report: Report) -> Result<Report, EngineError> {
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
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(EngineError::io("removing", p)(e)),
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

fn run(c: &ServiceCommand, done: &[String]) -> Result<(), EngineError> {
    let out = match Command::new(&c.program).args(&c.args).output() {
        Ok(out) => out,
        Err(_) if c.may_fail => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(EngineError::CommandNotFound {
                program: c.program.clone(),
                hint: hint_for(&c.program),
            })
        }
        Err(source) => {
            return Err(EngineError::Spawn {
                command: c.to_string(),
                source,
            })
        }
    };
    if out.status.success() || c.may_fail {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let mut stderr = if err.is_empty() {
        String::new()
    } else {
        format!(": {err}")
    };
    if err.contains("Failed to connect to bus") && c.args.first().is_some_and(|a| a == "--user") {
        stderr.push_str(
            " (a user service needs your login session: run this as yourself, not with sudo or su)",
        );
    }
    Err(EngineError::CommandFailed {
        command: c.to_string(),
        status: out.status.to_string(),
        stderr,
        done: if done.is_empty() {
            String::new()
        } else {
            format!(" (already done: {})", done.join("; "))
        },
    })
}

/// Writes `path` atomically (temp file + fsync + rename + fsync(dir)), creating its folder
/// (as `mkdir -p` would) first.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), EngineError> {
    let dir = path.parent().ok_or_else(|| EngineError::BadPath {
        path: path.to_path_buf(),
        msg: "it has no parent folder",
    })?;
    fs::create_dir_all(dir, 0o777)?;
    Ok(fs::write_atomic(path, data, mode)?)
}

/// `systemd-analyze verify` of a unit file, for the tests of generated units: `None` where
/// systemd-analyze is not installed, else its verdict (`Err` holds its status and output).
/// With `user_runtime`, the file is checked as a user unit with that runtime folder.
pub fn systemd_analyze_verify(
    unit_file: &Path,
    user_runtime: Option<&Path>,
) -> Option<Result<(), String>> {
    find_on_path("systemd-analyze")?;
    let mut cmd = Command::new("systemd-analyze");
    if let Some(runtime) = user_runtime {
        cmd.arg("--user").env("XDG_RUNTIME_DIR", runtime);
    }
    let out = match cmd.args(["verify", "--man=no"]).arg(unit_file).output() {
        Ok(out) => out,
        Err(e) => return Some(Err(format!("running systemd-analyze: {e}"))),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    Some(if out.status.success() && stderr.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}\n{stderr}", out.status))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_command_is_named_with_what_was_done() {
        let c = ServiceCommand {
            program: "sh".into(),
            args: vec!["-c".into(), "echo nope >&2; exit 3".into()],
            may_fail: false,
        };
        let e = run(&c, &["wrote /x".into()]).expect_err("fails");
        let s = e.to_string();
        assert!(s.contains("`sh -c 'echo nope >&2; exit 3'` failed"), "{s}");
        assert!(
            s.contains(": nope") && s.contains("already done: wrote /x"),
            "{s}"
        );
        let ok = ServiceCommand {
            may_fail: true,
            ..c
        };
        run(&ok, &[]).expect("ignored failure");
        let missing = ServiceCommand {
            program: "coffer-no-such-program".into(),
            args: vec![],
            may_fail: false,
        };
        let e = run(&missing, &[]).expect_err("missing");
        assert!(
            e.to_string().contains("coffer-no-such-program not found"),
            "{e}"
        );
        assert_eq!(
            hint_for("systemctl"),
            "this system does not use systemd; use --dry-run to see the unit and install it by hand"
        );
    }

    #[test]
    fn failing_command_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = dir.path().join("x.service");
        let mut plan = Report::new(false);
        plan.actions.push(Action::Write(FileWrite {
            path: unit.clone(),
            content: "[Unit]\n".into(),
        }));
        plan.actions
            .push(Action::run("sh", &["-c", "echo boom >&2; exit 4"], false));
        plan.actions.push(Action::run("true", &[], false));
        let s = execute(plan).expect_err("fails").to_string();
        assert!(
            s.contains("`sh -c 'echo boom >&2; exit 4'` failed")
                && s.contains(": boom")
                && s.contains(&format!("already done: wrote {}", unit.display())),
            "{s}"
        );
    }

    #[test]
    fn execute_writes_removes_runs_and_reports_what_was_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = dir.path().join("new folder/x.service");
        let old = dir.path().join("old.service");
        write_atomic(&old, b"[Unit]\n", 0o644).expect("write");
        let mut plan = Report::new(true);
        plan.actions.push(Action::Write(FileWrite {
            path: unit.clone(),
            content: "[Service]\n".into(),
        }));
        plan.actions.push(Action::Remove(old.clone()));
        plan.actions.push(Action::run("true", &[], false));
        plan.actions.push(Action::run("false", &[], true));
        let shown = plan.to_string();
        assert!(
            shown.starts_with(&format!("would write {}:\n[Service]\n\n", unit.display())),
            "{shown}"
        );
        assert!(
            shown.contains("would run: false  (failure ignored)\n"),
            "{shown}"
        );
        let done = execute(plan).expect("execute");
        assert_eq!(std::fs::read(&unit).expect("read"), b"[Service]\n");
        assert!(!old.exists());
        assert_eq!(
            done.to_string(),
            format!(
                "wrote {}\nremoved {}\nran: true\nran: false  (failure ignored)\n",
                unit.display(),
                old.display()
            )
        );
    }

    #[test]
    fn a_sandbox_is_read_from_the_unit_and_checked() {
        let unit = "[Unit]\nPrivateTmp=no\n[Service]\nPrivateTmp=yes\nProtectSystem=strict\n\
            ProtectHome=yes\n# ReadWritePaths=/commented\nReadWritePaths=/gone\nReadWritePaths=\n\
            ReadWritePaths=-\"/srv/my state\" /var/lib/100%%\nReadWritePaths=%h/state\n\
            BindReadOnlyPaths=/home/alice/docs:/docs\nInaccessiblePaths=/srv/secret\n";
        let sb = Sandbox::of_unit(unit);
        assert!(sb.private_tmp);
        assert_eq!((&*sb.protect_system, &*sb.protect_home), ("strict", "yes"));
        assert_eq!(
            sb.read_write,
            [
                PathBuf::from("/srv/my state"),
                PathBuf::from("/var/lib/100%")
            ]
        );
        assert_eq!(sb.bound, [PathBuf::from("/home/alice/docs")]);
        let why = |p: &str, a| sb.check(Path::new(p), a).map(|u| u.setting);
        assert_eq!(
            why("/tmp/c/agent.toml", Access::Read).as_deref(),
            Some("PrivateTmp=yes")
        );
        assert_eq!(
            why("/var/tmp/x", Access::Read).as_deref(),
            Some("PrivateTmp=yes")
        );
        assert_eq!(why("/tmpfoo/x", Access::Read), None);
        assert_eq!(
            why("/home/bob/x", Access::Read).as_deref(),
            Some("ProtectHome=yes")
        );
        assert_eq!(why("/home/alice/docs/a", Access::Read), None);
        assert_eq!(
            why("/srv/secret/k", Access::Read).as_deref(),
            Some("InaccessiblePaths=/srv/secret")
        );
        assert_eq!(why("/etc/coffer/agent.toml", Access::Read), None);
        assert_eq!(why("/srv/my state/journal", Access::Write), None);
        let u = sb
            .check(Path::new("/srv/other"), Access::Write)
            .expect("read-only");
        assert_eq!(u.setting, "ProtectSystem=strict");
        assert!(u.to_string().contains("add it to ReadWritePaths="), "{u}");
        let ro = Sandbox::of_unit("[Service]\nProtectHome=read-only\nProtectSystem=full\n");
        assert_eq!(ro.check(Path::new("/home/a/x"), Access::Read), None);
        let w = |p: &str| ro.check(Path::new(p), Access::Write).map(|u| u.setting);
        assert_eq!(w("/home/a/state").as_deref(), Some("ProtectHome=read-only"));
        assert_eq!(w("/etc/coffer").as_deref(), Some("ProtectSystem=full"));
        assert_eq!(w("/srv/state"), None);
        let mut r = Report::new(false);
        r.refusals.push("config /tmp/a is out of reach".into());
        let e = preflight(&r, false).expect_err("refused").to_string();
        assert!(
            e.contains("nothing was installed:\n  - config /tmp/a"),
            "{e}"
        );
    }

    #[test]
    fn units_are_edited_line_by_line() {
        let template =
            "# packaged\n# header\n[Service]\nExecStart=/usr/bin/x\n# User=x\nUser=x\nKeep=1\n";
        let unit = edit_unit(
            template,
            "# mine\n",
            &[
                ("ExecStart", Edit::Set("/opt/x".into())),
                ("User", Edit::Remove),
                ("Keep", Edit::Keep),
            ],
        );
        assert_eq!(
            unit,
            "# mine\n[Service]\nExecStart=/opt/x\n# User=x\nKeep=1\n"
        );
        assert_eq!(
            unit_word(Path::new("/a b/100%$"), true).expect("word"),
            r#""/a b/100%%$$""#
        );
        let Action::Run(echo) = Action::run("echo", &["it's", "", "a=b,c"], false) else {
            unreachable!("Action::run builds a Run")
        };
        assert_eq!(echo.to_string(), r"echo 'it'\''s' '' a=b,c");
    }
}
