//! A TCP forwarder on loopback that behaves like a long link: a fixed delay each way, an
//! optional rate limit, and a switch that black-holes the connections it carries.
//!
//! The delay is applied per chunk of bytes: each chunk read from one side is stamped with
//! the time it arrived and written to the other side `delay` later, while the reader goes
//! on reading. So a delay costs latency, never throughput (as on a real long link with
//! windows large enough); only the optional rate limit caps bytes per second.
//!
//! Black-holing stops forwarding on every connection open at that moment, in both
//! directions, without closing anything: the peers see a link that went silent (a NAT
//! mapping dropped, a laptop suspended). Connections accepted afterwards forward normally.
//!
//! The proxy runs on its own thread and tokio runtime, so synchronous tests can use it;
//! dropping [`DelayProxy`] stops it and closes every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How the link behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyConfig {
    /// Added to every byte, each way (so one round trip costs twice this).
    pub delay: Duration,
    /// Bytes per second each way; `None` = unlimited.
    pub rate: Option<u64>,
}

impl ProxyConfig {
    /// A fixed delay each way, no rate limit.
    pub fn delay(delay: Duration) -> Self {
        ProxyConfig { delay, rate: None }
    }
}

/// Largest read, and so the largest chunk a delay or rate limit is applied to.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction (bounds the proxy's memory at 64 MiB per direction).
const QUEUE: usize = 1024;

struct Shared {
    delay_us: AtomicU64,
    /// Bytes per second each way, 0 = unlimited.
    rate: AtomicU64,
    /// Bytes written client -> target and target -> client.
    up: AtomicU64,
    down: AtomicU64,
    accepted: AtomicU64,
    /// Black-hole flags of the connections open now (pruned as they close).
    conns: Mutex<Vec<Arc<AtomicBool>>>,
}

/// A running proxy: connect to [`DelayProxy::addr`] to reach the target through the link.
pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on 127.0.0.1 (any port) and forwards every connection to `target`.
    pub fn start(target: SocketAddr, config: ProxyConfig) -> Result<DelayProxy> {
        Self::start_on("127.0.0.1:0".parse()?, target, config)
    }

    /// Listens on `listen` and forwards every connection to `target`.
    pub fn start_on(
        listen: SocketAddr,
        target: SocketAddr,
        config: ProxyConfig,
    ) -> Result<DelayProxy> {
        let shared = Arc::new(Shared {
            delay_us: AtomicU64::new(config.delay.as_micros() as u64),
            rate: AtomicU64::new(config.rate.unwrap_or(0)),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("delay-proxy")
            .build()
            .context("delay proxy: tokio runtime")?;
        let std_listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("delay proxy: bind {listen}"))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("delay proxy: listener: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(listener, target, sh) => {}
                    }
                });
                // Dropping the runtime cancels every connection task and closes its sockets.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("delay proxy: thread")?;
        Ok(DelayProxy {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the delay each way (for chunks read from now on).
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Changes the rate limit each way (`None` = unlimited).
    pub fn set_rate(&self, rate: Option<u64>) {
        self.shared.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    /// Stops forwarding, both ways, on every connection open now, without closing them;
    /// returns how many were black-holed. Later connections forward normally.
    pub fn black_hole_open_connections(&self) -> usize {
        let conns = lock(&self.shared.conns);
        for c in conns.iter() {
            c.store(true, Ordering::SeqCst);
        }
        conns.len()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now (black-holed ones included).
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Bytes forwarded client -> target so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// Bytes forwarded target -> client so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.down.load(Ordering::Relaxed)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: back off, keep serving.
                eprintln!("delay proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let sh = shared.clone();
        tokio::spawn(async move {
            let server = match TcpStream::connect(target).await {
                Ok(s) => s,
                Err(_) => return, // the client sees its connection closed
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let hole = Arc::new(AtomicBool::new(false));
            lock(&sh.conns).push(hole.clone());
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = direction(cr, sw, sh.clone(), hole.clone(), true);
            let down = direction(sr, cw, sh.clone(), hole.clone(), false);
            tokio::join!(up, down);
            lock(&sh.conns).retain(|c| !Arc::ptr_eq(c, &hole));
        });
    }
}

enum Item {
    Data(Instant, Vec<u8>),
    /// The sender closed its side: passed on (as a FIN) at this time.
    Eof(Instant),
}

/// Forwards one direction: a reader stamps chunks, a writer releases each at its time.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    hole: Arc<AtomicBool>,
    up: bool,
) {
    let (tx, mut rx) = mpsc::channel::<Item>(QUEUE);
    let h = hole.clone();
    let sh = shared.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            if h.load(Ordering::SeqCst) {
                // Silent: keep the socket (so the peer sees no close), read nothing more.
                std::future::pending::<()>().await;
            }
            let due = Instant::now() + Duration::from_micros(sh.delay_us.load(Ordering::Relaxed));
            let item = if n == 0 {
                Item::Eof(due)
            } else {
                Item::Data(due, buf[..n].to_vec())
            };
            let eof = matches!(item, Item::Eof(_));
            if tx.send(item).await.is_err() || eof {
                // Keep the read half until the writer is done (dropping it closes nothing,
                // but a black hole must hold everything open).
                return from;
            }
        }
    };
    let writer = async move {
        // Rate limit: the earliest time the next byte may go.
        let mut next_free = Instant::now();
        while let Some(item) = rx.recv().await {
            let (due, data) = match item {
                Item::Data(due, data) => (due, data),
                Item::Eof(due) => {
                    tokio::time::sleep_until(due).await;
                    if hole.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    let _ = to.shutdown().await;
                    return to;
                }
            };
            tokio::time::sleep_until(due).await;
            let rate = shared.rate.load(Ordering::Relaxed);
            let mut rest = &data[..];
            while !rest.is_empty() {
                // Under a rate limit, write in slices of ~10 ms worth so the flow is smooth.
                let n = if rate == 0 {
                    rest.len()
                } else {
                    rest.len().min(((rate / 100).max(1)) as usize)
                };
                if rate != 0 {
                    let now = Instant::now();
                    if next_free > now {
                        tokio::time::sleep_until(next_free).await;
                    } else {
                        next_free = now;
                    }
                    next_free += Duration::from_secs_f64(n as f64 / rate as f64);
                }
                if hole.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                if to.write_all(&rest[..n]).await.is_err() {
                    return to;
                }
                let counter = if up { &shared.up } else { &shared.down };
                counter.fetch_add(n as u64, Ordering::Relaxed);
                rest = &rest[n..];
            }
        }
        to
    };
    let (_from, _to) = tokio::join!(reader, writer);
    // A black-holed connection never gets here (its tasks pend until the proxy stops).
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An echo server on loopback; returns its address.
    fn echo() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn delays_each_way_and_carries_bytes_in_order() {
        let proxy = DelayProxy::start(echo(), ProxyConfig::delay(Duration::from_millis(40)))
            .expect("start");
        let mut s = std::net::TcpStream::connect(proxy.addr()).expect("connect");
        // A round trip costs at least the delay twice.
        let t = std::time::Instant::now();
        s.write_all(b"ping").expect("write");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).expect("read");
        assert_eq!(&b, b"ping");
        assert!(
            t.elapsed() >= Duration::from_millis(80),
            "{:?}",
            t.elapsed()
        );
        // Many writes in flight at once: all come back, in order.
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = s.try_clone().expect("clone");
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 4_000_000];
            r.read_exact(&mut got).map(|_| got)
        });
        s.write_all(&data).expect("write");
        let got = reader.join().expect("join").expect("read back");
        assert!(got == data, "bytes changed on the way");
        assert_eq!(proxy.bytes_up(), 4 + 4_000_000);
        assert_eq!(proxy.bytes_down(), 4 + 4_000_000);
    }

    #[test]
    fn black_hole_goes_silent_without_closing_and_new_connections_work() {
        let proxy = DelayProxy::start(echo(), ProxyConfig::default()).expect("start");
        let mut s = std::net::TcpStream::connect(proxy.addr()).expect("connect");
        s.write_all(b"a").expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("read");
        crate::wait_for("the connection to register", Duration::from_secs(5), || {
            (proxy.open_connections() == 1).then_some(())
        })
        .expect("open");
        assert_eq!(proxy.black_hole_open_connections(), 1);
        s.write_all(b"b").expect("write");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        match s.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            other => panic!("black hole answered or closed: {other:?}"),
        }
        let mut s2 = std::net::TcpStream::connect(proxy.addr()).expect("connect 2");
        s2.write_all(b"c").expect("write");
        s2.read_exact(&mut b).expect("read 2");
        assert_eq!(&b, b"c");
    }

    #[test]
    fn rate_limit_caps_bytes_per_second() {
        let proxy = DelayProxy::start(
            echo(),
            ProxyConfig {
                delay: Duration::ZERO,
                rate: Some(1_000_000),
            },
        )
        .expect("start");
        let mut s = std::net::TcpStream::connect(proxy.addr()).expect("connect");
        let mut r = s.try_clone().expect("clone");
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 500_000];
            r.read_exact(&mut got).map(|_| got.len())
        });
        let t = std::time::Instant::now();
        s.write_all(&[7u8; 500_000]).expect("write");
        assert_eq!(reader.join().expect("join").expect("read"), 500_000);
        // 500 kB at 1 MB/s takes at least ~0.5 s (a lower bound: cannot flake under load).
        assert!(
            t.elapsed() >= Duration::from_millis(450),
            "{:?}",
            t.elapsed()
        );
    }
}
