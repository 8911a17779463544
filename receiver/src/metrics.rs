//! `serve --metrics ADDR`: counters kept by the sessions, and the Prometheus (OpenMetrics)
//! text exposition at `/metrics` (off by default).
//!
//! [`Metrics`] holds `prometheus-client` counters and gauges (atomics) registered once;
//! the server bumps them where things happen and a scrape encodes their current values.
//! Series (counters carry the `_total` suffix in the exposition):
//!
//! - `coffer_receiver_sessions_active`: sessions holding a slot now;
//! - `coffer_receiver_sessions_total`: sessions started;
//! - `coffer_receiver_bytes_stored_total`: sealed bytes appended to packs;
//! - `coffer_receiver_chunks_stored_total`: chunks appended to packs;
//! - `coffer_receiver_chunks_deduplicated_total`: `PutChunk`s of a chunk already present;
//! - `coffer_receiver_commits_total`: files acknowledged (`FileAcked` sent);
//! - `coffer_receiver_handshakes_rejected_total{reason="failed"|"unauthorized"}`;
//! - `coffer_receiver_errors_total{kind="protocol"|"storage"|"internal"}`: errors reported to
//!   agents (each ends the session, or fails that one request);
//! - `coffer_receiver_repository_stored_bytes{repo}`: durable (indexed) pack bytes of each
//!   repository opened since `serve` started;
//! - `coffer_receiver_repository_used_bytes{repo}`: bytes its packs hold (what its quota
//!   counts), `coffer_receiver_repository_quota_bytes{repo}` (0: none) and
//!   `coffer_receiver_repository_quota_state{repo}` (0 ok, 1 warning: past `warn_at`, 2
//!   over: new chunks refused);
//! - `coffer_receiver_repository_files{repo}`, `coffer_receiver_repository_versions{repo}`,
//!   `coffer_receiver_repository_live_bytes{repo}` (the pack records its index references)
//!   and `coffer_receiver_repository_unused_bytes{repo}` (pack bytes nothing references:
//!   compaction's work), read from the index by a scrape at most every
//!   [`USAGE_REFRESH`] (the aggregate queries take about a second per million versions);
//!   `coffer_receiver_repository_last_prune_timestamp_seconds{repo}` (0: never) and
//!   `coffer_receiver_repository_last_prune_ok{repo}` (1 ok, 0 failed, -1 never pruned);
//! - `coffer_receiver_disk_free_bytes` and `coffer_receiver_min_free_bytes`: free space on
//!   the packs' file system and the floor below which every repository is refused;
//! - `errors_total{kind="quota"}` counts chunks refused for either.
//!
//! The endpoint is a deliberately tiny HTTP/1.1 responder on the server's runtime: one
//! request per connection, a bounded request head, a read timeout, a cap on concurrent
//! scrapes. It serves nothing but these numbers and repository names (no keys, file names
//! or paths).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The exposition's content type (what `prometheus-client` encodes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing the response may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a repository's usage series are kept before a scrape reads them again.
pub const USAGE_REFRESH: Duration = Duration::from_secs(30);
/// Scrapes answered at once; connections past this are closed at once.
const MAX_SCRAPES: usize = 16;

type Labels = [(&'static str, String); 1];

/// Why a connection was turned away before it became a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The Noise handshake failed or timed out (not a Coffer agent, wrong receiver key).
    Failed,
    /// The agent's key is not in `authorized.toml`.
    Unauthorized,
}

/// What kind of error was reported to an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A malformed frame or request, a wrong protocol version.
    Protocol,
    /// Storing or reading failed (disk full, I/O error, rolled-back batch).
    Storage,
    /// Anything else on the receiver's side.
    Internal,
    /// A new chunk refused: over the repository's quota or the disk floor (`min_free`).
    Quota,
}

/// The receiver's counters and gauges, shared by every session.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions_active: Gauge,
    sessions: Counter,
    bytes_stored: Counter,
    chunks_stored: Counter,
    chunks_deduplicated: Counter,
    commits: Counter,
    rejected_failed: Counter,
    rejected_unauthorized: Counter,
    errors_protocol: Counter,
    errors_storage: Counter,
    errors_internal: Counter,
    errors_quota: Counter,
    repository_bytes: Family<Labels, Gauge>,
    repository_used: Family<Labels, Gauge>,
    repository_quota: Family<Labels, Gauge>,
    repository_quota_state: Family<Labels, Gauge>,
    disk_free: Gauge,
    min_free: Gauge,
    usage: UsageSeries,
}

/// The per-repository series read from its index by a scrape (see the module doc).
#[derive(Debug, Default)]
struct UsageSeries {
    /// When each repository's were last set.
    refreshed: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    files: Family<Labels, Gauge>,
    versions: Family<Labels, Gauge>,
    live: Family<Labels, Gauge>,
    unused: Family<Labels, Gauge>,
    last_prune_at: Family<Labels, Gauge>,
    last_prune_ok: Family<Labels, Gauge>,
}

impl UsageSeries {
    fn register(&self, registry: &mut Registry) {
        for (name, help, family) in [
            (
                "coffer_receiver_repository_files",
                "Files with at least one version in each repository",
                &self.files,
            ),
            (
                "coffer_receiver_repository_versions",
                "Versions each repository holds",
                &self.versions,
            ),
            (
                "coffer_receiver_repository_live_bytes",
                "Bytes of the pack records each repository's index references",
                &self.live,
            ),
            (
                "coffer_receiver_repository_unused_bytes",
                "Pack bytes of each repository that nothing references (compaction frees them)",
                &self.unused,
            ),
            (
                "coffer_receiver_repository_last_prune_timestamp_seconds",
                "When each repository's last prune ended, unix seconds (0: never)",
                &self.last_prune_at,
            ),
            (
                "coffer_receiver_repository_last_prune_ok",
                "Each repository's last prune: 1 succeeded, 0 failed, -1 never pruned",
                &self.last_prune_ok,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps `coffer_receiver_sessions_active` raised while alive.
#[must_use = "the session counts as active only while this guard lives"]
pub struct ActiveSession<'a>(&'a Gauge);

impl Drop for ActiveSession<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Every series registered, at zero (labelled children too, so each appears at once).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sessions_active = Gauge::default();
        let sessions = Counter::default();
        let bytes_stored = Counter::default();
        let chunks_stored = Counter::default();
        let chunks_deduplicated = Counter::default();
        let commits = Counter::default();
        let rejected = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let repository_bytes = Family::<Labels, Gauge>::default();
        let repository_used = Family::<Labels, Gauge>::default();
        let repository_quota = Family::<Labels, Gauge>::default();
        let repository_quota_state = Family::<Labels, Gauge>::default();
        let disk_free = Gauge::default();
        let min_free = Gauge::default();
        let child = |f: &Family<Labels, Counter>, k: &'static str, v: &str| {
            f.get_or_create(&[(k, v.to_string())]).clone()
        };
        let rejected_failed = child(&rejected, "reason", "failed");
        let rejected_unauthorized = child(&rejected, "reason", "unauthorized");
        let errors_protocol = child(&errors, "kind", "protocol");
        let errors_storage = child(&errors, "kind", "storage");
        let errors_internal = child(&errors, "kind", "internal");
        let errors_quota = child(&errors, "kind", "quota");
        registry.register(
            "coffer_receiver_sessions_active",
            "Agent sessions holding a slot now",
            sessions_active.clone(),
        );
        registry.register(
            "coffer_receiver_sessions",
            "Agent sessions started",
            sessions.clone(),
        );
        registry.register(
            "coffer_receiver_bytes_stored",
            "Sealed chunk bytes appended to packs",
            bytes_stored.clone(),
        );
        registry.register(
            "coffer_receiver_chunks_stored",
            "Chunks appended to packs",
            chunks_stored.clone(),
        );
        registry.register(
            "coffer_receiver_chunks_deduplicated",
            "Chunks sent that the repository already held (not stored again)",
            chunks_deduplicated.clone(),
        );
        registry.register(
            "coffer_receiver_commits",
            "Files acknowledged to agents",
            commits.clone(),
        );
        registry.register(
            "coffer_receiver_handshakes_rejected",
            "Connections refused: failed handshakes and unauthorized agent keys",
            rejected,
        );
        registry.register(
            "coffer_receiver_errors",
            "Protocol, storage and internal errors reported to agents",
            errors,
        );
        registry.register(
            "coffer_receiver_repository_stored_bytes",
            "Durable (indexed) pack bytes of each repository opened since serve started",
            repository_bytes.clone(),
        );
        registry.register(
            "coffer_receiver_repository_used_bytes",
            "Bytes each repository's packs hold (what its quota counts)",
            repository_used.clone(),
        );
        registry.register(
            "coffer_receiver_repository_quota_bytes",
            "Each repository's quota in bytes (0: none)",
            repository_quota.clone(),
        );
        registry.register(
            "coffer_receiver_repository_quota_state",
            "Each repository against its quota: 0 ok, 1 warning (past warn_at), 2 over",
            repository_quota_state.clone(),
        );
        registry.register(
            "coffer_receiver_disk_free_bytes",
            "Free bytes on the file system holding the packs",
            disk_free.clone(),
        );
        registry.register(
            "coffer_receiver_min_free_bytes",
            "Free space below which every repository is refused new chunks (0: none)",
            min_free.clone(),
        );
        let usage = UsageSeries::default();
        usage.register(&mut registry);
        Self {
            registry,
            sessions_active,
            sessions,
            bytes_stored,
            chunks_stored,
            chunks_deduplicated,
            commits,
            rejected_failed,
            rejected_unauthorized,
            errors_protocol,
            errors_storage,
            errors_internal,
            errors_quota,
            repository_bytes,
            repository_used,
            repository_quota,
            repository_quota_state,
            disk_free,
            min_free,
            usage,
        }
    }

    /// A session started; it counts as active until the guard is dropped.
    pub fn session(&self) -> ActiveSession<'_> {
        self.sessions.inc();
        self.sessions_active.inc();
        ActiveSession(&self.sessions_active)
    }

    /// A chunk of `sealed_len` bytes was appended to a pack.
    pub fn chunk_stored(&self, sealed_len: u64) {
        self.chunks_stored.inc();
        self.bytes_stored.inc_by(sealed_len);
    }

    /// A chunk was sent that the repository already held.
    pub fn chunk_deduplicated(&self) {
        self.chunks_deduplicated.inc();
    }

    /// A file was acknowledged.
    pub fn commit(&self) {
        self.commits.inc();
    }

    /// A connection was refused before its session.
    pub fn rejected(&self, why: Rejected) {
        match why {
            Rejected::Failed => self.rejected_failed.inc(),
            Rejected::Unauthorized => self.rejected_unauthorized.inc(),
        };
    }

    /// An error was reported to an agent (or ended its session).
    pub fn error(&self, kind: ErrorKind) {
        match kind {
            ErrorKind::Protocol => self.errors_protocol.inc(),
            ErrorKind::Storage => self.errors_storage.inc(),
            ErrorKind::Internal => self.errors_internal.inc(),
            ErrorKind::Quota => self.errors_quota.inc(),
        };
    }

    /// Sets a repository's stored bytes.
    pub fn set_repository_bytes(&self, repo: &str, bytes: u64) {
        self.repository_bytes
            .get_or_create(&[("repo", repo.to_string())])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Sets a repository's use, quota (0: none) and where it stands (`QuotaState`).
    pub fn set_repository_quota(
        &self,
        repo: &str,
        used: u64,
        quota: u64,
        state: crate::quota::QuotaState,
    ) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let labels = [("repo", repo.to_string())];
        self.repository_used.get_or_create(&labels).set(g(used));
        self.repository_quota.get_or_create(&labels).set(g(quota));
        let state = match state {
            crate::quota::QuotaState::Ok => 0,
            crate::quota::QuotaState::Warning => 1,
            crate::quota::QuotaState::Over => 2,
        };
        self.repository_quota_state
            .get_or_create(&labels)
            .set(state);
    }

    /// True when repository `repo`'s usage series are older than [`USAGE_REFRESH`] (or were
    /// never set): the scrape reads them again.
    pub fn usage_due(&self, repo: &str) -> bool {
        let r = match self.usage.refreshed.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        r.get(repo).is_none_or(|t| t.elapsed() >= USAGE_REFRESH)
    }

    /// Sets a repository's files, versions, live and unused bytes and its last prune.
    pub fn set_repository_usage(&self, repo: &str, u: &crate::status::RepoUsage) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let labels = [("repo", repo.to_string())];
        let s = &self.usage;
        s.files.get_or_create(&labels).set(g(u.usage.files));
        s.versions.get_or_create(&labels).set(g(u.usage.versions));
        s.live.get_or_create(&labels).set(g(u.usage.live_bytes()));
        s.unused
            .get_or_create(&labels)
            .set(g(u.usage.unused_bytes()));
        let (at, ok) = match &u.last_prune {
            None => (0, -1),
            Some(p) => (p.at_secs().unwrap_or(0), i64::from(p.ok)),
        };
        s.last_prune_at.get_or_create(&labels).set(at);
        s.last_prune_ok.get_or_create(&labels).set(ok);
        let mut r = match s.refreshed.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        r.insert(repo.to_string(), std::time::Instant::now());
    }

    /// Sets the packs' file system's free bytes and the floor.
    pub fn set_disk(&self, free: u64, min_free: u64) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.disk_free.set(g(free));
        self.min_free.set(g(min_free));
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Answers `GET /metrics` on `listener` until `cancel`. `scrape` makes the body; it runs on
/// a blocking thread (it may take locks that storage work holds).
pub async fn serve_http<F>(listener: TcpListener, cancel: CancellationToken, scrape: F)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let scrape = Arc::new(scrape);
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = cancel.cancelled() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(
                    "metrics: accepting a connection: {}",
                    coffer_common::host::fs::describe(&e)
                );
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = cancel.cancelled() => return,
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            answer(stream, scrape).await;
            drop(slot);
        });
    }
}

/// What the request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics,
    NotFound,
    BadMethod,
    Bad,
}

fn parse_request(head: &[u8]) -> Request {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Bad;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Request::Metrics,
        (_, "/metrics") => Request::BadMethod,
        _ => Request::NotFound,
    }
}

async fn answer<F>(mut s: TcpStream, scrape: Arc<F>)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut n = 0;
    let complete = loop {
        if n == buf.len() {
            break false;
        }
        match tokio::time::timeout(READ_TIMEOUT, s.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break false,
            Ok(Ok(k)) => {
                n += k;
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
                    || buf[..n].windows(2).any(|w| w == b"\n\n")
                {
                    break true;
                }
            }
        }
    };
    let (status, ctype, body) = match (complete, parse_request(&buf[..n])) {
        (false, _) | (true, Request::Bad) => ("400 Bad Request", "text/plain", String::new()),
        (true, Request::NotFound) => (
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n".to_string(),
        ),
        (true, Request::BadMethod) => ("405 Method Not Allowed", "text/plain", String::new()),
        (true, Request::Metrics) => match tokio::task::spawn_blocking(move || scrape()).await {
            Ok(body) => ("200 OK", CONTENT_TYPE, body),
            Err(e) => {
                tracing::warn!("metrics: rendering failed: {e}");
                ("500 Internal Server Error", "text/plain", String::new())
            }
        },
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        s.write_all(resp.as_bytes()).await?;
        s.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_series_is_exposed_from_the_start() {
        let m = Metrics::new();
        let t = m.render();
        for s in [
            "coffer_receiver_sessions_active",
            "coffer_receiver_sessions_total",
            "coffer_receiver_bytes_stored_total",
            "coffer_receiver_chunks_stored_total",
            "coffer_receiver_chunks_deduplicated_total",
            "coffer_receiver_commits_total",
            "coffer_receiver_handshakes_rejected_total{reason=\"failed\"}",
            "coffer_receiver_handshakes_rejected_total{reason=\"unauthorized\"}",
            "coffer_receiver_errors_total{kind=\"protocol\"}",
            "coffer_receiver_errors_total{kind=\"storage\"}",
            "coffer_receiver_errors_total{kind=\"internal\"}",
        ] {
            assert_eq!(value(&t, s), Some(0.0), "{s} in\n{t}");
        }
        assert!(t.ends_with("# EOF\n"), "{t}");
    }

    #[test]
    fn counters_and_the_session_gauge_move() {
        let m = Metrics::new();
        {
            let _a = m.session();
            let _b = m.session();
            m.chunk_stored(100);
            m.chunk_stored(50);
            m.chunk_deduplicated();
            m.commit();
            m.rejected(Rejected::Unauthorized);
            m.error(ErrorKind::Storage);
            m.set_repository_bytes("photos", 4096);
            let t = m.render();
            assert_eq!(value(&t, "coffer_receiver_sessions_active"), Some(2.0));
            assert_eq!(value(&t, "coffer_receiver_sessions_total"), Some(2.0));
            assert_eq!(value(&t, "coffer_receiver_bytes_stored_total"), Some(150.0));
            assert_eq!(value(&t, "coffer_receiver_chunks_stored_total"), Some(2.0));
            assert_eq!(
                value(&t, "coffer_receiver_chunks_deduplicated_total"),
                Some(1.0)
            );
            assert_eq!(value(&t, "coffer_receiver_commits_total"), Some(1.0));
            assert_eq!(
                value(
                    &t,
                    "coffer_receiver_handshakes_rejected_total{reason=\"unauthorized\"}"
                ),
                Some(1.0)
            );
            assert_eq!(
                value(&t, "coffer_receiver_errors_total{kind=\"storage\"}"),
                Some(1.0)
            );
            assert_eq!(
                value(
                    &t,
                    "coffer_receiver_repository_stored_bytes{repo=\"photos\"}"
                ),
                Some(4096.0)
            );
        }
        let t = m.render();
        assert_eq!(value(&t, "coffer_receiver_sessions_active"), Some(0.0));
        assert_eq!(value(&t, "coffer_receiver_sessions_total"), Some(2.0));
    }

    #[test]
    fn repository_usage_and_last_prune_are_exported() {
        use crate::status::{LastPrune, RepoUsage};
        let m = Metrics::new();
        assert!(m.usage_due("photos"));
        let mut u = RepoUsage::default();
        u.usage.packs = 2;
        u.usage.pack_bytes = 10_000 + 2 * crate::store::PACK_HEADER_LEN;
        u.usage.files = 3;
        u.usage.versions = 7;
        u.usage.chunk_record_bytes = 6000;
        u.usage.commit_record_bytes = 1000;
        m.set_repository_usage("photos", &u);
        assert!(!m.usage_due("photos"));
        assert!(m.usage_due("nas"));
        u.last_prune = Some(LastPrune::parse(
            r#"{"at":"2026-12-03T18:00:00Z","ok":false,"error":"disk full",
                "versions_removed":0,"bytes_freed":0,"packs_rewritten":0}"#,
        ));
        u.usage.pack_bytes = 7000 + 2 * crate::store::PACK_HEADER_LEN;
        m.set_repository_usage("nas", &u);
        let t = m.render();
        let v = |s: &str| value(&t, s);
        let p = "coffer_receiver_repository_";
        assert_eq!(v(&format!("{p}files{{repo=\"photos\"}}")), Some(3.0));
        assert_eq!(v(&format!("{p}versions{{repo=\"photos\"}}")), Some(7.0));
        assert_eq!(
            v(&format!("{p}live_bytes{{repo=\"photos\"}}")),
            Some(7000.0)
        );
        assert_eq!(
            v(&format!("{p}unused_bytes{{repo=\"photos\"}}")),
            Some(3000.0)
        );
        assert_eq!(v(&format!("{p}unused_bytes{{repo=\"nas\"}}")), Some(0.0));
        assert_eq!(
            v(&format!(
                "{p}last_prune_timestamp_seconds{{repo=\"photos\"}}"
            )),
            Some(0.0)
        );
        assert_eq!(
            v(&format!("{p}last_prune_ok{{repo=\"photos\"}}")),
            Some(-1.0)
        );
        assert_eq!(
            v(&format!("{p}last_prune_timestamp_seconds{{repo=\"nas\"}}")),
            Some(1_796_320_800.0)
        );
        assert_eq!(v(&format!("{p}last_prune_ok{{repo=\"nas\"}}")), Some(0.0));
    }

    #[test]
    fn requests_are_routed() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::BadMethod
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(parse_request(b"hello\r\n\r\n"), Request::Bad);
        assert_eq!(parse_request(b""), Request::Bad);
    }

    #[tokio::test]
    async fn the_endpoint_answers_a_plain_get() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let m = Arc::new(Metrics::new());
        m.commit();
        let cancel = CancellationToken::new();
        let m2 = m.clone();
        let task = tokio::spawn(serve_http(listener, cancel.clone(), move || m2.render()));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        };
        let r = get("/metrics").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains(CONTENT_TYPE), "{r}");
        assert!(r.contains("coffer_receiver_commits_total 1\n"), "{r}");
        let r = get("/").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        cancel.cancel();
        task.await.expect("serve_http ends on cancel");
    }
}
