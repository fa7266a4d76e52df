//! systemd integration without a library: `sd_notify` messages (READY, STATUS,
//! WATCHDOG, STOPPING) as datagrams to `$NOTIFY_SOCKET`, and the watchdog
//! interval from `$WATCHDOG_USEC`. Outside systemd every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// Half of WATCHDOG_USEC, if the watchdog is on. The main loop pings once
    /// a second, so WatchdogSec should be at least 2 s.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, which
    /// must be ours if set).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let ours =
            std::env::var("WATCHDOG_PID").map_or(true, |pid| pid == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|us| us.parse::<u64>().ok())
            .filter(|&us| us > 0 && ours)
            .map(|us| Duration::from_micros(us / 2));
        if watchdog.is_some_and(|half| half < Duration::from_secs(1)) {
            tracing::warn!("WatchdogSec under 2 s: ringgate pings the watchdog once a second");
        }
        Notifier { socket, watchdog }
    }

    /// Sends one notification (`KEY=value` lines); failures are logged, not fatal.
    pub fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket {
            if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!("sd_notify failed: {e}");
            }
        }
    }
}
