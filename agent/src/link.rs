//! The link under a connection to the receiver: how it is opened ([`dial`]) and how a
//! link that went quiet is noticed ([`watch`]).
//!
//! - The receiver's address is resolved at every connect, so a host name whose address
//!   changed (DNS, a moved receiver) is followed without a restart; each address it
//!   resolves to (IPv6 and IPv4 alike) is tried in turn within [`CONNECT_TIMEOUT`].
//! - The socket gets TCP keepalive and a user timeout ([`coffer_common::host::net`]): a
//!   receiver that vanished without closing is noticed by the kernel within 30 s.
//! - The stream goes through the process's bandwidth limits ([`crate::rate`]).
//! - A middlebox that keeps the connection open but forwards nothing is invisible to
//!   TCP; [`watch`] notices it: a connection that awaits a reply and has moved no byte
//!   either way for [`SILENCE`] is taken for dead, and the connection manager opens a new
//!   one (requests are idempotent: a commit sent again returns its version). A throttled
//!   link is slow, not silent: every slice written or read counts as progress.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coffer_common::host::time::now_ms;
use tokio::net::TcpStream;

use crate::rate::{self, Limited, Progress};

/// A connection's stream: TCP through the bandwidth limits.
pub type Stream = Limited<TcpStream>;

/// A connect (resolving included) gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection awaiting a reply that moved no byte either way for this long is dead.
/// With [`WATCH_EVERY`] and a reconnect, a quiet link is replaced within 30 s.
pub const SILENCE: Duration = Duration::from_secs(20);
/// How often the watchdog looks.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// When a connection of this process was last found quiet (ms; 0: never). The others
/// that have received no byte since are closed too: what silenced one (a dropped NAT
/// mapping, a suspended laptop) silenced them, and each would otherwise be found out
/// only when it next awaits a reply, 20 s each. Only bytes received count here: a write
/// into a dead link succeeds until the buffers are full.
static QUIET_AT: AtomicI64 = AtomicI64::new(0);

/// Resolves `addr` (`host:port`, `[v6]:port`) now and connects (see the module comment).
pub async fn dial(addr: &str) -> Result<Stream, String> {
    dial_with(addr, |a| async move {
        tokio::net::lookup_host(a).await.map(|i| i.collect())
    })
    .await
}

/// [`dial`] with the resolver given (tests).
pub async fn dial_with<F, Fut>(addr: &str, resolve: F) -> Result<Stream, String>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let addrs = tokio::time::timeout_at(deadline, resolve(addr.to_string()))
        .await
        .map_err(|_| format!("resolving {addr} timed out"))?
        .map_err(|e| format!("resolving {addr}: {e}"))?;
    if addrs.is_empty() {
        return Err(format!("{addr} resolves to no address"));
    }
    let mut errors = Vec::new();
    let n = addrs.len();
    for (i, a) in addrs.into_iter().enumerate() {
        // Each address left gets an equal share of the time left.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / (n - i) as u32;
        match tokio::time::timeout(share, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                if let Err(e) = coffer_common::host::net::tune(&s) {
                    tracing::warn!(addr = %a, "cannot set TCP keepalive: {e}");
                }
                return Ok(Limited::new(s, rate::global().clone()));
            }
            Ok(Err(e)) if n == 1 => errors.push(e.to_string()),
            Ok(Err(e)) => errors.push(format!("{a}: {e}")),
            Err(_) if n == 1 => errors.push("connect timed out".into()),
            Err(_) => errors.push(format!("{a}: connect timed out")),
        }
    }
    Err(errors.join("; "))
}

/// Watches a connection's `progress` on the runtime: once replies are awaited
/// (`awaiting` says `Some(true)`) and no byte has moved either way for [`SILENCE`],
/// calls `dead` with the reason, once. Ends when `awaiting` says `None` (closed).
pub fn watch(
    progress: Arc<Progress>,
    awaiting: impl Fn() -> Option<bool> + Send + 'static,
    dead: impl FnOnce(String) + Send + 'static,
) {
    tokio::spawn(watch_with(
        progress,
        SILENCE,
        WATCH_EVERY,
        &QUIET_AT,
        awaiting,
        dead,
    ));
}

async fn watch_with(
    progress: Arc<Progress>,
    silence: Duration,
    every: Duration,
    quiet_at: &AtomicI64,
    awaiting: impl Fn() -> Option<bool>,
    dead: impl FnOnce(String),
) {
    let silence_ms = silence.as_millis() as i64;
    let born = now_ms();
    // Since when replies have been awaited, as seen here.
    let mut since: Option<i64> = None;
    loop {
        tokio::time::sleep(every).await;
        let wait = awaiting();
        if wait.is_none() {
            return;
        }
        let other = quiet_at.load(Ordering::SeqCst);
        if other > born && other > progress.read_ms.load(Ordering::Relaxed) {
            dead(
                "another connection to the receiver went quiet, and this one has received nothing \
                 since"
                    .into(),
            );
            return;
        }
        match wait {
            None => return,
            Some(false) => {
                since = None;
                continue;
            }
            Some(true) => {}
        }
        let now = now_ms();
        let start = *since.get_or_insert(now);
        let quiet = now - progress.last_ms().max(start);
        if quiet >= silence_ms {
            quiet_at.fetch_max(now, Ordering::SeqCst);
            dead(format!(
                "the link to the receiver went quiet: a reply awaited and no byte moved either \
                 way for {} s",
                quiet / 1000
            ));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Every connect asks the resolver again, and goes where it points now: a name whose
    /// address changed is followed without a restart.
    #[test]
    fn every_dial_resolves_again_and_follows_a_changed_address() {
        rt().block_on(async {
            let a = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a");
            let b = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("b");
            let addrs = [a.local_addr().expect("a"), b.local_addr().expect("b")];
            let asked = Arc::new(AtomicUsize::new(0));
            for (i, expect) in addrs.iter().enumerate() {
                let asked2 = asked.clone();
                let s = dial_with("receiver.example:1", move |name| async move {
                    assert_eq!(name, "receiver.example:1");
                    let k = asked2.fetch_add(1, Ordering::SeqCst);
                    Ok(vec![addrs[k]])
                })
                .await
                .expect("dial");
                assert_eq!(s.get_ref().peer_addr().expect("peer"), *expect, "dial {i}");
            }
            assert_eq!(asked.load(Ordering::SeqCst), 2);
            let (ca, _) = a.accept().await.expect("accept a");
            let (cb, _) = b.accept().await.expect("accept b");
            drop((ca, cb));
        });
    }

    #[test]
    fn dial_tries_each_address_and_says_why_none_answered() {
        rt().block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let good = l.local_addr().expect("addr");
            // A port nothing listens on (bound, then closed).
            let dead = {
                let d = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                d.local_addr().expect("addr")
            };
            let s = dial_with("x:1", move |_| async move { Ok(vec![dead, good]) })
                .await
                .expect("the second address answers");
            assert_eq!(s.get_ref().peer_addr().expect("peer"), good);
            let e = match dial_with("x:1", move |_| async move { Ok(vec![dead]) }).await {
                Err(e) => e,
                Ok(_) => panic!("connected to a closed port"),
            };
            assert!(e.to_lowercase().contains("refused"), "{e}");
            let e = match dial_with("nowhere:1", |_| async { Ok(vec![]) }).await {
                Err(e) => e,
                Ok(_) => panic!("connected to nothing"),
            };
            assert!(e.contains("nowhere:1 resolves to no address"), "{e}");
            let e = match dial_with("bad name:1", |_| async {
                Err(std::io::Error::other("no such host"))
            })
            .await
            {
                Err(e) => e,
                Ok(_) => panic!("resolved"),
            };
            assert!(e.contains("resolving bad name:1: no such host"), "{e}");
        });
    }

    /// A loopback address in IPv6 form works where the host has `::1`.
    #[test]
    fn dial_reaches_an_ipv6_loopback_address() {
        rt().block_on(async {
            let Ok(l) = tokio::net::TcpListener::bind("[::1]:0").await else {
                eprintln!("skipped: ::1 is not configured on this host");
                return;
            };
            let addr = format!("[::1]:{}", l.local_addr().expect("addr").port());
            let s = dial(&addr).await.expect("dial [::1]");
            assert!(s.get_ref().peer_addr().expect("peer").is_ipv6());
        });
    }

    #[test]
    fn a_silent_link_awaiting_a_reply_is_declared_dead_and_a_busy_one_is_not() {
        rt().block_on(async {
            let silence = Duration::from_millis(300);
            let every = Duration::from_millis(20);
            // Awaiting, and nothing moves: dead after about `silence`.
            let p = Arc::new(Progress::default());
            let t = std::time::Instant::now();
            let dead = Arc::new(AtomicBool::new(false));
            let d = dead.clone();
            let q = AtomicI64::new(0);
            watch_with(
                p,
                silence,
                every,
                &q,
                || Some(true),
                move |why| {
                    assert!(why.contains("went quiet"), "{why}");
                    d.store(true, Ordering::SeqCst);
                },
            )
            .await;
            assert!(dead.load(Ordering::SeqCst));
            assert!(t.elapsed() >= silence, "{:?}", t.elapsed());

            // Awaiting, and bytes keep moving (a throttled link): never dead; ends when
            // the connection closes.
            let p = Arc::new(Progress::default());
            let ticks = Arc::new(AtomicUsize::new(0));
            let (p2, ticks2) = (p.clone(), ticks.clone());
            watch_with(
                p,
                silence,
                every,
                &AtomicI64::new(0),
                move || {
                    p2.read_ms.store(now_ms(), Ordering::Relaxed);
                    (ticks2.fetch_add(1, Ordering::SeqCst) < 40).then_some(true)
                },
                |why| panic!("a moving link was declared dead: {why}"),
            )
            .await;
            assert!(ticks.load(Ordering::SeqCst) > 40);

            // Nothing awaited: an idle link is not dead, however long it is quiet.
            let n = Arc::new(AtomicUsize::new(0));
            let n2 = n.clone();
            watch_with(
                Arc::new(Progress::default()),
                silence,
                every,
                &AtomicI64::new(0),
                move || (n2.fetch_add(1, Ordering::SeqCst) < 30).then_some(false),
                |why| panic!("an idle link was declared dead: {why}"),
            )
            .await;
        });
    }

    /// One connection found quiet takes down the others that have been quiet since (the
    /// same outage), idle or not; one that moved bytes since, or opened since, is kept.
    #[test]
    fn a_quiet_link_takes_the_others_quiet_since_with_it() {
        rt().block_on(async {
            let silence = Duration::from_millis(300);
            let every = Duration::from_millis(20);
            let q = AtomicI64::new(0);
            let stale = Arc::new(Progress::default());
            stale.read_ms.store(now_ms() - 60_000, Ordering::Relaxed);
            // Written into since: no proof that the peer is there.
            stale.written_ms.store(now_ms() + 5_000, Ordering::Relaxed);
            let busy = Arc::new(Progress::default());
            let (busy2, rounds) = (busy.clone(), Arc::new(AtomicUsize::new(0)));
            let rounds2 = rounds.clone();
            let outcome = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (o1, o2, o3) = (outcome.clone(), outcome.clone(), outcome.clone());
            let silent = watch_with(
                Arc::new(Progress::default()),
                silence,
                every,
                &q,
                || Some(true),
                move |_| o1.lock().expect("lock").push("silent"),
            );
            let idle = watch_with(
                stale,
                silence,
                every,
                &q,
                || Some(false),
                move |why| {
                    assert!(why.contains("another connection"), "{why}");
                    o2.lock().expect("lock").push("idle");
                },
            );
            let moving = watch_with(
                busy,
                silence,
                every,
                &q,
                move || {
                    busy2.read_ms.store(now_ms(), Ordering::Relaxed);
                    (rounds2.fetch_add(1, Ordering::SeqCst) < 40).then_some(false)
                },
                move |_| o3.lock().expect("lock").push("moving"),
            );
            tokio::join!(silent, idle, moving);
            let got = outcome.lock().expect("lock").clone();
            assert_eq!(got, vec!["silent", "idle"]);
            assert!(q.load(Ordering::SeqCst) > 0);
        });
    }
}
