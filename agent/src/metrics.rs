//! `run --metrics ADDR`: Prometheus text exposition at `/metrics` (off by default).
//!
//! Series: files by state, pending bytes, bytes read and sent, files acknowledged, upload
//! rate, scans and rescans after event overflow, last acknowledgement time, whether the
//! receiver is connected, and the work waiting by class (fresh, backlog): files, bytes,
//! rate and the estimated seconds to done; per watch, whether it is available and its
//! deletions held. Values are read from the journal and the uploader's counters at
//! each scrape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::daemon::Daemon;
use crate::journal::{Class, CounterKey, MetaKey};

/// Renders the metrics text.
pub fn render(sh: &Daemon, rate: f64) -> String {
    let mut reg = Registry::default();
    let files = Family::<Vec<(String, String)>, Gauge>::default();
    let pending_bytes: Gauge = Gauge::default();
    let last_ack: Gauge = Gauge::default();
    let connected: Gauge = Gauge::default();
    let rate_g = Gauge::<f64, AtomicU64>::default();
    let read: Counter = Counter::default();
    let sent: Counter = Counter::default();
    let acked: Counter = Counter::default();
    let scans: Counter = Counter::default();
    let rescans: Counter = Counter::default();
    let q_files = Family::<Vec<(String, String)>, Gauge>::default();
    let q_bytes = Family::<Vec<(String, String)>, Gauge>::default();
    let q_rate = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
    let q_eta = Family::<Vec<(String, String)>, Gauge>::default();
    let available = Family::<Vec<(String, String)>, Gauge>::default();
    let held = Family::<Vec<(String, String)>, Gauge>::default();
    // Looked at before the journal is locked (the tracker locks it itself).
    for w in sh.watches().iter() {
        available
            .get_or_create(&vec![("watch".to_string(), w.name.clone())])
            .set(i64::from(sh.avail.available(w, &sh.journal)));
    }
    if let Ok(j) = sh.journal.lock() {
        let counts = j.held_counts().unwrap_or_default();
        for w in sh.watches().iter() {
            held.get_or_create(&vec![("watch".to_string(), w.name.clone())])
                .set(counts.get(&w.name).map_or(0, |c| c.0));
        }
        if let Ok(s) = j.summary() {
            if let Ok(q) = crate::status::queue_json(Some(&j), &s, true) {
                for class in Class::ALL {
                    let v = &q[class.as_str()];
                    let l = vec![("class".to_string(), class.as_str().to_string())];
                    q_files
                        .get_or_create(&l)
                        .set(v["files"].as_i64().unwrap_or(0));
                    q_bytes
                        .get_or_create(&l)
                        .set(v["bytes"].as_i64().unwrap_or(0));
                    if let Some(r) = v["bytes_per_second"].as_f64() {
                        q_rate.get_or_create(&l).set(r);
                    }
                    if let Some(e) = v["eta_seconds"].as_i64() {
                        q_eta.get_or_create(&l).set(e);
                    }
                }
            }
            for (state, n) in [
                ("pending", s.pending()),
                ("backed_up", s.backed_up),
                ("failed", s.failed),
                ("deleted", s.deleted),
            ] {
                files
                    .get_or_create(&vec![("state".to_string(), state.to_string())])
                    .set(n);
            }
            pending_bytes.set(s.pending_bytes);
        }
        let (scans_name, rescans_name) =
            (CounterKey::Scans.name(), CounterKey::RescansOverflow.name());
        for (name, v) in j.counters().unwrap_or_default() {
            if name == scans_name {
                scans.inc_by(v.max(0) as u64);
            } else if name == rescans_name {
                rescans.inc_by(v.max(0) as u64);
            }
        }
        if let Some(ms) = j
            .meta(MetaKey::LastAckMs)
            .ok()
            .flatten()
            .and_then(|v| v.parse::<i64>().ok())
        {
            last_ack.set(ms / 1000);
        }
        if j.meta(MetaKey::ReceiverState).ok().flatten().as_deref() == Some("connected") {
            connected.set(1);
        }
    }
    read.inc_by(sh.counters.bytes_read.load(Ordering::Relaxed));
    sent.inc_by(sh.counters.bytes_sent.load(Ordering::Relaxed));
    acked.inc_by(sh.counters.files_acked.load(Ordering::Relaxed));
    rate_g.set(rate);
    reg.register("coffer_agent_files", "Files by journal state", files);
    reg.register(
        "coffer_agent_pending_bytes",
        "Bytes of files not yet acknowledged",
        pending_bytes,
    );
    reg.register(
        "coffer_agent_read_bytes",
        "Bytes read from watched files since start",
        read,
    );
    reg.register(
        "coffer_agent_sent_bytes",
        "Sealed bytes sent to the receiver since start",
        sent,
    );
    reg.register(
        "coffer_agent_acked_files",
        "Files acknowledged since start",
        acked,
    );
    reg.register(
        "coffer_agent_upload_rate_bytes_per_second",
        "Read rate over the last scrape interval",
        rate_g,
    );
    reg.register("coffer_agent_scans", "Full scans of watched trees", scans);
    reg.register(
        "coffer_agent_rescans_overflow",
        "Rescans after lost file events",
        rescans,
    );
    reg.register(
        "coffer_agent_last_ack_timestamp_seconds",
        "Unix time of the last acknowledgement",
        last_ack,
    );
    reg.register(
        "coffer_agent_receiver_connected",
        "1 when connected to the receiver",
        connected,
    );
    reg.register(
        "coffer_agent_queue_files",
        "Files waiting to be backed up, by class (fresh: seen by the watcher; backlog: found by a scan)",
        q_files,
    );
    reg.register(
        "coffer_agent_queue_bytes",
        "Bytes of files waiting to be backed up, by class",
        q_bytes,
    );
    reg.register(
        "coffer_agent_queue_rate_bytes_per_second",
        "Bytes of each class backed up per second over the last 20 s",
        q_rate,
    );
    reg.register(
        "coffer_agent_queue_eta_seconds",
        "Estimated seconds until each class's waiting files are backed up, at its rate",
        q_eta,
    );
    reg.register(
        "coffer_agent_watch_available",
        "1 while a watch's folder is there to back up, 0 while it is unavailable (missing, \
         an empty mount point or another device: no deletions are recorded)",
        available,
    );
    reg.register(
        "coffer_agent_held_deletions",
        "Deletions held for confirmation (coffer-agent confirm-deletions WATCH)",
        held,
    );
    let mut out = String::new();
    let _ = encode(&mut out, &reg);
    out
}

/// Starts the HTTP endpoint on the runtime.
pub fn serve(rt: &tokio::runtime::Runtime, sh: Arc<Daemon>, addr: &str) -> std::io::Result<()> {
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
    let last = Arc::new(Mutex::new((Instant::now(), 0u64)));
    rt.spawn(async move {
        loop {
            let mut s = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // E.g. out of descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (sh, last) = (sh.clone(), last.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf[n..])).await {
                        Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                        Ok(Ok(k)) => {
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let resp = if head.starts_with("GET /metrics") {
                    let bytes = sh.counters.bytes_read.load(Ordering::Relaxed);
                    let rate = match last.lock() {
                        Ok(mut l) => {
                            let r = (bytes.saturating_sub(l.1)) as f64
                                / l.0.elapsed().as_secs_f64().max(0.001);
                            *l = (Instant::now(), bytes);
                            r
                        }
                        Err(_) => 0.0,
                    };
                    let body = tokio::task::spawn_blocking(move || render(&sh, rate))
                        .await
                        .unwrap_or_default();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                };
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}
