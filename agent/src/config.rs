//! The agent's TOML configuration.
//!
//! Every key is documented in README.md ("Configuration") and in `packaging/agent.toml`.
//! Unknown keys are refused; errors name the file, the line and the key.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coffer_common::channel::PublicKey;
use coffer_common::wire::MAX_NAME;
use serde::{Deserialize, Serialize};

/// Errors reading or checking a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("writing config {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn default_debounce() -> String {
    "2s".into()
}
fn default_rescan() -> String {
    "1h".into()
}
fn default_concurrency() -> usize {
    2
}

/// The configuration as written in TOML.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Receiver address, `host:port`.
    pub receiver: String,
    /// The receiver's public key (pinned).
    pub receiver_key: String,
    /// This machine's name in logs and status (default: the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the journal and keys live (default: `state` next to the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// A file holding the passphrase (else `COFFER_PASSPHRASE`, else a prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
    /// Quiet period before a changed file counts as settled.
    #[serde(default = "default_debounce")]
    pub debounce: String,
    /// How often every watched tree is rescanned in full.
    #[serde(default = "default_rescan")]
    pub rescan_interval: String,
    /// Files read, chunked and sealed at once.
    #[serde(default = "default_concurrency")]
    pub upload_concurrency: usize,
    /// A scan that would record more than this share of a watch's files as deleted holds
    /// those deletions until `confirm-deletions` (`"50%"`); a watch may set its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delete_share: Option<Share>,
    /// Most bytes per second sent to the receiver, all connections together (`"10MiB/s"`;
    /// unset: no limit). Changed by SIGHUP without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_limit: Option<String>,
    /// Most bytes per second received from it (restore, verify, ls; unset: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_limit: Option<String>,
    /// Watched folders.
    #[serde(default)]
    pub watch: Vec<RawWatch>,
}

/// One `[[watch]]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    /// The folder to watch.
    pub path: PathBuf,
    /// Its name in the backup (default: the folder's own name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Glob patterns (relative to the folder) of paths to leave out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// This watch's `max_delete_share` (default: the global one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delete_share: Option<Share>,
}

/// A share as written in TOML: a percentage (`"50%"`) or a fraction (`0.5`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Share {
    Percent(String),
    Fraction(f64),
}

impl Share {
    /// The share as a fraction (0.0 to 1.0), or why it is not one.
    pub fn fraction(&self) -> Result<f64, String> {
        match self {
            Share::Percent(v) => parse_share(v),
            Share::Fraction(f) if (0.0..=1.0).contains(f) => Ok(*f),
            Share::Fraction(f) => Err(format!(
                "{f} is not a fraction between 0 and 1 (or a percentage like \"50%\")"
            )),
        }
    }
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub receiver: String,
    pub receiver_key: PublicKey,
    pub name: String,
    pub state_dir: PathBuf,
    pub passphrase_file: Option<PathBuf>,
    pub debounce: Duration,
    pub rescan_interval: Duration,
    pub upload_concurrency: usize,
    /// `upload_limit` and `download_limit` in bytes per second (`None`: no limit).
    pub upload_limit: Option<u64>,
    pub download_limit: Option<u64>,
    pub watches: Vec<Watch>,
}

/// A checked watched folder.
#[derive(Debug, Clone)]
pub struct Watch {
    pub path: PathBuf,
    pub name: String,
    pub exclude: globset::GlobSet,
    pub exclude_patterns: Vec<String>,
    /// The share of its files (0.0 to 1.0) a scan may record as deleted at once; more is
    /// held until `confirm-deletions`.
    pub max_delete_share: f64,
}

/// `max_delete_share`'s default: half of a watch's files.
pub const DEFAULT_MAX_DELETE_SHARE: f64 = 0.5;

/// Parses a share written as a percentage, `"50%"` (0% to 100%, decimals allowed).
pub fn parse_share(v: &str) -> Result<f64, String> {
    let bad = || format!("{v:?} is not a percentage between \"0%\" and \"100%\" like \"50%\"");
    let n: f64 = v
        .trim()
        .strip_suffix('%')
        .ok_or_else(bad)?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if !(0.0..=100.0).contains(&n) {
        return Err(bad());
    }
    Ok(n / 100.0)
}

impl Watch {
    /// True when `rel` (relative to the watched folder) is excluded.
    pub fn excluded(&self, rel: &Path) -> bool {
        !self.exclude_patterns.is_empty() && self.exclude.is_match(rel)
    }
}

/// The host name, for the default machine name.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Checks a watch name: one path component, printable.
pub fn check_watch_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.chars().any(|c| c.is_control())
    {
        return Err(format!(
            "watch name {name:?} must be a single, non-empty path component without '/' or control characters"
        ));
    }
    Ok(())
}

impl Config {
    /// A minimal config written to `dir/agent.toml`, its state dir `dir/state` (tests).
    #[cfg(test)]
    pub(crate) fn for_test(dir: &Path) -> Config {
        let p = dir.join("agent.toml");
        std::fs::write(
            &p,
            format!(
                "receiver = \"127.0.0.1:1\"\nreceiver_key = \"{}\"\nstate_dir = \"{}\"\n",
                "A".repeat(43),
                dir.join("state").display()
            ),
        )
        .expect("write config");
        Config::load(&p).expect("config")
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Self::from_raw(path, raw)
    }

    /// Checks a parsed config; relative paths are taken relative to the config's folder.
    pub fn from_raw(path: &Path, raw: RawConfig) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let receiver_key = raw
            .receiver_key
            .parse::<PublicKey>()
            .map_err(|e| invalid(format!("key `receiver_key`: {e}")))?;
        if raw.receiver.trim().is_empty() {
            return Err(invalid("key `receiver` is empty".into()));
        }
        let dur = |key: &str, v: &str| {
            humantime::parse_duration(v).map_err(|e| {
                invalid(format!(
                    "key `{key}`: {v:?} is not a duration like \"2s\" or \"500ms\": {e}"
                ))
            })
        };
        let debounce = dur("debounce", &raw.debounce)?;
        let rescan_interval = dur("rescan_interval", &raw.rescan_interval)?;
        if rescan_interval < Duration::from_secs(1) {
            return Err(invalid("key `rescan_interval` must be at least 1s".into()));
        }
        if raw.upload_concurrency == 0 || raw.upload_concurrency > 64 {
            return Err(invalid(
                "key `upload_concurrency` must be between 1 and 64".into(),
            ));
        }
        if let Some(n) = raw.name.as_deref().filter(|n| n.len() > MAX_NAME) {
            return Err(invalid(format!(
                "key `name` is {} bytes; the receiver accepts at most {MAX_NAME}",
                n.len()
            )));
        }
        let rate = |key: &str, v: &Option<String>| {
            v.as_deref()
                .map(crate::rate::parse_rate)
                .transpose()
                .map_err(|m| invalid(format!("key `{key}`: {m}")))
        };
        let upload_limit = rate("upload_limit", &raw.upload_limit)?;
        let download_limit = rate("download_limit", &raw.download_limit)?;
        let global_share = match &raw.max_delete_share {
            Some(v) => v
                .fraction()
                .map_err(|m| invalid(format!("key `max_delete_share`: {m}")))?,
            None => DEFAULT_MAX_DELETE_SHARE,
        };
        let mut names = HashSet::new();
        let mut watches = Vec::new();
        for (i, w) in raw.watch.iter().enumerate() {
            let p = abs(&w.path);
            let name = match &w.name {
                Some(n) => n.clone(),
                None => p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or_else(|| {
                        invalid(format!(
                            "watch #{} (path {}): cannot take a name from this path; set `name`",
                            i + 1,
                            p.display()
                        ))
                    })?,
            };
            check_watch_name(&name)
                .map_err(|m| invalid(format!("watch #{} `name`: {m}", i + 1)))?;
            if !names.insert(name.clone()) {
                return Err(invalid(format!(
                    "two watches are named {name:?}; give each `[[watch]]` a distinct `name`"
                )));
            }
            let mut b = globset::GlobSetBuilder::new();
            for pat in &w.exclude {
                let g = globset::GlobBuilder::new(pat)
                    .literal_separator(false)
                    .build()
                    .map_err(|e| {
                        invalid(format!("watch {name:?} `exclude` pattern {pat:?}: {e}"))
                    })?;
                b.add(g);
            }
            let exclude = b
                .build()
                .map_err(|e| invalid(format!("watch {name:?} `exclude`: {e}")))?;
            let max_delete_share = match &w.max_delete_share {
                Some(v) => v
                    .fraction()
                    .map_err(|m| invalid(format!("watch {name:?} `max_delete_share`: {m}")))?,
                None => global_share,
            };
            watches.push(Watch {
                path: p,
                name,
                exclude,
                exclude_patterns: w.exclude.clone(),
                max_delete_share,
            });
        }
        Ok(Config {
            file: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            receiver: raw.receiver,
            receiver_key,
            name: raw.name.unwrap_or_else(host_name),
            state_dir: raw
                .state_dir
                .as_deref()
                .map(abs)
                .unwrap_or_else(|| base.join("state")),
            passphrase_file: raw.passphrase_file.as_deref().map(abs),
            debounce,
            rescan_interval,
            upload_concurrency: raw.upload_concurrency,
            upload_limit,
            download_limit,
            watches,
        })
    }

    /// The journal's path.
    pub fn journal_path(&self) -> PathBuf {
        self.state_dir.join("journal.sqlite")
    }

    /// The wrapped master key's path.
    pub fn keyfile_path(&self) -> PathBuf {
        self.state_dir.join("keyfile")
    }

    /// The agent's static Noise key's path.
    pub fn agent_key_path(&self) -> PathBuf {
        self.state_dir.join("agent.key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, text).expect("write");
        Config::load(&p)
    }

    #[test]
    fn defaults_apply() {
        let c = load(&format!(
            "receiver = \"127.0.0.1:1\"\nreceiver_key = \"{KEY}\"\n[[watch]]\npath = \"/tmp/docs\"\n"
        ))
        .expect("valid");
        assert_eq!(c.debounce, Duration::from_secs(2));
        assert_eq!(c.watches[0].name, "docs");
        assert!(c.state_dir.ends_with("state"));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\nfrobnicate = 3\n"
        ))
        .expect_err("unknown key");
        let s = e.to_string();
        assert!(
            s.contains("agent.toml") && s.contains("line 3") && s.contains("frobnicate"),
            "{s}"
        );
    }

    #[test]
    fn duplicate_watch_names_are_refused() {
        let e = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\n[[watch]]\npath = \"/a/docs\"\n[[watch]]\npath = \"/b/docs\"\n"
        ))
        .expect_err("dup");
        assert!(
            e.to_string().contains("two watches are named \"docs\""),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let e = load("receiver = \"x:1\"\nreceiver_key = \"nope\"\n").expect_err("key");
        assert!(e.to_string().contains("receiver_key"), "{e}");
        let e = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\ndebounce = \"soon\"\n"
        ))
        .expect_err("dur");
        assert!(e.to_string().contains("debounce"), "{e}");
    }

    #[test]
    fn a_name_longer_than_the_receiver_accepts_is_refused() {
        let long = "n".repeat(MAX_NAME + 1);
        let e = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\nname = \"{long}\"\n"
        ))
        .expect_err("long name");
        assert!(e.to_string().contains("key `name` is 257 bytes"), "{e}");
        let ok = "n".repeat(MAX_NAME);
        let c = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\nname = \"{ok}\"\n"
        ))
        .expect("256 bytes");
        assert_eq!(c.name, ok);
    }

    #[test]
    fn max_delete_share_is_global_or_per_watch_and_bad_values_are_named() {
        let c = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\n[[watch]]\npath = \"/a\"\n\
             [[watch]]\npath = \"/b\"\nmax_delete_share = \"80%\"\n"
        ))
        .expect("valid");
        assert_eq!(c.watches[0].max_delete_share, DEFAULT_MAX_DELETE_SHARE);
        assert_eq!(c.watches[1].max_delete_share, 0.8);
        let c = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\nmax_delete_share = \"12.5%\"\n\
             [[watch]]\npath = \"/a\"\n"
        ))
        .expect("valid");
        assert_eq!(c.watches[0].max_delete_share, 0.125);
        let c = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\nmax_delete_share = 0.25\n\
             [[watch]]\npath = \"/a\"\n"
        ))
        .expect("a fraction");
        assert_eq!(c.watches[0].max_delete_share, 0.25);
        for bad in ["\"50\"", "\"150%\"", "\"-1%\"", "\"half%\"", "2", "-0.5"] {
            let e = load(&format!(
                "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\nmax_delete_share = {bad}\n"
            ))
            .expect_err(bad);
            assert!(e.to_string().contains("key `max_delete_share`"), "{e}");
        }
        let e = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\n[[watch]]\npath = \"/a\"\n\
             max_delete_share = \"2\"\n"
        ))
        .expect_err("per watch");
        assert!(
            e.to_string()
                .contains("watch \"a\" `max_delete_share`: \"2\""),
            "{e}"
        );
    }

    #[test]
    fn bandwidth_limits_parse_and_a_bad_one_names_key_and_file() {
        let c = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\nupload_limit = \"10MiB/s\"\n\
             download_limit = \"1MB/s\"\n"
        ))
        .expect("valid");
        assert_eq!(c.upload_limit, Some(10 << 20));
        assert_eq!(c.download_limit, Some(1_000_000));
        let c = load(&format!("receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\n")).expect("valid");
        assert_eq!((c.upload_limit, c.download_limit), (None, None));
        for key in ["upload_limit", "download_limit"] {
            let e = load(&format!(
                "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\n{key} = \"fast\"\n"
            ))
            .expect_err(key)
            .to_string();
            assert!(
                e.contains("agent.toml")
                    && e.contains(&format!("key `{key}`: \"fast\" is not a rate")),
                "{e}"
            );
        }
    }

    #[test]
    fn excludes_match_relative_paths() {
        let c = load(&format!(
            "receiver = \"x:1\"\nreceiver_key = \"{KEY}\"\n[[watch]]\npath = \"/a/docs\"\nexclude = [\"*.tmp\", \"cache/**\"]\n"
        ))
        .expect("valid");
        let w = &c.watches[0];
        assert!(w.excluded(Path::new("x/y.tmp")));
        assert!(w.excluded(Path::new("cache/a/b")));
        assert!(!w.excluded(Path::new("notes.txt")));
    }
}
