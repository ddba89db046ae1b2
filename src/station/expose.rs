//! Reverse listeners: a monitoring client connecting to a `[devices.expose]`
//! address is carried to the named service on that device.
//!
//! ```text
//!  accept ─▶ draining? close ─▶ [cluster] another station holds the device? relay it there (peers)
//!    └ device's live session here?
//!        ├ none: close the client at once, log
//!        └ open stream "service\nclient" ─▶ pump (the agent opens the service or resets the stream)
//! ```
//!
//! Listeners are kept by their configured address. A reload keeps a
//! listener whose address stays (pointing it at the new device and
//! service), binds new addresses before anything else changes, and stops
//! the listeners of addresses gone from the config. A new address whose
//! port a leaving one holds (`127.0.0.1:P` becoming `0.0.0.0:P`) is bound
//! in its place: the leaving listener stops first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures_lite::future;
use smol::net::{TcpListener, TcpStream};

use super::status::StreamRefusal;
use super::{live_session, lock, peers, Error, Live, Shared};
use crate::config::StationConfig;
use crate::endpoint;
use crate::task::Scope;

/// How long a reverse client's device has to show it is alive (any
/// authentic packet) once its stream is opened: a live agent answers
/// within a round trip, a congested cellular one within seconds.
pub(super) const DEVICE_ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// How often the device's liveness is looked at meanwhile.
const DEVICE_ANSWER_POLL: Duration = Duration::from_millis(100);

/// How long a new listener waits for the port of the leaving ones it
/// replaces: they close once their accept loop sees its scope stopped,
/// at once on an idle executor.
const HANDOVER: Duration = Duration::from_secs(1);
const HANDOVER_STEP: Duration = Duration::from_millis(10);

/// What one listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ExposeSpec {
    pub addr: SocketAddr,
    pub device_name: String,
    pub service: String,
}

/// Every `[devices.expose]` entry of a config.
pub(super) fn specs(config: &StationConfig) -> Vec<ExposeSpec> {
    config
        .devices
        .iter()
        .flat_map(|device| {
            device.expose.iter().map(|(&addr, service)| ExposeSpec {
                addr,
                device_name: device.name.clone(),
                service: service.clone(),
            })
        })
        .collect()
}

/// A listener bound for a spec, not yet serving.
pub(super) struct Bound {
    spec: ExposeSpec,
    listener: TcpListener,
}

impl Bound {
    pub(super) fn spec(&self) -> &ExposeSpec {
        &self.spec
    }
}

/// The running listeners, by configured address.
#[derive(Default)]
pub(super) struct Exposes(Mutex<HashMap<SocketAddr, Running>>);

struct Running {
    spec: Arc<RwLock<ExposeSpec>>,
    /// Owns the accept loop; stopping or dropping it closes the listener.
    scope: Scope,
}

impl Exposes {
    /// Whether a listener here serves `service` of `device`: a relayed
    /// client may ask only for what this station would let in itself.
    pub(super) fn serves(&self, device: &str, service: &str) -> bool {
        lock(&self.0).values().any(|run| {
            let spec = run.spec.read().unwrap_or_else(|p| p.into_inner());
            spec.device_name == device && spec.service == service
        })
    }

    /// As if a listener for `spec` ran, without binding one: what the
    /// tests of a station's other parts need of its reverse listeners.
    #[cfg(test)]
    pub(super) fn pretend(&self, spec: ExposeSpec) {
        let running = Running { spec: Arc::new(RwLock::new(spec.clone())), scope: Scope::new() };
        lock(&self.0).insert(spec.addr, running);
    }

    /// Binds the addresses of `specs` not served yet. Fails, binding
    /// nothing, if one cannot be bound. Listeners that `specs` drops and
    /// that hold a port a new address needs are stopped first; only then
    /// can a failure leave one stopped (another program took the port in
    /// the moment between), which the log says.
    pub(super) async fn bind_new(&self, specs: &[ExposeSpec]) -> Result<Vec<Bound>, Error> {
        let mut bound = Vec::new();
        for spec in specs {
            if lock(&self.0).contains_key(&spec.addr) {
                continue;
            }
            let failed = |source| Error::Expose {
                addr: spec.addr,
                device: spec.device_name.clone(),
                service: spec.service.clone(),
                source,
            };
            // Port 0 binds an ephemeral port; the accept loop logs the one chosen.
            let listener = match TcpListener::bind(spec.addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    self.bind_in_place(spec.addr, specs).await.ok_or(e).map_err(failed)?
                }
                bound => bound.map_err(failed)?,
            };
            bound.push(Bound { spec: spec.clone(), listener });
        }
        Ok(bound)
    }

    /// Binds `addr` in place of the running listeners on its port that
    /// `specs` drops, if there are any: stops them, then binds within
    /// [`HANDOVER`].
    async fn bind_in_place(&self, addr: SocketAddr, specs: &[ExposeSpec]) -> Option<TcpListener> {
        let leaving: Vec<Running> = {
            let mut running = lock(&self.0);
            let holders: Vec<SocketAddr> = running
                .keys()
                .filter(|old| old.port() == addr.port() && !specs.iter().any(|s| s.addr == **old))
                .copied()
                .collect();
            holders
                .iter()
                .filter_map(|old| {
                    log::info!("no longer exposing {old}: {addr} takes its port");
                    running.remove(old)
                })
                .collect()
        };
        if leaving.is_empty() {
            return None;
        }
        for run in &leaving {
            run.scope.stop();
        }
        let until = Instant::now() + HANDOVER;
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return Some(listener),
                Err(e) if Instant::now() >= until => {
                    log::error!("cannot bind {addr} in place of the listeners it replaces: {e}");
                    return None;
                }
                Err(_) => smol::Timer::after(HANDOVER_STEP).await,
            };
        }
    }

    /// Serves `specs`: starts the `bound` listeners, points kept ones at
    /// their new spec, and stops those whose address is gone.
    pub(super) fn apply(&self, shared: &Arc<Shared>, specs: &[ExposeSpec], bound: Vec<Bound>) {
        let mut running = lock(&self.0);
        running.retain(|addr, run| {
            let Some(spec) = specs.iter().find(|s| s.addr == *addr) else {
                log::info!("no longer exposing {addr}");
                return false;
            };
            let mut current = run.spec.write().unwrap_or_else(|p| p.into_inner());
            if *current != *spec {
                log::info!(
                    "{addr} now exposes service {:?} of device {}",
                    spec.service,
                    spec.device_name
                );
                *current = spec.clone();
            }
            true
        });
        for Bound { spec, listener } in bound {
            let addr = spec.addr;
            let spec = Arc::new(RwLock::new(spec));
            let scope = Scope::new();
            scope.spawn(accept_exposed(shared.clone(), listener, spec.clone()));
            running.insert(addr, Running { spec, scope });
        }
    }
}

/// Accepts monitoring clients on a reverse listener until its owner stops
/// it, and carries each to the device's service.
async fn accept_exposed(shared: Arc<Shared>, listener: TcpListener, spec: Arc<RwLock<ExposeSpec>>) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    {
        let spec = spec.read().unwrap_or_else(|p| p.into_inner());
        log::info!("exposing service {:?} of device {} on {addr}", spec.service, spec.device_name);
    }
    loop {
        let (socket, peer) = crate::accept::next(&listener, || addr.to_string()).await;
        let ExposeSpec { device_name, service, .. } =
            spec.read().unwrap_or_else(|p| p.into_inner()).clone();
        if shared.draining.load(Ordering::Acquire) {
            log::info!("client {peer} on {addr}: the station is stopping; closed");
            shared.counters.stream_refused(StreamRefusal::Stopping);
            continue;
        }
        let _ = socket.set_nodelay(true);
        let client = Client { socket, peer, listener: addr.clone(), device: device_name, service };
        match &shared.registry {
            // Where the device is comes from the store: a lookup per client.
            Some(_) => {
                let shared2 = shared.clone();
                shared.scope.spawn(async move { route(&shared2, client).await });
            }
            None => serve_here(&shared, client),
        }
    }
}

/// A reverse client, and what it came for.
pub(super) struct Client {
    pub socket: TcpStream,
    pub peer: SocketAddr,
    /// Where it arrived: an expose listener's address, or the station that
    /// relayed it.
    pub listener: String,
    pub device: String,
    pub service: String,
}

/// In a cluster: relays the client to the station holding the device's
/// newest session, or serves it here if that is this station (or the
/// registry cannot say).
async fn route(shared: &Arc<Shared>, client: Client) {
    let registry = shared.registry.as_ref().expect("routing needs the registry");
    match registry.device_holder(&client.device).await {
        Ok(Some(holder)) if holder.station != registry.me() => {
            shared.counters.relayed_clients.fetch_add(1, Ordering::Relaxed);
            peers::relay_exposed(shared.clone(), client, holder.station).await;
        }
        _ => serve_here(shared, client),
    }
}

/// Carries the client to the device's session on this station, or closes
/// it at once if the device has none here.
fn serve_here(shared: &Arc<Shared>, client: Client) {
    // Offline: dropping the socket closes the client at once, rather
    // than leaving it waiting for a device that may not come.
    let Some(live) = live_session(shared, &client.device) else {
        shared.counters.stream_refused(StreamRefusal::DeviceOffline);
        let Client { peer, listener, device, service, .. } = client;
        log::warn!(
            "client {peer} on {listener}: device {device} is offline; \
             closed the connection (service {service:?})"
        );
        return;
    };
    carry(shared, &live, client);
}

/// Opens a stream to the client's service on `live`'s device and pumps
/// the client through it; the session's scope owns the pump, so the
/// client is closed when the session ends.
pub(super) fn carry(shared: &Shared, live: &Arc<Live>, client: Client) {
    let Client { socket, peer, listener, device, service } = client;
    // The client's address rides along for the agent's logs (who holds
    // a console); names cannot contain a newline, so it splits cleanly.
    let id = match live.tunnel.open(&format!("{service}\n{peer}")) {
        Ok(id) => id,
        Err(e) => {
            log::warn!("client {peer} on {listener}: device {device}: {e}; closed");
            // The service name is checked when the config is read, so
            // the limit of open streams is what refuses here.
            shared.counters.stream_refused(StreamRefusal::TooManyStreams);
            return;
        }
    };
    shared.counters.streams_opened.fetch_add(1, Ordering::Relaxed);
    log::info!("client {peer} on {listener} -> device {device} service {service:?} (stream {id})");
    let opened = SystemTime::now();
    let session = live.clone();
    live.scope.spawn(async move {
        let silent = async {
            // A live agent acknowledges the new stream within a round
            // trip; a dead one (killed, its session not yet timed out)
            // never does, and the client must not wait in silence.
            let deadline = Instant::now() + DEVICE_ANSWER_LIMIT;
            while !session.status.heard_since(opened) {
                if Instant::now() >= deadline {
                    return;
                }
                smol::Timer::after(DEVICE_ANSWER_POLL).await;
            }
            future::pending::<()>().await;
        };
        let pumped = async {
            endpoint::tcp::pump(&session.tunnel, id, socket).await;
            true
        };
        let gave_up = async {
            silent.await;
            false
        };
        match future::or(pumped, gave_up).await {
            true => log::debug!("client {peer} -> device {device}: stream {id} ended"),
            false => {
                log::warn!(
                    "client {peer} on {listener}: device {device} did not answer \
                     within {} s (is its agent down?); closed the connection",
                    DEVICE_ANSWER_LIMIT.as_secs()
                );
                session.tunnel.reset(id, "the device did not answer in time");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::station::fixture::station;

    fn spec(addr: &str, device: &str, service: &str) -> ExposeSpec {
        ExposeSpec {
            addr: addr.parse().expect("an address"),
            device_name: device.to_owned(),
            service: service.to_owned(),
        }
    }

    #[test]
    fn specs_are_every_exposed_address_of_every_device_in_order() {
        let key = || PrivateKey::generate().public_key().to_base64();
        let text = format!(
            "listen = \"127.0.0.1:8080\"\nprivate_key = \"{}\"\n\
             [[devices]]\nname = \"pump-17\"\npublic_key = \"{}\"\n\
             [devices.expose]\n\"127.0.0.1:15021\" = \"console\"\n\"127.0.0.1:15020\" = \"modbus\"\n\
             [[devices]]\nname = \"gate-2\"\npublic_key = \"{}\"\n\
             [[devices]]\nname = \"meter-9\"\npublic_key = \"{}\"\n\
             [devices.expose]\n\"0.0.0.0:0\" = \"modbus\"\n",
            PrivateKey::generate().to_base64(),
            key(),
            key(),
            key()
        );
        let config = StationConfig::parse(&text, "station.toml").expect("a valid config");
        assert_eq!(
            specs(&config),
            [
                spec("127.0.0.1:15020", "pump-17", "modbus"),
                spec("127.0.0.1:15021", "pump-17", "console"),
                spec("0.0.0.0:0", "meter-9", "modbus"),
            ]
        );
    }

    /// A reload points a kept listener at its new device and service and
    /// stops one whose address is gone; what is served follows at once.
    #[test]
    fn what_the_listeners_serve_follows_a_reload() {
        let shared = station();
        let exposes = &shared.exposes;
        assert!(!exposes.serves("pump-17", "modbus"));
        exposes.pretend(spec("127.0.0.1:15020", "pump-17", "modbus"));
        exposes.pretend(spec("127.0.0.1:15021", "pump-17", "console"));
        assert!(exposes.serves("pump-17", "modbus"));
        assert!(exposes.serves("pump-17", "console"));
        assert!(!exposes.serves("pump-17", "ssh"));
        assert!(!exposes.serves("meter-9", "modbus"));

        let specs = [spec("127.0.0.1:15020", "meter-9", "modbus")];
        // Nothing new to bind: the one address kept is running already.
        let bound = future::block_on(exposes.bind_new(&specs)).expect("nothing to bind");
        assert!(bound.is_empty());
        exposes.apply(&shared, &specs, bound);
        assert!(exposes.serves("meter-9", "modbus"));
        assert!(!exposes.serves("pump-17", "modbus"));
        assert!(!exposes.serves("pump-17", "console"));
        assert_eq!(lock(&exposes.0).keys().collect::<Vec<_>>(), [&specs[0].addr]);
    }
}
