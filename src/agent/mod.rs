//! The agent: keeps one session with the station over outbound HTTP and
//! carries local connections through it.
//!
//! ```text
//! forward listener ─accept─▶ wait for session ─▶ open stream(target) ─▶ pump
//! forward serial line ─▶ serial::keep_line (reopens) + serial::carry_line (a stream per conversation)
//! session loop: hello ─▶ Tunnel ─▶ lanes::carry (stream or poll shape) + timers + services
//! station opens "name" ─▶ [services] only ─▶ TCP connect ─▶ pump | serial::serve_console (one holder)
//!                 ▲ backoff with jitter ◀── session ends (idle, 404, peer close)
//! ```
//!
//! Every carrier connection is opened by the agent: the device's firewall
//! only lets traffic out. Through a forward proxy, requests use absolute
//! form (`POST http://station/...`); CONNECT is never used.

mod client;
mod depth;
mod egress;
mod forwards;
mod lanes;
pub mod proxy_auth;
mod serial;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event as Notify;
use futures_lite::future;
use smol::net::{TcpListener, TcpStream};

use crate::carrier::{self, Verb};
use crate::config::{AgentConfig, CarrierKind, Service};
use crate::connect::{connect, CONNECT_TIMEOUT};
use crate::core::session::Limits;
use crate::core::streams::{Side, MAX_STREAMS};
use crate::crypto::{self, SessionId, MAX_HANDSHAKE};
use crate::endpoint;
use crate::keys::{PrivateKey, PublicKey};
use crate::task::Scope;
use crate::tunnel::{self, CloseReason, Ending, Incoming, Tunnel};
use client::{Backoff, CarrierError, Client, Who, REPLY_TIMEOUT};

/// Retry delays while the station sees another agent with our key: tens
/// of seconds, growing (the station refuses for a minute and more).
const KEY_IN_USE_FIRST: Duration = Duration::from_secs(40);
const KEY_IN_USE_LAST: Duration = Duration::from_secs(600);

/// Time a local connection waits for a session before it is closed.
const SESSION_WAIT: Duration = Duration::from_secs(10);

/// Connections one forward carries at once. A quarter of the session's
/// streams ([`MAX_STREAMS`]), so one local client opening hundreds cannot
/// take every stream from the other forwards.
const MAX_STREAMS_PER_FORWARD: usize = MAX_STREAMS / 4;

/// Shortest time between two log lines about a forward at its bound.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("forward to {target}: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, target: String, source: std::io::Error },
    #[error("cannot serve status on {addr}: {source}")]
    Status { addr: SocketAddr, source: std::io::Error },
}

/// The agent's own key and the station keys it pins; a reload (key
/// rotation) replaces them.
struct Keys {
    own: PrivateKey,
    /// Pinned station keys, in the order the config lists them.
    station: Vec<PublicKey>,
    /// Index in `station` of the key the last handshake worked with.
    working: usize,
}

struct Shared {
    client: Client,
    keys: Mutex<Keys>,
    carrier: CarrierKind,
    /// What `auto` learnt of the path, kept across sessions.
    shape: lanes::ShapeMemory,
    /// The config's services; a reload swaps the map.
    services: Mutex<Arc<BTreeMap<String, Service>>>,
    /// The forwards as they run; a reload changes them.
    forwards: Mutex<forwards::Running>,
    /// The config as last applied, for what a reload cannot change.
    applied: Mutex<AgentConfig>,
    /// Serial services in use now, by service name.
    consoles: Mutex<HashMap<String, serial::Holder>>,
    limits: Limits,
    /// The live session and its id (which renewing its keys needs).
    current: Mutex<Option<(Arc<Tunnel>, SessionId)>>,
    changed: Notify,
    /// Carrier connections that failed and were made again.
    reconnects: AtomicU64,
    /// Sessions, totals and the last error, for the status.
    record: status::Record,
    /// A graceful stop began: no new local connections or streams.
    draining: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// The live session's tunnel, if there is one.
    fn tunnel(&self) -> Option<Arc<Tunnel>> {
        lock(&self.current).as_ref().map(|(tunnel, _)| tunnel.clone())
    }

    fn set_current(&self, session: Option<(Arc<Tunnel>, SessionId)>) {
        *lock(&self.current) = session;
        self.changed.notify(usize::MAX);
    }

    /// The live session, waiting up to `limit` for one.
    async fn session(&self, limit: Duration) -> Option<Arc<Tunnel>> {
        let give_up = smol::Timer::after(limit);
        let wait = async {
            loop {
                let listener = self.changed.listen();
                if let Some(tunnel) = self.tunnel().filter(|t| t.closed().is_none()) {
                    return Some(tunnel);
                }
                listener.await;
            }
        };
        future::or(wait, async {
            give_up.await;
            None
        })
        .await
    }
}

/// A configured agent with its forward ports bound.
pub struct Agent {
    shared: Arc<Shared>,
    /// Listeners bound; serial lines are opened when the agent runs,
    /// since a missing device node must not stop the agent.
    forwards: Vec<forwards::Ready>,
    /// The `status` listener, if the config asks for one.
    status: Option<TcpListener>,
}

impl Agent {
    pub async fn bind(config: AgentConfig) -> Result<Agent, Error> {
        let limits = Limits {
            idle_timeout: config.session_timeout,
            keepalive: config.keepalive,
            ..Limits::default()
        };
        Self::bind_with(config, limits).await
    }

    /// As [`Agent::bind`], with session timing chosen by the caller
    /// (`config.session_timeout` and `config.keepalive` are then ignored).
    pub async fn bind_with(config: AgentConfig, limits: Limits) -> Result<Agent, Error> {
        let ready = forwards::prepare(config.forwards.clone())?;
        let status = match config.status {
            Some(addr) => Some(
                TcpListener::bind(addr).await.map_err(|source| Error::Status { addr, source })?,
            ),
            None => None,
        };
        let shared = Shared {
            client: Client::new(config.station.clone(), config.proxy.clone(), &config.tls),
            keys: Mutex::new(Keys {
                own: config.private_key.clone(),
                station: config.station_public_keys.clone(),
                working: 0,
            }),
            carrier: config.carrier,
            shape: lanes::ShapeMemory::new(config.poll_hold, config.stream_retry),
            services: Mutex::new(Arc::new(config.services.clone())),
            forwards: Mutex::new(forwards::Running::default()),
            consoles: Mutex::new(HashMap::new()),
            limits,
            current: Mutex::new(None),
            changed: Notify::new(),
            reconnects: AtomicU64::new(0),
            record: status::Record::new(),
            draining: AtomicBool::new(false),
            applied: Mutex::new(config),
        };
        Ok(Agent { shared: Arc::new(shared), forwards: ready, status })
    }

    /// Local addresses of the forward listeners, in config order.
    pub fn forward_addrs(&self) -> Vec<SocketAddr> {
        self.forwards.iter().filter_map(forwards::Ready::local_addr).collect()
    }

    /// Runs until the future is dropped; then every task of the agent ends.
    pub async fn run(self) {
        let scope = Scope::new();
        // The forwards live in `shared` for reloads; they stop with us.
        let _forwards = StopForwards(self.shared.clone());
        {
            let mut running = lock(&self.shared.forwards);
            for ready in self.forwards {
                running.start(&self.shared, ready, None);
            }
        }
        if let Some(listener) = self.status {
            scope.spawn(status::serve(self.shared.clone(), listener));
        }
        scope.spawn(status::report(self.shared.clone()));
        keep_session(&self.shared).await;
    }
}

/// Stops the forwards when [`Agent::run`] ends.
struct StopForwards(Arc<Shared>);

impl Drop for StopForwards {
    fn drop(&mut self) {
        lock(&self.0.forwards).stop_all();
    }
}

/// The connections one TCP forward carries. They belong to the forward,
/// not to its accept loop, so that a reload moving the forward to another
/// address keeps them (forwards.rs).
#[derive(Default)]
struct Connections {
    tasks: Scope,
    /// How many are open. Not the whole value in each task: the tasks
    /// would own the scope that owns them, and never stop.
    open: Arc<AtomicUsize>,
}

async fn accept_forward(
    shared: Arc<Shared>,
    listener: TcpListener,
    target: Arc<Mutex<String>>,
    connections: Arc<Connections>,
) {
    let mut last_refusal_logged: Option<Instant> = None;
    loop {
        let what = || format!("forward to {}", lock(&target));
        let (socket, peer) = crate::accept::next(&listener, what).await;
        if connections.open.load(Ordering::Acquire) >= MAX_STREAMS_PER_FORWARD {
            // Logged once a minute at most: a flood must not flood the log.
            if !last_refusal_logged.is_some_and(|at| at.elapsed() < REFUSAL_LOG_EVERY) {
                last_refusal_logged = Some(Instant::now());
                log::warn!(
                    "forward to {}: {MAX_STREAMS_PER_FORWARD} connections open \
                     already; closing new ones from {peer} and others until some end",
                    lock(&target)
                );
            }
            continue;
        }
        connections.open.fetch_add(1, Ordering::AcqRel);
        let (shared, target, open) =
            (shared.clone(), lock(&target).clone(), connections.open.clone());
        connections.tasks.spawn(async move {
            carry_local(shared, socket, peer, target).await;
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn carry_local(shared: Arc<Shared>, socket: TcpStream, peer: SocketAddr, target: String) {
    if shared.draining.load(Ordering::Acquire) {
        log::info!("{peer} -> {target}: the agent is stopping; closing the connection");
        return;
    }
    let _ = socket.set_nodelay(true);
    let Some(tunnel) = shared.session(SESSION_WAIT).await else {
        log::warn!("{peer} -> {target}: no session with the station; closing the connection");
        return;
    };
    match tunnel.open(&target) {
        Ok(id) => {
            log::debug!("{peer} -> {target}: stream {id}");
            endpoint::tcp::pump(&tunnel, id, socket).await;
        }
        Err(e) => log::warn!("{peer} -> {target}: {e}; closing the connection"),
    }
}

/// Controls a running agent from outside its task.
#[derive(Clone)]
pub struct Handle(Arc<Shared>);

impl Agent {
    /// A handle for stopping the agent once it runs.
    pub fn handle(&self) -> Handle {
        Handle(self.shared.clone())
    }
}

impl Handle {
    /// Applies a reloaded config (SIGHUP): forwards and services added,
    /// removed, moved or changed without touching the streams of the
    /// others (forwards.rs); the keys as [`Handle::reload_keys`] does.
    /// Returns what changed, one line each, with the settings that apply
    /// only when the agent restarts. A forward that cannot listen, even
    /// once the forwards leaving its port have closed their listeners,
    /// refuses the whole reload: nothing changes.
    pub async fn reload(&self, config: AgentConfig) -> Result<Vec<String>, Error> {
        let shared = &self.0;
        let plan = lock(&shared.forwards).plan(&config.forwards);
        let ready = match forwards::prepare_reload(shared, &plan).await {
            Ok(ready) => ready,
            Err(e) => {
                shared.record.reloaded(false);
                return Err(e);
            }
        };
        let mut changes = lock(&shared.forwards).apply(shared, &config.forwards, plan, ready);
        changes.extend(self.reload_services(&config.services));
        changes.extend(restart_needed(&lock(&shared.applied), &config));
        changes.extend(self.reload_keys(&config).await);
        let mut applied = lock(&shared.applied);
        applied.forwards = config.forwards;
        applied.services = config.services;
        shared.record.reloaded(true);
        Ok(changes)
    }

    /// A reload whose config could not be read: counted for the status.
    pub fn reload_failed(&self) {
        self.0.record.reloaded(false);
    }

    fn reload_services(&self, new: &BTreeMap<String, Service>) -> Vec<String> {
        let mut current = lock(&self.0.services);
        let mut changes = Vec::new();
        for (name, service) in new {
            match current.get(name) {
                None => changes.push(format!("service {name} ({}) added", service_text(service))),
                Some(old) if old != service => changes.push(format!(
                    "service {name} is now {} (was {}); open streams stay",
                    service_text(service),
                    service_text(old)
                )),
                Some(_) => {}
            }
        }
        for (name, old) in current.iter() {
            if !new.contains_key(name) {
                changes.push(format!(
                    "service {name} ({}) removed; open streams stay",
                    service_text(old)
                ));
            }
        }
        *current = Arc::new(new.clone());
        changes
    }

    /// Takes the keys of a reloaded config (key rotation, README): the next
    /// sessions use them, and the running one renews its keys with them so
    /// its streams carry on. Returns what changed, one line each.
    async fn reload_keys(&self, config: &AgentConfig) -> Vec<String> {
        let shared = &self.0;
        let mut changes = Vec::new();
        {
            let mut keys = lock(&shared.keys);
            if keys.own.public_key() != config.private_key.public_key() {
                changes.push(format!(
                    "this device's key is now {}",
                    config.private_key.public_key().fingerprint()
                ));
                keys.own = config.private_key.clone();
            }
            if keys.station != config.station_public_keys {
                let list: Vec<String> =
                    config.station_public_keys.iter().map(PublicKey::fingerprint).collect();
                changes.push(format!("pinned station keys are now {}", list.join(", ")));
                keys.station = config.station_public_keys.clone();
                // The operator lists the key to move to first.
                keys.working = 0;
            }
        }
        if changes.is_empty() {
            return changes;
        }
        let current = lock(&shared.current).clone();
        if let Some((tunnel, session)) = current {
            changes.push(match renew_keys(shared, &tunnel, session).await {
                Ok(station) => format!(
                    "session {} renewed its keys (station key {})",
                    carrier::short(&session),
                    station.fingerprint()
                ),
                Err(e) => format!(
                    "session {} keeps its keys: {e}; the next session uses the new ones",
                    carrier::short(&session)
                ),
            });
        }
        changes
    }

    /// A graceful stop: no new local connections; open streams get up to
    /// `limit` to finish; then the session is closed, telling the station.
    pub async fn drain(&self, limit: Duration) {
        let shared = &self.0;
        shared.draining.store(true, Ordering::Release);
        if let Some(tunnel) = shared.tunnel() {
            tunnel::close_after_drain(&[tunnel], limit, Ending::AgentStopping).await;
        }
    }
}

/// How the status and reload lines name a service.
fn service_text(service: &Service) -> String {
    match service {
        Service::Tcp(address) => address.clone(),
        Service::Serial(config) => format!("serial {}", config.path),
    }
}

/// The settings of `new` that differ from `running` and apply only when the
/// agent restarts, one line each.
fn restart_needed(running: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    let differs = [
        ("station", running.station != new.station),
        ("proxy", running.proxy != new.proxy),
        ("carrier", running.carrier != new.carrier),
        ("session_timeout", running.session_timeout != new.session_timeout),
        ("keepalive", running.keepalive != new.keepalive),
        ("poll_hold", running.poll_hold != new.poll_hold),
        ("stream_retry", running.stream_retry != new.stream_retry),
        ("ca_file and tls_pin", running.tls != new.tls),
        ("status", running.status != new.status),
    ];
    differs
        .into_iter()
        .filter(|(_, differs)| *differs)
        .map(|(what, _)| format!("{what} changed: it applies when the agent restarts"))
        .collect()
}

/// Keeps a session with the station for as long as the agent runs.
async fn keep_session(shared: &Arc<Shared>) {
    let mut backoff = Backoff::new();
    // Another agent with our key holds the session: knock rarely.
    let mut key_in_use = Backoff::between(KEY_IN_USE_FIRST, KEY_IN_USE_LAST);
    loop {
        // A stopping agent opens nothing new: the station must see the
        // device go offline at the Close, not meet a fresh session.
        if shared.draining.load(Ordering::Acquire) {
            return future::pending().await;
        }
        match handshake(shared).await {
            Ok((tunnel, incoming, session)) => {
                backoff.reset();
                key_in_use.reset();
                log::info!(
                    "connected to the station via {} (session {}, carrier {:?})",
                    shared.client.describe(),
                    carrier::short(&session),
                    shared.carrier
                );
                shared.record.session_began(carrier::short(&session));
                shared.set_current(Some((tunnel.clone(), session)));
                let reason = run_session(shared, &tunnel, session, incoming).await;
                shared.set_current(None);
                shared.record.session_ended(&tunnel.stats());
                if shared.draining.load(Ordering::Acquire) {
                    log::info!(
                        "session {} closed: the agent is stopping",
                        carrier::short(&session)
                    );
                } else {
                    log::warn!("session {} ended: {reason}", carrier::short(&session));
                    shared.record.error(format!("session ended: {reason}"));
                }
            }
            Err(e) => {
                let delay = match e {
                    CarrierError::KeyInUse(_) => key_in_use.delay(),
                    // Told when: the crowd this agent is part of spreads
                    // over what the station admits, and the backoff does
                    // not grow past it.
                    CarrierError::Busy(wait) => backoff.after(wait),
                    _ => backoff.delay(),
                };
                log::warn!("cannot start a session: {e}; retrying in {:.1} s", delay.as_secs_f32());
                shared.record.error(format!("cannot start a session: {e}"));
                smol::Timer::after(delay).await;
            }
        }
    }
}

/// A new session, with the first pinned station key that works: while the
/// station's key is replaced, an agent pins both and the station may hold
/// either.
async fn handshake(
    shared: &Shared,
) -> Result<(Arc<Tunnel>, smol::channel::Receiver<Incoming>, SessionId), CarrierError> {
    let mut session = [0u8; crypto::SESSION_ID_LEN];
    getrandom::fill(&mut session).map_err(CarrierError::Random)?;
    let (initiator, reply) = with_station_keys(shared, |own, station| async move {
        let (initiator, msg) =
            crypto::initiate(&own, &station, &session).map_err(CarrierError::Handshake)?;
        // The station keeps the session alive at the agent's interval too.
        let keepalive = carrier::hello_query(shared.limits.keepalive);
        let path = shared.client.path(&session, Verb::Hello, Some(&keepalive));
        let sent = Instant::now();
        let reply = handshake_exchange(shared, &path, &msg).await?;
        shared.shape.hello_took(sent.elapsed());
        Ok((initiator, reply))
    })
    .await?;
    let transport = initiator.finish(&reply).map_err(CarrierError::Handshake)?;
    let (tunnel, incoming) = Tunnel::new(Side::Agent, transport, shared.limits.clone());
    Ok((tunnel, incoming, session))
}

/// Renews the keys of the running session `session` with the agent's keys
/// now (a device or station key rotation): its streams carry on.
async fn renew_keys(
    shared: &Shared,
    tunnel: &Tunnel,
    session: SessionId,
) -> Result<PublicKey, CarrierError> {
    let (initiator, reply, station) = with_station_keys(shared, |own, station| async move {
        let (initiator, msg) =
            crypto::initiate(&own, &station, &session).map_err(CarrierError::Handshake)?;
        let mut body = carrier::rekey_body(&msg);
        // Sealed with the session's current keys: proves the request is
        // ours and fresh.
        tunnel.seal_ack(&mut body);
        let path = shared.client.path(&session, Verb::Rekey, None);
        let reply = handshake_exchange(shared, &path, &body).await?;
        Ok((initiator, reply, station))
    })
    .await?;
    tunnel.rekey(initiator.finish(&reply).map_err(CarrierError::Handshake)?);
    Ok(station)
}

/// Runs `attempt` with the agent's key and each pinned station key in
/// turn, starting with the one that worked last, until the station can
/// read the handshake (it answers 400 to one made for a key it lacks).
async fn with_station_keys<T, F, Fut>(shared: &Shared, attempt: F) -> Result<T, CarrierError>
where
    F: Fn(PrivateKey, PublicKey) -> Fut,
    Fut: std::future::Future<Output = Result<T, CarrierError>>,
{
    let (own, station, first) = {
        let keys = lock(&shared.keys);
        (keys.own.clone(), keys.station.clone(), keys.working)
    };
    let mut tried = 0;
    loop {
        let index = (first + tried) % station.len();
        match attempt(own.clone(), station[index]).await {
            Ok(done) => {
                lock(&shared.keys).working = index;
                return Ok(done);
            }
            Err(e @ CarrierError::Status { status: 400, who: Who::Station, .. }) => {
                if tried + 1 == station.len() {
                    let pinned: Vec<String> = station.iter().map(PublicKey::fingerprint).collect();
                    return Err(CarrierError::StationKeyWrong(pinned.join(", ")));
                }
                log::info!(
                    "the station could not read a handshake for its key {} ({e}); trying the next pinned key",
                    station[index].fingerprint()
                );
                tried += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends a handshake message on `path` and returns the station's reply.
async fn handshake_exchange(
    shared: &Shared,
    path: &str,
    body: &[u8],
) -> Result<Vec<u8>, CarrierError> {
    let mut conn = None;
    let mut reply = Vec::new();
    let mut collect = |bytes: &[u8]| {
        reply.extend_from_slice(bytes);
        Ok(())
    };
    shared
        .client
        .exchange(&mut conn, path, body, REPLY_TIMEOUT, MAX_HANDSHAKE as u64, &mut collect)
        .await
        .map_err(|e| match e {
            CarrierError::Status { status: 403, who: Who::Station, .. } => {
                CarrierError::KeyRefused(lock(&shared.keys).own.public_key().to_base64())
            }
            CarrierError::Status { status: 409, who: Who::Station, .. } => {
                CarrierError::KeyInUse(lock(&shared.keys).own.public_key().fingerprint())
            }
            other => other,
        })?;
    Ok(reply)
}

/// Runs the session's lanes, timers and reverse streams until it ends.
async fn run_session(
    shared: &Arc<Shared>,
    tunnel: &Arc<Tunnel>,
    session: SessionId,
    incoming: smol::channel::Receiver<Incoming>,
) -> CloseReason {
    let scope = Scope::new();
    scope.spawn(lanes::carry(shared.clone(), tunnel.clone(), session));
    let services = {
        let (shared, tunnel) = (shared.clone(), tunnel.clone());
        async move {
            let streams = Scope::new();
            while let Ok(stream) = incoming.recv().await {
                streams.spawn(open_service(shared.clone(), tunnel.clone(), stream));
            }
        }
    };
    scope.spawn(services);
    tunnel.run_timers().await
}

/// Serves a stream the station opened to one of our named services.
///
/// The stream's name is the service name, optionally followed by a newline
/// and who asked for it (the station's monitoring client), for our logs
/// only: config forbids control characters in names, so the split is
/// unambiguous. Only services from our own `[services]` are opened; the
/// station cannot name an address.
async fn open_service(shared: Arc<Shared>, tunnel: Arc<Tunnel>, stream: Incoming) {
    let Incoming { id, name } = stream;
    let (service, who) = match name.split_once('\n') {
        Some((service, client)) => (service, format!("station client {client} (stream {id})")),
        None => (name.as_str(), format!("station stream {id}")),
    };
    let services = lock(&shared.services).clone();
    let address = match services.get(service) {
        Some(Service::Tcp(address)) => address.clone(),
        Some(Service::Serial(config)) => {
            serial::serve_console(&shared, &tunnel, id, service, who, config).await;
            return;
        }
        None => {
            log::warn!("{who} asked for unknown service {service:?}; refused");
            tunnel.reset(id, &format!("the device has no service named {service:?}"));
            return;
        }
    };
    match connect(address.as_str(), CONNECT_TIMEOUT).await {
        Ok(socket) => {
            log::debug!("service {service} ({address}): {who}");
            endpoint::tcp::pump(&tunnel, id, socket).await;
        }
        Err(e) => {
            log::warn!("service {service} ({address}) for {who}: {e}");
            tunnel.reset(id, &format!("service {service}: {e}"));
        }
    }
}
