//! `service install` and `service uninstall`: runs the agent as a systemd unit (Linux and
//! other systemd systems) or a launchd job (macOS), pointing at this binary and config.
//!
//! [`install`] and [`uninstall`] first build a [`Report`]: the files to write (with their
//! full content), the files to remove and the commands to run, in order. With `dry_run`
//! that is all they do and the caller prints the report; otherwise they check that the
//! service manager is there, carry out each step (unit files are written atomically) and
//! return the same report of what was done. That machinery is
//! `coffer_common::host::service`'s, shared with the receiver; this file holds what is the
//! agent's own: its user and system units, the launchd plist, where each goes and the
//! commands that load it.
//!
//! Before a systemd unit is installed, every path it needs is checked against its sandbox
//! ([`Sandbox`], read from the unit's text): the binary, config, passphrase file and state
//! dir out of reach refuse the install ([`Report::refusals`]), a watched folder out of reach
//! is a warning; both are printed on stderr, with `--dry-run` too.
//!
//! The systemd units are the files under `packaging/systemd/` with their `ExecStart=`,
//! `ReadWritePaths=` and state-directory lines rewritten, so a generated unit and a
//! packaged one never drift apart; the launchd plist is [`launchd_plist`] (the file in
//! `packaging/launchd/` is its output for example paths).

use std::path::{Path, PathBuf};

use coffer_common::host::service::{
    self as engine, build_dir_note, edit_unit, nothing_to_uninstall, service_path, systemctl,
    unit_word, Access, Edit, EngineError, Sandbox,
};
pub use coffer_common::host::service::{Action, FileWrite, Report, ServiceCommand};

use crate::config::{Config, ConfigError};

/// The systemd unit's name.
pub const UNIT_NAME: &str = "coffer-agent.service";
/// The launchd job's label.
pub const LAUNCHD_LABEL: &str = "net.coffer.agent";

const SYSTEM_UNIT_TEMPLATE: &str = include_str!("../../packaging/systemd/coffer-agent.service");
const USER_UNIT_TEMPLATE: &str = include_str!("../../packaging/systemd/coffer-agent-user.service");
/// The packaged system unit's state directory (`StateDirectory=coffer-agent`).
const PACKAGED_STATE_DIR: &str = "/var/lib/coffer-agent";

/// What `service install` should do.
#[derive(Debug, Clone)]
pub struct InstallOpts {
    /// A per-user service (systemd user unit, launchd LaunchAgent) instead of a system one.
    pub user: bool,
    /// Only report what would be written and run.
    pub dry_run: bool,
    /// The agent's config file (made absolute; it must load).
    pub config: PathBuf,
    /// The binary the service runs; `None` means this program (`std::env::current_exe`).
    pub binary: Option<PathBuf>,
}

/// What `service uninstall` should do.
#[derive(Debug, Clone)]
pub struct UninstallOpts {
    /// Remove the per-user service instead of the system one.
    pub user: bool,
    /// Only report what would be removed and run.
    pub dry_run: bool,
}

/// Errors of `service install` / `uninstall`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "state dir {path} (from {config}) does not exist: run `coffer-agent init --config {config}` first"
    )]
    StateDirMissing { path: PathBuf, config: PathBuf },
    #[error("cannot find your home directory: HOME is not set to an absolute path")]
    NoHome,
    #[error("installing or removing a system service needs root: run it with sudo, or pass --user for a per-user service")]
    NotRoot,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The service manager in charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Platform {
    Systemd,
    Launchd,
}

/// What the plan depends on from the environment (a field each, so tests can fake it).
#[derive(Debug, Clone)]
struct Env {
    platform: Platform,
    home: Option<PathBuf>,
    xdg_config_home: Option<PathBuf>,
    uid: u32,
}

impl Env {
    fn detect() -> Self {
        let abs_var = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        Env {
            platform: if cfg!(target_os = "macos") {
                Platform::Launchd
            } else {
                Platform::Systemd
            },
            home: abs_var("HOME"),
            xdg_config_home: abs_var("XDG_CONFIG_HOME"),
            uid: nix::unistd::getuid().as_raw(),
        }
    }

    fn home(&self) -> Result<&Path, ServiceError> {
        self.home.as_deref().ok_or(ServiceError::NoHome)
    }

    /// Where the unit or plist lives.
    fn service_file(&self, user: bool) -> Result<PathBuf, ServiceError> {
        Ok(match (self.platform, user) {
            (Platform::Systemd, false) => Path::new("/etc/systemd/system").join(UNIT_NAME),
            (Platform::Systemd, true) => {
                let config_home = match &self.xdg_config_home {
                    Some(p) => p.clone(),
                    None => self.home()?.join(".config"),
                };
                config_home.join("systemd/user").join(UNIT_NAME)
            }
            (Platform::Launchd, false) => {
                Path::new("/Library/LaunchDaemons").join(format!("{LAUNCHD_LABEL}.plist"))
            }
            (Platform::Launchd, true) => self
                .home()?
                .join("Library/LaunchAgents")
                .join(format!("{LAUNCHD_LABEL}.plist")),
        })
    }

    fn launchd_domain(&self, user: bool) -> String {
        if user {
            format!("gui/{}", self.uid)
        } else {
            "system".into()
        }
    }
}

/// `service install`: writes the unit (or plist) for this binary and config, enables and
/// (re)starts it. With `dry_run`, only returns what it would do.
pub fn install(opts: &InstallOpts) -> Result<Report, ServiceError> {
    let env = Env::detect();
    let binary = engine::service_binary(opts.binary.as_deref())?;
    let cfg = Config::load(&opts.config)?;
    if !cfg.state_dir.is_dir() {
        return Err(ServiceError::StateDirMissing {
            path: cfg.state_dir.clone(),
            config: cfg.file.clone(),
        });
    }
    let report = plan_install(opts, &env, &binary, &cfg)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if opts.dry_run {
        for r in &report.refusals {
            eprintln!("warning: without --dry-run, the install is refused: {r}");
        }
        return Ok(report);
    }
    apply(&env, opts.user, report)
}

/// `service uninstall`: stops and disables the service and removes its unit (or plist).
/// Nothing installed is not an error: the report says so.
pub fn uninstall(opts: &UninstallOpts) -> Result<Report, ServiceError> {
    let env = Env::detect();
    let report = plan_uninstall(opts, &env)?;
    if opts.dry_run || report.actions.is_empty() {
        return Ok(report);
    }
    apply(&env, opts.user, report)
}

/// Carries out a plan after checking for root (for a system service), a running service
/// manager and every command on PATH.
fn apply(env: &Env, user: bool, report: Report) -> Result<Report, ServiceError> {
    if !user && !nix::unistd::geteuid().is_root() {
        return Err(ServiceError::NotRoot);
    }
    engine::preflight(&report, env.platform == Platform::Systemd)?;
    Ok(engine::execute(report)?)
}

fn plan_install(
    opts: &InstallOpts,
    env: &Env,
    binary: &Path,
    cfg: &Config,
) -> Result<Report, ServiceError> {
    let path = env.service_file(opts.user)?;
    let mut report = Report::new(opts.dry_run);
    match env.platform {
        Platform::Systemd => {
            let content = systemd_unit(opts.user, binary, &cfg.file, &cfg.state_dir)?;
            check_reach(
                &mut report,
                &Sandbox::of_unit(&content),
                opts.user,
                binary,
                cfg,
            );
            report
                .actions
                .push(Action::Write(FileWrite { path, content }));
            let ctl = |args: &[&str]| systemctl(opts.user, args);
            report.actions.push(ctl(&["daemon-reload"]));
            report.actions.push(ctl(&["enable", UNIT_NAME]));
            // Restart, not `start`: a reinstall must apply the new unit to a running agent.
            // No waiting for READY=1, which comes only after the first scan.
            report
                .actions
                .push(ctl(&["restart", "--no-block", UNIT_NAME]));
            let scope = if opts.user { " --user" } else { "" };
            report.notes.push(format!(
                "the agent starts in the background: `systemctl{scope} status {UNIT_NAME}` shows whether it runs, `journalctl{scope} -u {UNIT_NAME}` its log, `coffer-agent status --config {}` its progress",
                cfg.file.display()
            ));
            if opts.user {
                report.notes.push(
                    "a user service stops when you log out; `loginctl enable-linger` keeps it running"
                        .into(),
                );
            }
        }
        Platform::Launchd => {
            let log = if opts.user {
                env.home()?.join("Library/Logs/coffer-agent.log")
            } else {
                PathBuf::from("/Library/Logs/coffer-agent.log")
            };
            let content = launchd_plist(binary, &cfg.file, &log)?;
            let domain = env.launchd_domain(opts.user);
            let target = format!("{domain}/{LAUNCHD_LABEL}");
            let plist = path.to_string_lossy().into_owned();
            report
                .actions
                .push(Action::Write(FileWrite { path, content }));
            report.actions.push(launchctl(&["bootout", &target], true));
            report.actions.push(launchctl(&["enable", &target], false));
            report
                .actions
                .push(launchctl(&["bootstrap", &domain, &plist], false));
            report
                .notes
                .push(format!("the agent logs to {}", log.display()));
        }
    }
    if cfg.passphrase_file.is_none() {
        report.notes.push(format!(
            "{} sets no `passphrase_file`: a service cannot prompt for the passphrase, so the agent will fail to start unless COFFER_PASSPHRASE is in its environment",
            cfg.file.display()
        ));
    }
    report.notes.extend(build_dir_note(binary, "agent"));
    Ok(report)
}

/// Checks every path the service needs against its unit's sandbox: the binary, the config,
/// the passphrase file and the state dir (out of reach: the service could not start, so the
/// install is refused) and the watched folders (out of reach: a warning, the others are
/// still backed up).
fn check_reach(report: &mut Report, sandbox: &Sandbox, user: bool, binary: &Path, cfg: &Config) {
    let config = cfg.file.display();
    let again = format!(
        "then run `coffer-agent service install{} --config {config}` again",
        if user { " --user" } else { "" }
    );
    let mut needs: Vec<(&str, &Path, Access, String)> = vec![
        (
            "the binary",
            binary,
            Access::Read,
            format!(" (`cargo install --path agent`, or the .deb), {again} with it"),
        ),
        (
            "config",
            &cfg.file,
            Access::Read,
            format!(
                ", then run `coffer-agent service install{} --config NEW-PATH` again",
                if user { " --user" } else { "" }
            ),
        ),
        (
            "state dir",
            &cfg.state_dir,
            Access::Write,
            format!(" with its files, set `state_dir` in {config} to its new place, {again}"),
        ),
    ];
    if let Some(p) = &cfg.passphrase_file {
        needs.push((
            "passphrase file",
            p,
            Access::Read,
            format!(", set `passphrase_file` in {config} to its new place, {again}"),
        ));
    }
    for (what, path, access, then) in needs {
        if let Some(u) = sandbox.check(path, access) {
            report.refusals.push(format!(
                "{what} {} is out of the service's reach: {} {}; {}{then}",
                path.display(),
                u.setting,
                u.why,
                u.fix
            ));
        }
    }
    for w in &cfg.watches {
        if let Some(u) = sandbox.check(&w.path, Access::Read) {
            report.warnings.push(format!(
                "watch {:?} ({}) is out of the service's reach, so nothing in it would be backed up: {} {}; {}, or run the agent outside a service (`coffer-agent run --config {config}`)",
                w.name,
                w.path.display(),
                u.setting,
                u.why,
                u.fix
            ));
        }
    }
}

fn plan_uninstall(opts: &UninstallOpts, env: &Env) -> Result<Report, ServiceError> {
    let path = env.service_file(opts.user)?;
    if let Some(nothing) = nothing_to_uninstall(opts.dry_run, &path) {
        return Ok(nothing);
    }
    let mut report = Report::new(opts.dry_run);
    match env.platform {
        Platform::Systemd => {
            report
                .actions
                .push(systemctl(opts.user, &["disable", "--now", UNIT_NAME]));
            report.actions.push(Action::Remove(path));
            report
                .actions
                .push(systemctl(opts.user, &["daemon-reload"]));
        }
        Platform::Launchd => {
            let target = format!("{}/{LAUNCHD_LABEL}", env.launchd_domain(opts.user));
            report.actions.push(launchctl(&["bootout", &target], true));
            report.actions.push(Action::Remove(path));
        }
    }
    report.notes.push(
        "the journal, the keys and the config stay where they are; the backups stay on the receiver"
            .into(),
    );
    Ok(report)
}

fn launchctl(args: &[&str], may_fail: bool) -> Action {
    Action::run("launchctl", args, may_fail)
}

/// The systemd unit for `binary` and `config`, with `state_dir` writable.
pub fn systemd_unit(
    user: bool,
    binary: &Path,
    config: &Path,
    state_dir: &Path,
) -> Result<String, ServiceError> {
    let exec = format!(
        "{} run --config {}",
        unit_word(binary, true)?,
        unit_word(config, true)?
    );
    let keep_state_directory = !user && state_dir == Path::new(PACKAGED_STATE_DIR);
    let state_edit = if keep_state_directory {
        Edit::Keep
    } else {
        Edit::Remove
    };
    let (template, scope) = if user {
        (USER_UNIT_TEMPLATE, "--user ")
    } else {
        (SYSTEM_UNIT_TEMPLATE, "")
    };
    let header = format!(
        "# Coffer backup agent, written by `coffer-agent service install {scope}--config {}`.\n\
         # Run that again after moving the binary or the state dir; put local changes in a\n\
         # drop-in (`systemctl {scope}edit {UNIT_NAME}`), which a reinstall keeps.\n",
        config.display()
    );
    Ok(edit_unit(
        template,
        &header,
        &[
            ("ExecStart", Edit::Set(exec)),
            ("ReadWritePaths", Edit::Set(unit_word(state_dir, false)?)),
            ("StateDirectory", state_edit.clone()),
            ("StateDirectoryMode", state_edit),
        ],
    ))
}

/// The launchd plist that runs `binary run --config config`, logging to `log`.
pub fn launchd_plist(binary: &Path, config: &Path, log: &Path) -> Result<String, ServiceError> {
    let s = |p: &Path| service_path(p).map(xml_escape);
    Ok(format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- Coffer backup agent for launchd. `coffer-agent service install` writes this file with
     this machine's paths to ~/Library/LaunchAgents (per user) or /Library/LaunchDaemons,
     and loads it with launchctl bootstrap. -->
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>{label}</string>
	<key>ProgramArguments</key>
	<array>
		<string>{binary}</string>
		<string>run</string>
		<string>--config</string>
		<string>{config}</string>
	</array>
	<!-- Start at login (or boot), and again after a crash, at most every 30 s. -->
	<key>RunAtLoad</key>
	<true/>
	<key>KeepAlive</key>
	<dict>
		<key>SuccessfulExit</key>
		<false/>
	</dict>
	<key>ThrottleInterval</key>
	<integer>30</integer>
	<!-- SIGTERM finishes the current commit; allow it time before SIGKILL. -->
	<key>ExitTimeOut</key>
	<integer>90</integer>
	<key>ProcessType</key>
	<string>Background</string>
	<key>StandardErrorPath</key>
	<string>{log}</string>
</dict>
</plist>
"#,
        label = LAUNCHD_LABEL,
        binary = s(binary)?,
        config = s(config)?,
        log = s(log)?,
    ))
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    fn env(platform: Platform) -> Env {
        Env {
            platform,
            home: Some("/home/alice".into()),
            xdg_config_home: None,
            uid: 1000,
        }
    }

    fn config(dir: &Path, extra: &str) -> Config {
        let p = dir.join("agent.toml");
        std::fs::write(
            &p,
            format!("receiver = \"127.0.0.1:7700\"\nreceiver_key = \"{KEY}\"\n{extra}"),
        )
        .expect("write config");
        Config::load(&p).expect("config loads")
    }

    fn opts(user: bool, config: &Path) -> InstallOpts {
        InstallOpts {
            user,
            dry_run: true,
            config: config.to_path_buf(),
            binary: None,
        }
    }

    fn line<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .collect()
    }

    fn assert_hardened(unit: &str) {
        for l in [
            "Type=notify",
            "WatchdogSec=60",
            "NotifyAccess=main",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallArchitectures=native",
            "StartLimitBurst=5",
        ] {
            assert!(unit.lines().any(|x| x == l), "missing {l} in:\n{unit}");
        }
        assert!(line(unit, "RestartSec").len() == 1, "{unit}");
        // Reading users' homes is the agent's job: nothing may hide them.
        assert!(line(unit, "ProtectHome").is_empty(), "{unit}");
    }

    #[test]
    fn system_unit_runs_this_binary_on_this_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), "passphrase_file = \"pass\"\n");
        let bin = Path::new("/opt/coffer/bin/coffer-agent");
        let r = plan_install(&opts(false, &cfg.file), &env(Platform::Systemd), bin, &cfg)
            .expect("plan");
        let files: Vec<_> = r.files().collect();
        assert_eq!(files.len(), 1);
        assert_eq!(
            files[0].path,
            Path::new("/etc/systemd/system/coffer-agent.service")
        );
        let unit = &files[0].content;
        assert_eq!(
            line(unit, "ExecStart"),
            [format!(
                "/opt/coffer/bin/coffer-agent run --config {}",
                cfg.file.display()
            )]
        );
        assert!(cfg.file.is_absolute());
        assert_eq!(
            line(unit, "ReadWritePaths"),
            [cfg.state_dir.display().to_string()]
        );
        // The packaged StateDirectory= would create /var/lib/coffer-agent for nothing.
        assert!(line(unit, "StateDirectory").is_empty(), "{unit}");
        assert_eq!(line(unit, "CapabilityBoundingSet"), ["CAP_DAC_READ_SEARCH"]);
        assert_eq!(line(unit, "WantedBy"), ["multi-user.target"]);
        assert_hardened(unit);
        assert!(
            unit.starts_with("# Coffer backup agent, written by"),
            "{unit}"
        );
        assert!(!unit.contains("Installed by the coffer-agent package"));
        let cmds: Vec<String> = r.commands().map(|c| c.to_string()).collect();
        assert_eq!(
            cmds,
            [
                "systemctl daemon-reload",
                "systemctl enable coffer-agent.service",
                "systemctl restart --no-block coffer-agent.service",
            ]
        );
        assert!(r.notes.iter().all(|n| !n.contains("passphrase_file")));
    }

    #[test]
    fn user_unit_goes_to_the_user_manager() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), "");
        let r = plan_install(
            &opts(true, &cfg.file),
            &env(Platform::Systemd),
            Path::new("/usr/bin/coffer-agent"),
            &cfg,
        )
        .expect("plan");
        let f = r.files().next().expect("a unit");
        assert_eq!(
            f.path,
            Path::new("/home/alice/.config/systemd/user/coffer-agent.service")
        );
        assert_eq!(
            line(&f.content, "ExecStart"),
            [format!(
                "/usr/bin/coffer-agent run --config {}",
                cfg.file.display()
            )]
        );
        assert_eq!(
            line(&f.content, "ReadWritePaths"),
            [cfg.state_dir.display().to_string()]
        );
        assert_eq!(line(&f.content, "WantedBy"), ["default.target"]);
        assert!(line(&f.content, "CapabilityBoundingSet").is_empty());
        assert_hardened(&f.content);
        let cmds: Vec<String> = r.commands().map(|c| c.to_string()).collect();
        assert_eq!(
            cmds,
            [
                "systemctl --user daemon-reload",
                "systemctl --user enable coffer-agent.service",
                "systemctl --user restart --no-block coffer-agent.service",
            ]
        );
        // No passphrase_file: the service could not start; say so.
        assert!(r.notes.iter().any(|n| n.contains("passphrase_file")), "{r}");
        let shown = r.to_string();
        assert!(
            shown.contains(
                "would write /home/alice/.config/systemd/user/coffer-agent.service:\n# Coffer"
            ),
            "{shown}"
        );
        assert!(shown.contains("would run: systemctl --user enable coffer-agent.service"));
    }

    /// A config under /tmp: the service, with its private /tmp, could not read it.
    #[test]
    fn paths_out_of_the_sandbox_are_refused_or_warned_with_the_fix() {
        let tmp = tempfile::tempdir_in("/tmp").expect("tempdir in /tmp");
        let watched = tmp.path().join("w");
        let cfg = config(
            tmp.path(),
            &format!(
                "passphrase_file = \"pass\"\n[[watch]]\npath = \"{}\"\n",
                watched.display()
            ),
        );
        let bin = Path::new("/usr/bin/coffer-agent");
        for user in [false, true] {
            let r = plan_install(&opts(user, &cfg.file), &env(Platform::Systemd), bin, &cfg)
                .expect("a plan, even so");
            let refused = r.refusals.join("\n");
            for (what, path) in [
                ("config", &cfg.file),
                ("state dir", &cfg.state_dir),
                ("passphrase file", &tmp.path().join("pass")),
            ] {
                assert!(
                    refused.contains(&format!(
                        "{what} {} is out of the service's reach: PrivateTmp=yes gives the service a private, empty /tmp and /var/tmp; move it out of /tmp and /var/tmp",
                        path.display()
                    )),
                    "{what}: {refused}"
                );
            }
            assert!(refused.contains("set `state_dir` in"), "{refused}");
            assert!(!refused.contains("the binary"), "{refused}");
            assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
            assert!(
                r.warnings[0].starts_with(&format!(
                    "watch \"w\" ({}) is out of the service's reach",
                    watched.display()
                )),
                "{}",
                r.warnings[0]
            );
            // The printed report is what it was: the warnings go to stderr.
            let shown = r.to_string();
            assert!(!shown.contains("out of the service's reach"), "{shown}");
        }
        // Launchd has no such sandbox.
        let r =
            plan_install(&opts(true, &cfg.file), &env(Platform::Launchd), bin, &cfg).expect("plan");
        assert!(r.refusals.is_empty() && r.warnings.is_empty());
    }

    #[test]
    fn the_units_sandbox_lets_the_agent_write_its_state_dir_only() {
        for user in [false, true] {
            let state = Path::new("/srv/coffer state/100%");
            let unit = systemd_unit(
                user,
                Path::new("/usr/bin/coffer-agent"),
                Path::new("/etc/coffer/agent.toml"),
                state,
            )
            .expect("unit");
            let sb = Sandbox::of_unit(&unit);
            assert!(sb.private_tmp, "{unit}");
            assert_eq!(sb.protect_system, "strict");
            assert_eq!(sb.protect_home, "no");
            assert_eq!(sb.check(&state.join("journal.sqlite"), Access::Write), None);
            assert!(sb.check(Path::new("/srv/other"), Access::Write).is_some());
            assert_eq!(
                sb.check(Path::new("/home/alice/Documents"), Access::Read),
                None
            );
        }
    }

    #[test]
    fn xdg_config_home_is_honoured() {
        let mut e = env(Platform::Systemd);
        e.xdg_config_home = Some("/cfg".into());
        assert_eq!(
            e.service_file(true).expect("path"),
            Path::new("/cfg/systemd/user/coffer-agent.service")
        );
        e.home = None;
        e.xdg_config_home = None;
        assert!(matches!(e.service_file(true), Err(ServiceError::NoHome)));
    }

    #[test]
    fn packaged_state_dir_keeps_state_directory() {
        let unit = systemd_unit(
            false,
            Path::new("/usr/bin/coffer-agent"),
            Path::new("/etc/coffer/agent.toml"),
            Path::new("/var/lib/coffer-agent"),
        )
        .expect("unit");
        assert_eq!(line(&unit, "StateDirectory"), ["coffer-agent"]);
        // Apart from its header, the unit for the packaged paths is the packaged unit.
        let body = |s| engine::unit_body(s).collect::<Vec<_>>();
        assert_eq!(body(&unit), body(SYSTEM_UNIT_TEMPLATE));
    }

    #[test]
    fn odd_paths_are_quoted_and_escaped() {
        let unit = systemd_unit(
            true,
            Path::new("/opt/my apps/coffer-agent"),
            Path::new("/home/a/100% \"sure\"/agent.toml"),
            Path::new("/home/a/$state dir"),
        )
        .expect("unit");
        assert_eq!(
            line(&unit, "ExecStart"),
            [r#""/opt/my apps/coffer-agent" run --config "/home/a/100%% \"sure\"/agent.toml""#]
        );
        assert_eq!(line(&unit, "ReadWritePaths"), [r#""/home/a/$state dir""#]);
        let e = systemd_unit(
            true,
            Path::new("/bin/x"),
            Path::new("/a\nb"),
            Path::new("/s"),
        )
        .expect_err("newline");
        assert!(e.to_string().contains("control characters"), "{e}");
    }

    #[test]
    fn launchd_plist_for_user_and_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), "passphrase_file = \"pass\"\n");
        let e = env(Platform::Launchd);
        let r = plan_install(
            &opts(true, &cfg.file),
            &e,
            Path::new("/usr/local/bin/coffer-agent"),
            &cfg,
        )
        .expect("plan");
        let f = r.files().next().expect("plist");
        assert_eq!(
            f.path,
            Path::new("/home/alice/Library/LaunchAgents/net.coffer.agent.plist")
        );
        assert!(f.content.contains("<string>/usr/local/bin/coffer-agent</string>\n\t\t<string>run</string>\n\t\t<string>--config</string>"));
        assert!(f
            .content
            .contains(&format!("<string>{}</string>", cfg.file.display())));
        assert!(f
            .content
            .contains("<string>/home/alice/Library/Logs/coffer-agent.log</string>"));
        let cmds: Vec<String> = r.commands().map(|c| c.to_string()).collect();
        assert_eq!(
            cmds,
            [
                "launchctl bootout gui/1000/net.coffer.agent",
                "launchctl enable gui/1000/net.coffer.agent",
                "launchctl bootstrap gui/1000 /home/alice/Library/LaunchAgents/net.coffer.agent.plist",
            ]
        );
        assert!(r.commands().next().is_some_and(|c| c.may_fail));
        let r = plan_install(
            &opts(false, &cfg.file),
            &e,
            Path::new("/usr/local/bin/coffer-agent"),
            &cfg,
        )
        .expect("plan");
        let f = r.files().next().expect("plist");
        assert_eq!(
            f.path,
            Path::new("/Library/LaunchDaemons/net.coffer.agent.plist")
        );
        assert!(r.commands().any(|c| c.to_string()
            == "launchctl bootstrap system /Library/LaunchDaemons/net.coffer.agent.plist"));
    }

    #[test]
    fn packaged_plist_is_the_rendered_one() {
        let packaged = include_str!("../../packaging/launchd/net.coffer.agent.plist");
        let rendered = launchd_plist(
            Path::new("/usr/local/bin/coffer-agent"),
            Path::new("/Users/you/Library/Application Support/coffer/agent.toml"),
            Path::new("/Users/you/Library/Logs/coffer-agent.log"),
        )
        .expect("plist");
        assert_eq!(packaged, rendered);
        let odd =
            launchd_plist(Path::new("/a&b/<c>"), Path::new("/x"), Path::new("/l")).expect("plist");
        assert!(odd.contains("<string>/a&amp;b/&lt;c&gt;</string>"));
    }

    #[test]
    fn uninstall_of_nothing_is_a_note() {
        let mut e = env(Platform::Systemd);
        let dir = tempfile::tempdir().expect("tempdir");
        e.xdg_config_home = Some(dir.path().to_path_buf());
        let u = UninstallOpts {
            user: true,
            dry_run: false,
        };
        let r = plan_uninstall(&u, &e).expect("plan");
        assert!(r.actions.is_empty());
        assert!(r.notes[0].contains("nothing to uninstall"), "{r}");
        let unit = dir.path().join("systemd/user").join(UNIT_NAME);
        engine::write_atomic(&unit, b"[Unit]\n", 0o644).expect("write");
        assert_eq!(std::fs::read(&unit).expect("read"), b"[Unit]\n");
        let r = plan_uninstall(&u, &e).expect("plan");
        let shown: Vec<String> = r
            .actions
            .iter()
            .map(|a| match a {
                Action::Run(c) => c.to_string(),
                Action::Remove(p) => format!("rm {}", p.display()),
                Action::Write(w) => format!("write {}", w.path.display()),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "systemctl --user disable --now coffer-agent.service".to_string(),
                format!("rm {}", unit.display()),
                "systemctl --user daemon-reload".to_string(),
            ]
        );
    }

    /// `systemd-analyze verify` on generated units, where systemd-analyze exists.
    #[test]
    fn generated_units_pass_systemd_analyze() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = dir.path().join("runtime");
        std::fs::create_dir(&runtime).expect("runtime dir");
        for user in [false, true] {
            // verify wants ExecStart= to exist and be executable.
            let unit = systemd_unit(
                user,
                Path::new("/bin/true"),
                &dir.path().join("my config/agent.toml"),
                &dir.path().join("state 100%"),
            )
            .expect("unit");
            let path = dir.path().join(UNIT_NAME);
            std::fs::write(&path, unit).expect("write unit");
            match engine::systemd_analyze_verify(&path, user.then_some(runtime.as_path())) {
                None => return eprintln!("SKIP: systemd-analyze not available"),
                Some(verdict) => verdict.unwrap_or_else(|e| panic!("user={user}: {e}")),
            }
        }
    }
}
