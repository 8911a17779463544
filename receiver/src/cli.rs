//! The `coffer-receiver` command line (clap derive) and what each command does with its
//! result. `main.rs` only parses, sets up logging, calls [`run`] and prints the error.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::store::{LocalDisk, PackStores};
use crate::{clidoc, server, service, status, Authorized, Layout};
use clap::{Args, CommandFactory, Parser, Subcommand};
use coffer_common::host::log::LogArgs;

/// Coffer receiver: stores sealed chunks durably; never sees keys or plaintext.
#[derive(Parser)]
#[command(name = "coffer-receiver", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args)]
pub struct RootOpt {
    /// The backup tree.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create the backup tree and the receiver key; prints the public key.
    Init {
        #[command(flatten)]
        root: RootOpt,
        /// Address to listen on (default 127.0.0.1:7700).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Let agent KEY write to repository NAME.
    Authorize {
        #[command(flatten)]
        root: RootOpt,
        /// Repository name.
        #[arg(long, value_name = "REPO")]
        name: String,
        /// The agent's public key (as printed by `coffer-agent init`; it may begin with
        /// `-`).
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Stop accepting agent KEY (new connections are refused at once).
    Revoke {
        #[command(flatten)]
        root: RootOpt,
        /// The agent's public key.
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Serve agents until SIGTERM/SIGINT.
    Serve {
        #[command(flatten)]
        root: RootOpt,
        /// Address to listen on, overriding receiver.toml (port 0 picks a free port).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9465). Off by
        /// default; ADDR is used as given, so keep it on loopback unless the network to it
        /// is trusted.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// Show repositories, keys, counts and whether serve is running.
    Status {
        #[command(flatten)]
        root: RootOpt,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Check every stored record against its hash and the index against the packs (no
    /// key needed).
    Scrub {
        #[command(flatten)]
        root: RootOpt,
        /// Only this repository.
        #[arg(long, value_name = "NAME")]
        repo: Option<String>,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild index.sqlite from the packs (refused while serve runs); exits 1 when
    /// anything was found lost or damaged.
    Repair {
        #[command(flatten)]
        root: RootOpt,
        /// Only this repository.
        #[arg(long, value_name = "NAME")]
        repo: Option<String>,
    },
    /// Apply each repository's retention policy, then compact its packs; while serve runs,
    /// serve does it (in turn with its sessions). Prints versions kept and removed, bytes
    /// freed, packs rewritten.
    Prune {
        #[command(flatten)]
        root: RootOpt,
        /// Only this repository.
        #[arg(long, value_name = "NAME")]
        repo: Option<String>,
        /// Decide and print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Install or remove the systemd service that runs `serve`.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Print shell completions.
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clidoc::Shell,
    },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
pub enum ServiceAction {
    /// Write the unit for this binary and ROOT (run as the root's owner), enable, (re)start.
    Install {
        #[command(flatten)]
        root: RootOpt,
        /// Print the unit and the commands; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop and disable the service and remove its unit.
    Uninstall {
        /// Print what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Errors of the command line: a command's own, or writing what it prints.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Command(#[from] crate::Error),
    #[error("writing to stdout")]
    Stdout(#[source] std::io::Error),
    #[error("encoding status")]
    EncodeStatus(#[source] serde_json::Error),
    #[error("writing completions to stdout")]
    Completions(#[source] std::io::Error),
    #[error("writing the man page to stdout")]
    Man(#[source] std::io::Error),
}

impl From<service::ServiceError> for CliError {
    fn from(e: service::ServiceError) -> Self {
        CliError::Command(e.into())
    }
}

fn out(line: impl std::fmt::Display) -> Result<(), CliError> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}").map_err(CliError::Stdout)?;
    o.flush().map_err(CliError::Stdout)
}

/// Where every command finds repositories' packs: the one place the store is chosen.
fn pack_stores() -> Arc<dyn PackStores> {
    Arc::new(LocalDisk)
}

/// Runs the parsed command; the exit code is a failure when `scrub` found damage.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Init { root, listen } => {
            let key = crate::init(&root.root, listen)?;
            out(key)?;
        }
        Command::Authorize { root, name, key } => {
            match crate::authorize(&root.root, &name, &key)? {
                Authorized::Added => {
                    tracing::info!("agent key {key} may now write repository {name}")
                }
                Authorized::AlreadyPresent => {
                    tracing::info!("agent key {key} was already authorized for repository {name}")
                }
            }
        }
        Command::Revoke { root, key } => {
            let repo = crate::revoke(&root.root, &key)?;
            tracing::info!("revoked agent key {key} (it wrote repository {repo})");
        }
        Command::Serve {
            root,
            listen,
            metrics,
        } => serve(root.root, listen, metrics)?,
        Command::Status { root, json } => {
            let s = status::status(&Layout::new(&root.root), &*pack_stores())?;
            if json {
                out(serde_json::to_string(&s).map_err(CliError::EncodeStatus)?)?;
            } else {
                print!("{}", s.render());
            }
        }
        Command::Scrub { root, repo, json } => return scrub(&root.root, repo.as_deref(), json),
        Command::Repair { root, repo } => return repair(&root.root, repo.as_deref()),
        Command::Prune {
            root,
            repo,
            dry_run,
            json,
        } => return prune(&root.root, repo.as_deref(), dry_run, json),
        Command::Service { action } => {
            let report = match action {
                ServiceAction::Install { root, dry_run } => {
                    service::install(&service::InstallOpts {
                        dry_run,
                        root: root.root,
                        binary: None,
                    })?
                }
                ServiceAction::Uninstall { dry_run } => {
                    service::uninstall(&service::UninstallOpts { dry_run })?
                }
            };
            print!("{report}");
        }
        Command::Completions { shell } => {
            clidoc::completions(shell, &mut Cli::command(), &mut std::io::stdout().lock())
                .map_err(CliError::Completions)?;
        }
        Command::Man => {
            clidoc::man(Cli::command(), &mut std::io::stdout().lock()).map_err(CliError::Man)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `serve`: prints the bound address once listening, runs until SIGTERM/SIGINT.
fn serve(
    root: PathBuf,
    listen: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) -> Result<(), CliError> {
    let mut ready_err = None;
    server::serve(
        server::ServeOptions {
            root,
            listen,
            metrics,
            stores: pack_stores(),
        },
        |addr| {
            if let Err(e) = out(format_args!("listening on {addr}")) {
                ready_err = Some(e);
            }
        },
    )?;
    match ready_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `scrub`: prints each problem as it is found (damaged records as `damaged: ...`), then
/// the totals; with `--json`, one object instead. Fails when anything is wrong.
fn scrub(root: &Path, only: Option<&str>, json: bool) -> Result<ExitCode, CliError> {
    let report = status::scrub(&Layout::new(root), &*pack_stores(), only, |repo, p, d| {
        if json {
            return;
        }
        let _ = match d {
            Some(d) => out(format_args!(
                "damaged: repository {} pack {} offset {} chunk {}: {}",
                d.repo, d.pack, d.offset, d.chunk, d.why
            )),
            None => out(p.line(repo)),
        };
    })?;
    let problems = report.problems();
    if json {
        let v = serde_json::json!({
            "repositories": report.repos,
            "problems": problems,
        });
        out(serde_json::to_string(&v).map_err(CliError::EncodeStatus)?)?;
    } else {
        let versions: u64 = report.repos.iter().map(|r| r.versions).sum();
        let pending: u64 = report.repos.iter().map(|r| r.upgrade_pending).sum();
        out(format_args!(
            "scrub: {} records ({} bytes) in {} repositories checked, {} damaged; {} versions \
             checked against their commit records ({} upgrade pending); {} problems",
            report.records,
            report.bytes,
            report.repositories,
            report.damaged.len(),
            versions,
            pending,
            problems
        ))?;
    }
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `repair`: rebuilds indexes from the packs, printing each problem and a line per
/// repository, then the totals. Fails when anything was lost or damaged.
fn repair(root: &Path, only: Option<&str>) -> Result<ExitCode, CliError> {
    let progress = crate::repair::Progress::on_terminal();
    let report = crate::repair::repair(&Layout::new(root), &*pack_stores(), only, &progress)?;
    let sum = |f: fn(&crate::repair::Rebuilt) -> u64| -> u64 {
        report.repositories.iter().map(|(_, r)| f(r)).sum()
    };
    out(format_args!(
        "repair: {} repositories, {} packs, {} chunks, {} versions; {} damaged records, {} \
         versions with lost chunks, {} bytes cut{}{}",
        report.repositories.len(),
        sum(|r| r.packs),
        sum(|r| r.chunks),
        sum(|r| r.versions),
        sum(|r| r.damaged),
        sum(|r| r.versions_lost_chunks),
        sum(|r| r.cut_bytes),
        if report
            .repositories
            .iter()
            .any(|(_, r)| r.no_commit_records())
        {
            "; versions NOT recovered where the packs hold no commit records"
        } else {
            ""
        },
        if report.refused.is_empty() {
            String::new()
        } else {
            format!("; {} repositories NOT repaired", report.refused.len())
        }
    ))?;
    Ok(if report.lost_anything() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `prune`: a line per repository (its error, when it failed), then the totals; with
/// `--json`, one object `{dry_run, repositories: [report...], errors: [{repo, error}]}`.
/// Fails when any repository failed.
fn prune(root: &Path, only: Option<&str>, dry_run: bool, json: bool) -> Result<ExitCode, CliError> {
    use std::io::IsTerminal;
    let opts = crate::prune::PruneOptions {
        dry_run,
        progress: std::io::stderr().is_terminal(),
    };
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    let mut printed = Ok(());
    let mut each = |repo: &str, r: Result<crate::prune::PruneReport, String>| match r {
        Ok(report) => {
            if !json && printed.is_ok() {
                printed = out(report.line());
            }
            reports.push(report);
        }
        Err(e) => {
            tracing::error!("prune of repository {repo} failed: {e}");
            if !json && printed.is_ok() {
                printed = out(format_args!("repository {repo}: FAILED: {e}"));
            }
            errors.push(serde_json::json!({"repo": repo, "error": e}));
        }
    };
    let layout = Layout::new(root);
    if status::serve_running(&layout)? {
        // `serve` runs: it prunes, in turn with its sessions (the control socket), and its
        // reports are printed here as this process's own would be.
        tracing::info!("serve is running: the prune is done by it");
        let req = crate::control::Request::Prune {
            repo: only.map(str::to_string),
            dry_run,
        };
        for o in crate::control::request(&layout, &req).map_err(crate::Error::from)? {
            let (repo, r) = crate::control::Outcome::into_result(o);
            each(&repo, r);
        }
    } else {
        crate::prune::prune_root(&layout, &*pack_stores(), only, &opts, |repo, r| {
            each(repo, r.map_err(|e| e.to_string()))
        })?;
    }
    printed?;
    if json {
        let v = serde_json::json!({
            "dry_run": dry_run,
            "repositories": reports,
            "errors": errors,
        });
        out(serde_json::to_string(&v).map_err(CliError::EncodeStatus)?)?;
    } else {
        let sum = |f: fn(&crate::prune::PruneReport) -> u64| -> u64 { reports.iter().map(f).sum() };
        out(format_args!(
            "prune{}: {} repositories, {} versions kept, {} {}, {} bytes {}, {} packs \
             rewritten, {} deleted{}",
            if dry_run { " (dry run)" } else { "" },
            reports.len(),
            sum(|r| r.versions_kept),
            sum(|r| r.versions_removed),
            if dry_run { "to remove" } else { "removed" },
            sum(|r| r.bytes_freed),
            if dry_run { "to free" } else { "freed" },
            sum(|r| r.packs_rewritten),
            sum(|r| r.packs_deleted),
            if errors.is_empty() {
                String::new()
            } else {
                format!("; {} repositories FAILED", errors.len())
            }
        ))?;
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};
    use crate::clidoc::{self, Shell};
    use coffer_common::host::log::LogFormat;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn log_options_are_global() {
        let c = Cli::try_parse_from([
            "coffer-receiver",
            "serve",
            "--root",
            "/r",
            "-q",
            "--log-format",
            "json",
            "--metrics",
            "127.0.0.1:9465",
        ])
        .expect("parses");
        assert!(c.log.quiet);
        assert_eq!(c.log.log_format, LogFormat::Json);
        match c.command {
            Command::Serve { metrics, .. } => {
                assert_eq!(metrics, Some("127.0.0.1:9465".parse().expect("addr")))
            }
            _ => panic!("not serve"),
        }
        assert!(
            Cli::try_parse_from(["coffer-receiver", "-q", "-v", "status", "--root", "/r"]).is_err()
        );
        assert!(Cli::try_parse_from([
            "coffer-receiver",
            "--log-format",
            "xml",
            "status",
            "--root",
            "/r"
        ])
        .is_err());
    }

    #[test]
    fn completions_and_man_page_render_and_stay_hidden() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            clidoc::completions(shell, &mut Cli::command(), &mut out).expect("renders");
            let text = String::from_utf8(out).expect("utf-8");
            assert!(text.contains("coffer-receiver"), "{shell}");
            assert!(text.contains("authorize"), "{shell}");
        }
        let mut out = Vec::new();
        clidoc::man(Cli::command(), &mut out).expect("renders");
        let man = String::from_utf8(out).expect("utf-8");
        assert!(man.contains(".TH coffer-receiver"), "{man}");
        assert!(man.contains("serve"), "{man}");
        let help = Cli::command().render_long_help().to_string();
        assert!(
            !help.contains("completions") && !help.contains("\n  man"),
            "{help}"
        );
    }
}
