//! systemd's notify protocol (sd_notify(3)), for `Type=notify` units: one
//! datagram per state change to the socket `$NOTIFY_SOCKET` names, and
//! `WATCHDOG=1` at half the `$WATCHDOG_USEC` interval so a wedged process is
//! restarted.
//!
//! ```text
//!  listeners bound ─▶ READY=1      SIGHUP ─▶ RELOADING=1 … READY=1      SIGTERM ─▶ STOPPING=1
//!  executor alive  ─▶ WATCHDOG=1 every WATCHDOG_USEC / 2
//! ```
//!
//! Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing. A
//! datagram that cannot be sent is logged once and otherwise ignored: the
//! service works without its supervisor's bookkeeping.

use std::ffi::OsString;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Names the socket, a path or `@name` for the abstract namespace.
const SOCKET_VAR: &str = "NOTIFY_SOCKET";

/// The watchdog interval in microseconds, when the unit sets `WatchdogSec=`.
const WATCHDOG_VAR: &str = "WATCHDOG_USEC";

/// The process the watchdog applies to, when set: not us if it differs.
const WATCHDOG_PID_VAR: &str = "WATCHDOG_PID";

/// Talks to the service manager, or to nobody.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
    complained: AtomicBool,
}

impl Notifier {
    /// From the environment systemd sets for the service.
    pub fn from_env() -> Notifier {
        Self::from_vars(
            std::env::var_os(SOCKET_VAR),
            std::env::var_os(WATCHDOG_VAR),
            std::env::var_os(WATCHDOG_PID_VAR),
            std::process::id(),
        )
    }

    fn from_vars(
        socket: Option<OsString>,
        watchdog_usec: Option<OsString>,
        watchdog_pid: Option<OsString>,
        pid: u32,
    ) -> Notifier {
        let target = socket.and_then(|name| {
            let name = name.into_string().ok()?;
            let addr = match name.strip_prefix('@') {
                Some(abstract_name) => abstract_address(abstract_name)?,
                None => SocketAddr::from_pathname(&name).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let ours = watchdog_pid
            .and_then(|text| text.into_string().ok()?.parse::<u32>().ok())
            .map_or(true, |watched| watched == pid);
        let watchdog = watchdog_usec
            .filter(|_| ours)
            .and_then(|text| text.into_string().ok()?.parse::<u64>().ok())
            .filter(|usec| *usec > 0)
            .map(|usec| Duration::from_micros(usec) / 2);
        Notifier { target, watchdog, complained: AtomicBool::new(false) }
    }

    /// Listeners are bound and the service serves.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// A reload began; [`Notifier::ready`] says it ended.
    pub fn reloading(&self) {
        self.send("RELOADING=1");
    }

    /// A graceful stop began.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Sends `WATCHDOG=1` every half watchdog interval, forever, if the unit
    /// asked for a watchdog; else never returns and does nothing. Run it on
    /// the executor whose liveness it vouches for.
    pub async fn keep_watchdog(&self) {
        let Some(every) = self.watchdog else {
            return futures_lite::future::pending().await;
        };
        loop {
            self.send("WATCHDOG=1");
            smol::Timer::after(every).await;
        }
    }

    fn send(&self, state: &str) {
        let Some((socket, addr)) = &self.target else { return };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            if !self.complained.swap(true, Ordering::Relaxed) {
                log::warn!("cannot notify the service manager ({SOCKET_VAR}): {e}");
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &str) -> Option<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes()).ok()
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_: &str) -> Option<SocketAddr> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_is_half_the_interval_and_only_for_us() {
        let some = |s: &str| Some(OsString::from(s));
        let n = Notifier::from_vars(None, some("4000000"), None, 7);
        assert_eq!(n.watchdog, Some(Duration::from_secs(2)));
        let n = Notifier::from_vars(None, some("4000000"), some("7"), 7);
        assert_eq!(n.watchdog, Some(Duration::from_secs(2)));
        let n = Notifier::from_vars(None, some("4000000"), some("8"), 7);
        assert_eq!(n.watchdog, None, "the watchdog is another process's");
        assert_eq!(Notifier::from_vars(None, some("0"), None, 7).watchdog, None);
        assert_eq!(Notifier::from_vars(None, some("soon"), None, 7).watchdog, None);
        assert!(Notifier::from_vars(None, None, None, 7).target.is_none());
    }

    #[test]
    fn states_arrive_as_datagrams_on_a_path_and_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("postern-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let path = UnixDatagram::bind(&dir).expect("bind a path");
        let name = format!("postern-notify-test-{}", std::process::id());
        let abstract_socket =
            UnixDatagram::bind_addr(&abstract_address(&name).expect("abstract")).expect("bind");
        for (socket, var) in
            [(&path, dir.display().to_string()), (&abstract_socket, format!("@{name}"))]
        {
            let notifier = Notifier::from_vars(Some(var.into()), None, None, 1);
            notifier.ready();
            notifier.reloading();
            notifier.stopping();
            let mut buf = [0u8; 64];
            for expected in ["READY=1", "RELOADING=1", "STOPPING=1"] {
                let n = socket.recv(&mut buf).expect("a datagram");
                assert_eq!(&buf[..n], expected.as_bytes());
            }
        }
        let _ = std::fs::remove_file(&dir);
    }
}
