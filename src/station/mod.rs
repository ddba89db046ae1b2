//! The station: serves the HTTP carrier, authenticates devices, and
//! connects their streams to the targets they are allowed to open.
//!
//! ```text
//! TCP accept ─▶ admission (slots) ─▶ requests: hello / down / up / poll / push
//!                                        │
//!   sessions: id ─▶ Live { device, Tunnel, scope } ─▶ stream opened ─▶ allow? ─▶ connect target ─▶ pump
//!
//! expose listener (one per [devices.expose] entry) ─▶ device's live session ─▶ stream to a service
//! ```
//!
//! Unauthenticated requests get a status code and cost nothing lasting: a
//! session exists only after a handshake with a known device key, and a
//! carrier request is served only if its body holds an authentic packet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};

use crate::admission::{Full, HandshakeBudget, RejectLog, Slots, MAX_CONNECTIONS, MAX_STRANGERS};
use crate::carrier::{self, http};
use crate::config::StationConfig;
use crate::core::session::Limits;
use crate::crypto::SessionId;
use crate::keys::{PrivateKey, PublicKey};
use crate::task::Scope;
use crate::tunnel::{Incoming, Tunnel};

mod expose;
mod requests;

use expose::{accept_exposed, Expose};
use requests::{refuse_log, serve_connection};

/// Time a target has to accept a connection before the stream is refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Distinct unknown device keys remembered so each is logged once.
const UNKNOWN_KEYS_LOGGED: usize = 1024;

/// Why the station could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// A `[devices.expose]` listener could not bind.
    #[error("device {device}: cannot expose service {service:?} on {addr}: {source}")]
    Expose { addr: SocketAddr, device: String, service: String, source: std::io::Error },
}

struct Device {
    name: String,
    allow: HashSet<String>,
}

/// A device's live session.
struct Live {
    id: SessionId,
    device: PublicKey,
    name: String,
    tunnel: Arc<Tunnel>,
    /// Target connections and pumps of this session.
    scope: Scope,
    /// An authentic packet arrived, so this is not a replayed handshake.
    confirmed: AtomicBool,
}

struct Shared {
    key: PrivateKey,
    devices: HashMap<PublicKey, Device>,
    targets: BTreeMap<String, String>,
    sessions: Mutex<HashMap<SessionId, Arc<Live>>>,
    unknown_logged: Mutex<HashSet<PublicKey>>,
    slots: Slots,
    handshakes: Mutex<HandshakeBudget>,
    rejects: Mutex<RejectLog>,
    limits: Limits,
    /// Owns every connection and session task of the station.
    scope: Scope,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A bound station, ready to run.
pub struct Station {
    listener: TcpListener,
    shared: Arc<Shared>,
    exposes: Vec<Expose>,
}

impl Station {
    pub async fn bind(config: StationConfig) -> Result<Station, Error> {
        let limits = Limits { idle_timeout: config.session_timeout, ..Limits::default() };
        Self::bind_with(config, limits).await
    }

    /// As [`Station::bind`], with session timing chosen by the caller
    /// (`config.session_timeout` is then ignored).
    pub async fn bind_with(config: StationConfig, limits: Limits) -> Result<Station, Error> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind { addr: config.listen, source })?;
        let mut exposes = Vec::new();
        for device in &config.devices {
            for (&addr, service) in &device.expose {
                // Port 0 binds an ephemeral port; run() logs the one chosen.
                let listener = TcpListener::bind(addr).await.map_err(|source| Error::Expose {
                    addr,
                    device: device.name.clone(),
                    service: service.clone(),
                    source,
                })?;
                exposes.push(Expose {
                    listener,
                    device: device.public_key,
                    device_name: device.name.clone(),
                    service: service.clone(),
                });
            }
        }
        let devices = config
            .devices
            .into_iter()
            .map(|d| (d.public_key, Device { name: d.name, allow: d.allow.into_iter().collect() }))
            .collect();
        let shared = Shared {
            key: config.private_key,
            devices,
            targets: config.targets,
            sessions: Mutex::new(HashMap::new()),
            unknown_logged: Mutex::new(HashSet::new()),
            slots: Slots::default(),
            handshakes: Mutex::new(HandshakeBudget::new(Instant::now())),
            rejects: Mutex::new(RejectLog::new(Instant::now())),
            limits,
            scope: Scope::new(),
        };
        Ok(Station { listener, shared: Arc::new(shared), exposes })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until the future is dropped; then every connection and
    /// session of this station ends.
    pub async fn run(self) {
        log::info!("station listening on {} (HTTP carrier)", self.local_addr());
        let shared = self.shared;
        let _stop_all = StopOnDrop(shared.clone());
        for expose in self.exposes {
            shared.scope.spawn(accept_exposed(shared.clone(), expose));
        }
        loop {
            let (socket, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    log::warn!("accept failed: {e}");
                    smol::Timer::after(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match shared.slots.take() {
                Ok(slot) => slot,
                Err(full) => {
                    let why = match full {
                        Full::Strangers => {
                            format!("{MAX_STRANGERS} connections have not authenticated yet")
                        }
                        Full::Connections => format!("{MAX_CONNECTIONS} connections are open"),
                    };
                    refuse_log(&shared, peer, 503, &why);
                    // The socket is fresh: its send buffer takes this at once,
                    // so the accept loop never waits on a stranger.
                    let mut socket = socket;
                    let _ = socket.write(&http::error_response(503)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            shared.scope.spawn(serve_connection(shared.clone(), socket, peer, slot));
        }
    }
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.scope.stop();
        for live in lock(&self.0.sessions).drain().map(|(_, live)| live) {
            live.tunnel.end("station stopping");
            live.scope.stop();
        }
    }
}

fn log_unknown_key(shared: &Shared, key: &PublicKey, peer: SocketAddr) {
    let mut logged = lock(&shared.unknown_logged);
    if logged.len() >= UNKNOWN_KEYS_LOGGED {
        logged.clear();
    }
    if logged.insert(*key) {
        log::warn!(
            "{peer}: unknown device key {} refused (full key {}); add it to [[devices]] to let it in",
            key.fingerprint(),
            key.to_base64()
        );
    }
}

/// Runs a session until it ends: its timers, and a target connection for
/// every stream the device opens.
async fn drive_session(
    shared: Arc<Shared>,
    live: Arc<Live>,
    incoming: smol::channel::Receiver<Incoming>,
) {
    let opens = async {
        while let Ok(stream) = incoming.recv().await {
            let (shared, live2) = (shared.clone(), live.clone());
            live.scope.spawn(open_target(shared, live2, stream));
        }
    };
    let (reason, ()) = future::zip(live.tunnel.run_timers(), opens).await;
    live.scope.stop();
    let mut sessions = lock(&shared.sessions);
    if sessions.get(&live.id).is_some_and(|l| Arc::ptr_eq(l, &live)) {
        sessions.remove(&live.id);
    }
    drop(sessions);
    log::info!("device {} session {} ended: {reason}", live.name, carrier::short(&live.id));
}

async fn open_target(shared: Arc<Shared>, live: Arc<Live>, stream: Incoming) {
    let Incoming { id, name } = stream;
    let allowed = shared.devices.get(&live.device).is_some_and(|d| d.allow.contains(&name));
    let address = shared.targets.get(&name).filter(|_| allowed);
    let Some(address) = address else {
        log::warn!("device {}: target {name:?} refused: not in its allow list", live.name);
        live.tunnel.reset(id, &format!("target {name:?} is not allowed for this device"));
        return;
    };
    let connect = async { TcpStream::connect(address.as_str()).await.map_err(|e| e.to_string()) };
    let timeout = async {
        smol::Timer::after(CONNECT_TIMEOUT).await;
        Err(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()))
    };
    match future::or(connect, timeout).await {
        Ok(socket) => {
            let _ = socket.set_nodelay(true);
            log::debug!("device {}: stream {id} to {name} ({address})", live.name);
            live.tunnel.pump(id, socket).await;
        }
        Err(e) => {
            log::warn!("device {}: target {name} ({address}): {e}", live.name);
            live.tunnel.reset(id, &format!("target {name}: {e}"));
        }
    }
}

/// The live session of a device, if it has one: the confirmed one when an
/// unconfirmed handshake (possibly a replay) exists beside it.
fn live_session(shared: &Shared, device: &PublicKey) -> Option<Arc<Live>> {
    lock(&shared.sessions)
        .values()
        .filter(|live| live.device == *device && live.tunnel.closed().is_none())
        .max_by_key(|live| live.confirmed.load(Ordering::Acquire))
        .cloned()
}

/// The first authentic packet of a session proves the handshake was not a
/// replay, so older sessions of the same device can go.
fn confirm(shared: &Shared, live: &Arc<Live>) {
    if live.confirmed.swap(true, Ordering::AcqRel) {
        return;
    }
    let older: Vec<Arc<Live>> = lock(&shared.sessions)
        .values()
        .filter(|l| l.device == live.device && !Arc::ptr_eq(l, live))
        .cloned()
        .collect();
    for old in older {
        old.tunnel.end("the device started a new session");
    }
}
