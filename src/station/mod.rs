//! The station: serves the HTTP carrier, authenticates devices, and
//! connects their streams to the targets they are allowed to open.
//!
//! ```text
//! TCP accept ─▶ admission (slots) ─▶ requests: hello / down / up / poll / push
//!                                        │
//!   sessions: id ─▶ Live { device name, key, Tunnel, scope } ─▶ stream opened ─▶ allow? ─▶ connect target ─▶ pump
//!
//! expose listener (one per [devices.expose] entry) ─▶ device's live session ─▶ stream to a service
//!
//! with [cluster]: registry (Redis) ─ which station holds each session and device
//!   unknown session ─▶ its holder, via the holder's peer listener (peers) ─▶ requests, as above
//!   expose client for a device held elsewhere ─▶ relayed to its holder
//! ```
//!
//! Unauthenticated requests get a status code and cost nothing lasting: a
//! session exists only after a handshake with a known device key, and a
//! carrier request is served only if its body holds an authentic packet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures_lite::{future, AsyncWriteExt};
use smol::net::TcpListener;

use crate::admission::{CloneWatch, Full, HandshakeBudget, RejectLog, Slots, MAX_STRANGERS};
use crate::carrier::{self, http};
use crate::config::StationConfig;
use crate::connect::{connect, ConnectError, CONNECT_TIMEOUT};
use crate::core::session::Limits;
use crate::core::window::Budget;
use crate::crypto::{self, CryptoError, Responder, SessionId};
use crate::endpoint;
use crate::keys::{PrivateKey, PublicKey};
use crate::task::Scope;
use crate::tunnel::{self, Ending, Incoming, Tunnel};

mod expose;
#[cfg(test)]
mod fixture;
mod peers;
mod registry;
mod requests;
mod resp;
mod status;
mod tls;

use expose::{Bound, ExposeSpec, Exposes};
use registry::{Held, Registry};
use requests::{refuse_log, serve_connection, Via};
pub use status::{
    render_metrics, render_status, render_text, ClusterStatus, DeviceStatus, ReloadTally, Reloads,
    Snapshot,
};
use status::{Counters, HandshakeRefusal, LiveStatus, StreamRefusal, Totals};

/// How often the unlogged refusals of the last minute are counted in the log.
const REFUSAL_SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// A session heard from this recently is in use (keepalives come every
/// 15 s; clones replace each other within a second or two).
const SESSION_IN_USE: Duration = Duration::from_secs(10);

/// Distinct unknown device keys remembered so each is logged once.
const UNKNOWN_KEYS_LOGGED: usize = 1024;

/// Why the station could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot serve status on {addr}: {source}")]
    Status { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen for the cluster's other stations on {addr}: {source}")]
    Peer { addr: SocketAddr, source: std::io::Error },
    /// A `[devices.expose]` listener could not bind.
    #[error("device {device}: cannot expose service {service:?} on {addr}: {source}")]
    Expose { addr: SocketAddr, device: String, service: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsStartError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Device {
    name: String,
    allow: HashSet<String>,
}

/// Who may connect and what they may open: the part of the config a
/// reload replaces whole. A device is known by its name; while its key is
/// replaced, more than one key names it.
#[derive(Debug, PartialEq, Eq)]
struct Roster {
    /// Device name by every key it may use.
    keys: HashMap<PublicKey, String>,
    devices: HashMap<String, Device>,
    targets: BTreeMap<String, String>,
}

impl Roster {
    fn new(config: &StationConfig) -> Roster {
        let mut keys = HashMap::new();
        let mut devices = HashMap::new();
        for d in &config.devices {
            for key in &d.public_keys {
                keys.insert(*key, d.name.clone());
            }
            let allow = d.allow.iter().cloned().collect();
            devices.insert(d.name.clone(), Device { name: d.name.clone(), allow });
        }
        Roster { keys, devices, targets: config.targets.clone() }
    }

    /// The device that `key` belongs to.
    fn device_of(&self, key: &PublicKey) -> Option<&Device> {
        self.devices.get(self.keys.get(key)?)
    }

    /// The names of `device`'s keys, for reload lines.
    fn keys_of(&self, device: &str) -> HashSet<PublicKey> {
        self.keys.iter().filter(|(_, name)| *name == device).map(|(key, _)| *key).collect()
    }
}

/// The station's static keys: the current one, and the one replacing it
/// while agents move to it (key rotation).
struct StationKeys {
    current: PrivateKey,
    next: Option<PrivateKey>,
}

impl StationKeys {
    fn of(config: &StationConfig) -> StationKeys {
        StationKeys { current: config.private_key.clone(), next: config.next_private_key.clone() }
    }

    /// Reads an agent's first handshake message with whichever of our keys
    /// it was made for.
    fn respond(&self, msg: &[u8]) -> Result<Responder, CryptoError> {
        match (crypto::respond(&self.current, msg), &self.next) {
            (Err(_), Some(next)) => crypto::respond(next, msg),
            (first, _) => first,
        }
    }
}

/// A device's live session.
struct Live {
    id: SessionId,
    /// The device key the session's keys were made with (a renewal may
    /// change it).
    key: Mutex<PublicKey>,
    name: String,
    tunnel: Arc<Tunnel>,
    /// Target connections and pumps of this session.
    scope: Scope,
    /// An authentic packet arrived, so this is not a replayed handshake.
    confirmed: AtomicBool,
    status: LiveStatus,
    /// Where the handshake came from.
    peer: SocketAddr,
}

impl Live {
    /// A session just made with `key`, not confirmed yet, in the `Arc` it
    /// lives in: made outside it and moved in, this and [`Shared::new`]'s
    /// value cost the station binary 384 bytes.
    fn new(
        id: SessionId,
        key: PublicKey,
        name: String,
        tunnel: Arc<Tunnel>,
        peer: SocketAddr,
    ) -> Arc<Live> {
        Arc::new(Live {
            id,
            key: Mutex::new(key),
            name,
            tunnel,
            scope: Scope::new(),
            confirmed: AtomicBool::new(false),
            status: LiveStatus::new(),
            peer,
        })
    }

    /// What this session has carried so far.
    fn totals(&self) -> Totals {
        let stats = self.tunnel.stats();
        Totals {
            bytes_up: stats.stream_in,
            bytes_down: stats.stream_out,
            resent: stats.resent,
            rejected_packets: stats.rejected,
            carrier_connections: self.status.carrier_connections.load(Ordering::Relaxed),
            sessions: 1,
            last_heard: self.status.last_seen(),
        }
    }
}

struct Shared {
    keys: RwLock<StationKeys>,
    /// The config the station started with, for what a reload cannot change.
    started_with: Fixed,
    exposes: Exposes,
    /// A graceful stop began: no new sessions or streams.
    draining: AtomicBool,
    roster: RwLock<Arc<Roster>>,
    sessions: Mutex<HashMap<SessionId, Arc<Live>>>,
    counters: Counters,
    /// When the station was bound: its `process_start_time_seconds`.
    started: SystemTime,
    unknown_logged: Mutex<HashSet<PublicKey>>,
    slots: Slots,
    handshakes: Mutex<HandshakeBudget>,
    clones: Mutex<CloneWatch>,
    rejects: Mutex<RejectLog>,
    limits: Limits,
    /// Owns every connection and session task of the station.
    scope: Scope,
    /// TLS on the carrier listener, if configured.
    tls: tls::ListenerTls,
    /// The cluster's session registry, with `[cluster]`.
    registry: Option<Registry>,
    /// Idle connections to the other stations, for forwarded requests.
    peer_pool: peers::Pool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// The station's state for `config`, apart from its listeners: what
    /// a station is before it binds, and what the request tests drive.
    /// In its `Arc`, as [`Live::new`].
    fn new(
        config: &StationConfig,
        limits: Limits,
        exposes: Exposes,
        tls: tls::ListenerTls,
        registry: Option<Registry>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            started_with: Fixed::of(config),
            exposes,
            draining: AtomicBool::new(false),
            roster: RwLock::new(Arc::new(Roster::new(config))),
            keys: RwLock::new(StationKeys::of(config)),
            sessions: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            started: SystemTime::now(),
            unknown_logged: Mutex::new(HashSet::new()),
            slots: Slots::new(config.max_connections),
            handshakes: Mutex::new(HandshakeBudget::new(Instant::now())),
            clones: Mutex::new(CloneWatch::default()),
            rejects: Mutex::new(RejectLog::new(Instant::now())),
            limits,
            scope: Scope::new(),
            tls,
            registry,
            peer_pool: peers::Pool::default(),
        })
    }

    /// The roster now; a reload swaps it, and holders of the old one finish
    /// what they were deciding with it.
    fn roster(&self) -> Arc<Roster> {
        self.roster.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Takes the station keys of a reloaded config. Sessions keep the keys
    /// they have: a station key matters only to handshakes.
    fn reload_keys(&self, config: &StationConfig) -> Vec<String> {
        let new = StationKeys::of(config);
        let mut keys = self.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let public =
            |k: &StationKeys| (k.current.public_key(), k.next.as_ref().map(PrivateKey::public_key));
        let (was, now) = (public(&keys), public(&new));
        *keys = new;
        let mut lines = Vec::new();
        if was.0 != now.0 {
            lines.push(format!("the station's key is now {} (new sessions)", now.0.fingerprint()));
        }
        if was.1 != now.1 {
            lines.push(match now.1 {
                Some(next) => {
                    format!("next key {} accepted beside the current one", next.fingerprint())
                }
                None => "no next key".to_owned(),
            });
        }
        lines
    }

    /// Reads a handshake's first message with the station's keys.
    fn respond(&self, msg: &[u8]) -> Result<Responder, CryptoError> {
        self.keys().respond(msg)
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, StationKeys> {
        self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A bound station, ready to run.
pub struct Station {
    listener: TcpListener,
    shared: Arc<Shared>,
    exposes: Vec<Bound>,
    status: Option<TcpListener>,
    /// Where the cluster's other stations connect, with `[cluster]`.
    peers: Option<TcpListener>,
}

/// What only a restart changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fixed {
    listen: SocketAddr,
    status: Option<SocketAddr>,
    session_timeout: Duration,
}

impl Fixed {
    fn of(config: &StationConfig) -> Fixed {
        Fixed {
            listen: config.listen,
            status: config.status,
            session_timeout: config.session_timeout,
        }
    }
}

/// Receive-window room past each stream's first window that all devices'
/// streams share: a few fast devices may take this much between them, and
/// no more, whatever the fleet's size (see `core::window`).
pub const WINDOW_BUDGET: u64 = 256 * 1024 * 1024;

impl Station {
    pub async fn bind(config: StationConfig) -> Result<Station, Error> {
        let limits = Limits {
            idle_timeout: config.session_timeout,
            windows: Budget::new(WINDOW_BUDGET),
            ..Limits::default()
        };
        Self::bind_with(config, limits).await
    }

    /// As [`Station::bind`], with session timing chosen by the caller
    /// (`config.session_timeout` is then ignored).
    pub async fn bind_with(config: StationConfig, limits: Limits) -> Result<Station, Error> {
        raise_file_limit(config.max_connections);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind { addr: config.listen, source })?;
        let exposes = Exposes::default();
        let bound = exposes.bind_new(&expose::specs(&config)).await?;
        let status = match config.status {
            Some(addr) => Some(
                TcpListener::bind(addr).await.map_err(|source| Error::Status { addr, source })?,
            ),
            None => None,
        };
        let tls = tls::ListenerTls::new(&config)?;
        let (peers, registry) = match &config.cluster {
            Some(cluster) => {
                let addr = cluster.peer;
                let listener =
                    TcpListener::bind(addr).await.map_err(|source| Error::Peer { addr, source })?;
                let bound = listener.local_addr().map_err(|source| Error::Peer { addr, source })?;
                let me = cluster.advertised(bound);
                let registry = Registry::new(cluster.store.clone(), me, cluster.record_ttl);
                (Some(listener), Some(registry))
            }
            None => (None, None),
        };
        let shared = Shared::new(&config, limits, exposes, tls, registry);
        Ok(Station { listener, shared, exposes: bound, status, peers })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until the future is dropped; then every connection and
    /// session of this station ends.
    pub async fn run(self) {
        log::info!(
            "station listening on {} (HTTP carrier){}",
            self.local_addr(),
            self.shared.tls.describe()
        );
        let shared = self.shared;
        let _stop_all = StopOnDrop(shared.clone());
        let specs: Vec<ExposeSpec> = self.exposes.iter().map(|b| b.spec().clone()).collect();
        shared.exposes.apply(&shared, &specs, self.exposes);
        if let Some(listener) = self.status {
            shared.scope.spawn(status::serve(shared.clone(), listener));
        }
        shared.scope.spawn(tell_unlogged_refusals(shared.clone()));
        if let (Some(listener), Some(registry)) = (self.peers, &shared.registry) {
            log::info!(
                "cluster: other stations reach this one at {} (listening on {}); \
                 session registry at {}",
                registry.me(),
                listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                registry.store()
            );
            shared.scope.spawn(accept(shared.clone(), listener, Via::Peer));
            shared.scope.spawn(keep_records(shared.clone()));
        }
        accept(shared, self.listener, Via::Agent).await;
    }
}

/// Accepts connections on `listener` until the station stops, each served
/// by its own task within the admission limits.
async fn accept(shared: Arc<Shared>, listener: TcpListener, via: Via) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    loop {
        let (socket, peer) = crate::accept::next(&listener, || addr.clone()).await;
        let slot = match shared.slots.take() {
            Ok(slot) => slot,
            Err(full) => {
                let why = match full {
                    Full::Strangers => {
                        format!("{MAX_STRANGERS} connections have not authenticated yet")
                    }
                    Full::Connections => {
                        format!("{} connections are open (max_connections)", shared.slots.max())
                    }
                };
                // An agent comes back when the crowd it is part of has
                // had its turn (admission::HandshakeBudget).
                let retry_after = lock(&shared.handshakes).defer(Instant::now());
                refuse_log(&shared, peer, 503, &format!("{why}; told to retry in {retry_after} s"));
                // The socket is fresh: its send buffer takes this at once,
                // so the accept loop never waits on a stranger.
                let mut socket = socket;
                let _ = socket.write(&http::busy_response(retry_after)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        shared.scope.spawn(serve_connection(shared.clone(), socket, peer, slot, via));
    }
}

/// Renews the registry records of every session held here, as long as the
/// station runs.
async fn keep_records(shared: Arc<Shared>) {
    let Some(registry) = &shared.registry else { return };
    loop {
        registry.renewal_due().await;
        let held: Vec<Held> = lock(&shared.sessions)
            .values()
            .filter(|live| live.tunnel.closed().is_none())
            .map(|live| Held {
                session: live.id,
                device: live.name.clone(),
                active: live.status.heard_within(live.tunnel.idle_timeout() / 2),
            })
            .collect();
        registry.renew(&held).await;
    }
}

/// File descriptors a station needs beside its carrier connections:
/// listeners, target and reverse-client sockets in flight, the store, logs.
const OTHER_FILES: u64 = 1024;

/// Raises the open-file soft limit as far as `max_connections` needs and
/// the hard limit allows (a server's soft limit is often 1024, far below
/// what a fleet opens), and warns if that is not far enough.
fn raise_file_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let needed = max_connections as u64 + OTHER_FILES;
    let mut limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else { return };
    if current >= needed {
        return;
    }
    let mut raised = limit.maximum.map_or(needed, |hard| hard.min(needed));
    if raised > current {
        limit.current = Some(raised);
        if setrlimit(Resource::Nofile, limit).is_err() {
            raised = current;
        }
    }
    if raised < needed {
        log::warn!(
            "the open-file limit is {raised}: fewer than the {max_connections} carrier \
             connections max_connections allows; raise LimitNOFILE= in the unit (or ulimit -n) \
             to {needed}, or lower max_connections"
        );
    }
}

/// Once a minute, how many refusals the log budget left unlogged, so a
/// burst is never silent even when nothing follows it.
async fn tell_unlogged_refusals(shared: Arc<Shared>) {
    loop {
        smol::Timer::after(REFUSAL_SUMMARY_EVERY).await;
        if let Some(count) = lock(&shared.rejects).flush(Instant::now()) {
            log_unlogged_refusals(count);
        }
    }
}

fn log_unlogged_refusals(count: u64) {
    log::info!("{count} more requests were refused in the last minute (not logged each)");
}

/// Controls a running station from outside its task: reload and stop.
#[derive(Clone)]
pub struct Handle(Arc<Shared>);

impl Station {
    /// A handle for reloading or stopping the station once it runs.
    pub fn handle(&self) -> Handle {
        Handle(self.shared.clone())
    }
}

impl Handle {
    /// Applies a new config to the running station: devices added are let
    /// in, devices removed (or given a new key) lose their session, allow
    /// lists and targets apply to new streams, expose listeners follow.
    /// No other session is touched. Returns what changed, one line each,
    /// including what only a restart applies; on error nothing changed.
    /// Either way it is counted in `postern_reloads_total`.
    pub async fn reload(&self, config: StationConfig) -> Result<Vec<String>, Error> {
        let shared = &self.0;
        let specs = expose::specs(&config);
        // Binding is the step that can fail: do it before changing anything.
        let bound = match shared.exposes.bind_new(&specs).await {
            Ok(bound) => bound,
            Err(e) => {
                shared.counters.reloaded(false);
                return Err(e);
            }
        };
        let mut changes = shared.started_with.restart_needed(&Fixed::of(&config));
        changes.extend(shared.reload_keys(&config));
        changes.extend(shared.tls.reload(&config));
        let new = Arc::new(Roster::new(&config));
        let old = std::mem::replace(
            &mut *shared.roster.write().unwrap_or_else(|poisoned| poisoned.into_inner()),
            new.clone(),
        );
        for (name, device) in &old.devices {
            match new.devices.get(name) {
                None => changes.push(format!("device {name} removed; its session ends")),
                Some(now) if now != device => {
                    changes.push(format!("device {name}: changed (applies to new streams)"));
                }
                Some(_) => {}
            }
            let (before, after) = (old.keys_of(name), new.keys_of(name));
            if new.devices.contains_key(name) && before != after {
                let fingerprints = |keys: &HashSet<PublicKey>| {
                    let mut list: Vec<String> = keys.iter().map(PublicKey::fingerprint).collect();
                    list.sort();
                    list.join(", ")
                };
                changes.push(format!("device {name}: keys now {}", fingerprints(&after)));
            }
        }
        for name in new.devices.keys() {
            if !old.devices.contains_key(name) {
                changes.push(format!("device {name} added"));
            }
        }
        // A session lives on while its key still names its device: a
        // device removed, or a key taken away before the session renewed
        // its keys with another, ends it.
        let gone: Vec<Arc<Live>> = lock(&shared.sessions)
            .values()
            .filter(|live| new.keys.get(&*lock(&live.key)) != Some(&live.name))
            .cloned()
            .collect();
        for live in gone {
            let why = if new.devices.contains_key(&live.name) {
                Ending::KeyRemoved
            } else {
                Ending::DeviceRemoved
            };
            log::info!("device {}: session {} ends: {why}", live.name, carrier::short(&live.id));
            live.tunnel.end(why);
        }
        if old.targets != new.targets {
            changes.push("[targets] changed (applies to new streams)".to_owned());
        }
        shared.exposes.apply(shared, &specs, bound);
        shared.counters.reloaded(true);
        Ok(changes)
    }

    /// A reload that never reached [`Handle::reload`] (the new config could
    /// not be read or parsed) is counted as refused, as one that did.
    pub fn reload_failed(&self) {
        self.0.counters.reloaded(false);
    }

    /// A graceful stop: no new sessions, streams or reverse clients; the
    /// open streams get up to `limit` to finish; then every session is
    /// closed, telling its agent, and the caller can exit.
    pub async fn drain(&self, limit: Duration) {
        let shared = &self.0;
        shared.draining.store(true, Ordering::Release);
        // Draining: no session starts from here on, so these are all.
        let tunnels: Vec<Arc<Tunnel>> =
            lock(&shared.sessions).values().map(|live| live.tunnel.clone()).collect();
        tunnel::close_after_drain(&tunnels, limit, Ending::StationStopping).await;
    }
}

impl Fixed {
    /// One line for each setting that differs in `new` and needs a restart.
    fn restart_needed(&self, new: &Fixed) -> Vec<String> {
        let mut lines = Vec::new();
        if new.listen != self.listen {
            lines.push(format!("listen is now {}: restart the station to apply", new.listen));
        }
        if new.status != self.status {
            lines.push("status changed: restart the station to apply".to_owned());
        }
        if new.session_timeout != self.session_timeout {
            lines.push("session_timeout changed: restart the station to apply".to_owned());
        }
        lines
    }
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.scope.stop();
        for live in lock(&self.0.sessions).drain().map(|(_, live)| live) {
            live.tunnel.end(Ending::StationStopped);
            live.scope.stop();
        }
    }
}

fn log_unknown_key(shared: &Shared, key: &PublicKey, peer: SocketAddr) {
    let mut logged = lock(&shared.unknown_logged);
    if logged.len() >= UNKNOWN_KEYS_LOGGED {
        logged.clear();
    }
    shared.counters.unknown_keys.fetch_add(1, Ordering::Relaxed);
    shared.counters.handshake_refused(HandshakeRefusal::UnknownKey);
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
    {
        let mut sessions = lock(&shared.sessions);
        if sessions.get(&live.id).is_some_and(|l| Arc::ptr_eq(l, &live)) {
            sessions.remove(&live.id);
            // Under the lock a scrape sums the live sessions' with.
            let past_limit = live.tunnel.stats().streams_refused;
            shared.counters.ended_past_limit.fetch_add(past_limit, Ordering::Relaxed);
        }
    }
    if let Some(registry) = &shared.registry {
        registry.release(&live.id, &live.name).await;
    }
    *lock(&shared.counters.ended).entry(live.name.clone()).or_default() += live.totals();
    log::info!("device {} session {} ended: {reason}", live.name, carrier::short(&live.id));
}

async fn open_target(shared: Arc<Shared>, live: Arc<Live>, stream: Incoming) {
    let Incoming { id, name } = stream;
    let counters = &shared.counters;
    if shared.draining.load(Ordering::Acquire) {
        log::info!("device {}: target {name:?} refused: the station is stopping", live.name);
        counters.stream_refused(StreamRefusal::Stopping);
        live.tunnel.reset(id, "the station is stopping");
        return;
    }
    let roster = shared.roster();
    let allowed = roster.devices.get(&live.name).is_some_and(|d| d.allow.contains(&name));
    let address = roster.targets.get(&name).filter(|_| allowed);
    let Some(address) = address else {
        log::warn!("device {}: target {name:?} refused: not in its allow list", live.name);
        // The device is told the same either way: whether a name is a
        // target is not its business.
        counters.stream_refused(match roster.targets.contains_key(&name) {
            true => StreamRefusal::NotAllowed,
            false => StreamRefusal::UnknownTarget,
        });
        live.tunnel.reset(id, &format!("target {name:?} is not allowed for this device"));
        return;
    };
    match connect(address.as_str(), CONNECT_TIMEOUT).await {
        Ok(socket) => {
            log::debug!("device {}: stream {id} to {name} ({address})", live.name);
            counters.streams_opened.fetch_add(1, Ordering::Relaxed);
            endpoint::tcp::pump(&live.tunnel, id, socket).await;
        }
        Err(e) => {
            log::warn!("device {}: target {name} ({address}): {e}", live.name);
            counters.stream_refused(match e {
                ConnectError::Failed(_) => StreamRefusal::ConnectFailed,
                ConnectError::NoAnswer(_) => StreamRefusal::ConnectTimeout,
            });
            live.tunnel.reset(id, &format!("target {name}: {e}"));
        }
    }
}

/// The live session of a device, if it has one: the confirmed one when an
/// unconfirmed handshake (possibly a replay) exists beside it.
fn live_session(shared: &Shared, device: &str) -> Option<Arc<Live>> {
    lock(&shared.sessions)
        .values()
        .filter(|live| live.name == device && live.tunnel.closed().is_none())
        .max_by_key(|live| live.confirmed.load(Ordering::Acquire))
        .cloned()
}

/// [`live_session`] of every device that has one, in one pass over the
/// sessions: what /metrics needs, without a pass per device (a station of
/// 10,000 devices took seconds per scrape that way).
fn live_sessions(shared: &Shared) -> HashMap<String, Arc<Live>> {
    let mut live: HashMap<String, Arc<Live>> = HashMap::new();
    for session in lock(&shared.sessions).values().filter(|l| l.tunnel.closed().is_none()) {
        let confirmed = session.confirmed.load(Ordering::Acquire);
        match live.get(&session.name) {
            Some(have) if have.confirmed.load(Ordering::Acquire) >= confirmed => {}
            _ => {
                live.insert(session.name.clone(), session.clone());
            }
        }
    }
    live
}

/// The first authentic packet of a session proves the handshake was not a
/// replay, so older sessions of the same device can go.
fn confirm(shared: &Shared, live: &Arc<Live>) {
    if live.confirmed.swap(true, Ordering::AcqRel) {
        return;
    }
    let older: Vec<Arc<Live>> = lock(&shared.sessions)
        .values()
        .filter(|l| l.name == live.name && !Arc::ptr_eq(l, live))
        .cloned()
        .collect();
    for old in older {
        // A session still heard from lately was in use: replacing it again
        // and again is two agents with one key, not one that restarted.
        let heard = old.status.heard_within(SESSION_IN_USE);
        if heard && lock(&shared.clones).replaced(&live.name, live.peer, Instant::now()) {
            log::warn!(
                "device {}: two agents use its key, from {} and {} (a cloned device image?); \
                 its new handshakes are refused for a while, the connected one keeps its session",
                live.name,
                old.peer,
                live.peer
            );
        }
        old.tunnel.end(Ending::NewSession);
    }
}
