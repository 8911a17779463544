//! The command line (clap derive) and the dispatch of each command to the library.
//! `main.rs` only parses, calls [`run`] and prints a [`CliError`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use coffer_common::channel::{ChannelError, ParseKeyError, PublicKey, StaticKeypair};
use coffer_common::host::fs::{Context as _, IoError};
use coffer_common::host::log::LogArgs;
use coffer_common::keys::{self, KdfParams, KeyError, MasterSecret};

use crate::config::{check_watch_name, host_name, Config, ConfigError, RawConfig, RawWatch};
use crate::daemon::RunError;
use crate::journal::JournalError;
use crate::restore::RestoreError;
use crate::service::ServiceError;
use crate::state::StateError;
use crate::{daemon, restore, service, state, status};

/// Why a command failed. Each variant says it in the words the user sees after `error: `
/// (with its causes, as `coffer_common::error_text` prints them).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Io(#[from] IoError),
    /// Writing generated text (completions, the man page) to standard output.
    #[error(transparent)]
    Stdout(std::io::Error),
    /// A bad `--at`, or a folder name that cannot be a watch name.
    #[error("{0}")]
    Usage(String),
    #[error("--receiver-key")]
    ReceiverKey(#[source] ParseKeyError),
    #[error(
        "config {} already exists; refusing to overwrite it (remove it first to start over)",
        .0.display()
    )]
    ConfigExists(PathBuf),
    #[error("two --watch folders are named {0:?}; rename one in the config after init")]
    SameWatchName(String),
    #[error(transparent)]
    Toml(#[from] toml::ser::Error),
    #[error(transparent)]
    Pause(#[from] crate::pause::PauseError),
    #[error("--limit-rate: {0}")]
    LimitRate(String),
}

/// Coffer backup agent: watches folders and backs up every change, end-to-end encrypted.
#[derive(Parser, Debug)]
#[command(name = "coffer-agent", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create keys and a config; prints this agent's public key.
    Init(InitArgs),
    /// Run the backup daemon.
    Run(RunArgs),
    /// Show what is backed up, pending and failed (or, given paths, whether each is safe).
    #[command(after_help = STATUS_HELP)]
    Status(StatusArgs),
    /// List backed-up files as of now or a point in time.
    #[command(after_help = LS_HELP)]
    Ls(LsArgs),
    /// List every version of files, oldest first.
    #[command(after_help = VERSIONS_HELP)]
    Versions(VersionsArgs),
    /// Restore files.
    #[command(after_help = RESTORE_HELP)]
    Restore(RestoreArgs),
    /// Check that the receiver holds every chunk of the backup.
    Verify(VerifyArgs),
    /// Stop sending to the receiver (changes are still journaled), until `resume` or for
    /// a while. Holds across restarts; works whether or not the agent runs.
    Pause(PauseArgs),
    /// End a pause: the agent sends what waits.
    Resume(ResumeArgs),
    /// Record the deletions held for a watch (`status --held` lists them): a scan found
    /// more than `max_delete_share` of its files gone at once. For a watch unavailable as
    /// "another device", also take the device it is on now as its own.
    ConfirmDeletions(ConfirmArgs),
    /// Install or remove the agent as a background service (systemd, launchd).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Print shell completions.
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

const STATUS_HELP: &str = "With PATH...: one line per path (--json: an array of objects with \
\"path\" and \"state\": backed_up, deleted, pending, failed or unknown; an unknown path has \
\"cause\": outside_watches, excluded (with \"pattern\"), missing, special or not_scanned, and \
\"why\").
Exit status with PATH...: 0 when every path is backed up and unchanged since, 1 when any is \
pending or failed (or changed since its backup), 2 when any is unknown to the agent (2 wins over \
1); an error (a bad config, an unreadable journal) also exits 1.
--failed --json prints an array of {\"path\", \"reason\", \"attempts\"}; without --failed, \
--json prints one object (files, pending_bytes, last_backup_at, receiver, watches, failed...).";

const LS_HELP: &str = "Columns: size in bytes, the file's modification time (mtime, UTC), the \
receiver's version number, the path. A header names them when stdout is a terminal. --json \
prints one array of {\"path\", \"kind\", \"size\", \"mtime\", \"version\", \"backed_up_at\"} \
(and \"target\" for a symlink); backed_up_at is when that version reached the receiver. \
Nothing to list is said on stderr, with exit status 0.";

const VERSIONS_HELP: &str = "Columns: the file's own version count (1 = oldest), the receiver's \
version number (repository-wide, also what status shows), when that version was backed up \
(the receiver's commit time, UTC), the size, and the start of the content hash, the symlink \
target, or `deleted`. A header names them when stdout is a terminal; with several paths each \
list follows a `PATH:` line. --json prints one array of {\"path\", \"versions\": [{\"n\", \
\"version\", \"backed_up_at\", \"backed_up_at_unix\", \"kind\", \"size\", \"mtime\", \
\"content_hash\" | \"target\"}]}. A file with no versions is said on stderr, with exit \
status 0.";

const RESTORE_HELP: &str =
    "Files land in TO/watch-name/relative/path, whichever way they were named.";

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Write the unit (or plist) for this binary and config, enable and start it.
    Install {
        #[command(flatten)]
        config: ConfigArg,
        /// A per-user service (systemd --user, LaunchAgent) instead of a system one.
        #[arg(long)]
        user: bool,
        /// Print the files and commands instead of writing and running them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop, disable and remove the service.
    Uninstall {
        /// The per-user service.
        #[arg(long)]
        user: bool,
        /// Print what would be done.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Serve Prometheus metrics at ADDR (e.g. 127.0.0.1:9464) under /metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

#[derive(Args, Debug)]
pub struct ConfigArg {
    /// The agent's config file.
    #[arg(long, short = 'c', env = "COFFER_CONFIG")]
    pub config: PathBuf,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Where to write the config (must not exist yet).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// Receiver address, host:port.
    #[arg(long)]
    pub receiver: String,
    /// The receiver's public key (printed by `coffer-receiver init`; it may begin with `-`).
    #[arg(long, allow_hyphen_values = true)]
    pub receiver_key: String,
    /// This machine's name in logs and status (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// A folder to watch (repeatable); created if missing.
    #[arg(long)]
    pub watch: Vec<PathBuf>,
    /// Where the journal and keys live (default: `state` next to the config).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A file holding the passphrase, recorded in the config.
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
    /// New machine: use the key file escrowed on the receiver instead of making a new one.
    #[arg(long)]
    pub recover: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// List only failing files, with reasons.
    #[arg(long)]
    pub failed: bool,
    /// List the deletions held for confirmation (`confirm-deletions WATCH` records them).
    #[arg(long, conflicts_with = "failed")]
    pub held: bool,
    /// Files or folders to ask about: paths on disk under a watched folder, or
    /// `watch-name/relative/path`. The exit status then says what was found (below).
    pub paths: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Machine-readable output: one JSON array (below).
    #[arg(long)]
    pub json: bool,
    /// Point in time: RFC 3339 with any offset (2026-12-03T09:35:05+01:00, ...Z), a time
    /// without an offset in local time (2026-12-03T09:35:05, as `date` shows it; TZ is
    /// honoured), a date alone (2026-12-01: its start, local time), or unix seconds.
    /// Default: now.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Only files under this folder (or this one file): a path on disk under a watched
    /// folder, or `watch-name/folder`.
    pub prefix: Option<String>,
}

#[derive(Args, Debug)]
pub struct VersionsArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Machine-readable output: one JSON array (below).
    #[arg(long)]
    pub json: bool,
    /// The files: paths on disk under a watched folder, or `watch-name/relative/path`.
    #[arg(required = true)]
    pub paths: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Target folder (files land in TO/watch-name/relative/path); `-` streams one file to stdout.
    #[arg(long)]
    pub to: PathBuf,
    /// Point in time: RFC 3339 with any offset (2026-12-03T09:35:05+01:00, ...Z), a time
    /// without an offset in local time (2026-12-03T09:35:05, as `date` shows it; TZ is
    /// honoured), a date alone (2026-12-01: its start, local time), or unix seconds.
    /// Default: each file's latest version.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Restore into a non-empty target, replacing files.
    #[arg(long)]
    pub overwrite: bool,
    /// Restore into a target (or a folder found in it) that another user owns or that group
    /// or others may write to. Refused by default: another user could swap folders or
    /// files in it while the restore writes.
    #[arg(long)]
    pub allow_shared_target: bool,
    /// When restoring as root, keep setuid and setgid bits. Dropped by default, and always
    /// for a file whose owner could not be set.
    #[arg(long)]
    pub keep_setuid: bool,
    /// Most bytes per second to download for this restore ("10MiB/s", "500KiB/s",
    /// "1MB/s"); default: the config's `download_limit`.
    #[arg(long, value_name = "RATE")]
    pub limit_rate: Option<String>,
    /// Files or folders to restore: paths on disk under a watched folder, or
    /// `watch-name/relative/path`; default: everything.
    pub paths: Vec<String>,
}

#[derive(Args, Debug)]
pub struct PauseArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// How long: "30m", "2h", "1d" (default: until `resume`).
    #[arg(long = "for", value_name = "DURATION")]
    pub for_: Option<String>,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Args, Debug)]
pub struct ConfirmArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The watch's name.
    pub watch: String,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Download, open and check every chunk.
    #[arg(long)]
    pub read_data: bool,
    /// Check every version, not only the latest of each file.
    #[arg(long)]
    pub all: bool,
}

/// Parses an optional `--at` (see [`coffer_common::host::time::parse_time`]).
fn parse_at(at: Option<&str>) -> Result<Option<i64>, CliError> {
    at.map(coffer_common::host::time::parse_time)
        .transpose()
        .map_err(CliError::Usage)
}

fn load(c: &ConfigArg) -> Result<Config, CliError> {
    Ok(Config::load(&c.config)?)
}

/// Runs a parsed command line; its exit code (0, or what `status PATH...` found).
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let quiet = cli.log.quiet;
    match cli.cmd {
        Cmd::Status(a) => status_cmd(a),
        cmd => run_cmd(cmd, quiet).map(|()| ExitCode::SUCCESS),
    }
}

/// `status`: the summary, `--failed`, or `PATH...` (whose exit code says what was found).
fn status_cmd(a: StatusArgs) -> Result<ExitCode, CliError> {
    let cfg = load(&a.config)?;
    if !a.paths.is_empty() {
        let v = status::print_paths(&cfg, &a.paths, a.json)?;
        return Ok(ExitCode::from(v as u8));
    }
    if a.held {
        status::print_held(&cfg, a.json)?;
    } else if a.failed {
        status::print_failed(&cfg, a.json)?;
    } else {
        status::print(&cfg, a.json)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_cmd(cmd: Cmd, quiet: bool) -> Result<(), CliError> {
    match cmd {
        Cmd::Init(a) => init(a),
        Cmd::Run(a) => Ok(daemon::run(
            load(&a.config)?,
            daemon::RunOpts {
                metrics: a.metrics,
                progress: !quiet,
            },
        )?),
        Cmd::Service(ServiceCmd::Install {
            config,
            user,
            dry_run,
        }) => {
            let r = service::install(&service::InstallOpts {
                user,
                dry_run,
                config: config.config,
                binary: None,
            })?;
            print!("{r}");
            Ok(())
        }
        Cmd::Service(ServiceCmd::Uninstall { user, dry_run }) => {
            let r = service::uninstall(&service::UninstallOpts { user, dry_run })?;
            print!("{r}");
            Ok(())
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            // Rendered to memory first: writing straight to a closed pipe would panic.
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "coffer-agent", &mut buf);
            print_bytes(&buf)
        }
        Cmd::Man => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut buf)
                .map_err(CliError::Stdout)?;
            print_bytes(&buf)
        }
        Cmd::Status(a) => status_cmd(a).map(|_| ()),
        Cmd::Ls(a) => {
            let cfg = load(&a.config)?;
            let at = parse_at(a.at.as_deref())?;
            Ok(restore::ls(
                &cfg,
                at,
                a.at.as_deref(),
                a.prefix.as_deref(),
                a.json,
            )?)
        }
        Cmd::Versions(a) => Ok(restore::versions(&load(&a.config)?, &a.paths, a.json)?),
        Cmd::Restore(a) => {
            let mut cfg = load(&a.config)?;
            let at = parse_at(a.at.as_deref())?;
            if let Some(r) = &a.limit_rate {
                cfg.download_limit = Some(crate::rate::parse_rate(r).map_err(CliError::LimitRate)?);
            }
            Ok(restore::restore(
                &cfg,
                restore::RestoreOpts {
                    to: a.to,
                    at,
                    paths: a.paths,
                    overwrite: a.overwrite,
                    progress: !quiet,
                    allow_shared_target: a.allow_shared_target,
                    keep_setuid: a.keep_setuid,
                },
            )?)
        }
        Cmd::ConfirmDeletions(a) => confirm_deletions(&load(&a.config)?, &a.watch),
        Cmd::Pause(a) => pause(&load(&a.config)?, a.for_.as_deref()),
        Cmd::Resume(a) => resume(&load(&a.config)?),
        Cmd::Verify(a) => Ok(restore::verify(
            &load(&a.config)?,
            a.read_data,
            a.all,
            !quiet,
        )?),
    }
}

/// `confirm-deletions WATCH`: the held deletions become dirty rows (a running daemon takes
/// them at once, else the next start does); a watch unavailable as another device forgets
/// its recorded place, so the device it is on now becomes its own.
fn confirm_deletions(cfg: &Config, watch: &str) -> Result<(), CliError> {
    let Some(w) = cfg.watches.iter().find(|w| w.name == watch) else {
        let names: Vec<&str> = cfg.watches.iter().map(|w| w.name.as_str()).collect();
        return Err(CliError::Usage(format!(
            "no watch is named {watch:?} in {} (its watches: {})",
            cfg.file.display(),
            names.join(", ")
        )));
    };
    let mut j = crate::journal::Journal::open(&cfg.journal_path())?;
    let place = crate::avail::recorded_place(&j, &w.name);
    if let crate::avail::Availability::Unavailable(why @ crate::avail::Reason::OtherDevice { .. }) =
        crate::avail::check(&w.path, place.as_ref())
    {
        crate::avail::Tracker::forget_place(&mut j, &w.name)?;
        println!(
            "watch {watch}: {}; its device now is taken as its own",
            why.describe(&w.path)
        );
    }
    let n = j.confirm_held(&w.name, coffer_common::host::time::now_ms())?;
    if n == 0 {
        println!("no deletions are held for watch {watch}");
    } else {
        println!(
            "{n} deletions confirmed for watch {watch}: {}",
            if daemon::is_running(cfg) {
                "the agent records them now"
            } else {
                "the agent records them when it next runs"
            }
        );
    }
    Ok(())
}

/// How long `pause` waits for a running daemon to stop sending.
const PAUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `pause [--for DURATION]`: writes the pause; with the daemon running, waits until it
/// has stopped sending (at most [`PAUSE_WAIT`]).
fn pause(cfg: &Config, length: Option<&str>) -> Result<(), CliError> {
    use crate::pause::{self, Pause};
    let reason = match length {
        Some(v) => format!("coffer-agent pause --for {v}"),
        None => "coffer-agent pause".to_string(),
    };
    let length = length.map(pause::parse_for).transpose()?;
    let p = Pause::new(length, reason);
    pause::set(&cfg.state_dir, &p)?;
    let waiting = crate::journal::Journal::open_read_only(&cfg.journal_path())
        .and_then(|j| j.summary())
        .map(|s| {
            format!(
                "; {} files ({} bytes) wait",
                s.pending(),
                s.pending_bytes.max(0)
            )
        })
        .unwrap_or_default();
    if !daemon::is_running(cfg) {
        println!(
            "paused {}; the agent is not running: it journals changes and sends nothing when it \
             next runs{waiting}",
            p.until_text()
        );
        return Ok(());
    }
    let deadline = std::time::Instant::now() + PAUSE_WAIT;
    while !pause::applied(&cfg.state_dir, &p) {
        if std::time::Instant::now() >= deadline || !daemon::is_running(cfg) {
            println!(
                "paused {}; the agent has not yet confirmed that it stopped sending (it \
                 finishes what it was sending first){waiting}",
                p.until_text()
            );
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    println!(
        "paused {}: the agent stopped sending and keeps journaling changes{waiting}",
        p.until_text()
    );
    Ok(())
}

/// `resume`: removes the pause.
fn resume(cfg: &Config) -> Result<(), CliError> {
    let old = crate::pause::clear(&cfg.state_dir)?;
    match old {
        Some(p) if p.holds_at(coffer_common::host::time::now_ms()) => println!(
            "resumed: {}",
            if daemon::is_running(cfg) {
                "the agent sends what waits now"
            } else {
                "the agent sends what waits when it next runs"
            }
        ),
        _ => println!("not paused"),
    }
    Ok(())
}

/// Writes generated text to stdout; a reader that went away (`| head`) is not an error.
fn print_bytes(buf: &[u8]) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(buf).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(CliError::Stdout),
    }
}

fn init(a: InitArgs) -> Result<(), CliError> {
    if a.config.exists() {
        return Err(CliError::ConfigExists(a.config));
    }
    let receiver_key: PublicKey = a.receiver_key.parse().map_err(CliError::ReceiverKey)?;
    let config_dir = a
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&config_dir).ctx("creating", &config_dir)?;
    let config_dir = std::path::absolute(&config_dir).ctx("resolving", &config_dir)?;
    let state_dir = match &a.state_dir {
        Some(s) => std::path::absolute(s).ctx("resolving", s)?,
        None => config_dir.join("state"),
    };
    let mut watches = Vec::new();
    for w in &a.watch {
        std::fs::create_dir_all(w).ctx("creating watched folder", w)?;
        let abs = std::fs::canonicalize(w).ctx("resolving", w)?;
        let name = abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into());
        check_watch_name(&name).map_err(CliError::Usage)?;
        if watches
            .iter()
            .any(|x: &RawWatch| x.name.as_deref() == Some(&name))
        {
            return Err(CliError::SameWatchName(name));
        }
        watches.push(RawWatch {
            path: abs,
            name: Some(name),
            exclude: vec![],
            max_delete_share: None,
        });
    }
    let raw = RawConfig {
        receiver: a.receiver.clone(),
        receiver_key: receiver_key.to_string(),
        name: Some(a.name.clone().unwrap_or_else(host_name)),
        state_dir: Some(state_dir.clone()),
        passphrase_file: a
            .passphrase_file
            .as_deref()
            .map(|p| std::path::absolute(p).ctx("resolving", p))
            .transpose()?,
        debounce: "2s".into(),
        rescan_interval: "1h".into(),
        upload_concurrency: 2,
        max_delete_share: None,
        upload_limit: None,
        download_limit: None,
        watch: watches,
    };
    let cfg = Config::from_raw(&a.config, raw.clone())?;
    state::create_state_dir(&state_dir)?;
    if !a.recover {
        let pass = state::passphrase(cfg.passphrase_file.as_deref(), true)?;
        let master = MasterSecret::generate()?;
        let wrapped = keys::wrap_master(&master, &pass, KdfParams::default())?;
        state::write_private(&cfg.keyfile_path(), &wrapped)?;
    }
    let kp = StaticKeypair::generate()?;
    state::write_private(&cfg.agent_key_path(), &kp.to_bytes())?;
    let text = format!(
        "# Coffer agent configuration. Every key is described in README.md (Configuration).\n{}",
        toml::to_string_pretty(&raw)?
    );
    std::fs::write(&a.config, text).ctx("writing", &a.config)?;
    println!("{}", kp.public());
    if a.recover {
        eprintln!(
            "Recovery: authorize this key for your repository on the receiver:\n  coffer-receiver authorize --root DIR --name REPO {}\n\
             then `coffer-agent ls/restore --config {}` fetch the escrowed key file and ask for your passphrase.",
            kp.public(),
            a.config.display()
        );
    } else {
        eprintln!(
            "Next: on the receiver run\n  coffer-receiver authorize --root DIR --name REPO {}\nthen start `coffer-agent run --config {}`.",
            kp.public(),
            a.config.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
