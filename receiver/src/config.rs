//! `<root>/receiver.toml`: listen address and limits. Every key has a documented default
//! (see `packaging/receiver.toml`); unknown keys are refused.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use coffer_common::host::fs::{Context, IoError};

use crate::server::MAX_HANDSHAKES;

/// Default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";

/// The receiver's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address `serve` listens on.
    pub listen: SocketAddr,
    /// Sessions served at once.
    pub max_sessions: usize,
    /// A session idle this long is closed.
    pub idle_timeout_secs: u64,
    /// Size at which a pack is closed and a new one begun.
    pub pack_max_bytes: u64,
    /// How long in-flight sessions may take to finish on shutdown.
    pub shutdown_grace_secs: u64,
    /// How long a new connection has to send its preamble and first handshake message.
    pub handshake_timeout_secs: u64,
    /// Connections from one address in the handshake (or waiting for one) at once.
    pub max_handshakes_per_address: usize,
    /// Sessions one agent key may hold at once.
    pub max_sessions_per_key: usize,
    /// Sessions one repository's keys may hold at once.
    pub max_sessions_per_repo: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            max_sessions: 64,
            idle_timeout_secs: 300,
            pack_max_bytes: 64 << 20,
            shutdown_grace_secs: 10,
            handshake_timeout_secs: 3,
            max_handshakes_per_address: 16,
            max_sessions_per_key: 8,
            max_sessions_per_repo: 16,
        }
    }
}

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("{path}: {key} {msg}")]
    Invalid {
        path: String,
        key: &'static str,
        msg: &'static str,
    },
}

impl Config {
    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            msg: e.to_string().trim().to_string(),
        })?;
        let bad = |key, msg| ConfigError::Invalid {
            path: origin.to_string(),
            key,
            msg,
        };
        if c.max_sessions == 0 || c.max_sessions > 100_000 {
            return Err(bad("max_sessions", "must be between 1 and 100000"));
        }
        if c.idle_timeout_secs == 0 {
            return Err(bad("idle_timeout_secs", "must be at least 1"));
        }
        if c.pack_max_bytes < 1 << 20 || c.pack_max_bytes > 1 << 40 {
            return Err(bad("pack_max_bytes", "must be between 1 MiB and 1 TiB"));
        }
        if c.handshake_timeout_secs == 0 || c.handshake_timeout_secs > 10 {
            return Err(bad("handshake_timeout_secs", "must be between 1 and 10"));
        }
        if c.max_handshakes_per_address == 0 || c.max_handshakes_per_address > MAX_HANDSHAKES {
            return Err(bad(
                "max_handshakes_per_address",
                "must be between 1 and 512 (the handshakes run at once in all)",
            ));
        }
        if c.max_sessions_per_key == 0 || c.max_sessions_per_key > 100_000 {
            return Err(bad("max_sessions_per_key", "must be between 1 and 100000"));
        }
        if c.max_sessions_per_repo == 0 || c.max_sessions_per_repo > 100_000 {
            return Err(bad("max_sessions_per_repo", "must be between 1 and 100000"));
        }
        Ok(c)
    }

    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).ctx("reading", path)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The commented file `init` writes, with this configuration's values.
    pub fn render(&self) -> String {
        format!(
            "# coffer-receiver configuration (see packaging/receiver.toml for every key).\n\
             \n\
             # Address and port `serve` listens on; `serve --listen` overrides it.\n\
             listen = \"{}\"\n\
             # Agent sessions served at once.\n\
             max_sessions = {}\n\
             # A session that sends nothing for this long is closed (seconds).\n\
             idle_timeout_secs = {}\n\
             # Size at which a pack file is closed and a new one started (bytes).\n\
             pack_max_bytes = {}\n\
             # On SIGTERM/SIGINT, time given to in-flight commits before exiting (seconds).\n\
             shutdown_grace_secs = {}\n\
             # Time a new connection has to send its preamble and first handshake message\n\
             # (seconds, at most 10).\n\
             handshake_timeout_secs = {}\n\
             # Connections from one address in the handshake, or queued for one, at once.\n\
             max_handshakes_per_address = {}\n\
             # Sessions one agent key may hold at once.\n\
             max_sessions_per_key = {}\n\
             # Sessions the keys of one repository may hold at once.\n\
             max_sessions_per_repo = {}\n",
            self.listen,
            self.max_sessions,
            self.idle_timeout_secs,
            self.pack_max_bytes,
            self.shutdown_grace_secs,
            self.handshake_timeout_secs,
            self.max_handshakes_per_address,
            self.max_sessions_per_key,
            self.max_sessions_per_repo
        )
    }

    /// Idle timeout as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// The handshake's opening deadline as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    /// Shutdown grace as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_example_parses_to_the_defaults() {
        let text = include_str!("../../packaging/receiver.toml");
        let c = Config::parse(text, "packaging/receiver.toml").expect("example parses");
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn rendered_file_round_trips() {
        let c = Config {
            listen: "0.0.0.0:0".parse().expect("addr"),
            max_sessions: 300,
            handshake_timeout_secs: 5,
            max_handshakes_per_address: 2,
            max_sessions_per_key: 3,
            max_sessions_per_repo: 4,
            ..Config::default()
        };
        assert_eq!(Config::parse(&c.render(), "x").expect("parse"), c);
    }

    #[test]
    fn empty_file_is_all_defaults_and_unknown_keys_are_refused() {
        assert_eq!(Config::parse("", "x").expect("parse"), Config::default());
        let e = Config::parse("max_sesions = 3\n", "r.toml").expect_err("typo");
        assert!(e.to_string().contains("max_sesions"), "{e}");
        let e = Config::parse("pack_max_bytes = 10\n", "r.toml").expect_err("tiny");
        assert!(e.to_string().contains("pack_max_bytes"), "{e}");
        for bad in [
            "handshake_timeout_secs = 0",
            "handshake_timeout_secs = 11",
            "max_handshakes_per_address = 0",
            "max_handshakes_per_address = 513",
            "max_sessions_per_key = 0",
            "max_sessions_per_repo = 0",
        ] {
            let e = Config::parse(bad, "r.toml").expect_err(bad);
            let key = bad.split(' ').next().unwrap_or_default();
            assert!(e.to_string().contains(key), "{e}");
        }
    }
}
