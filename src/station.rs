//! The station: serves the HTTP carrier, authenticates devices, and
//! connects their streams to the targets they are allowed to open.
//!
//! ```text
//! TCP accept ─▶ connection task ─▶ carrier request (hello/down/up/poll/push)
//!                                        │
//!   sessions: id ─▶ Live { device, Tunnel, scope } ─▶ stream opened ─▶ allow? ─▶ connect target ─▶ pump
//!
//! expose listener (one per [devices.expose] entry) ─accept─▶ device's live session?
//!   ├ none: close the client at once, log
//!   └ open stream "service\nclient" ─▶ pump (the agent opens the service or resets the stream)
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

use crate::admission::{
    Full, HandshakeBudget, RejectLog, Slot, Slots, MAX_CONNECTIONS, MAX_STRANGERS,
};
use crate::carrier::conn::{HttpConn, MIN_READ_BUF_BYTES};
use crate::carrier::http::{self, BodyKind, HttpError, RequestHead, CHUNK_END, LAST_CHUNK};
use crate::carrier::{self, Verb, DOWN_BODY_MAX, POLL_BODY_MAX, STREAM_CHUNK};
use crate::config::StationConfig;
use crate::core::session::{Lane, Limits};
use crate::core::streams::Side;
use crate::crypto::{self, RecordReader, SessionId, MAX_HANDSHAKE, MAX_RECORD};
use crate::keys::{PrivateKey, PublicKey};
use crate::task::Scope;
use crate::tunnel::{Incoming, LaneEnd, Tunnel};

/// Time a client has to send a complete request head once it connected or
/// finished its previous request. Agents send at once; 10 s is generous.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle time allowed between requests on a kept-alive connection: longer
/// than an agent's longest pause between polls.
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// Time to read a bounded body (poll, push) from a connection that has
/// carried an authentic packet; strangers get [`HEAD_TIMEOUT`] for theirs.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a target has to accept a connection before the stream is refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Distinct unknown device keys remembered so each is logged once.
const UNKNOWN_KEYS_LOGGED: usize = 1024;

/// Header fields of every carrier reply.
const REPLY_HEADERS: [(&str, &str); 3] = [
    ("Content-Type", "application/octet-stream"),
    ("Cache-Control", "no-store"),
    carrier::STATION_MARK,
];

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

/// A reverse listener: clients connecting here reach `service` on a device.
struct Expose {
    listener: TcpListener,
    device: PublicKey,
    device_name: String,
    service: String,
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

async fn deadline<T>(
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    future::or(work, async {
        smol::Timer::after(limit).await;
        Err(HttpError::Timeout)
    })
    .await
}

/// How a request ended, for the connection loop.
enum Outcome {
    /// Answered in full; the connection may serve another request.
    Done,
    /// Refused with this status and reason (for the log; `None` when
    /// logged already); the connection closes after it.
    Refuse(u16, Option<String>),
    /// Nothing more can be written (the peer left or a stream response ended).
    Close,
}

async fn serve_connection(shared: Arc<Shared>, socket: TcpStream, peer: SocketAddr, slot: Slot) {
    let mut conn = HttpConn::with_capacity(socket, MIN_READ_BUF_BYTES);
    let mut slot = slot;
    let mut first = true;
    loop {
        let wait = if first { HEAD_TIMEOUT } else { IDLE_TIMEOUT };
        first = false;
        let head = match deadline(wait, conn.read_request()).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                if !matches!(e, HttpError::Io(_) | HttpError::UnexpectedEof) || !slot.is_proven() {
                    refuse_log(&shared, peer, e.status(), &format!("bad request: {e}"));
                }
                if !matches!(e, HttpError::Io(_) | HttpError::UnexpectedEof) {
                    let _ = conn.write_all(&http::error_response(e.status())).await;
                }
                return;
            }
        };
        let keep_alive = head.keep_alive;
        let outcome = match handle(&shared, &mut conn, &head, peer, &mut slot).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Refuse(e.status(), Some(e.to_string())),
        };
        match outcome {
            Outcome::Done if keep_alive => continue,
            Outcome::Done | Outcome::Close => return,
            Outcome::Refuse(status, reason) => {
                if let Some(reason) = reason {
                    let what = format!("{} {}: {reason}", head.method, head.target);
                    refuse_log(&shared, peer, status, &what);
                }
                let _ = conn.write_all(&http::error_response(status)).await;
                return;
            }
        }
    }
}

/// Logs a refusal, within the budget of [`RejectLog`].
fn refuse_log(shared: &Shared, peer: SocketAddr, status: u16, what: &str) {
    let (own_line, summary) = lock(&shared.rejects).admit(Instant::now());
    if let Some(count) = summary {
        log::info!("{count} more requests were refused in the last minute (not logged each)");
    }
    if own_line {
        log::info!("{peer}: refused with {status}: {what}");
    }
}

async fn handle(
    shared: &Arc<Shared>,
    conn: &mut HttpConn<TcpStream>,
    head: &RequestHead,
    peer: SocketAddr,
    slot: &mut Slot,
) -> Result<Outcome, HttpError> {
    let Some((session, verb)) = carrier::parse_path(&head.target) else {
        return Ok(refuse(404, "not a carrier path"));
    };
    if head.method != "POST" {
        return Ok(refuse(405, "carrier requests are POST"));
    }
    if verb == Verb::Hello {
        return hello(shared, conn, head, session, peer, slot).await;
    }
    let Some(live) = lock(&shared.sessions).get(&session).cloned() else {
        return Ok(refuse(404, "no such session (the station restarted or it timed out)"));
    };
    let req = Request { shared, head, live: &live, slot };
    match verb {
        Verb::Hello => unreachable!("handled above"),
        Verb::Down => down(req, conn).await,
        Verb::Up => up(req, conn).await,
        Verb::Poll => poll(req, conn).await,
        Verb::Push => push(req, conn).await,
    }
}

fn refuse(status: u16, reason: &str) -> Outcome {
    Outcome::Refuse(status, Some(reason.to_owned()))
}

/// What the handlers of a known session's requests work with.
struct Request<'a> {
    shared: &'a Arc<Shared>,
    head: &'a RequestHead,
    live: &'a Arc<Live>,
    slot: &'a mut Slot,
}

impl Request<'_> {
    /// Time to read a bounded body: strangers get less.
    fn body_timeout(&self) -> Duration {
        if self.slot.is_proven() {
            BODY_TIMEOUT
        } else {
            HEAD_TIMEOUT
        }
    }

    /// Feeds a bounded body of records to the session. A body without an
    /// authentic packet, or with a forged or replayed one, gets nothing but
    /// the refusal this returns.
    fn receive_body(&mut self, body: &[u8]) -> Result<(), Outcome> {
        let mut reader = RecordReader::default();
        let mut scratch = Vec::new();
        match self.live.tunnel.receive(body, &mut reader, &mut scratch) {
            Ok(authentic) if authentic > 0 && reader.is_clean() => {
                self.proven();
                Ok(())
            }
            Ok(_) => Err(refuse(403, "no authentic packet in the body")),
            Err(e) => Err(refuse(403, &format!("{e} (changed on the way, or replayed)"))),
        }
    }

    /// The request carried an authentic packet.
    fn proven(&mut self) {
        self.slot.promote();
        confirm(self.shared, self.live);
    }
}

async fn read_body(
    conn: &mut HttpConn<TcpStream>,
    head: &RequestHead,
    max: u64,
    limit: Duration,
) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    deadline(limit, conn.body(head.body, Some(max)).read_to_end(&mut body)).await?;
    Ok(body)
}

async fn respond(
    conn: &mut HttpConn<TcpStream>,
    keep_alive: bool,
    body: &[u8],
) -> Result<Outcome, HttpError> {
    let mut out = Vec::with_capacity(128 + body.len());
    let kind = BodyKind::Length(body.len() as u64);
    http::write_response_head(&mut out, 200, "OK", &REPLY_HEADERS, kind, keep_alive);
    out.extend_from_slice(body);
    conn.write_all(&out).await?;
    Ok(Outcome::Done)
}

async fn hello(
    shared: &Arc<Shared>,
    conn: &mut HttpConn<TcpStream>,
    head: &RequestHead,
    session: SessionId,
    peer: SocketAddr,
    slot: &mut Slot,
) -> Result<Outcome, HttpError> {
    let msg = read_body(conn, head, MAX_HANDSHAKE as u64, HEAD_TIMEOUT).await?;
    // The Diffie-Hellman work below is what strangers could make us do
    // for free: it is rationed.
    if !lock(&shared.handshakes).take(Instant::now()) {
        return Ok(refuse(503, "too many handshakes this second; the agent retries later"));
    }
    let responder = match crypto::respond(&shared.key, &msg) {
        Ok(responder) => responder,
        Err(e) => return Ok(refuse(400, &format!("not a postern handshake: {e}"))),
    };
    let Some(device) = shared.devices.get(&responder.device) else {
        log_unknown_key(shared, &responder.device, peer);
        return Ok(Outcome::Refuse(403, None));
    };
    if responder.session_id != session || lock(&shared.sessions).contains_key(&session) {
        return Ok(refuse(400, "handshake for a session id it does not own"));
    }
    let device_key = responder.device;
    let (reply, transport) = match responder.accept() {
        Ok(accepted) => accepted,
        Err(e) => {
            log::warn!("{peer}: handshake with device {} failed: {e}", device.name);
            return Ok(Outcome::Refuse(400, None));
        }
    };
    slot.promote();
    let (tunnel, incoming) = Tunnel::new(Side::Station, transport, shared.limits);
    let live = Arc::new(Live {
        id: session,
        device: device_key,
        name: device.name.clone(),
        tunnel,
        scope: Scope::new(),
        confirmed: AtomicBool::new(false),
    });
    lock(&shared.sessions).insert(session, live.clone());
    log::info!(
        "device {} handshake from {peer} (session {})",
        device.name,
        carrier::short(&session)
    );
    let task_shared = shared.clone();
    shared.scope.spawn(drive_session(task_shared, live, incoming));
    respond(conn, head.keep_alive, &reply).await
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

/// Accepts monitoring clients on a reverse listener for as long as the
/// station runs, and carries each to the device's service.
async fn accept_exposed(shared: Arc<Shared>, expose: Expose) {
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

async fn down(mut req: Request<'_>, conn: &mut HttpConn<TcpStream>) -> Result<Outcome, HttpError> {
    let (head, live) = (req.head, req.live);
    let body = read_body(conn, head, DOWN_BODY_MAX, req.body_timeout()).await?;
    if let Err(refused) = req.receive_body(&body) {
        return Ok(refused);
    }
    let lane = live.tunnel.begin_lane(Lane::Data);
    // An HTTP/1.0 hop (nginx's default upstream protocol) cannot take a
    // chunked response; the body then ends when the connection closes.
    let chunked = head.minor_version >= 1;
    let body = if chunked { BodyKind::Chunked } else { BodyKind::UntilClose };
    let mut out = Vec::with_capacity(STREAM_CHUNK + MAX_RECORD + 64);
    let mut headers = REPLY_HEADERS.to_vec();
    // nginx streams a response that asks for it; other buffering proxies
    // are found out by the agent, which then switches to poll.
    headers.push(("X-Accel-Buffering", "no"));
    http::write_response_head(&mut out, 200, "OK", &headers, body, false);
    // A record at once, so the agent can tell a streaming path from one
    // that holds back the response.
    let mut first = true;
    loop {
        let frame_at = out.len();
        if chunked {
            // Room for a fixed-width size line, filled in once the size is known.
            out.extend_from_slice(b"00000000\r\n");
        }
        let records_at = out.len();
        let sent = if first {
            first = false;
            live.tunnel.seal_ack(&mut out);
            Ok(())
        } else {
            live.tunnel.transmit(lane, &mut out, STREAM_CHUNK).await
        };
        match sent {
            Ok(()) => {
                if chunked {
                    let size = format!("{:08x}", out.len() - records_at);
                    out[frame_at..frame_at + 8].copy_from_slice(size.as_bytes());
                    out.extend_from_slice(CHUNK_END);
                }
                conn.write_all(&out).await?;
                out.clear();
            }
            Err(end) => {
                if let LaneEnd::Closed(reason) = &end {
                    log::debug!("device {}: downlink ends: {reason}", live.name);
                }
                out.truncate(frame_at);
                if chunked {
                    out.extend_from_slice(LAST_CHUNK);
                }
                conn.write_all(&out).await?;
                return Ok(Outcome::Close);
            }
        }
    }
}

async fn up(mut req: Request<'_>, conn: &mut HttpConn<TcpStream>) -> Result<Outcome, HttpError> {
    let (head, live) = (req.head, req.live);
    // A long body streams through this buffer: give it the full size. The
    // session id in the path bounds who gets this far to those who saw it.
    conn.grow();
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    {
        let mut body = conn.body(head.body, None);
        // The first bytes must come promptly; after that an uplink may idle
        // as long as the session does (keepalives arrive well within it).
        let mut wait = HEAD_TIMEOUT;
        while let Some(bytes) = deadline(wait, body.next()).await? {
            wait = req.shared.limits.idle_timeout;
            let authentic = match live.tunnel.receive(bytes, &mut reader, &mut scratch) {
                Ok(n) => n,
                Err(e) => return Ok(refuse(400, &e.to_string())),
            };
            if authentic > 0 && !req.slot.is_proven() {
                req.proven();
            }
            if !req.slot.is_proven() && reader.is_clean() {
                return Ok(refuse(403, "no authentic packet in the uplink"));
            }
        }
    }
    respond(conn, head.keep_alive, &[]).await
}

async fn poll(mut req: Request<'_>, conn: &mut HttpConn<TcpStream>) -> Result<Outcome, HttpError> {
    let (head, live) = (req.head, req.live);
    let body = read_body(conn, head, POLL_BODY_MAX as u64, req.body_timeout()).await?;
    if let Err(refused) = req.receive_body(&body) {
        return Ok(refused);
    }
    let lane = live.tunnel.begin_lane(Lane::Sequenced);
    let mut out = Vec::new();
    let hold = carrier::poll_wait(&head.target);
    let wait = async {
        smol::Timer::after(hold).await;
        Ok(())
    };
    // Superseded or closed: answer with just an ack; the agent moves on.
    let _ = future::or(live.tunnel.transmit(lane, &mut out, POLL_BODY_MAX), wait).await;
    if out.is_empty() {
        live.tunnel.seal_ack(&mut out);
    }
    respond(conn, head.keep_alive, &out).await
}

async fn push(mut req: Request<'_>, conn: &mut HttpConn<TcpStream>) -> Result<Outcome, HttpError> {
    let (head, live) = (req.head, req.live);
    let max = POLL_BODY_MAX as u64 + MAX_RECORD as u64;
    let body = read_body(conn, head, max, req.body_timeout()).await?;
    if let Err(refused) = req.receive_body(&body) {
        return Ok(refused);
    }
    let mut out = Vec::new();
    live.tunnel.seal_ack(&mut out);
    respond(conn, head.keep_alive, &out).await
}
