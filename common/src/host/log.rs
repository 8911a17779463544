//! Logging set-up shared by both binaries: the `-v`/`-q`/`--log-format` options and the
//! `tracing` subscriber behind them. Logs go to stderr; stdout holds only results.

use clap::{Args, ValueEnum};

/// Logging options shared by every command (logs go to stderr).
#[derive(Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// More log output on stderr (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less log output (warnings and errors only); RUST_LOG overrides.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogArgs {
    /// The filter used when `RUST_LOG` is not set.
    pub fn default_filter(&self) -> &'static str {
        match (self.quiet, self.verbose) {
            (true, _) => "warn",
            (false, 0) => "info",
            (false, 1) => "debug",
            (false, _) => "trace",
        }
    }
}

/// Installs the process's subscriber: stderr, the level from `RUST_LOG` or the options,
/// colours only for text on a terminal. A second call (tests) leaves the first in place.
pub fn init(l: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(l.default_filter()));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match l.log_format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn levels_follow_the_flags() {
        let parse = |a: &[&str]| Cli::try_parse_from(a).map(|c| c.log);
        assert_eq!(parse(&["x"]).expect("none").default_filter(), "info");
        assert_eq!(parse(&["x", "-v"]).expect("-v").default_filter(), "debug");
        assert_eq!(parse(&["x", "-vv"]).expect("-vv").default_filter(), "trace");
        assert_eq!(parse(&["x", "-q"]).expect("-q").default_filter(), "warn");
        assert!(parse(&["x", "-q", "-v"]).is_err());
        let json = parse(&["x", "--log-format", "json"]).expect("json");
        assert_eq!(json.log_format, LogFormat::Json);
    }
}
