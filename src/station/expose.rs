//! Reverse listeners: a monitoring client connecting to a `[devices.expose]`
//! address is carried to the named service on that device.
//!
//! ```text
//!  accept ─▶ device's live session?
//!    ├ none: close the client at once, log
//!    └ open stream "service\nclient" ─▶ pump (the agent opens the service or resets the stream)
//! ```

use std::sync::Arc;
use std::time::Duration;

use smol::net::TcpListener;

use super::{live_session, Shared};
use crate::keys::PublicKey;

/// A reverse listener: clients connecting here reach `service` on a device.
pub(super) struct Expose {
    pub listener: TcpListener,
    pub device: PublicKey,
    pub device_name: String,
    pub service: String,
}

/// Accepts monitoring clients on a reverse listener for as long as the
/// station runs, and carries each to the device's service.
pub(super) async fn accept_exposed(shared: Arc<Shared>, expose: Expose) {
    let Expose { listener, device, device_name, service } = expose;
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    log::info!("exposing service {service:?} of device {device_name} on {addr}");
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, don't spin.
                log::warn!("{addr}: accept failed: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Offline: dropping the socket closes the client at once, rather
        // than leaving it waiting for a device that may not come.
        let Some(live) = live_session(&shared, &device) else {
            log::warn!(
                "client {peer} on {addr}: device {device_name} is offline; \
                 closed the connection (service {service:?})"
            );
            continue;
        };
        // The client's address rides along for the agent's logs (who holds
        // a console); names cannot contain a newline, so it splits cleanly.
        let id = match live.tunnel.open(&format!("{service}\n{peer}")) {
            Ok(id) => id,
            Err(e) => {
                log::warn!("client {peer} on {addr}: device {device_name}: {e}; closed");
                continue;
            }
        };
        log::info!(
            "client {peer} on {addr} -> device {device_name} service {service:?} (stream {id})"
        );
        let _ = socket.set_nodelay(true);
        let tunnel = live.tunnel.clone();
        let name = device_name.clone();
        // The session's scope owns the pump, so the client is closed when
        // the session ends.
        live.scope.spawn(async move {
            tunnel.pump(id, socket).await;
            log::debug!("client {peer} -> device {name}: stream {id} ended");
        });
    }
}
