//! systemd readiness and watchdog notifications (`sd_notify`), without a library: one
//! datagram per state change to `$NOTIFY_SOCKET`. Without that variable (not under systemd,
//! or `Type=simple`) every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

/// Sends `state` (e.g. `READY=1`) to the socket systemd named; false when there is none or
/// sending failed (never fatal).
pub fn notify(state: &str) -> bool {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(p) => notify_to(Path::new(&p), state).is_ok(),
        None => false,
    }
}

/// Sends `state` to the notification socket `path` (`@name` is an abstract socket).
pub fn notify_to(path: &Path, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_os_str().as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(std::io::Error::other("abstract sockets need Linux"));
        }
    }
    sock.send_to(state.as_bytes(), path)?;
    Ok(())
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if systemd asked for it (and
/// `$WATCHDOG_PID`, when set, is this process).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("notify");
        let server = UnixDatagram::bind(&p).expect("bind");
        notify_to(&p, "READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
    }
}
