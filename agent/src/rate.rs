//! Bandwidth limits: `upload_limit` and `download_limit` in the config, and `restore
//! --limit-rate` for one restore.
//!
//! A limit is a token bucket ([`Bucket`]) counting bytes on the wire: every byte the agent
//! writes to (or reads from) a connection to the receiver, Noise framing included. One
//! bucket per direction is shared by all of the process's connections ([`global`]): the main
//! connection, the query lane and the fresh lane together stay under the limit. A limit is
//! changed in place ([`Limits::set`], on SIGHUP), so connections keep their bucket.
//!
//! The bucket holds at most an eighth of a second's worth of bytes (at least
//! [`MIN_BURST`]), and a write or read takes at most that much at once, so over any
//! window of T seconds at most `rate * (T + 0.25 s)` bytes pass: within 2.5% over 10 s.
//! A read is limited by reading less (the kernel's window then slows the sender).
//!
//! [`Limited`] wraps a stream with the buckets, and records when bytes last moved each way
//! ([`Progress`]): a throttled connection is slow, not silent (see [`crate::link`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The least a limit may be: slower, a 2 MiB chunk could take longer than the receiver's
/// idle timeout (300 s by default) to cross, and the receiver would end the session.
pub const MIN_RATE: u64 = 16 << 10;
/// The smallest burst (and slice of a write or read) whatever the rate.
pub const MIN_BURST: u64 = 256;

/// Parses a rate: a number, a unit of bytes or bits, and `/s`: `"10MiB/s"`, `"500KiB/s"`,
/// `"1.5MB/s"`, `"100Mbit/s"`, `"2000B/s"`. Binary units (KiB, MiB, GiB: 1024-based) and
/// decimal ones (kB or KB, MB, GB: 1000-based) are both taken; `/s` may be left out.
/// Returns bytes per second (at least [`MIN_RATE`], 16 KiB/s), or what is wrong with it.
pub fn parse_rate(v: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "{v:?} is not a rate like \"10MiB/s\", \"500KiB/s\", \"1MB/s\" or \"100Mbit/s\"{why}"
        )
    };
    let s = v.trim();
    let s = s
        .strip_suffix("/s")
        .or_else(|| s.strip_suffix("ps"))
        .unwrap_or(s)
        .trim_end();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad(""))?;
    let unit = unit.trim();
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "k" | "K" | "kB" | "KB" => 1e3,
        "KiB" | "Ki" => 1024.0,
        "M" | "MB" => 1e6,
        "MiB" | "Mi" => 1024.0 * 1024.0,
        "G" | "GB" => 1e9,
        "GiB" | "Gi" => 1024.0 * 1024.0 * 1024.0,
        "bit" | "b" => 1.0 / 8.0,
        "kbit" | "Kbit" | "kb" | "Kb" => 1e3 / 8.0,
        "Mbit" | "Mb" => 1e6 / 8.0,
        "Gbit" | "Gb" => 1e9 / 8.0,
        _ => return Err(bad(&format!(" (unknown unit {unit:?})"))),
    };
    let rate = (n * mult).round();
    if !rate.is_finite() || rate > u64::MAX as f64 / 2.0 {
        return Err(bad(""));
    }
    let rate = rate as u64;
    if rate < MIN_RATE {
        return Err(bad(" of at least \"16KiB/s\" (leave it out for no limit)"));
    }
    Ok(rate)
}

/// A rate as people read it: `2 MiB/s`, `500 KiB/s`, `1.5 MB/s` stays in binary units.
pub fn describe(rate: Option<u64>) -> String {
    match rate {
        None => "no limit".into(),
        Some(r) if r >= 1 << 30 => format!("{:.1} GiB/s", r as f64 / (1u64 << 30) as f64),
        Some(r) if r >= 1 << 20 => format!("{:.1} MiB/s", r as f64 / (1u64 << 20) as f64),
        Some(r) if r >= 1 << 10 => format!("{:.1} KiB/s", r as f64 / 1024.0),
        Some(r) => format!("{r} B/s"),
    }
}

/// Monotonic time since some origin (a fake in tests).
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The real clock.
pub struct Mono(Instant);

impl Default for Mono {
    fn default() -> Self {
        Mono(Instant::now())
    }
}

impl Clock for Mono {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A token bucket of bytes; no limit until [`Bucket::set_rate`] gives one.
pub struct Bucket<C: Clock = Mono> {
    clock: C,
    state: Mutex<State>,
}

struct State {
    /// Bytes per second; `None`: no limit.
    rate: Option<u64>,
    /// Bytes that may go now; negative after a slice larger than what was there (a debt
    /// paid before the next grant).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Duration,
}

impl Default for Bucket<Mono> {
    fn default() -> Self {
        Bucket::with_clock(Mono::default())
    }
}

impl<C: Clock> Bucket<C> {
    pub fn with_clock(clock: C) -> Self {
        let at = clock.now();
        Bucket {
            clock,
            state: Mutex::new(State {
                rate: None,
                tokens: 0.0,
                at,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// The burst (and the largest slice) at `rate`.
    fn burst(rate: u64) -> f64 {
        (rate / 8).max(MIN_BURST) as f64
    }

    /// Sets the limit (`None`: none). Bytes already granted stay spent; the bucket starts
    /// empty at a new rate, so a change never lets a burst through.
    pub fn set_rate(&self, rate: Option<u64>) {
        let now = self.clock.now();
        let mut s = self.lock();
        if s.rate == rate {
            return;
        }
        s.rate = rate;
        s.tokens = s.tokens.min(0.0);
        s.at = now;
    }

    /// The limit now.
    pub fn rate(&self) -> Option<u64> {
        self.lock().rate
    }

    /// Asks to move up to `want` bytes: how many may go now (at least 1, and all of `want`
    /// when there is no limit), taken from the bucket; or how long to wait before asking
    /// again. Bytes granted and not moved are given back with [`Bucket::refund`].
    pub fn grant(&self, want: usize) -> Result<usize, Duration> {
        if want == 0 {
            return Ok(0);
        }
        let now = self.clock.now();
        let mut s = self.lock();
        let Some(rate) = s.rate else {
            return Ok(want);
        };
        let burst = Self::burst(rate);
        let r = rate as f64;
        let dt = now.saturating_sub(s.at).as_secs_f64();
        s.tokens = (s.tokens + dt * r).min(burst);
        s.at = now;
        if s.tokens <= 0.0 {
            // Until the debt is paid and a little more (at least 1 ms: no busy loop).
            let wait = (-s.tokens + 1.0) / r;
            return Err(Duration::from_secs_f64(wait).max(Duration::from_millis(1)));
        }
        let n = want.min(burst as usize).max(1);
        s.tokens -= n as f64;
        Ok(n)
    }

    /// Gives back `n` bytes granted and not moved.
    pub fn refund(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut s = self.lock();
        if let Some(rate) = s.rate {
            s.tokens = (s.tokens + n as f64).min(Self::burst(rate));
        }
    }
}

/// The two buckets of a process: what it sends, what it receives.
#[derive(Default)]
pub struct Limits {
    pub up: Bucket,
    pub down: Bucket,
}

impl Limits {
    /// Applies the limits (`None`: none); logs what changed.
    pub fn set(&self, up: Option<u64>, down: Option<u64>) {
        let (old_up, old_down) = (self.up.rate(), self.down.rate());
        self.up.set_rate(up);
        self.down.set_rate(down);
        if old_up != up || old_down != down {
            tracing::info!(
                upload = %describe(up),
                download = %describe(down),
                "bandwidth limits"
            );
        }
    }
}

/// The process's limits, shared by all its connections.
pub fn global() -> &'static Arc<Limits> {
    static LIMITS: OnceLock<Arc<Limits>> = OnceLock::new();
    LIMITS.get_or_init(Arc::default)
}

/// When bytes last moved each way on a connection (ms since the Unix epoch, 0: never).
#[derive(Default)]
pub struct Progress {
    pub read_ms: AtomicI64,
    pub written_ms: AtomicI64,
    /// Bytes moved each way.
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
}

impl Progress {
    /// The last time bytes moved either way.
    pub fn last_ms(&self) -> i64 {
        self.read_ms
            .load(Ordering::Relaxed)
            .max(self.written_ms.load(Ordering::Relaxed))
    }
}

/// A stream whose writes and reads go through the process's buckets, and whose progress
/// each way is recorded.
pub struct Limited<S> {
    inner: S,
    limits: Arc<Limits>,
    progress: Arc<Progress>,
    write_wait: Option<Pin<Box<tokio::time::Sleep>>>,
    read_wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Limited<S> {
    pub fn new(inner: S, limits: Arc<Limits>) -> Self {
        Limited {
            inner,
            limits,
            progress: Arc::default(),
            write_wait: None,
            read_wait: None,
        }
    }

    /// The stream's progress record (shared).
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Waits out a bucket's answer: `Ready(n)` bytes granted, or `Pending` with a timer set.
fn take(
    bucket: &Bucket,
    wait: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<usize> {
    loop {
        if let Some(w) = wait.as_mut() {
            ready!(w.as_mut().poll(cx));
            *wait = None;
        }
        match bucket.grant(want) {
            Ok(n) => return Poll::Ready(n),
            Err(d) => *wait = Some(Box::pin(tokio::time::sleep(d))),
        }
    }
}

fn stamp(at: &AtomicI64, bytes: &AtomicU64, n: usize) {
    if n > 0 {
        at.store(coffer_common::host::time::now_ms(), Ordering::Relaxed);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let limits = this.limits.clone();
        let n = ready!(take(&limits.up, &mut this.write_wait, buf.len(), cx));
        match Pin::new(&mut this.inner).poll_write(cx, &buf[..n]) {
            Poll::Ready(Ok(w)) => {
                limits.up.refund(n - w.min(n));
                stamp(&this.progress.written_ms, &this.progress.written_bytes, w);
                Poll::Ready(Ok(w))
            }
            other => {
                limits.up.refund(n);
                other
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let limits = this.limits.clone();
        let room = buf.remaining();
        let n = ready!(take(&limits.down, &mut this.read_wait, room, cx));
        if n >= room {
            let before = buf.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, buf);
            let got = buf.filled().len() - before;
            limits.down.refund(n - got.min(n));
            stamp(&this.progress.read_ms, &this.progress.read_bytes, got);
            return r;
        }
        // Read at most the grant: into the first `n` bytes of the room (made initialized
        // first), then counted as filled.
        let slice = buf.initialize_unfilled_to(n);
        let mut part = ReadBuf::new(slice);
        let r = Pin::new(&mut this.inner).poll_read(cx, &mut part);
        let got = part.filled().len();
        limits.down.refund(n - got.min(n));
        stamp(&this.progress.read_ms, &this.progress.read_bytes, got);
        if let Poll::Ready(Ok(())) = r {
            buf.advance(got);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock moved by hand.
    #[derive(Default, Clone)]
    struct Fake(Arc<AtomicU64>);

    impl Fake {
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for Fake {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    #[test]
    fn rates_parse_in_binary_decimal_and_bit_units() {
        let ok = |s: &str| parse_rate(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("10MiB/s"), 10 << 20);
        assert_eq!(ok("500KiB/s"), 500 << 10);
        assert_eq!(ok("1MB/s"), 1_000_000);
        assert_eq!(ok("1.5 MB/s"), 1_500_000);
        assert_eq!(ok("2GiB/s"), 2 << 30);
        assert_eq!(ok("100Mbit/s"), 12_500_000);
        assert_eq!(ok("200000bit/s"), 25_000);
        assert_eq!(ok("20000B/s"), 20_000);
        assert_eq!(ok("20000"), 20_000);
        assert_eq!(ok("16KiB/s"), MIN_RATE);
        assert_eq!(ok(" 3 MiB "), 3 << 20);
        assert_eq!(ok("64kB/s"), 64_000);
        for bad in [
            "",
            "fast",
            "10 parsecs/s",
            "MiB/s",
            "-1MiB/s",
            "1..2MB/s",
            "0",
            "10B/s",
        ] {
            let e = parse_rate(bad).expect_err(bad);
            assert!(e.contains("is not a rate"), "{bad}: {e}");
        }
        assert!(parse_rate("10B/s")
            .expect_err("refused")
            .contains("of at least \"16KiB/s\""));
        assert!(parse_rate("3 furlongs/s")
            .expect_err("refused")
            .contains("unknown unit \"furlongs\""));
    }

    /// Drives a bucket as a writer that always wants `want` bytes, for `secs` of fake time
    /// in steps of `step`; returns the bytes granted in each whole second.
    fn run(
        bucket: &Bucket<Fake>,
        clock: &Fake,
        want: usize,
        secs: u64,
        step: Duration,
    ) -> Vec<u64> {
        let mut per_second = vec![0u64; secs as usize];
        let end = Duration::from_secs(secs);
        while clock.now() < end {
            match bucket.grant(want) {
                Ok(n) => per_second[clock.now().as_secs() as usize] += n as u64,
                Err(wait) => clock.advance(wait.min(step).max(Duration::from_micros(1))),
            }
        }
        per_second
    }

    #[test]
    fn a_limit_holds_within_a_few_percent_over_any_ten_seconds() {
        for (rate, want) in [
            (2u64 << 20, 1 << 20),
            (10 << 20, 65536),
            (1024, 4096),
            (5000, 1),
        ] {
            let clock = Fake::default();
            let b = Bucket::with_clock(clock.clone());
            b.set_rate(Some(rate));
            let got = run(&b, &clock, want, 30, Duration::from_millis(3));
            for w in got.windows(10) {
                let sum: u64 = w.iter().sum();
                let limit = rate as f64 * 10.0;
                assert!(
                    (sum as f64) <= limit * 1.05,
                    "rate {rate}, want {want}: {sum} bytes in 10 s (limit {limit})"
                );
                assert!(
                    (sum as f64) >= limit * 0.95,
                    "rate {rate}, want {want}: only {sum} bytes in 10 s (limit {limit})"
                );
            }
        }
    }

    #[test]
    fn no_limit_grants_everything_and_a_new_rate_applies_at_once() {
        let clock = Fake::default();
        let b = Bucket::with_clock(clock.clone());
        assert_eq!(b.grant(10 << 20), Ok(10 << 20));
        b.set_rate(Some(1 << 20));
        // Starts empty: nothing until time passes.
        assert!(b.grant(4096).is_err());
        let got = run(&b, &clock, 1 << 20, 10, Duration::from_millis(5));
        let first: u64 = got.iter().sum();
        assert!(first <= (10u64 << 20) * 105 / 100, "{first}");
        // Halved (as a SIGHUP would): the next ten seconds carry half as much.
        b.set_rate(Some(512 << 10));
        let start = clock.now();
        let mut sent = 0u64;
        while clock.now() < start + Duration::from_secs(10) {
            match b.grant(1 << 20) {
                Ok(n) => sent += n as u64,
                Err(w) => clock.advance(w.min(Duration::from_millis(5))),
            }
        }
        assert!(sent <= (5u64 << 20) * 105 / 100, "{sent}");
        assert!(sent >= (5u64 << 20) * 95 / 100, "{sent}");
        b.set_rate(None);
        assert_eq!(b.grant(123_456), Ok(123_456));
    }

    #[test]
    fn refunds_return_what_did_not_move_and_slices_are_bounded() {
        let clock = Fake::default();
        let b = Bucket::with_clock(clock.clone());
        b.set_rate(Some(8 << 20));
        clock.advance(Duration::from_secs(5));
        // The burst is an eighth of a second: one slice at most.
        assert_eq!(b.grant(100 << 20), Ok(1 << 20));
        assert!(b.grant(1).is_err());
        b.refund(1 << 20);
        assert_eq!(b.grant(4096), Ok(4096));
    }

    #[test]
    fn a_limited_stream_moves_every_byte_and_records_progress() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let limits = Arc::new(Limits::default());
            limits.up.set_rate(Some(1 << 20));
            limits.down.set_rate(Some(1 << 20));
            let (a, b) = tokio::io::duplex(64 << 10);
            let mut a = Limited::new(a, limits.clone());
            let mut b = Limited::new(b, limits.clone());
            let (pa, pb) = (a.progress(), b.progress());
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let sent = data.clone();
            let t = std::time::Instant::now();
            let writer = tokio::spawn(async move {
                a.write_all(&sent).await.expect("write");
                a.shutdown().await.expect("shutdown");
            });
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.expect("read");
            writer.await.expect("writer");
            assert_eq!(got, data);
            // 300 KB at 1 MiB/s, from an empty bucket: at least a quarter of a second.
            assert!(
                t.elapsed() >= Duration::from_millis(200),
                "{:?}",
                t.elapsed()
            );
            assert_eq!(pa.written_bytes.load(Ordering::Relaxed), 300_000);
            assert_eq!(pb.read_bytes.load(Ordering::Relaxed), 300_000);
            assert!(pa.last_ms() > 0 && pb.last_ms() > 0);
        });
    }
}
