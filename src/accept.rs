//! The accept step every listener of postern shares: the station's carrier
//! and peer listeners, its expose listeners, the agent's forwards and both
//! programs' status listeners.

use std::net::SocketAddr;
use std::time::Duration;

use smol::net::{TcpListener, TcpStream};

/// Pause after a failed accept (out of file descriptors and the like):
/// long enough not to spin on an error that persists, short enough that a
/// descriptor freed meanwhile is used at once.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The next connection on `listener`. A failed accept is logged as
/// `WHAT: accept failed: REASON` and tried again after [`ACCEPT_BACKOFF`].
pub async fn next(listener: &TcpListener, what: impl Fn() -> String) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                log::warn!("{}: accept failed: {e}", what());
                smol::Timer::after(ACCEPT_BACKOFF).await;
            }
        }
    }
}
