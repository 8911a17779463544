//! TCP settings both daemons put on their connections, so that a peer that vanished
//! without closing (a NAT mapping dropped, a laptop suspended, a cable pulled) is noticed
//! within [`DEAD_PEER_WITHIN`] rather than after the kernel's default two hours.
//!
//! - Keepalive: after [`KEEPALIVE_IDLE`] without traffic, a probe every
//!   [`KEEPALIVE_INTERVAL`]; [`KEEPALIVE_PROBES`] unanswered probes end the connection.
//! - `TCP_USER_TIMEOUT` (Linux): data sent and not acknowledged for [`USER_TIMEOUT`]
//!   ends the connection (keepalive alone does not cover a peer that vanished while data
//!   was in flight).
//!
//! A connection ended so fails its next read or write with an error; each side then does
//! what it does for any lost connection (the agent reconnects, the receiver ends the
//! session). What TCP cannot see, a middlebox that keeps the connection open and forwards
//! nothing, the agent notices by itself (its link watchdog).

use std::time::Duration;

use tokio::net::TcpStream;

/// How long a connection without traffic waits before its first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection is dropped.
pub const KEEPALIVE_PROBES: u32 = 3;
/// Longest that sent data may stay unacknowledged (Linux).
pub const USER_TIMEOUT: Duration = Duration::from_secs(25);
/// A vanished peer is noticed within this long: idle + probes x interval, or the user
/// timeout, whichever applies, with room to spare.
pub const DEAD_PEER_WITHIN: Duration = Duration::from_secs(30);

/// Turns on keepalive with the short intervals above, and `TCP_USER_TIMEOUT` where there
/// is one; `TCP_NODELAY` too (requests and replies are small frames that must not wait).
pub fn tune(stream: &TcpStream) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    stream.set_nodelay(true)?;
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    #[cfg(not(target_os = "openbsd"))]
    let ka = ka.with_retries(KEEPALIVE_PROBES);
    sock.set_tcp_keepalive(&ka)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tuned_connection_has_keepalive_and_a_user_timeout() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = l.local_addr().expect("addr");
            let (c, a) = tokio::join!(TcpStream::connect(addr), l.accept());
            let (c, (a, _)) = (c.expect("connect"), a.expect("accept"));
            for s in [&c, &a] {
                tune(s).expect("tune");
                let sock = socket2::SockRef::from(s);
                assert!(sock.keepalive().expect("keepalive"));
                assert_eq!(sock.tcp_keepalive_time().expect("idle"), KEEPALIVE_IDLE);
                assert!(s.nodelay().expect("nodelay"));
                #[cfg(target_os = "linux")]
                assert_eq!(
                    sock.tcp_user_timeout().expect("user timeout"),
                    Some(USER_TIMEOUT)
                );
            }
        });
    }
}
