//! The daemon's one shutdown signal, which every thread and task of `run` watches.
//!
//! [`Shutdown::stop`] (SIGTERM/SIGINT, or a startup error) tells them all at once: loops
//! that sleep wake ([`Shutdown::sleep`]), threads blocked on a channel wake through
//! `select!` on [`Shutdown::signal`], async code awaits [`Shutdown::stopped`], and hot
//! paths read [`Shutdown::is_stopping`] (one atomic load). [`Shutdown::give_up`] is the
//! last step of a stop: past its deadline, replies still awaited from the receiver are
//! given up on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio_util::sync::CancellationToken;

/// The daemon's shutdown signal (see the module comment).
pub struct Shutdown {
    stopping: AtomicBool,
    given_up: AtomicBool,
    /// Dropped by [`Shutdown::stop`]: `stopped` is then disconnected, and every `recv` on
    /// it returns at once. Nothing is ever sent on it.
    trigger: Mutex<Option<Sender<()>>>,
    stopped: Receiver<()>,
    /// The same signal for async code.
    token: CancellationToken,
}

impl Default for Shutdown {
    fn default() -> Self {
        let (trigger, stopped) = crossbeam_channel::bounded(0);
        Shutdown {
            stopping: AtomicBool::new(false),
            given_up: AtomicBool::new(false),
            trigger: Mutex::new(Some(trigger)),
            stopped,
            token: CancellationToken::new(),
        }
    }
}

impl Shutdown {
    /// Tells every thread to stop taking work (idempotent).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.token.cancel();
        let trigger = match self.trigger.lock() {
            Ok(mut t) => t.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(trigger);
    }

    /// True once [`Shutdown::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Sleeps for `d`, or less if the daemon stops meanwhile; true when it is stopping.
    pub fn sleep(&self, d: Duration) -> bool {
        match self.stopped.recv_timeout(d) {
            Err(RecvTimeoutError::Disconnected) => true,
            Ok(()) | Err(RecvTimeoutError::Timeout) => self.is_stopping(),
        }
    }

    /// A channel that is ready (disconnected) once the daemon stops, for `select!` beside
    /// the channel a thread waits on.
    pub fn signal(&self) -> &Receiver<()> {
        &self.stopped
    }

    /// Resolves once the daemon stops (for async code).
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }

    /// Past the stop's deadline: replies still awaited from the receiver are given up on
    /// (what they would have acknowledged stays in flight, requeued at the next start).
    pub fn give_up(&self) {
        self.given_up.store(true, Ordering::SeqCst);
    }

    /// True once [`Shutdown::give_up`] was called.
    pub fn is_given_up(&self) -> bool {
        self.given_up.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn one_stop_wakes_sleepers_and_selects_at_once() {
        let s = std::sync::Arc::new(Shutdown::default());
        assert!(!s.is_stopping());
        assert!(!s.sleep(Duration::from_millis(1)));
        let (_keep, idle) = crossbeam_channel::unbounded::<u32>();
        let waiters: Vec<_> = (0..3)
            .map(|i| {
                let (s, idle) = (s.clone(), idle.clone());
                std::thread::spawn(move || {
                    let t = Instant::now();
                    if i == 0 {
                        assert!(s.sleep(Duration::from_secs(60)));
                    } else {
                        crossbeam_channel::select! {
                            recv(idle) -> _ => panic!("nothing was sent"),
                            recv(s.signal()) -> _ => {}
                        }
                    }
                    t.elapsed()
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        s.stop();
        s.stop();
        for w in waiters {
            let waited = w.join().expect("waiter");
            assert!(waited < Duration::from_secs(30), "woke after {waited:?}");
        }
        assert!(s.is_stopping());
        assert!(s.sleep(Duration::from_secs(60)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(s.stopped());
        assert!(!s.is_given_up());
        s.give_up();
        assert!(s.is_given_up());
    }
}
