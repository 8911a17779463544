//! `<root>/receiver.toml`: listen address and limits. Every key has a documented default
//! (see `packaging/receiver.toml`); unknown keys are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use coffer_common::host::fs::{Context, IoError};

use crate::auth::RepoName;
use crate::quota::{parse_percent, parse_size};
use crate::retention::{duration_text, parse_duration, parse_share, share_text, Retention};
use crate::server::MAX_HANDSHAKES;

/// `min_free` when it is not set: this much on a file system of at least
/// [`AUTO_MIN_FREE_FS`]; none on a smaller one (a test disk, a small VM), where the
/// operator sets it.
pub const AUTO_MIN_FREE: u64 = 5 << 30;
/// The smallest file system [`AUTO_MIN_FREE`] applies to.
pub const AUTO_MIN_FREE_FS: u64 = 50 << 30;
/// `warn_at` when it is not set.
pub const DEFAULT_WARN_AT: u32 = 90;

/// A size in bytes, written `"500GiB"` (or a plain number of bytes) in `receiver.toml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Size(pub u64);

/// A percentage from 1 to 100, written `"90%"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percent(pub u32);

impl Default for Percent {
    fn default() -> Self {
        Percent(DEFAULT_WARN_AT)
    }
}

/// A size or percentage as written: text, or a bare number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Written {
    Number(u64),
    Text(String),
}

impl Written {
    fn size(&self) -> Result<u64, String> {
        match self {
            Written::Number(n) => Ok(*n),
            Written::Text(t) => parse_size(t),
        }
    }

    fn percent(&self) -> Result<u32, String> {
        match self {
            Written::Number(n) => parse_percent(&n.to_string()),
            Written::Text(t) => parse_percent(t),
        }
    }
}

/// `n` bytes as `receiver.toml` writes them: in the largest binary unit that divides it.
fn size_text(n: u64) -> String {
    for (unit, m) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    n.to_string()
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&size_text(self.0))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Written::deserialize(d)?
            .size()
            .map(Size)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}%", self.0))
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Written::deserialize(d)?
            .percent()
            .map(Percent)
            .map_err(serde::de::Error::custom)
    }
}

/// `[repos.NAME]`: settings of one repository.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// The repository's quota; the top-level `quota` when absent.
    pub quota: Option<Size>,
    /// `[repos.NAME.retention]`: keys that override `[retention]` for this repository.
    #[serde(default)]
    pub retention: RetentionKeys,
}

/// The keys of a `[retention]` or `[repos.NAME.retention]` table, each as written (`None`:
/// not set). Durations of zero are `"0"` (for `keep_deleted_for` and `prune_interval`:
/// never); `max_unused` is in basis points (`"10%"` is 1000).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "toml::Table", into = "toml::Table")]
pub struct RetentionKeys {
    pub keep_within: Option<Duration>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_last: Option<u32>,
    pub keep_deleted_for: Option<Duration>,
    pub keep_all: Option<bool>,
    pub prune_interval: Option<Duration>,
    pub max_unused: Option<u32>,
}

/// Every key of a retention table, in the order `render` writes them.
pub const RETENTION_KEYS: [&str; 11] = [
    "keep_within",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "keep_last",
    "keep_deleted_for",
    "keep_all",
    "prune_interval",
    "max_unused",
];

impl RetentionKeys {
    /// Reads a retention table; an error is the key (as given) and what is wrong with it.
    fn from_table(t: &toml::Table) -> Result<Self, (String, String)> {
        let mut k = RetentionKeys::default();
        for (key, v) in t {
            let bad = |msg: String| (key.clone(), msg);
            let duration = || match v {
                toml::Value::String(s) => parse_duration(s).map_err(bad),
                toml::Value::Integer(0) => Ok(Duration::ZERO),
                other => Err(bad(format!(
                    "expected a quoted duration such as \"90d\" or \"24h\", got {other}"
                ))),
            };
            let count = || match v {
                toml::Value::Integer(n) => u32::try_from(*n).map_err(|_| {
                    bad(format!(
                        "expected a whole number from 0 to {}, got {n}",
                        u32::MAX
                    ))
                }),
                other => Err(bad(format!(
                    "expected a whole number such as 48, got {other}"
                ))),
            };
            match key.as_str() {
                "keep_within" => k.keep_within = Some(duration()?),
                "keep_hourly" => k.keep_hourly = Some(count()?),
                "keep_daily" => k.keep_daily = Some(count()?),
                "keep_weekly" => k.keep_weekly = Some(count()?),
                "keep_monthly" => k.keep_monthly = Some(count()?),
                "keep_yearly" => k.keep_yearly = Some(count()?),
                "keep_last" => k.keep_last = Some(count()?),
                "keep_deleted_for" => k.keep_deleted_for = Some(duration()?),
                "prune_interval" => k.prune_interval = Some(duration()?),
                "keep_all" => match v {
                    toml::Value::Boolean(b) => k.keep_all = Some(*b),
                    other => return Err(bad(format!("expected true or false, got {other}"))),
                },
                "max_unused" => {
                    k.max_unused = Some(match v {
                        toml::Value::String(s) => parse_share(s).map_err(bad)?,
                        toml::Value::Float(f) if (0.0..=1.0).contains(f) => {
                            (f * 10_000.0).round() as u32
                        }
                        other => {
                            return Err(bad(format!(
                                "expected a quoted share such as \"10%\", got {other}"
                            )))
                        }
                    })
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key; a retention table takes {}",
                        RETENTION_KEYS.join(", ")
                    )))
                }
            }
        }
        Ok(k)
    }

    /// The set keys as `key = value` lines of `receiver.toml`, in [`RETENTION_KEYS`] order.
    fn lines(&self) -> Vec<String> {
        let d = |v: &Option<Duration>| v.map(|d| format!("\"{}\"", duration_text(d)));
        let n = |v: &Option<u32>| v.map(|n| n.to_string());
        let values = [
            d(&self.keep_within),
            n(&self.keep_hourly),
            n(&self.keep_daily),
            n(&self.keep_weekly),
            n(&self.keep_monthly),
            n(&self.keep_yearly),
            n(&self.keep_last),
            d(&self.keep_deleted_for),
            self.keep_all.map(|b| b.to_string()),
            d(&self.prune_interval),
            self.max_unused.map(|s| format!("\"{}\"", share_text(s))),
        ];
        RETENTION_KEYS
            .iter()
            .zip(values)
            .filter_map(|(k, v)| v.map(|v| format!("{k} = {v}")))
            .collect()
    }

    /// Every key set to DESIGN.md's default.
    pub fn defaults() -> Self {
        let r = Retention::default();
        let p = &r.policy;
        RetentionKeys {
            keep_within: Some(p.keep_within),
            keep_hourly: Some(p.keep_hourly),
            keep_daily: Some(p.keep_daily),
            keep_weekly: Some(p.keep_weekly),
            keep_monthly: Some(p.keep_monthly),
            keep_yearly: Some(p.keep_yearly),
            keep_last: Some(p.keep_last),
            keep_deleted_for: Some(p.keep_deleted_for.unwrap_or(Duration::ZERO)),
            keep_all: Some(p.keep_all),
            prune_interval: Some(r.prune_interval.unwrap_or(Duration::ZERO)),
            max_unused: Some((r.max_unused * 10_000.0).round() as u32),
        }
    }

    /// True when no key is set.
    pub fn is_empty(&self) -> bool {
        *self == RetentionKeys::default()
    }

    /// `base` with the keys set here replacing its own.
    pub fn apply(&self, base: &Retention) -> Retention {
        let mut r = base.clone();
        let p = &mut r.policy;
        let never = |d: Duration| (!d.is_zero()).then_some(d);
        if let Some(v) = self.keep_within {
            p.keep_within = v;
        }
        for (set, field) in [
            (self.keep_hourly, &mut p.keep_hourly),
            (self.keep_daily, &mut p.keep_daily),
            (self.keep_weekly, &mut p.keep_weekly),
            (self.keep_monthly, &mut p.keep_monthly),
            (self.keep_yearly, &mut p.keep_yearly),
            (self.keep_last, &mut p.keep_last),
        ] {
            if let Some(v) = set {
                *field = v;
            }
        }
        if let Some(v) = self.keep_deleted_for {
            p.keep_deleted_for = never(v);
        }
        if let Some(v) = self.keep_all {
            p.keep_all = v;
        }
        if let Some(v) = self.prune_interval {
            r.prune_interval = never(v);
        }
        if let Some(v) = self.max_unused {
            r.max_unused = f64::from(v) / 10_000.0;
        }
        r
    }
}

impl TryFrom<toml::Table> for RetentionKeys {
    type Error = String;

    fn try_from(t: toml::Table) -> Result<Self, String> {
        Self::from_table(&t).map_err(|(k, m)| format!("{k}: {m}"))
    }
}

impl From<RetentionKeys> for toml::Table {
    fn from(k: RetentionKeys) -> toml::Table {
        // Each line is `key = value` with a valid TOML value, so the table parses.
        toml::from_str(&k.lines().join("\n")).unwrap_or_default()
    }
}

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
    /// Default quota of every repository, on the bytes its packs hold (0: none).
    pub quota: Size,
    /// Below this much free space on the packs' file system, new chunks are refused for
    /// every repository (0: none). Unset: [`AUTO_MIN_FREE`] on a file system of at least
    /// [`AUTO_MIN_FREE_FS`], none on a smaller one.
    pub min_free: Option<Size>,
    /// Share of a quota past which `status` and `/metrics` warn.
    pub warn_at: Percent,
    /// `[retention]`: the retention keys set for every repository (DESIGN.md's defaults
    /// for the others); see [`Config::retention`].
    pub retention: RetentionKeys,
    /// Per-repository settings (`[repos.NAME]`).
    pub repos: BTreeMap<RepoName, RepoConfig>,
}

/// The receiver's configuration, by the name the retention interface uses.
pub type ReceiverConfig = Config;

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
            quota: Size(0),
            min_free: None,
            warn_at: Percent::default(),
            retention: RetentionKeys::default(),
            repos: BTreeMap::new(),
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
    #[error("{path}: {key}: {msg}")]
    Value {
        path: String,
        key: String,
        msg: String,
    },
}

/// Checks the size and percentage keys of the parsed file (`quota`, `min_free`, `warn_at`,
/// `[repos.NAME]` and its `quota`), so that an error names the key (the deserializer's
/// errors name only a line).
fn check_quota_keys(table: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    let bad = |key: String, msg: String| ConfigError::Value {
        path: origin.to_string(),
        key,
        msg,
    };
    let written = |key: &str, v: &toml::Value| -> Result<Written, ConfigError> {
        match v {
            toml::Value::String(s) => Ok(Written::Text(s.clone())),
            toml::Value::Integer(n) if *n >= 0 => Ok(Written::Number(*n as u64)),
            other => Err(bad(
                key.to_string(),
                format!("expected a quoted value such as \"500GiB\" or \"90%\", got {other}"),
            )),
        }
    };
    for key in ["quota", "min_free"] {
        if let Some(v) = table.get(key) {
            written(key, v)?.size().map_err(|m| bad(key.into(), m))?;
        }
    }
    if let Some(v) = table.get("warn_at") {
        written("warn_at", v)?
            .percent()
            .map_err(|m| bad("warn_at".into(), m))?;
    }
    if let Some(repos) = table.get("repos") {
        let Some(repos) = repos.as_table() else {
            return Err(bad("repos".into(), "expected tables [repos.NAME]".into()));
        };
        for (name, r) in repos {
            let key = format!("repos.{name}");
            RepoName::new(name).map_err(|e| bad(key.clone(), e.to_string()))?;
            let Some(r) = r.as_table() else {
                return Err(bad(key, "expected a table [repos.NAME]".into()));
            };
            if let Some(v) = r.get("quota") {
                let key = format!("{key}.quota");
                written(&key, v)?.size().map_err(|m| bad(key, m))?;
            }
        }
    }
    Ok(())
}

/// Checks the `[retention]` and `[repos.NAME.retention]` tables, so that an error names the
/// key (and the repository) rather than a line.
fn check_retention_keys(table: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    let check = |v: &toml::Value, prefix: &str| -> Result<(), ConfigError> {
        let bad = |key: String, msg: String| ConfigError::Value {
            path: origin.to_string(),
            key: if key.is_empty() {
                prefix.trim_end_matches('.').to_string()
            } else {
                format!("{prefix}{key}")
            },
            msg,
        };
        let Some(t) = v.as_table() else {
            return Err(bad(
                String::new(),
                "expected a table of retention keys".to_string(),
            ));
        };
        RetentionKeys::from_table(t)
            .map(drop)
            .map_err(|(k, m)| bad(k, m))
    };
    if let Some(v) = table.get("retention") {
        check(v, "retention.")?;
    }
    if let Some(repos) = table.get("repos").and_then(|r| r.as_table()) {
        for (name, r) in repos {
            if let Some(v) = r.as_table().and_then(|r| r.get("retention")) {
                check(v, &format!("repos.{name}.retention."))?;
            }
        }
    }
    Ok(())
}

impl Config {
    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: origin.to_string(),
            msg: e.to_string().trim().to_string(),
        };
        let table = toml::from_str(text).map_err(parse_error)?;
        check_quota_keys(&table, origin)?;
        check_retention_keys(&table, origin)?;
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
             max_sessions_per_repo = {}\n\
             # Default quota of every repository, on the bytes its packs hold (\"0\": none),\n\
             # e.g. \"500GiB\"; [repos.NAME] quota = ... sets one repository's.\n\
             quota = \"{}\"\n\
             # Below this much free space on the packs' file system, every repository is\n\
             # refused new chunks (\"0\": none). Unset: 5GiB on a file system of 50 GiB or\n\
             # more, none on a smaller one.\n\
             {}\n\
             # Share of a quota past which status and /metrics warn.\n\
             warn_at = \"{}%\"\n",
            self.listen,
            self.max_sessions,
            self.idle_timeout_secs,
            self.pack_max_bytes,
            self.shutdown_grace_secs,
            self.handshake_timeout_secs,
            self.max_handshakes_per_address,
            self.max_sessions_per_key,
            self.max_sessions_per_repo,
            size_text(self.quota.0),
            match self.min_free {
                Some(m) => format!("min_free = \"{}\"", size_text(m.0)),
                None => "# min_free = \"5GiB\"".to_string(),
            },
            self.warn_at.0,
        ) + &self.render_retention()
            + &self.render_repos()
    }

    /// The `[retention]` table of [`Config::render`]: the keys set, else DESIGN.md's
    /// defaults commented out.
    fn render_retention(&self) -> String {
        let mut out = String::from(
            "\n# Retention: which versions of each file the receiver keeps (see\n\
             # packaging/receiver.toml); [repos.NAME.retention] overrides keys per repository.\n",
        );
        if self.retention.is_empty() {
            out.push_str("# [retention]\n");
            for l in RetentionKeys::defaults().lines() {
                out.push_str(&format!("# {l}\n"));
            }
        } else {
            out.push_str("[retention]\n");
            for l in self.retention.lines() {
                out.push_str(&format!("{l}\n"));
            }
        }
        out
    }

    /// The `[repos.NAME]` tables of [`Config::render`].
    fn render_repos(&self) -> String {
        let mut out = String::new();
        for (name, r) in &self.repos {
            let name = toml::Value::String(name.to_string());
            out.push_str(&format!("\n[repos.{name}]\n"));
            if let Some(q) = r.quota {
                out.push_str(&format!("quota = \"{}\"\n", size_text(q.0)));
            }
            if !r.retention.is_empty() {
                out.push_str(&format!("\n[repos.{name}.retention]\n"));
                for l in r.retention.lines() {
                    out.push_str(&format!("{l}\n"));
                }
            }
        }
        out
    }

    /// The retention settings of repository `repo`: DESIGN.md's defaults, replaced key by
    /// key by `[retention]`, then by `[repos.NAME.retention]`.
    pub fn retention(&self, repo: &RepoName) -> Retention {
        let global = self.retention.apply(&Retention::default());
        match self.repos.get(repo) {
            Some(r) => r.retention.apply(&global),
            None => global,
        }
    }

    /// The quota of repository `name` in bytes (0: none): its own, else the default.
    pub fn quota_of(&self, name: &RepoName) -> u64 {
        self.repos
            .get(name)
            .and_then(|r| r.quota)
            .unwrap_or(self.quota)
            .0
    }

    /// The free-space floor on a file system of `fs_size` bytes (see `min_free`).
    pub fn min_free_for(&self, fs_size: u64) -> u64 {
        match self.min_free {
            Some(m) => m.0,
            None if fs_size >= AUTO_MIN_FREE_FS => AUTO_MIN_FREE,
            None => 0,
        }
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
    fn packaged_retention_block_uncommented_is_the_defaults() {
        let text = include_str!("../../packaging/receiver.toml");
        let block: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "# [retention]")
            .take_while(|l| !l.starts_with("# [repos."))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .collect();
        assert_eq!(block.len(), 1 + RETENTION_KEYS.len(), "{block:?}");
        let c = Config::parse(&block.join("\n"), "block").expect("block parses");
        assert_eq!(c.retention, RetentionKeys::defaults());
        let any = RepoName::new("any").expect("name");
        assert_eq!(c.retention(&any), Retention::default());
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
        let mut repos = BTreeMap::new();
        repos.insert(
            RepoName::new("my \"laptop\"").expect("name"),
            RepoConfig {
                quota: Some(Size(500 << 30)),
                retention: RetentionKeys::default(),
            },
        );
        repos.insert(RepoName::new("nas").expect("name"), RepoConfig::default());
        let c = Config {
            quota: Size(3 << 40),
            min_free: Some(Size(12345)),
            warn_at: Percent(75),
            repos,
            ..Config::default()
        };
        assert_eq!(Config::parse(&c.render(), "x").expect("parse"), c);
        let c = Config {
            min_free: Some(Size(0)),
            ..Config::default()
        };
        assert_eq!(Config::parse(&c.render(), "x").expect("parse"), c);
    }

    #[test]
    fn quota_keys_parse_sizes_and_percentages() {
        let c = Config::parse(
            "quota = \"1TiB\"\nmin_free = \"5GiB\"\nwarn_at = \"80%\"\n\
             [repos.laptop]\nquota = \"500GiB\"\n[repos.nas]\n",
            "r.toml",
        )
        .expect("parse");
        let laptop = RepoName::new("laptop").expect("name");
        let nas = RepoName::new("nas").expect("name");
        let other = RepoName::new("other").expect("name");
        assert_eq!(c.quota_of(&laptop), 500 << 30);
        assert_eq!(c.quota_of(&nas), 1 << 40);
        assert_eq!(c.quota_of(&other), 1 << 40);
        assert_eq!(c.min_free_for(1 << 30), 5 << 30);
        assert_eq!(c.warn_at, Percent(80));
        // Bare numbers are bytes; "0" is none.
        let c = Config::parse("quota = 1048576\nmin_free = \"0\"\n", "r.toml").expect("parse");
        assert_eq!(c.quota_of(&laptop), 1 << 20);
        assert_eq!(c.min_free_for(1 << 50), 0);
        // Unset min_free: 5 GiB on a large file system, none on a small one.
        let d = Config::default();
        assert_eq!(d.quota_of(&laptop), 0);
        assert_eq!(d.min_free_for(AUTO_MIN_FREE_FS), AUTO_MIN_FREE);
        assert_eq!(d.min_free_for(8 << 20), 0);
        assert_eq!(d.warn_at, Percent(90));
    }

    #[test]
    fn a_bad_quota_value_is_an_error_naming_its_key() {
        for (text, key) in [
            ("quota = \"500 XB\"", "quota:"),
            ("quota = \"lots\"", "quota:"),
            ("quota = -1", "quota:"),
            ("min_free = \"5.5.5G\"", "min_free:"),
            ("min_free = true", "min_free:"),
            ("warn_at = \"120%\"", "warn_at:"),
            ("warn_at = \"0%\"", "warn_at:"),
            ("[repos.laptop]\nquota = \"1 PB\"", "repos.laptop.quota:"),
            ("[repos.\".hidden\"]\nquota = \"1GiB\"", "repos..hidden:"),
            ("repos = 3", "repos:"),
        ] {
            let e = Config::parse(text, "r.toml").expect_err(text);
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("r.toml: {key}")),
                "{text}: {shown}"
            );
        }
        let e = Config::parse("[repos.laptop]\nquta = \"1GiB\"", "r.toml").expect_err("typo");
        assert!(e.to_string().contains("quta"), "{e}");
    }

    #[test]
    fn retention_defaults_are_designs_and_per_repo_tables_override_key_by_key() {
        let laptop = RepoName::new("laptop").expect("name");
        let nas = RepoName::new("nas").expect("name");
        let d = Config::default();
        assert_eq!(d.retention(&laptop), Retention::default());
        let c = Config::parse(
            "[retention]\nkeep_daily = 7\nkeep_deleted_for = \"2w\"\nmax_unused = \"25%\"\n\
             [repos.laptop]\nquota = \"1GiB\"\n\
             [repos.laptop.retention]\nkeep_last = 3\nkeep_daily = 0\nprune_interval = \"0\"\n\
             keep_deleted_for = \"0\"\nkeep_within = \"30m\"\n\
             [repos.nas.retention]\nkeep_all = true\n",
            "r.toml",
        )
        .expect("parse");
        let g = c.retention(&RepoName::new("other").expect("name"));
        let mut want = Retention::default();
        want.policy.keep_daily = 7;
        want.policy.keep_deleted_for = Some(Duration::from_secs(14 * 86_400));
        want.max_unused = 0.25;
        assert_eq!(g, want);
        let l = c.retention(&laptop);
        let mut want_l = want.clone();
        want_l.policy.keep_last = 3;
        want_l.policy.keep_daily = 0;
        want_l.policy.keep_deleted_for = None;
        want_l.policy.keep_within = Duration::from_secs(1800);
        want_l.prune_interval = None;
        assert_eq!(l, want_l);
        assert_eq!(c.quota_of(&laptop), 1 << 30);
        let n = c.retention(&nas);
        assert!(n.policy.keep_all);
        assert_eq!(n.policy.keep_daily, 7);
        // Rendered and read back: the same settings.
        let back = Config::parse(&c.render(), "x").expect("parse rendered");
        assert_eq!(back, c);
        assert_eq!(back.retention(&laptop), l);
        // Every key written out with DESIGN.md's defaults reads as the defaults.
        let text = format!(
            "[retention]\n{}\n",
            RetentionKeys::defaults().lines().join("\n")
        );
        let all = Config::parse(&text, "x").expect("parse defaults");
        assert_eq!(all.retention(&laptop), Retention::default());
        assert_eq!(all.retention, RetentionKeys::defaults());
    }

    #[test]
    fn a_bad_retention_key_or_value_is_an_error_naming_it_and_the_file() {
        for (text, key) in [
            ("[retention]\nkeep_daly = 3", "retention.keep_daly:"),
            ("[retention]\nkeep_daily = -1", "retention.keep_daily:"),
            ("[retention]\nkeep_daily = \"7\"", "retention.keep_daily:"),
            (
                "[retention]\nkeep_hourly = 5000000000",
                "retention.keep_hourly:",
            ),
            (
                "[retention]\nkeep_within = \"3 days\"",
                "retention.keep_within:",
            ),
            ("[retention]\nkeep_within = 86400", "retention.keep_within:"),
            (
                "[retention]\nkeep_deleted_for = \"90\"",
                "retention.keep_deleted_for:",
            ),
            (
                "[retention]\nprune_interval = \"1y\"",
                "retention.prune_interval:",
            ),
            (
                "[retention]\nmax_unused = \"110%\"",
                "retention.max_unused:",
            ),
            ("[retention]\nmax_unused = 10", "retention.max_unused:"),
            ("[retention]\nkeep_all = \"yes\"", "retention.keep_all:"),
            ("retention = 3", "retention:"),
            ("[repos.nas]\nretention = 3", "repos.nas.retention:"),
            (
                "[repos.laptop.retention]\nkeep_weekly = 1.5",
                "repos.laptop.retention.keep_weekly:",
            ),
            (
                "[repos.laptop.retention]\nkeep_forever = true",
                "repos.laptop.retention.keep_forever:",
            ),
        ] {
            let e = Config::parse(text, "r.toml").expect_err(text);
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("r.toml: {key}")),
                "{text}: {shown}"
            );
        }
        // Zero and fractions are accepted where they mean something.
        let c = Config::parse(
            "[retention]\nprune_interval = 0\nmax_unused = 0.5\nkeep_daily = 0\n",
            "r.toml",
        )
        .expect("parse");
        let r = c.retention(&RepoName::new("x").expect("name"));
        assert_eq!(
            (r.prune_interval, r.max_unused, r.policy.keep_daily),
            (None, 0.5, 0)
        );
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
